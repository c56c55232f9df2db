"""Benchmark: checkpoint payload size (and write / read time) per model at given
prompt lengths, in the format workers write (mlx-lm's `save_prompt_cache` layout, `worker.payload_write`).

    python -m kvrouter.worker.bench_checkpoints [--model SPEC ...] [--kv-bits 8] \\
        [--tokens 1024 8192] [--cold] [--json OUT]

Each model (a GGUF file, an mlx-lm directory; none: the default model) is prefilled
with the same seeded token ids, in chunks of 512, up to each length in turn; at
each length the state is written as a checkpoint of exactly that many tokens,
read back (the worker's one hashed read, then, for comparison, the former two
passes: a checksum pass and mlx-lm's `load_prompt_cache`; `--cold` drops the file
from the page cache before each), and its payload bytes printed. Recurrent state has a fixed size, so
the totals matter, not bytes per token. With `--kv-bits`, models whose layers are
not all plain KV caches are reported as refused. The command re-executes itself
with OpenBLAS preloaded, as a worker does, unless KVROUTER_NO_BLAS_PRELOAD=1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kvrouter.worker.launch import module_command

CHUNK = 512  # prefill chunk, tokens


def measure(spec: str | None, lengths: list[int], kv_bits: int | None, cache_dir: Path,
            cold: bool = False) -> list[dict]:
    """One row per length: {"model", "layout", "kv_bits", "tokens", "bytes", "write_s", "read_s",
    "two_pass_read_s"}: read_s is the worker's one hashed read (`checkpoint_load`),
    two_pass_read_s the former load (an xxh3 pass over the file, then mlx-lm's
    `load_prompt_cache`); with `cold`, the file is dropped from the page cache before each.
    Raises ValueError when `kv_bits` does not apply to the model."""
    import mlx.core as mx

    from kvrouter.worker import cache_state
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import load_prompt_cache

    from kvrouter.cachestore.payload import checksum_file
    from kvrouter.cachestore.payload_read import drop_from_page_cache
    from kvrouter.worker.checkpoint_load import load_payload
    from kvrouter.worker.config import KvQuantization
    from kvrouter.worker.models import load_model

    bundle = load_model(spec, cache_dir, kv_quant=KvQuantization(kv_bits) if kv_bits else None)
    spec_ = bundle.state
    prompt = [(i * 7919) % 40000 + 100 for i in range(max(lengths))]
    state, fed, rows = spec_.new(), 0, []
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # on disk (/tmp may be RAM)
        for n in sorted(lengths):
            while fed < n:
                end = min(n, fed + CHUNK)
                mx.eval(bundle.model(mx.array(prompt[fed:end])[None], cache=state))
                fed = end
            path = Path(tmp) / f"{n}.safetensors"
            t0 = time.perf_counter()
            cache_state.payload_writer(cache_state.cut(state, n, n), n, bundle.identity)(path)
            t1 = time.perf_counter()
            if cold:
                drop_from_page_cache(path)
            t1 = time.perf_counter()
            load_payload(path, bundle.identity, n, spec_.layout)
            t2 = time.perf_counter()
            if cold:
                drop_from_page_cache(path)
            t3 = time.perf_counter()
            checksum_file(path)  # what a load did before: a checksum pass over the file, then mlx-lm's reader
            old = load_prompt_cache(str(path))  # lazy: evaluating it is what reads the file
            mx.eval([a for _, a in tree_flatten([c.state for c in old]) if isinstance(a, mx.array)])
            t4 = time.perf_counter()
            rows.append({"model": bundle.name, "layout": spec_.layout, "kv_bits": kv_bits, "tokens": n,
                         "bytes": path.stat().st_size, "write_s": round(t1 - t0, 4), "read_s": round(t2 - t1, 4),
                         "two_pass_read_s": round(t4 - t3, 4)})
    return rows


def main(argv: list[str] | None = None) -> None:
    from kvrouter.worker.blas import reexec_with_preload

    reexec_with_preload([*module_command("kvrouter.worker.bench_checkpoints"), *sys.argv[1:]])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None,
                   help="a GGUF file or an mlx-lm model directory; repeatable (default: the default model)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None, help="quantized KV cache, as a worker's")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192], help="prompt lengths (default 1024 8192)")
    p.add_argument("--cold", action="store_true",
                   help="drop each payload from the page cache before reading it (posix_fadvise DONTNEED)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    from kvrouter.worker.config import default_cache_dir

    rows = []
    print(f"{'MODEL':<24} {'KV BITS':>7} {'TOKENS':>7} {'BYTES':>12} {'MIB':>8} {'WRITE S':>8} {'READ S':>7} {'2-PASS S':>8}  CACHES")
    for spec in args.model or [None]:
        try:
            found = measure(spec, args.tokens, args.kv_bits, default_cache_dir(), args.cold)
        except ValueError as exc:
            print(f"{spec}: {exc}")
            continue
        for r in found:
            print(f"{r['model'][:24]:<24} {r['kv_bits'] or '-':>7} {r['tokens']:>7} {r['bytes']:>12,} "
                  f"{r['bytes'] / 2**20:>8.2f} {r['write_s']:>8.3f} {r['read_s']:>7.3f} {r['two_pass_read_s']:>8.3f}  "
                  f"{r['layout']}")
        rows += found
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
