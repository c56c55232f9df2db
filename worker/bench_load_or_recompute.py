"""Benchmark: does load-or-recompute pick the faster path? For a grid of prefix
lengths, what the worker's decision (`cachestore.costs.decide_load`) chose, both of
its predictions, and both real times: loading the checkpoint from disk (the
worker's own load path, `CheckpointManager.load`: one hashed read, arrays on the
device, cache objects) against prefilling the same tokens.

    python -m kvrouter.worker.bench_load_or_recompute [--model DIR] \\
        [--tokens 512 1024 2048 4096] [--page-cache both] [--json OUT]

Two passes over the grid, as a worker learns:
1. calibration: each length is prefilled from nothing (timed; `PrefillFit` learns
   prefill time by position from these), stored as a checkpoint in a temporary
   store, then loaded once cold (its pages dropped from the page cache first) and
   once warm (`learn_disk_load` learns both bandwidths);
2. evaluation: with the learnt rates, each length is decided and then both paths
   are timed again: the load cold and warm (`--page-cache`), the prefill once.
A row is "ok" when the chosen path's real time is the faster one's, or within 10 %.

Prefill is the plain per-sequence loop in `--chunk` token chunks (what a request
that prefills alone runs). The model: an mlx-lm directory or a GGUF file (default:
the default model). Use `--tokens 2048 4096 8192 16384 32768` on a GPU. Cold reads
need a filesystem that honours posix_fadvise(DONTNEED); the resident fraction
printed says what the page cache held when each load began.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from kvrouter.worker.launch import module_command

CHUNK = 512  # prefill chunk, tokens
WITHIN = 1.10  # a choice is "ok" when its real time is at most this times the faster path's


def prefill_timed(bundle, tokens: list[int], chunk: int, state=None):
    """(state, seconds): `tokens` prefilled in `chunk`-token steps into `state` (None:
    from nothing), each step evaluated."""
    import mlx.core as mx

    state = bundle.state.new() if state is None else state
    t0 = time.perf_counter()
    for i in range(0, len(tokens), chunk):
        mx.eval(bundle.model(mx.array(tokens[i: i + chunk])[None], cache=state))
    return state, time.perf_counter() - t0


def set_page_cache(manager, entry, cold: bool) -> float | None:
    """Drops the payload of `entry` from the page cache (cold) or reads it into it (warm);
    returns the fraction the page cache then holds (mincore), None when unknown."""
    from kvrouter.cachestore.payload_read import drop_from_page_cache

    path = manager.store.payload_dir / entry.payload_name
    if cold:
        drop_from_page_cache(path)
    else:
        path.read_bytes()  # in the page cache, as after a recent write or load
    return manager.resident(entry)


def load_timed(manager, entry, n: int):
    """(seconds, Restored) of one load of `entry` through the worker's own path."""
    t0 = time.perf_counter()
    restored = manager.load(entry, n)
    seconds = time.perf_counter() - t0
    manager.end_admission_round()  # no sharing of the loaded state between loads
    if restored is None:
        raise RuntimeError(f"checkpoint of {n} tokens failed to load")
    return seconds, restored


def run(spec: str | None, lengths: list[int], chunk: int, modes: list[str], cache_dir: Path) -> dict:
    """Both passes (see the module docstring). Returns {"model", "rates", "rows"}; a row:
    {"tokens", "bytes", "page_cache", "resident", "chose", "predicted_load_s",
    "predicted_recompute_s", "load_s", "recompute_s", "ok"}."""
    from dataclasses import asdict

    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.cachestore.costs import PrefillFit, Rates, Reuse, decide_load, learn_disk_load
    from kvrouter.worker import cache_state
    from kvrouter.worker.checkpoints import CheckpointManager
    from kvrouter.worker.models import load_model

    bundle = load_model(spec, cache_dir)
    top = max(lengths)
    if top + 1 > bundle.context_length:
        raise ValueError(f"{top} tokens do not fit the model's context of {bundle.context_length}")
    r = random.Random(0)
    prompt = [r.randrange(100, 30000) for _ in range(top)]
    # Warm-up over the whole grid's longest prompt: on a GPU backend each new attention
    # length compiles kernels, and a calibration that paid for them overestimated
    # prefill about 2x on the H200 (2026-12-02).
    prefill_timed(bundle, prompt[:top], chunk)
    fit, rates, rows = PrefillFit(), Rates(), []
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        store = CheckpointStore(StoreConfig(Path(tmp), disk_budget_bytes=1 << 40, min_tokens=1))
        manager = CheckpointManager(bundle.identity, bundle.state, store)
        entries = {}
        for n in lengths:  # 1: calibration
            state, prefill_s = prefill_timed(bundle, prompt[:n], chunk)
            fit.add(0, n, prefill_s)
            entry = store.save("waypoint", bundle.identity, "bench", prompt[:n],
                               cache_state.payload_writer(cache_state.cut(state, n, n), n, bundle.identity))
            if entry is None:
                raise RuntimeError(f"storing the {n}-token checkpoint failed")
            entries[n] = entry
            del state
            for cold in (True, False):
                set_page_cache(manager, entry, cold)
                seconds, restored = load_timed(manager, entry, n)
                rates = learn_disk_load(rates, restored.loaded_bytes, seconds, restored.stages.resident)
            print(f"calibrated {n:>6} tokens: prefill {prefill_s:.3f} s, payload {entry.payload_bytes / 2**20:.1f} MiB",
                  file=sys.stderr)
        rates = fit.apply(rates)
        for n in lengths:  # 2: evaluation
            entry = entries[n]
            _, recompute_s = prefill_timed(bundle, prompt[:n], chunk)
            for mode in modes:
                resident = set_page_cache(manager, entry, mode == "cold")
                d = decide_load(Reuse("disk", n, entry.payload_bytes, resident), 0, rates)
                load_s, _ = load_timed(manager, entry, n)
                best = min(load_s, recompute_s)
                chosen = load_s if d.load else recompute_s
                rows.append({"tokens": n, "bytes": entry.payload_bytes, "page_cache": mode, "resident": resident,
                             "chose": "load" if d.load else "recompute", "predicted_load_s": d.load_s,
                             "predicted_recompute_s": d.recompute_s, "load_s": load_s, "recompute_s": recompute_s,
                             "ok": chosen <= WITHIN * best})
        store.close()
    return {"model": bundle.name, "rates": asdict(rates), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    from kvrouter.worker.blas import reexec_with_preload

    reexec_with_preload([*module_command("kvrouter.worker.bench_load_or_recompute"), *sys.argv[1:]])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an mlx-lm model directory or a GGUF file (default: the default model)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                   help="prefix lengths, tokens (default 512 1024 2048 4096; a GPU: 2048 ... 32768)")
    p.add_argument("--chunk", type=int, default=CHUNK, help=f"prefill chunk, tokens (default {CHUNK})")
    p.add_argument("--page-cache", choices=("cold", "warm", "both"), default="both",
                   help="load with the payload dropped from the page cache, held in it, or both (default)")
    p.add_argument("--json", type=Path, default=None, help="also write the rates and rows as JSON here")
    args = p.parse_args(argv)

    from kvrouter.worker.config import default_cache_dir

    modes = ["cold", "warm"] if args.page_cache == "both" else [args.page_cache]
    result = run(args.model, sorted(set(args.tokens)), args.chunk, modes, default_cache_dir())
    rt = result["rates"]
    print(f"model {result['model']}; learnt: prefill {rt['prefill_fixed_s']:.4f} s + {rt['prefill_linear_s']:.3e} s/token "
          f"+ {rt['prefill_quad_s']:.3e} s/token^2; disk cold {rt['disk_cold_bps'] / 1e9:.2f} GB/s, "
          f"warm {rt['disk_warm_bps'] / 1e9:.2f} GB/s (whole load)")
    print(f"{'TOKENS':>7} {'MIB':>7} {'CACHE':>5} {'RESIDENT':>8} {'CHOSE':>9} {'PRED LOAD':>9} {'PRED PREF':>9} "
          f"{'REAL LOAD':>9} {'REAL PREF':>9}  OK")
    for row in result["rows"]:
        res = "?" if row["resident"] is None else f"{row['resident']:.2f}"
        print(f"{row['tokens']:>7} {row['bytes'] / 2**20:>7.1f} {row['page_cache']:>5} {res:>8} {row['chose']:>9} "
              f"{row['predicted_load_s']:>9.3f} {row['predicted_recompute_s']:>9.3f} {row['load_s']:>9.3f} "
              f"{row['recompute_s']:>9.3f}  {'yes' if row['ok'] else 'NO'}")
    ok = sum(r["ok"] for r in result["rows"])
    print(f"{ok}/{len(result['rows'])} choices were the faster path or within {round((WITHIN - 1) * 100)} % of it")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
