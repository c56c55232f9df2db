"""Benchmark: a disk hit and a RAM-tier hit against their bounds, in process, through
the worker's own load path (`CheckpointManager.load`) and a plain prefill loop.

    python -P -m kvrouter.worker.bench_hits [--model DIR] [--tokens 8192 32768] \\
        [--suffix 500] [--json OUT]

For each prefix length n (a checkpoint of n tokens, then a suffix of `--suffix`
new tokens, as a request that extends a stored conversation):

- live hit: prefill the suffix on a state that already holds the n tokens
  (what a request continuing a live state computes), the best of two, seconds;
- disk hit: the checkpoint's payload dropped from the page cache, then load it
  and prefill the suffix; bound = payload bytes ÷ the cold read bandwidth (a
  plain sequential read of the same file, page cache dropped) + the live hit;
- RAM-tier hit: the checkpoint held by the RAM tier (the disk load put it
  there), then restore it (a copy of its arrays, evaluated) and prefill the
  suffix; bound = the live hit + payload bytes ÷ the device's copy bandwidth
  (`worker.bench_copy`, an array of the payload's size).

Issue 15's targets: each hit at most 1.2 × its bound. Cold reads need a
filesystem that honours posix_fadvise(DONTNEED) (the resident fraction printed
says what the page cache held when each load began). Each length is prefilled
once from nothing first, so kernels are compiled before anything is timed.
No HTTP or gRPC is involved: the router adds about 1-2 ms to each.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from kvrouter.worker.bench_load_or_recompute import load_timed, prefill_timed, set_page_cache
from kvrouter.worker.launch import module_command

SUFFIX = 500  # new tokens after the reused prefix
WITHIN = 1.2  # issue 15: a hit within 1.2 x its bound


def _read_bps(path: Path) -> float:
    """Bytes per second of one plain sequential read of `path` (16 MiB blocks), its
    pages dropped from the page cache first."""
    from kvrouter.cachestore.payload_read import drop_from_page_cache

    drop_from_page_cache(path)
    size, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(16 << 20):
            size += len(block)
    return size / (time.perf_counter() - t0)


def run(spec: str | None, lengths: list[int], suffix_tokens: int, chunk: int, cache_dir: Path) -> dict:
    """Every length's row (see the module docstring): {"tokens", "bytes", "live_s",
    "disk_s", "disk_load_s", "resident", "read_bps", "disk_bound_s", "disk_vs_bound",
    "ram_s", "ram_load_s", "copy_bps", "ram_bound_s", "ram_vs_bound"}; seconds, bytes."""
    import mlx.core as mx

    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.worker import cache_state
    from kvrouter.worker.bench_copy import measure_copy
    from kvrouter.worker.checkpoints import CheckpointManager
    from kvrouter.worker.ram_tier import RamTier
    from kvrouter.worker.models import load_model

    bundle = load_model(spec, cache_dir)
    top = max(lengths) + suffix_tokens
    if top + 1 > bundle.context_length:
        raise ValueError(f"{top} tokens do not fit the model's context of {bundle.context_length}")
    r = random.Random(0)
    tokens = [r.randrange(100, 30000) for _ in range(top)]
    rows = []
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        store = CheckpointStore(StoreConfig(Path(tmp), disk_budget_bytes=1 << 40, min_tokens=1))
        manager = CheckpointManager(bundle.identity, bundle.state, store, ram=RamTier(1 << 40))
        for n in lengths:
            prefix, suffix = tokens[:n], tokens[n: n + suffix_tokens]
            prefill_timed(bundle, tokens[: n + suffix_tokens], chunk)  # warm-up: kernels for these lengths
            state, _ = prefill_timed(bundle, prefix, chunk)
            entry = store.save("waypoint", bundle.identity, "bench", prefix,
                               cache_state.payload_writer(cache_state.cut(state, n, n), n, bundle.identity))
            if entry is None:
                raise RuntimeError(f"storing the {n}-token checkpoint failed")
            live_s = float("inf")
            for _ in range(2):  # the best of two: the first suffix after a long prefill ran slow on the H200
                live = cache_state.cut(state, n, n)
                mx.eval([c.state for c in live])
                live_s = min(live_s, prefill_timed(bundle, suffix, chunk, live)[1])
                del live
            del state
            path = store.payload_dir / entry.payload_name
            read_bps = _read_bps(path)
            manager.ram.discard(entry.id)
            resident = set_page_cache(manager, entry, cold=True)
            t0 = time.perf_counter()
            disk_load_s, restored = load_timed(manager, entry, n)
            mx.eval([c.state for c in restored.caches])
            prefill_timed(bundle, suffix, chunk, restored.caches)
            disk_s = time.perf_counter() - t0
            del restored
            if entry.id not in manager.ram:
                raise RuntimeError("the disk load did not keep the checkpoint in the RAM tier (--kv-cache-ram-mb)")
            t0 = time.perf_counter()
            ram_load_s, restored = load_timed(manager, entry, n)
            if restored.source != "ram":
                raise RuntimeError(f"expected a RAM-tier restore, got {restored.source}")
            mx.eval([c.state for c in restored.caches])
            ram_load_s = time.perf_counter() - t0
            ram_s = ram_load_s + prefill_timed(bundle, suffix, chunk, restored.caches)[1]
            del restored
            copy = measure_copy(entry.payload_bytes)
            disk_bound = entry.payload_bytes / read_bps + live_s
            ram_bound = live_s + entry.payload_bytes / copy["bytes_per_s"]
            rows.append({"tokens": n, "bytes": entry.payload_bytes, "live_s": live_s, "disk_s": disk_s,
                         "disk_load_s": disk_load_s, "resident": resident, "read_bps": read_bps,
                         "disk_bound_s": disk_bound, "disk_vs_bound": disk_s / disk_bound,
                         "ram_s": ram_s, "ram_load_s": ram_load_s, "copy_bps": copy["bytes_per_s"],
                         "ram_bound_s": ram_bound, "ram_vs_bound": ram_s / ram_bound})
            print(f"measured {n} tokens", file=sys.stderr)
        store.close()
    return {"model": bundle.name, "device": str(mx.default_device()), "suffix_tokens": suffix_tokens,
            "chunk": chunk, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    from kvrouter.worker.blas import reexec_with_preload

    reexec_with_preload([*module_command("kvrouter.worker.bench_hits"), *sys.argv[1:]])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an mlx-lm model directory or a GGUF file (default: the default model)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096],
                   help="prefix lengths, tokens (default 1024 4096; a GPU: 8192 32768)")
    p.add_argument("--suffix", type=int, default=SUFFIX, help=f"new tokens after the prefix (default {SUFFIX})")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk, tokens (default 2048)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    from kvrouter.worker.config import default_cache_dir

    result = run(args.model, sorted(set(args.tokens)), args.suffix, args.chunk, default_cache_dir())
    print(f"model {result['model']} on {result['device']}; suffix {result['suffix_tokens']} tokens")
    print(f"{'TOKENS':>7} {'MIB':>7} {'LIVE':>7} {'DISK':>7} {'BOUND':>7} {'x':>5} {'RAM':>7} {'BOUND':>7} {'x':>5}")
    for w in result["rows"]:
        print(f"{w['tokens']:>7} {w['bytes'] / 2**20:>7.1f} {w['live_s']:>7.3f} {w['disk_s']:>7.3f} "
              f"{w['disk_bound_s']:>7.3f} {w['disk_vs_bound']:>5.2f} {w['ram_s']:>7.3f} {w['ram_bound_s']:>7.3f} "
              f"{w['ram_vs_bound']:>5.2f}")
    met = all(w["disk_vs_bound"] <= WITHIN and w["ram_vs_bound"] <= WITHIN for w in result["rows"])
    print(f"every hit within {WITHIN} x its bound: {'yes' if met else 'no'}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
