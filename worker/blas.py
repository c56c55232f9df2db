"""Which BLAS the MLX CPU backend runs on, and preloading a fast one.

The `mlx-cpu` wheel bundles a reference BLAS (measured 7.8 GFLOP/s on a 2048²
fp32 matmul on a 2-core machine); with Debian's OpenBLAS (`libopenblas0-pthread`)
preloaded the same matmul runs at 162 GFLOP/s. Worker processes are therefore
started with OpenBLAS in LD_PRELOAD when the machine has it (Linux only; macOS
uses Metal and Accelerate).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Debian/Ubuntu multiarch locations, pthread flavour first (the one the measurements used).
OPENBLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
NO_PRELOAD_ENV = "KVROUTER_NO_BLAS_PRELOAD"


def find_openblas() -> Path | None:
    """Path of an installed OpenBLAS shared library, or None (always None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    arch = os.uname().machine
    for pattern in OPENBLAS_CANDIDATES:
        path = Path(pattern.format(arch=arch))
        if path.exists():
            return path
    return None


def preload_env(env: dict[str, str], threads: int | None = None) -> dict[str, str]:
    """A copy of `env` with OpenBLAS in LD_PRELOAD (when found and not disabled by
    KVROUTER_NO_BLAS_PRELOAD=1) and, when `threads` is given, BLAS threads limited
    to that many so several workers on one machine do not fight over its cores."""
    out = dict(env)
    lib = None if env.get(NO_PRELOAD_ENV) == "1" else find_openblas()
    if lib is not None and str(lib) not in env.get("LD_PRELOAD", ""):
        out["LD_PRELOAD"] = ":".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    if threads is not None:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            out.setdefault(name, str(threads))
    return out


def reexec_with_preload(argv: list[str]) -> None:
    """Replaces this process with `argv` (a full command line) under
    `preload_env` when OpenBLAS is available but not loaded yet. Returns only
    when no re-exec is needed."""
    if describe_blas() != "reference (bundled with mlx)":
        return
    env = preload_env(dict(os.environ))
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    os.execve(argv[0], argv, env)


def describe_blas() -> str:
    """A short description of the BLAS in this process, for logs and `doctor`.

    On Linux it reads /proc/self/maps; elsewhere it names the platform's default.
    """
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if "libopenblas" in name:
            return f"OpenBLAS ({line.split()[-1]})"
        if "libmkl" in name:
            return f"MKL ({line.split()[-1]})"
    return "reference (bundled with mlx)"
