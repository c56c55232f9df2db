"""Benchmark: prefill speed of the default model on this machine's MLX backend.

    python -m kvrouter.worker.bench_prefill [--tokens 512] [--repeat 3]

Prints tokens per second and the BLAS in use. Run it under `kvrouter`'s worker
environment (OpenBLAS preloaded on Linux) to see what workers get:
the command re-executes itself with the preload, as a worker does, unless
KVROUTER_NO_BLAS_PRELOAD=1.
"""

from __future__ import annotations

import argparse
import sys
import time

from kvrouter.worker.launch import module_command


def main(argv: list[str] | None = None) -> None:
    from kvrouter.worker.blas import describe_blas, reexec_with_preload

    reexec_with_preload([*module_command("kvrouter.worker.bench_prefill"), *sys.argv[1:]])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from kvrouter.worker.config import default_cache_dir
    from kvrouter.worker.models import load_model

    bundle = load_model(None, default_cache_dir())
    ids = mx.array([[(i * 7919) % 40000 + 100 for i in range(args.tokens)]], dtype=mx.int32)
    mx.eval(bundle.model(ids[:, :16], cache=make_prompt_cache(bundle.model)))  # warm-up
    rates = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        mx.eval(bundle.model(ids, cache=make_prompt_cache(bundle.model)))
        rates.append(args.tokens / (time.perf_counter() - start))
    print(f"device: {mx.default_device()}  BLAS: {describe_blas()}")
    print(f"prefill {args.tokens} tokens ({bundle.kv_layout}): best {max(rates):.1f} tok/s, "
          f"median {sorted(rates)[len(rates) // 2]:.1f} tok/s over {args.repeat} runs")


if __name__ == "__main__":
    main()
