"""Model identity: which checkpoints a loaded model may reuse.

A KV checkpoint is only valid for the same weights, tokenizer, KV layout, checkpoint
format and MLX/mlx-lm versions; ``model_identity`` hashes all of them.
Hashing the weights file costs ~0.1 s per 100 MB, so the weights digest is cached in
``<cache_dir>/models/digests.json`` keyed by resolved path, size and mtime.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import xxhash

from kvrouter.worker.payload_format import CHECKPOINT_FORMAT

logger = logging.getLogger("kvrouter.models")

CHUNK_BYTES = 8 << 20
DIGESTS_FILE = "digests.json"


def _field(tag: str, value: str | int) -> bytes:
    """One length-prefixed, type-tagged field: ``tag:type:len:`` then the UTF-8 bytes."""
    kind = "i" if isinstance(value, int) else "s"
    data = str(value).encode("utf-8")
    return f"{tag}:{kind}:{len(data)}:".encode("ascii") + data


def model_identity(
    weights_digest: str,
    tokenizer_json: str,
    kv_layout: str,
    *,
    mlx_version: str,
    mlx_lm_version: str,
    checkpoint_format: int = CHECKPOINT_FORMAT,
) -> str:
    """Digest that names a model for KV reuse.

    Args:
        weights_digest: hex digest of the weights files (``weights_digest``).
        tokenizer_json: the tokenizer's JSON text (hashed here).
        kv_layout: the state layout: shapes, and the cache class of every layer with
            its window, kv bits and group size (``loader.kv_layout_of``).
        mlx_version, mlx_lm_version: versions; only ``major.minor`` counts.
        checkpoint_format: KV checkpoint format version.

    Returns:
        32-character hex xxh3_128 digest.
    """
    h = xxhash.xxh3_128()
    for tag, value in (
        ("weights", weights_digest),
        ("tokenizer", xxhash.xxh3_128_hexdigest(tokenizer_json.encode("utf-8"))),
        ("kv_layout", kv_layout),
        ("format", int(checkpoint_format)),
        ("mlx", major_minor(mlx_version)),
        ("mlx_lm", major_minor(mlx_lm_version)),
    ):
        h.update(_field(tag, value))
    return h.hexdigest()


def major_minor(version: str) -> str:
    """``"0.32.4"`` → ``"0.32"``."""
    return ".".join(version.split(".")[:2])


def hash_files(files: Iterable[Path]) -> str:
    """xxh3_128 hex digest over the bytes of ``files`` in the given order (8 MiB reads).
    Each file is prefixed by its name and size so that splitting differently changes the digest."""
    h = xxhash.xxh3_128()
    for path in files:
        h.update(_field("file", path.name))
        h.update(_field("size", path.stat().st_size))
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
    return h.hexdigest()


def weights_files(path: Path) -> list[Path]:
    """The files whose bytes are the weights: the file itself, or a directory's
    ``*.safetensors`` sorted by name.

    Raises:
        FileNotFoundError: a directory without safetensors files.
    """
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def weights_digest(path: Path, cache_dir: Path | None) -> str:
    """Digest of the weights at ``path`` (file or model directory), cached.

    Args:
        path: a weights file (GGUF) or a model directory.
        cache_dir: kvrouter cache directory; the cache lives in ``cache_dir/models/digests.json``.
            None disables caching.

    Returns:
        hex digest (see ``hash_files``).
    """
    files = [f.resolve() for f in weights_files(path)]
    key = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    store = None if cache_dir is None else Path(cache_dir) / "models" / DIGESTS_FILE
    cached = _read_digests(store)
    if key in cached:
        return cached[key]
    logger.info("hashing weights of %s (%d file(s))", path, len(files))
    digest = hash_files(files)
    if store is not None:
        cached[key] = digest
        _write_digests(store, cached)
    return digest


def _read_digests(store: Path | None) -> dict[str, str]:
    if store is None or not store.exists():
        return {}
    try:
        data = json.loads(store.read_text())
    except (OSError, ValueError):
        logger.warning("ignoring unreadable digest cache %s", store)
        return {}
    return data if isinstance(data, dict) else {}


def _write_digests(store: Path, digests: dict[str, str]) -> None:
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=".digests.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(digests, f, indent=1, sort_keys=True)
        os.replace(tmp, store)
    except OSError as exc:
        logger.warning("could not write digest cache %s: %s", store, exc)
