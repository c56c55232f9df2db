"""The GPU measurement driver (issue 15, "How it is measured"): one run against an
mlx-lm model directory that writes one JSON report.

    python -P -m kvrouter.router.bench.accelerator --model DIR --out FILE.json \\
        [--mlx-server] [--lengths 8192,32768] [--budget-s 540] [--parts cold,hits,compare,prefill]

Parts, in priority order (a part that no longer fits `--budget-s` is skipped and
the report says why under `skipped`; the JSON is rewritten after every step, so a
run killed from outside still leaves what it measured):

1. `cold`: time to first token (TTFT) of a cold prompt with the store on vs
   `kvrouter serve --no-kv-cache`, at each length: a shared prefix (the system
   message, length - message tokens) + a user message of about 500 tokens (a
   quarter of the length below 2,000 tokens), as issue 15's table; plus, with the
   store on, a live-state hit (same prefix, another message: the suffix prefill).
2. `hits`: the store server restarted (same store directory, `--decode-concurrency 1`
   so an unrelated request drops the live state); per length, with the page cache
   dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only), a disk hit vs
   its bound (payload bytes ÷ cold read bandwidth + the live-state hit's TTFT as the
   suffix prefill), then a RAM-tier hit vs its bound (live-state hit + bytes ÷ the
   device's copy bandwidth, `worker.bench_copy`). The cold read bandwidth is read
   from the largest payload file in the store, page cache dropped before and after.
   Also load-or-recompute at each length: the disk hit's TTFT against the
   `--no-kv-cache` cold TTFT, and which one the router took.
3. `compare`: `kvrouter bench --compare --targets kvrouter[,mlx_lm.server]
   --sessions 16 --concurrency 4 --system-words 5000 --max-tokens 16 --model DIR`
   with default flags, as subprocesses, one program each (kvrouter first, so its
   figures survive a budget cut); their summaries (per-request records left out) and
   the bench's ratios to mlx_lm.server.
4. `prefill`: `python -P -m kvrouter.worker.bench_prefill --model DIR
   --through-engine --tokens MAX_LENGTH --json FILE` (worker vs the plain in-process
   loop).

5. `load_or_recompute`: `python -P -m
   kvrouter.worker.bench_load_or_recompute --model DIR --tokens 2048 ... 32768
   --json FILE` (in process: the worker's decision, both predictions, both real
   times).
6. `hits_inproc`: `python -P -m kvrouter.worker.bench_hits --model DIR --tokens
   LENGTHS --json FILE` (in process, the worker's load path: a disk hit and a
   RAM-tier hit against their bounds; through the server the worker may rightly
   recompute instead of loading, and then the `hits` part measures no load).

One server process at a time; each is stopped before the next starts. Requests go
through the bench's own client (`router.bench.client.run_workload`, the official
`openai` client); figures in seconds, bytes and tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from kvrouter.worker.launch import module_command

PARTS = ("cold", "hits", "compare", "prefill", "load_or_recompute", "hits_inproc")
LOR_GRID = (2048, 4096, 8192, 16384, 32768)  # issue 15: load-or-recompute at 2K..32K
# Least seconds a part needs left to be worth starting (a server start, a warm-up
# and one request on the H200 take 30-60 s: issue 15's kit notes ~20 s of kernel
# compilation on a fresh machine).
PART_MIN_S = {"cold": 30.0, "hits": 30.0, "compare": 60.0, "prefill": 20.0, "load_or_recompute": 20.0,
              "hits_inproc": 20.0}
STOP_RESERVE_S = 25.0  # kept back for stopping a server (shutdown checkpoints)
MESSAGE_TOKENS = 500  # the table: 7,680-token prefix + 500-token message at 8K
BENCH_FLAGS = ("--sessions", "16", "--concurrency", "4", "--system-words", "5000", "--max-tokens", "16")
WORDS = ("the build test file module function return value error check config cache token request worker "
         "router store index prefix session model prompt stream client server thread queue state load write "
         "read commit branch merge diff patch status log trace metric latency budget policy anchor waypoint "
         "evict restart process memory disk payload checksum header route retry health python shell path "
         "option default flag parser schema field type class method argument result list tuple string").split()


@dataclass(frozen=True)
class DriverConfig:
    """The driver's flags, parsed. lengths: prompt lengths in tokens, ascending;
    budget_s: wall-clock seconds for the whole run, server starts included."""

    model: Path
    out: Path
    mlx_server: bool
    lengths: tuple[int, ...]
    budget_s: float
    parts: tuple[str, ...]
    cache_dir: Path
    work_dir: Path | None

    def as_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


def parse_lengths(value: str) -> tuple[int, ...]:
    """--lengths: comma-separated prompt lengths in tokens, each at least 256; returned
    ascending without repeats. Raises argparse.ArgumentTypeError."""
    try:
        names = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers separated by commas, got {value!r}") from None
    if not names or min(names) < 256:
        raise argparse.ArgumentTypeError(f"give one or more lengths of at least 256 tokens, got {value!r}")
    return tuple(sorted(set(names)))


def parse_parts(value: str) -> tuple[str, ...]:
    """--parts: comma-separated names from PARTS, run in PARTS order. Raises argparse.ArgumentTypeError."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in PARTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(bad) or '(none)'}; choose from {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in names)


def _positive(value: str) -> float:
    v = float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -P -m kvrouter.router.bench.accelerator",
        description="Measure what issue 15 lists (cold TTFT with and without the store, disk and RAM-tier "
                    "hits against their bounds, load-or-recompute, bench --compare, long prefill through the "
                    "worker) for one mlx-lm model directory, within a time budget, into one JSON file.")
    p.add_argument("--model", type=Path, required=True, help="an mlx-lm model directory (config.json, weights, "
                                                              "tokenizer files)")
    p.add_argument("--out", type=Path, required=True, help="the JSON report to write (rewritten after every step)")
    p.add_argument("--mlx-server", action="store_true",
                   help="also run mlx_lm.server in the compare part (--targets kvrouter,mlx_lm.server); "
                        "without it, kvrouter alone")
    p.add_argument("--lengths", type=parse_lengths, default=(8192, 32768), metavar="N[,N...]",
                   help="prompt lengths in tokens (default 8192,32768): shared prefix + a ~500-token message")
    p.add_argument("--budget-s", type=_positive, default=540.0,
                   help="seconds for the whole run, server starts and stops included (default 540: one "
                        "10-minute device call with room for setup); parts that no longer fit are skipped")
    p.add_argument("--parts", type=parse_parts, default=PARTS, metavar="NAME[,NAME...]",
                   help=f"which parts to run, always in priority order ({', '.join(PARTS)}; default all)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="kvrouter's cache directory for the servers (default: kvrouter's default)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where stores, logs and bench output go (default: a new temporary directory)")
    return p


def parse_args(argv: list[str] | None = None) -> DriverConfig:
    """The driver's command line -> DriverConfig. Exits with status 2 on bad flags (argparse)."""
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.cache_dir is None:
        from kvrouter.worker.config import default_cache_dir

        ns.cache_dir = default_cache_dir()
    return DriverConfig(model=ns.model.expanduser(), out=ns.out, mlx_server=ns.mlx_server, lengths=ns.lengths,
                        budget_s=ns.budget_s, parts=ns.parts, cache_dir=ns.cache_dir, work_dir=ns.work_dir)


# ---- the report -------------------------------------------------------------

def new_report(cfg: DriverConfig) -> dict:
    """The report's skeleton: config, host, one key per part in `parts` (None until
    measured), `skipped` (part -> why), `notes`, `summary` (see `summarize`), `elapsed_s`."""
    return {
        "driver": "kvrouter.router.bench.accelerator",
        "config": cfg.as_json(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "root": hasattr(os, "geteuid") and os.geteuid() == 0},
        "parts": {p: None for p in PARTS},
        "skipped": {},
        "notes": [],
        "summary": {},
        "elapsed_s": 0.0,
    }


def skip(report: dict, part: str, why: str) -> None:
    """Records that `part` (or a step of it, e.g. "hits.ram") was not measured, and why."""
    report["skipped"][part] = why
    print(f"skipping {part}: {why}", file=sys.stderr)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to 3 places; None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 3)


def disk_hit_bound_s(payload_bytes: float, read_bytes_per_s: float, suffix_s: float) -> float:
    """Issue 15's bound of a disk hit, seconds: payload bytes ÷ cold read bandwidth
    (bytes/s) + the suffix prefill (seconds)."""
    return payload_bytes / read_bytes_per_s + suffix_s


def ram_hit_bound_s(live_hit_s: float, payload_bytes: float, copy_bytes_per_s: float) -> float:
    """Issue 15's bound of a RAM-tier hit, seconds: the live-state hit + payload bytes ÷
    the measured copy bandwidth (bytes/s)."""
    return live_hit_s + payload_bytes / copy_bytes_per_s


def message_tokens(length: int) -> int:
    """Tokens of the user message at prompt length `length`: 500, or a quarter of the
    length for prompts under 2,000 tokens."""
    return min(MESSAGE_TOKENS, length // 4)


def summarize(report: dict) -> dict:
    """The headline ratios of a report (see `new_report`), each keyed by prompt length
    (tokens, as a string) where it has one; None where the figure is missing:
    cold_store_vs_no_kv_cache, disk_hit_vs_bound, ram_hit_vs_bound,
    load_or_recompute_took_vs_faster, compare_vs_mlx_lm_server (the bench's ratios),
    prefill_worker_vs_plain, load_or_recompute_bench_ok (keyed "tokens page_cache"),
    inproc_disk_hit_vs_bound, inproc_ram_hit_vs_bound (the `hits_inproc` part)."""
    parts = report.get("parts") or {}
    cold = (parts.get("cold") or {}).get("lengths", {})
    hits = (parts.get("hits") or {}).get("lengths", {})
    compare = parts.get("compare") or {}
    prefill = ((parts.get("prefill") or {}).get("result") or {}).get("lengths", [])
    lor = ((parts.get("load_or_recompute") or {}).get("result") or {}).get("rows", [])
    inproc = ((parts.get("hits_inproc") or {}).get("result") or {}).get("rows", [])
    return {
        "cold_store_vs_no_kv_cache": {n: row.get("store_vs_no_kv_cache") for n, row in cold.items()},
        "disk_hit_vs_bound": {n: row.get("disk_vs_bound") for n, row in hits.items()},
        "ram_hit_vs_bound": {n: row.get("ram_vs_bound") for n, row in hits.items()},
        "load_or_recompute_took_vs_faster": {n: (row.get("load_or_recompute") or {}).get("took_vs_faster")
                                             for n, row in hits.items()},
        "compare_vs_mlx_lm_server": compare.get("ratios"),
        "prefill_worker_vs_plain": {str(r.get("tokens")): r.get("worker_vs_plain") for r in prefill},
        "load_or_recompute_bench_ok": {f"{r.get('tokens')} {r.get('page_cache')}": r.get("ok") for r in lor},
        "inproc_disk_hit_vs_bound": {str(r.get("tokens")): r.get("disk_vs_bound") for r in inproc},
        "inproc_ram_hit_vs_bound": {str(r.get("tokens")): r.get("ram_vs_bound") for r in inproc},
    }


def load_or_recompute_row(disk_request: dict, recompute_ttft: float | None) -> dict:
    """What the router chose for a prompt whose prefix is on disk, against recomputing it.
    disk_request: a `measured_ask` record (ttft seconds, source); recompute_ttft: the
    `--no-kv-cache` cold TTFT of the same length, seconds. When the router loaded,
    `faster` and `took_vs_faster` compare both; when it recomputed, the load time is
    unknown and both are None."""
    took = "load" if disk_request["source"] == "disk" else "recompute"
    row = {"router_took": took, "source": disk_request["source"], "taken_ttft": disk_request["ttft"],
           "recompute_ttft": recompute_ttft, "faster": None, "took_vs_faster": None}
    if took == "load" and recompute_ttft is not None:
        load = disk_request["ttft"]
        row["faster"] = "load" if load <= recompute_ttft else "recompute"
        row["took_vs_faster"] = ratio(load, min(load, recompute_ttft))
    return row


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def kv_bytes_per_token(config: dict) -> int:
    """KV cache bytes per token of an mlx-lm llama-style `config.json` dict: 2 (keys and
    values) × layers × KV heads × head dim × the dtype's bytes (`torch_dtype`,
    bfloat16 when absent). The Llama-3-8B shape in bf16 gives 131,072 (issue 15).
    Raises KeyError when the config lacks num_hidden_layers or the head counts."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES.get(config.get("torch_dtype"), 2)


def sized_store_flags(lengths: tuple[int, ...], bytes_per_token: int) -> list[str]:
    """Store flags that hold what the driver's prompts need (MiB, rounded up): live
    states and the RAM tier for every length at once with a quarter to spare (at
    least 256 MiB each: the sized defaults may not hold a 32K state of an 8B model),
    and a disk budget for 3× that (anchors, shutdown checkpoints; at least the
    default 4,096 MiB). The cold max covers the longest prompt (one anchor of the
    whole shared prefix at 32K, where the default 30,000 would leave a waypoint), and
    prefixes under 512 tokens (CPU test lengths) get a lower min tokens."""
    state_mib = -(-int(1.25 * sum(lengths) * bytes_per_token) // 2**20)
    min_prefix = min(n - message_tokens(n) for n in lengths)
    return ["--live-state-mb", str(max(256, state_mib)), "--kv-cache-ram-mb", str(max(256, state_mib)),
            "--kv-cache-disk-mb", str(max(4096, 3 * state_mib)),
            "--kv-cache-cold-max-tokens", str(max(30000, max(lengths))),
            "--kv-cache-min-tokens", str(min(512, min_prefix - 32))]


class Budget:
    """Seconds left of `total_s` from construction (monotonic clock)."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.t0 = time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total_s - self.used()


class OutOfBudget(Exception):
    """The budget ran out inside a part: the rest of the part is skipped."""


# ---- prompts ----------------------------------------------------------------

def _text(rng: random.Random, words: int, lead: str) -> str:
    return lead + " " + " ".join(rng.choice(WORDS) for _ in range(words))


def sized_text(encode_len, target: int, seed: int, lead: str) -> str:
    """Text whose token count (`encode_len(text)`) is close to `target` (within a few
    percent): words drawn from a seeded RNG, scaled by two measurements."""
    words = max(8, target)
    for _ in range(3):
        text = _text(random.Random(seed), words, lead)
        n = encode_len(text)
        if abs(n - target) <= max(4, target // 100):
            break
        words = max(8, int(words * target / max(n, 1)))
    return _text(random.Random(seed), words, lead)


@dataclass(frozen=True)
class LengthPrompts:
    """The prompts at one length: one shared system prefix and distinct user messages
    (cold, live, disk, ram), each about `message_tokens` tokens."""

    length: int
    prefix_tokens: int
    messages: dict

    def chat(self, which: str) -> tuple[dict, ...]:
        return tuple(self.messages[which])


def build_prompts(model_dir: Path, cache_dir: Path, lengths: tuple[int, ...]) -> dict[int, LengthPrompts]:
    """Prompts per length, sized with the model's own tokenizer and chat template.
    Each length's prefix starts with its own text (no prefix is shared between lengths)."""
    from kvrouter.router.bench.tokenize import chat_tokenizer

    encode = chat_tokenizer(str(model_dir), cache_dir)

    def user_len(text: str) -> int:
        return len(encode([{"role": "user", "content": text}])) - len(encode([{"role": "user", "content": ""}]))

    def system_len(text: str) -> int:
        return len(encode([{"role": "system", "content": text}]))

    out = {}
    for i, n in enumerate(lengths):
        m = message_tokens(n)
        system = sized_text(system_len, n - m, 1000 + i, f"Project {n} shared block {i}.")
        msgs = {}
        for j, which in enumerate(("cold", "live", "disk", "ram")):
            user = sized_text(user_len, m, 2000 + 10 * i + j, f"Question {which} {n}:")
            msgs[which] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        prefix = system_len(system)
        out[n] = LengthPrompts(n, prefix, msgs)
    return out


UNRELATED = ({"role": "user", "content": "Say the number 7."},)


# ---- requests and metrics ---------------------------------------------------

def ask(base_url: str, model: str, messages, max_tokens: int, timeout_s: float) -> dict:
    """One streamed chat request through the bench client; returns its record
    (ttft, prompt_tokens, cached_tokens, ... seconds and tokens). Raises OutOfBudget
    when it does not finish within `timeout_s`, RuntimeError when it failed."""
    from kvrouter.router.bench.client import run_workload
    from kvrouter.router.bench.workload import BenchRequest

    if timeout_s <= 1:
        raise OutOfBudget("no time left for a request")
    req = BenchRequest(0, 0, "driver", tuple(messages))

    async def go():
        return await asyncio.wait_for(run_workload(base_url, model, [[req]], 1, max_tokens, label="request"),
                                      timeout_s)

    try:
        result = asyncio.run(go())
    except (asyncio.TimeoutError, TimeoutError):
        raise OutOfBudget(f"a request did not finish within {timeout_s:.0f} s") from None
    rec = result.records[0].as_dict()
    if rec["error"]:
        raise RuntimeError(f"request failed: {rec['error']}")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
            if k in ("ttft", "latency", "prompt_tokens", "cached_tokens", "prefilled_tokens", "completion_tokens")}


METRICS = ("kvrouter_prompt_tokens_total", "kvrouter_prefill_seconds_sum", "kvrouter_checkpoint_load_seconds_sum",
           "kvrouter_checkpoint_load_bytes_sum", "kvrouter_checkpoint_store_seconds_sum",
           "kvrouter_checkpoint_store_bytes_sum", "kvrouter_checkpoint_events_total")


def metric_totals(base_url: str) -> dict[str, float]:
    """The router's /metrics samples named in METRICS, keyed `name{label=value,...}`
    (model label left out), summed."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in METRICS:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")
                key = f"{s.name}{{{labels}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before per key, non-zero entries only, rounded to 4 places."""
    keys = set(before) | set(after)
    d = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 4) for k in sorted(keys)}
    return {k: v for k, v in d.items() if v}


def pick(delta: dict[str, float], prefix: str) -> float:
    """Sum of the delta entries whose key starts with `prefix`."""
    return sum(v for k, v in delta.items() if k.startswith(prefix))


def measured_ask(server, model: str, messages, max_tokens: int, budget: Budget) -> dict:
    """`ask` plus the /metrics deltas the request caused (`metrics`) and where most of
    its prompt tokens came from (`source`: computed, live, ram or disk)."""
    before = metric_totals(server.base_url)
    rec = ask(server.base_url, model, messages, max_tokens, budget.left() - STOP_RESERVE_S)
    delta = metric_delta(before, metric_totals(server.base_url))
    sources = {k.split("source=")[1].rstrip("}"): v for k, v in delta.items()
               if k.startswith("kvrouter_prompt_tokens_total{") and "source=" in k}
    rec["source"] = max(sources, key=sources.get) if sources else "computed"
    rec["metrics"] = delta
    return rec


# ---- the page cache and the disk -------------------------------------------

def drop_page_cache() -> str | None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`. Returns None when done, else why not."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return "not root: the page cache cannot be dropped"
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"could not drop the page cache: {exc}"
    return None


def read_seconds(path: Path, block: int = 16 << 20) -> float:
    """Seconds to read `path` once, sequentially, in `block`-byte reads."""
    buf = bytearray(block)
    view = memoryview(buf)
    tic = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - tic


def payload_files(store_dir: Path) -> list[Path]:
    """The store's committed payload files (`*.safetensors`, temp files left out), largest first."""
    from kvrouter.cachestore.payload import is_temp

    files = [p for p in store_dir.rglob("*.safetensors") if not is_temp(p.name)]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def cold_read_bandwidth(store_dir: Path) -> dict:
    """Cold read bandwidth of the store's disk, bytes/s: the largest payload file read
    once after dropping the page cache (which is dropped again afterwards). Returns
    {"bytes", "seconds", "bytes_per_s", "file"} or {"error": why}."""
    files = payload_files(store_dir)
    if not files:
        return {"error": "no payload file in the store"}
    why = drop_page_cache()
    if why:
        return {"error": why}
    s = read_seconds(files[0])
    size = files[0].stat().st_size
    drop_page_cache()
    return {"bytes": size, "seconds": round(s, 4), "bytes_per_s": round(size / s) if s > 0 else None,
            "file": files[0].name}


def wait_store_idle(store_dir: Path, timeout_s: float) -> float:
    """Waits until no temp payload file has existed in `store_dir` for 1 s (the
    checkpoint writer is idle), at most `timeout_s`; returns the seconds waited."""
    from kvrouter.cachestore.payload import is_temp

    t0 = time.monotonic()
    quiet_since = None
    while time.monotonic() - t0 < timeout_s:
        busy = any(is_temp(p.name) for p in store_dir.rglob("*") if p.is_file())
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= 1.0:
            break
        time.sleep(0.2)
    return round(time.monotonic() - t0, 2)


# ---- servers ----------------------------------------------------------------

class Driver:
    """One run: the config, the budget, the report (written to cfg.out after every step)."""

    def __init__(self, cfg: DriverConfig):
        self.cfg = cfg
        self.budget = Budget(cfg.budget_s)
        self.report = new_report(cfg)
        self.work = cfg.work_dir or Path(tempfile.mkdtemp(prefix="kvrouter-accel-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.report["work_dir"] = str(self.work)
        self.prompts: dict[int, LengthPrompts] = {}
        model_config = json.loads((cfg.model / "config.json").read_text())
        self.report["kv_bytes_per_token"] = bpt = kv_bytes_per_token(model_config)
        self.store_flags = sized_store_flags(cfg.lengths, bpt)
        # the restart for the hits: one batch slot (an unrelated request drops the live
        # state, so the next hit comes from the RAM tier) and no new stores (no evict
        # checkpoint writes competing with the loads; min tokens past every prompt)
        self.hits_flags = ["--decode-concurrency", "1", "--kv-cache-min-tokens", str(max(cfg.lengths) + 1),
                           "--kv-cache-warm-mb", "0"]  # the disk hit must come from disk, not a warm-up
        self.report["server_flags"] = {"common": ["--model", str(cfg.model)], "store": self.store_flags,
                                       "no_kv_cache": ["--no-kv-cache", *self.store_flags[:2]],
                                       "hits_restart": [*self.store_flags, *self.hits_flags]}

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.budget.used(), 1)
        self.report["summary"] = summarize(self.report)
        tmp = self.cfg.out.with_suffix(self.cfg.out.suffix + ".tmp")
        self.cfg.out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.report, indent=2) + "\n")
        os.replace(tmp, self.cfg.out)

    def server(self, name: str, extra: list[str]):
        from kvrouter.router.bench import servers

        return servers.kvrouter_server(name, self.work, self.cfg.cache_dir, ["--model", str(self.cfg.model), *extra])

    def start(self, server) -> str:
        """Starts `server` within the budget; returns the model name to send."""
        from kvrouter.router.bench.cli import _model_name

        left = self.budget.left() - STOP_RESERVE_S
        if left < 5:
            raise OutOfBudget("no time left to start a server")
        print(f"starting {server.name} (log: {server.log_path})", file=sys.stderr)
        try:
            server.start(timeout_s=left)
        except RuntimeError as exc:
            if self.budget.left() < STOP_RESERVE_S + 5:
                raise OutOfBudget(str(exc)) from exc
            raise
        return _model_name(server.base_url)

    def stop(self, server) -> None:
        server.stop(timeout_s=max(2.0, min(60.0, self.budget.left() - 2)))

    def warm_up(self, server, model: str, out: dict, seed: int) -> None:
        """One request of the smallest length with text of its own (`seed`: a new one
        per server start, so it never hits the store; kernels compile, buffers grow),
        then one short one; their TTFTs go in `out["warm_up"]`."""
        n = self.cfg.lengths[0]
        from kvrouter.router.bench.tokenize import chat_tokenizer

        encode = chat_tokenizer(str(self.cfg.model), self.cfg.cache_dir)
        text = sized_text(lambda t: len(encode([{"role": "user", "content": t}])), n, seed,
                          f"Warm-up block {seed}.")
        first = ask(server.base_url, model, [{"role": "user", "content": text}], 2, self.budget.left() - STOP_RESERVE_S)
        short = ask(server.base_url, model, UNRELATED, 2, self.budget.left() - STOP_RESERVE_S)
        out["warm_up"] = {"ttft_long": first["ttft"], "ttft_short": short["ttft"], "tokens": first["prompt_tokens"]}

    # ---- parts ----

    def part_cold(self) -> None:
        out: dict = {"lengths": {}}
        self.report["parts"]["cold"] = out
        flags = self.report["server_flags"]
        for mode, extra in (("no_kv_cache", flags["no_kv_cache"]), ("store", flags["store"])):
            server = self.server(f"acc-{mode.replace('_', '-')}", extra)
            try:
                model = self.start(server)
                out[f"{mode}_start_s"] = round(server.start_seconds[-1], 2)
                self.warm_up(server, model, out.setdefault(mode, {}), 70 + len(out))
                self.save()
                for n, pr in self.prompts.items():
                    row = out["lengths"].setdefault(str(n), {"prompt_tokens": None, "prefix_tokens": pr.prefix_tokens})
                    rec = measured_ask(server, model, pr.chat("cold"), 1, self.budget)
                    row[f"{mode}_cold"] = rec
                    row["prompt_tokens"] = rec["prompt_tokens"]
                    if mode == "store":
                        row["store_checkpoint_write_s"] = round(pick(rec["metrics"], "kvrouter_checkpoint_store_seconds_sum"), 4)
                        row["live_hit"] = measured_ask(server, model, pr.chat("live"), 1, self.budget)
                        row["store_vs_no_kv_cache"] = ratio(rec["ttft"], row.get("no_kv_cache_cold", {}).get("ttft"))
                    self.save()
            finally:
                self.stop(server)
                self.save()
        out["target"] = "cold TTFT with the store on <= 1.05 x --no-kv-cache cold"

    def part_hits(self) -> None:
        out: dict = {"lengths": {}}
        self.report["parts"]["hits"] = out
        store_dir = self.work / "kv-acc-store"
        if not store_dir.is_dir():
            raise RuntimeError("no store from the cold part (run it first: --parts cold,hits)")
        cold = (self.report["parts"].get("cold") or {}).get("lengths", {})
        copy_bw = self.copy_bandwidth(store_dir)
        out["copy_bandwidth"] = copy_bw
        server = self.server("acc-store", [*self.store_flags, *self.hits_flags])
        try:
            model = self.start(server)
            out["restart_start_s"] = round(server.start_seconds[-1], 2)
            self.warm_up(server, model, out, 90)
            drop = drop_page_cache()  # again before each disk hit
            wait_store_idle(store_dir, min(60.0, self.budget.left() - STOP_RESERVE_S))
            out["read_bandwidth"] = cold_read_bandwidth(store_dir)
            if drop:
                out["notes"] = [f"page cache not dropped ({drop}): disk hits may read from the page cache; "
                                "their bound ratios are left out"]
                skip(self.report, "hits.page_cache", drop)
            self.save()
            read_bw = out["read_bandwidth"].get("bytes_per_s")
            for n, pr in self.prompts.items():
                row = out["lengths"].setdefault(str(n), {})
                live = (cold.get(str(n)) or {}).get("live_hit", {}).get("ttft")
                no_kv = ((cold.get(str(n)) or {}).get("no_kv_cache_cold") or {}).get("ttft")
                row["live_hit_ttft"] = live
                if not drop:
                    drop_page_cache()
                rec = measured_ask(server, model, pr.chat("disk"), 1, self.budget)
                row["disk_hit"] = rec
                loaded = pick(rec["metrics"], "kvrouter_checkpoint_load_bytes_sum")
                row["disk_payload_bytes"] = loaded
                row["disk_load_s"] = round(pick(rec["metrics"], "kvrouter_checkpoint_load_seconds_sum"), 4)
                if rec["source"] == "disk" and loaded and read_bw and live is not None and not drop:
                    row["disk_bound_s"] = round(disk_hit_bound_s(loaded, read_bw, live), 4)
                    row["disk_vs_bound"] = ratio(rec["ttft"], row["disk_bound_s"])
                row["load_or_recompute"] = load_or_recompute_row(rec, no_kv)
                self.save()
                # an unrelated request takes the one batch slot: the live state goes (no
                # evict checkpoint: min tokens), the RAM tier keeps the loaded checkpoint
                ask(server.base_url, model, UNRELATED, 2, self.budget.left() - STOP_RESERVE_S)
                row["writer_wait_s"] = wait_store_idle(store_dir, min(120.0, self.budget.left() - STOP_RESERVE_S))
                rec = measured_ask(server, model, pr.chat("ram"), 1, self.budget)
                row["ram_hit"] = rec
                reused_bytes = loaded
                if rec["source"] == "ram" and reused_bytes and copy_bw.get("bytes_per_s") and live is not None:
                    row["ram_bound_s"] = round(ram_hit_bound_s(live, reused_bytes, copy_bw["bytes_per_s"]), 4)
                    row["ram_vs_bound"] = ratio(rec["ttft"], row["ram_bound_s"])
                ask(server.base_url, model, UNRELATED, 2, self.budget.left() - STOP_RESERVE_S)
                wait_store_idle(store_dir, min(120.0, self.budget.left() - STOP_RESERVE_S))
                self.save()
        finally:
            self.stop(server)
            self.save()
        out["targets"] = {"disk": "disk hit <= 1.2 x (bytes / cold read bandwidth + suffix prefill)",
                          "ram": "RAM-tier hit <= 1.2 x (live-state hit + bytes / copy bandwidth)",
                          "load_or_recompute": "the faster path, or within 10 % of it"}
        out["method"] = ("suffix prefill = the live-state hit's TTFT at the same length (same prefix, another "
                         "~500-token message; cold part); RAM-tier payload bytes = the disk hit's loaded bytes")

    def copy_bandwidth(self, store_dir: Path) -> dict:
        """The device's copy bandwidth for an array as large as the largest payload
        (`worker.bench_copy` in a subprocess: this process never loads MLX)."""
        files = payload_files(store_dir)
        size = files[0].stat().st_size if files else 64 << 20
        size = max(16 << 20, min(size, 4 << 30))
        try:
            done = subprocess.run([*module_command("kvrouter.worker.bench_copy"), "--bytes", str(size)],
                                  capture_output=True, text=True, timeout=max(5.0, min(120.0, self.budget.left() - 60)))
        except subprocess.TimeoutExpired:
            return {"error": "timed out"}
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-500:]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    def part_compare(self) -> None:
        """`kvrouter bench --compare` with the issue's workload flags, one program per
        invocation (kvrouter first), so kvrouter's figures survive when mlx_lm.server
        runs out of budget; the ratios are the bench's own (`report.side_by_side`)."""
        import importlib.util

        from kvrouter.router.bench.report import side_by_side
        from kvrouter.router.extras import EXTRAS

        missing = [m for m in EXTRAS["bench"] if importlib.util.find_spec(m) is None]
        if missing:  # `kvrouter bench` refuses to start without its extra
            skip(self.report, "compare", f"kvrouter bench needs the 'bench' extra (missing: {', '.join(missing)})")
            return
        targets = ["kvrouter", "mlx_lm.server"] if self.cfg.mlx_server else ["kvrouter"]
        out: dict = {"equivalent_to": "kvrouter bench --compare --targets " + ",".join(targets) + " "
                                      + " ".join(BENCH_FLAGS) + f" --model {self.cfg.model}",
                     "commands": {}, "results": {}, "returncodes": {}, "seconds": {}}
        if not self.cfg.mlx_server:
            out["note"] = "kvrouter alone (pass --mlx-server to run mlx_lm.server beside it)"
        self.report["parts"]["compare"] = out
        for target in targets:
            if self.budget.left() < PART_MIN_S["compare"]:
                skip(self.report, f"compare.{target}", f"budget: {self.budget.left():.0f} s left")
                continue
            outdir = self.work / f"bench-{target}"
            argv = [*module_command("kvrouter.router.cli"), "bench", "--compare", "--targets", target, *BENCH_FLAGS,
                    "--model", str(self.cfg.model), "--cache-dir", str(self.cfg.cache_dir), "--output", str(outdir)]
            out["commands"][target] = "kvrouter " + " ".join(argv[4:])
            self.save()
            rc, seconds, tail = run_bounded(argv, self.budget.left() - 5, self.work / f"bench-{target}.log")
            out["returncodes"][target], out["seconds"][target] = rc, seconds
            summary = outdir / "summary.json"
            if summary.is_file():
                data = json.loads(summary.read_text())
                for name, s in data.get("results", {}).items():
                    s.pop("per_request", None)
                    out["results"][name] = s
                out.setdefault("workload", data.get("workload"))
            if rc is None:
                skip(self.report, f"compare.{target}", f"did not finish within the budget ({seconds:.0f} s); "
                                                       f"log tail: {tail[-600:]}")
            elif rc != 0:
                out.setdefault("log_tails", {})[target] = tail
            self.save()
        if len(out["results"]) > 1 and "mlx_lm.server" in out["results"]:
            table, out["ratios"] = side_by_side(out["results"], "mlx_lm.server")
            print(table, file=sys.stderr)
        out["targets"] = "TTFT p50 <= 0.5 x and p95 <= 0.3 x mlx_lm.server's, prefilled tokens <= 0.25 x"

    def part_prefill(self) -> None:
        out = self._module_part("prefill", "kvrouter.worker.bench_prefill",
                                ["--through-engine", "--tokens", str(max(self.cfg.lengths)), "--repeat", "1"])
        out["target"] = "prefill through the worker <= 1.2 x the plain in-process loop"

    def part_load_or_recompute(self) -> None:
        grid = sorted({n for n in LOR_GRID if n <= max(self.cfg.lengths)} | set(self.cfg.lengths))
        out = self._module_part("load_or_recompute", "kvrouter.worker.bench_load_or_recompute",
                                ["--tokens", *map(str, grid)])
        out["target"] = "the faster path, or one within 10 % of it, at 2K, 4K, 8K, 16K and 32K"

    def part_hits_inproc(self) -> None:
        out = self._module_part("hits_inproc", "kvrouter.worker.bench_hits", ["--tokens", *map(str, self.cfg.lengths)])
        out["targets"] = {"disk": "disk hit <= 1.2 x (bytes / cold read bandwidth + suffix prefill)",
                          "ram": "RAM-tier hit <= 1.2 x (live-state hit + bytes / copy bandwidth)"}

    def _module_part(self, part: str, module: str, args: list[str]) -> dict:
        """Runs `python -P -m module --model DIR *args --json FILE` within the budget; the
        part's report: command, returncode, seconds, result (its JSON), log_tail on a
        failure. Raises OutOfBudget when it did not finish in time."""
        out_json = self.work / f"{part}.json"
        argv = [*module_command(module), "--model", str(self.cfg.model), *args, "--json", str(out_json)]
        out: dict = {"command": " ".join(argv[3:])}
        self.report["parts"][part] = out
        rc, seconds, tail = run_bounded(argv, self.budget.left() - 5, self.work / f"{part}.log")
        out.update({"returncode": rc, "seconds": seconds})
        if out_json.is_file():
            out["result"] = json.loads(out_json.read_text())
        if rc is None:
            raise OutOfBudget(f"{module} did not finish within the budget; log tail: {tail}")
        if rc != 0:
            out["log_tail"] = tail
        return out

    def run(self) -> int:
        if any(p in self.cfg.parts for p in ("cold", "hits")):
            t0 = time.monotonic()
            self.prompts = build_prompts(self.cfg.model, self.cfg.cache_dir, self.cfg.lengths)
            self.report["prompts"] = {str(n): {"prefix_tokens": p.prefix_tokens, "message_tokens": message_tokens(n)}
                                      for n, p in self.prompts.items()}
            self.report["notes"].append(f"prompts built in {time.monotonic() - t0:.1f} s")
        failed = False
        for part in PARTS:
            if part not in self.cfg.parts:
                self.report["parts"].pop(part, None)
                continue
            left = self.budget.left()
            if left < PART_MIN_S[part]:
                skip(self.report, part, f"budget: {left:.0f} s left of {self.cfg.budget_s:.0f} s, "
                                        f"the part needs at least {PART_MIN_S[part]:.0f} s")
                self.save()
                continue
            print(f"== {part} ({left:.0f} s left)", file=sys.stderr)
            t0 = time.monotonic()
            try:
                getattr(self, f"part_{part}")()
            except OutOfBudget as exc:
                skip(self.report, f"{part}.rest", f"budget ran out inside the part: {exc}")
            except Exception as exc:  # recorded, never fatal: the next part still runs
                failed = True
                self.report.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"
                print(f"{part} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.report.setdefault("part_seconds", {})[part] = round(time.monotonic() - t0, 1)
            self.save()
        self.save()
        print(f"wrote {self.cfg.out} ({self.budget.used():.0f} s)", file=sys.stderr)
        return 1 if failed else 0


def run_bounded(argv: list[str], timeout_s: float, log_path: Path) -> tuple[int | None, float, str]:
    """Runs `argv` in its own process group, output to `log_path`, temporary files in
    `log_path`'s folder (TMPDIR), killing the whole group (servers it started
    included) after `timeout_s` seconds. Returns (exit status or None when killed,
    seconds, the log's last 1,500 characters)."""
    t0 = time.monotonic()
    env = {**os.environ, "TMPDIR": str(log_path.parent)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = proc.wait(max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    tail = log_path.read_text(errors="replace")[-1500:]
    return rc, round(time.monotonic() - t0, 1), tail


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # one bar per request is noise; before tqdm is imported
    cfg = parse_args(argv)
    if not (cfg.model / "config.json").is_file():
        print(f"error: {cfg.model} is not an mlx-lm model directory (no config.json)", file=sys.stderr)
        return 2
    return Driver(cfg).run()


if __name__ == "__main__":
    raise SystemExit(main())
