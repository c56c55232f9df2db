"""Routing micro-benchmark: how long the router takes to decide where a long
prompt goes, with a large store index.

Setup (synthetic token ids, seeded): a store with `checkpoints` rows, 16 of them
waypoints on the measured prompt's own path (every 2048 tokens), the rest other
sessions that share its first 1024 tokens (the system block) and then diverge;
two workers, one whose live state holds the prompt minus its last 512 tokens.
Measured: `Dispatcher.prepare` (worker choice over the live states + the
longest-prefix lookup in the LMDB index + metrics), the path every request takes
after tokenization. Tokenizing a prompt of the same length with the default
model's tokenizer is measured apart.

Rows are inserted straight into the index in large write transactions (the
payload files are not written: lookup never reads them), so setup takes seconds.
"""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvrouter.router.bench.report import percentile

SYSTEM_TOKENS = 1024
WAYPOINT_EVERY = 2048


@dataclass
class _Worker:
    """What routing reads of a worker client (name, health)."""

    name: str
    healthy: bool = True


def build_index(store, model_id: str, prompt: list[int], checkpoints: int, rng: random.Random) -> int:
    """Inserts `checkpoints` rows (see module docstring). Returns tokens stored in total."""
    from kvrouter.cachestore import Entry
    from kvrouter.cachestore.keys import pack_tokens

    rows: list[tuple[Entry, bytes]] = []
    own = [prompt[:n] for n in range(WAYPOINT_EVERY, len(prompt), WAYPOINT_EVERY)][:16]
    others = checkpoints - len(own)
    for i in range(checkpoints):
        if i < len(own):
            tokens, kind = own[i], "waypoint"
        else:
            tail = rng.randint(64, 1024)
            tokens = prompt[:SYSTEM_TOKENS] + [rng.randrange(49152) for _ in range(tail)]
            kind = "anchor" if i % 5 == 0 else "evict"
        now = time.time()
        entry = Entry(id=uuid.uuid4().hex, kind=kind, namespace="", model_id=model_id, n_tokens=len(tokens),
                      payload_name="absent.safetensors", payload_bytes=46 * 1024 * len(tokens), checksum="0",
                      created=now, last_used=now, hits=0)
        rows.append((entry, pack_tokens(tokens)))
    total = 0
    for start in range(0, len(rows), 500):
        batch = rows[start:start + 500]

        def add(txn, batch=batch):
            for entry, packed in batch:
                txn.add_entry(entry, packed)

        store.index.write(add)
        total += sum(e.n_tokens for e, _ in batch)
    assert others >= 0
    return total


def run_routing_bench(checkpoints: int = 10_000, prompt_tokens: int = 32_768, cache_dir: Path | None = None,
                      model: str | None = None, iterations: int = 2000, seed: int = 0) -> dict:
    """Returns decision p50/p99/max in ms, tokenization ms, and the setup."""
    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.router.dispatch import Dispatcher, Job
    from kvrouter.router.cluster import Cluster, ServedModel
    from kvrouter.router.leases import Leases
    from kvrouter.router.metrics import create_metrics

    rng = random.Random(seed)
    prompt = [rng.randrange(49152) for _ in range(prompt_tokens)]
    with tempfile.TemporaryDirectory(prefix="kvrouter-routing-") as tmp:
        store = CheckpointStore(StoreConfig(directory=Path(tmp), disk_budget_bytes=2**50))
        try:
            t0 = time.perf_counter()
            stored_tokens = build_index(store, "bench-model", prompt, checkpoints, rng)
            setup_s = time.perf_counter() - t0
            workers = [_Worker("w0"), _Worker("w1")]
            cluster = Cluster(workers, store)
            cluster.view("w0").lives = {1: ("", tuple(prompt[:-512]))}
            cluster.view("w1").lives = {1: ("", tuple(prompt[:SYSTEM_TOKENS] + [7] * 2000))}
            served = ServedModel("bench", "bench-model", prompt_tokens * 2, tokenizer=None, workers=workers)
            job = Job(model=served, tokens=tuple(prompt), anchor_tokens=0, max_tokens=1, temperature=0.0,
                      top_p=1.0, seed=None)
            leases = Leases()
            dispatcher = Dispatcher(cluster, leases, create_metrics())
            with leases.hold("w1", 1.0, 0.0):  # w1 has a request in flight
                route = dispatcher.prepare(job)
                dispatcher.finish(route)
                for _ in range(50):  # warm the page cache and the interpreter
                    dispatcher.finish(dispatcher.prepare(job))
                times = []
                for _ in range(iterations):
                    t = time.perf_counter()
                    decided = dispatcher.prepare(job)
                    times.append((time.perf_counter() - t) * 1000)
                    dispatcher.finish(decided)
            lookup_times = []
            for _ in range(iterations // 4):
                t = time.perf_counter()
                store.lookup("bench-model", "", prompt)
                lookup_times.append((time.perf_counter() - t) * 1000)
            point_reads = store.index.point_reads
        finally:
            store.close()
    tokenize = _tokenize_ms(prompt_tokens, cache_dir, model)
    return {
        "checkpoints": checkpoints,
        "prompt_tokens": prompt_tokens,
        "stored_tokens": stored_tokens,
        "setup_seconds": round(setup_s, 2),
        "route": {"worker": route.worker, "reason": route.reason, "predicted_cached": route.predicted_cached},
        "iterations": iterations,
        "decision_p50_ms": round(percentile(times, 50), 4),
        "decision_p99_ms": round(percentile(times, 99), 4),
        "decision_max_ms": round(max(times), 4),
        "store_lookup_p50_ms": round(percentile(lookup_times, 50), 4),
        "store_lookup_p99_ms": round(percentile(lookup_times, 99), 4),
        "index_point_reads_total": point_reads,
        **tokenize,
    }


def _tokenize_ms(prompt_tokens: int, cache_dir: Path | None, model: str | None) -> dict:
    """Rendering + tokenizing an agent conversation of about `prompt_tokens` tokens with the
    model's tokenizer and chat template, as the router does (reported apart from the
    decision): in full (`tokenize_ms`), and again after one more turn was appended, when
    the router tokenizes only what is new (`tokenize_incremental_ms`, the hit path of an
    agent client that resends the conversation). Medians of 5 runs. Skipped (None)
    without a cache directory."""
    if cache_dir is None:
        return {"tokenize_tokens": None, "tokenize_ms": None, "tokenize_incremental_ms": None}
    from kvrouter.router.bench.tokenize import model_tokenizer
    from kvrouter.router.bench.workload import WORDS

    rng = random.Random(1)
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    system = say(int(prompt_tokens * 0.6))
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": say(int(prompt_tokens * 0.35 / 20))}
             for i in range(20)]
    messages = [{"role": "system", "content": system}, *turns, {"role": "user", "content": say(60)}]
    full, incremental = [], []
    for _ in range(5):
        tok = model_tokenizer(model, cache_dir)  # fresh: nothing seen
        t = time.perf_counter()
        n = len(tok.chat_prompt(messages[:-2]).tokens)
        full.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        n = len(tok.chat_prompt(messages).tokens)  # the same conversation, one turn longer
        incremental.append((time.perf_counter() - t) * 1000)
    return {"tokenize_tokens": n, "tokenize_ms": round(sorted(full)[2], 2),
            "tokenize_incremental_ms": round(sorted(incremental)[2], 2)}
