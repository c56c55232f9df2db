"""Benchmark: how fast MLX copies an array on its default device (the bound of a
RAM-tier hit: a restore copies the checkpoint's arrays, `cache_state.cut`).

    python -P -m kvrouter.worker.bench_copy --bytes 1073741824 [--repeat 3]

Prints one JSON object: {"device", "bytes", "seconds" (best of the repeats),
"bytes_per_s", "method"}. Used by the GPU driver (`router.bench.accelerator`).
"""

from __future__ import annotations

import argparse
import json
import time


def measure_copy(nbytes: int, repeat: int = 3) -> dict:
    """Best time of `repeat` elementwise copies (`a + 0`, bfloat16, evaluated) of a
    `nbytes`-byte array on MLX's default device, after one warm-up copy.
    nbytes: bytes (rounded down to whole bfloat16 values, at least 2). Returns the
    JSON-able dict described in the module docstring."""
    import mlx.core as mx

    row = 1 << 20  # values per row: a 2-D shape keeps each dimension below MLX's int32 limit
    n = max(1, nbytes // 2)
    a = mx.zeros((max(1, n // row), min(n, row)), dtype=mx.bfloat16)
    n = a.size
    mx.eval(a)
    mx.eval(a + 0)  # warm-up: kernel and buffer
    best = float("inf")
    for _ in range(max(1, repeat)):
        tic = time.perf_counter()
        b = a + 0
        mx.eval(b)
        best = min(best, time.perf_counter() - tic)
        del b
    return {"device": str(mx.default_device()), "bytes": 2 * n, "seconds": best,
            "bytes_per_s": 2 * n / best if best > 0 else None,
            "method": "best of elementwise copies (a + 0) of a bfloat16 array"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -P -m kvrouter.worker.bench_copy", description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=int, default=1 << 30, help="array size in bytes (default 1 GiB)")
    p.add_argument("--repeat", type=int, default=3, help="timed copies (default 3); the best is reported")
    ns = p.parse_args(argv)
    print(json.dumps(measure_copy(ns.bytes, ns.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
