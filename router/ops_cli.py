"""Operator commands registered on `kvrouter`: `bench`, `doctor`, `export-mlx`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_parsers(sub, default_cache_dir: Path) -> None:
    from kvrouter.router.bench.cli import add_parser as add_bench

    add_bench(sub, default_cache_dir)
    doctor = sub.add_parser("doctor", help="check this machine's setup and the store, say what to fix",
                            description="Prints the MLX backend and device, the BLAS workers use, whether the "
                                        "default model is present, the store's size and state, and what it would "
                                        "fix. Changes nothing; exit status 1 when a check fails.")
    doctor.add_argument("--cache-dir", type=Path, default=default_cache_dir)
    doctor.add_argument("--kv-cache-dir", "--kv-disk-dir", type=Path, default=None,
                        help="store directory (default: a 'kv' folder in the cache directory)")
    doctor.add_argument("--kv-cache-disk-mb", "--kv-disk-space-mb", type=int, default=None,
                        help="the store's disk budget in MiB, to check the store and the free disk against "
                             "(default: none; `kvrouter serve` sizes it from the model and prints it at start)")
    export = sub.add_parser("export-mlx", help="write the imported model as an mlx-lm model directory",
                            description="Write the model (default: the default GGUF model) as an mlx-lm directory "
                                        "(config.json, float32 model.safetensors, tokenizer files), e.g. for "
                                        "`python -m mlx_lm.server --model DIR`.")
    export.add_argument("dir", type=Path, help="output directory (must not hold a config.json)")
    export.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    export.add_argument("--cache-dir", type=Path, default=default_cache_dir)


def _bench(ns: argparse.Namespace) -> int:
    from kvrouter.router.bench.cli import run

    logging.basicConfig(level="WARNING")
    return run(ns)


def _doctor(ns: argparse.Namespace) -> int:
    from kvrouter.router.doctor import format_report, run_checks

    budget = None if ns.kv_cache_disk_mb is None else ns.kv_cache_disk_mb * 2**20
    checks = run_checks(ns.cache_dir, ns.kv_cache_dir or ns.cache_dir / "kv", budget)
    print(format_report(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def _export(ns: argparse.Namespace) -> int:
    from kvrouter.router.export_mlx import export_mlx_model

    from kvrouter.router.usage import UsageError, flag_errors

    logging.basicConfig(level="INFO", format="%(message)s")
    try:
        with flag_errors():  # its ValueErrors are about --model
            out = export_mlx_model(ns.model, ns.cache_dir, ns.dir)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from exc
    print(out)
    return 0


COMMANDS = {"bench": _bench, "doctor": _doctor, "export-mlx": _export}
