"""The tokenizer bundle SMG's gateway asks a worker for (`GetTokenizer`).

SMG (crates/tokenizer, model_gateway/src/workflow/tokenizer_registration.rs)
unzips the bundle into a directory and loads it as a Hugging Face tokenizer
directory: `tokenizer.json` (the `tokenizers` model), `tokenizer_config.json`
(`chat_template`, `bos_token`/`eos_token`, `add_bos_token`/`add_eos_token`),
`config.json` and `generation_config.json` (`eos_token_id`, merged into its stop
decoder). A chat template may also come as `chat_template.jinja`/`.json`.

A GGUF model has none of these files: they are written from the loaded
`ModelBundle` (the `tokenizer.json` the tokenizers library builds from the GGUF
metadata, its chat template and ids). An mlx-lm model directory's own files are
sent where they exist and take precedence over the written ones.

No MLX import here: the bundle is built from plain values.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK_BYTES = 64 * 1024
"""Bytes per `GetTokenizerChunk` (SMG's own servicers send 64 KiB)."""

DIRECTORY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
)
"""Files copied from a model directory when present (what SMG's loader reads)."""


def synthesized_files(
    tokenizer_json: str,
    chat_template: str | None,
    eos_token_ids: tuple[int, ...],
    bos_token_id: int | None,
    context_length: int,
    model_type: str = "",
) -> dict[str, bytes]:
    """The Hugging Face tokenizer files for a model known only by its bundle fields.

    Returns a mapping file name -> bytes: tokenizer.json, tokenizer_config.json,
    config.json, generation_config.json. Raises ValueError when an id is not in
    the vocabulary.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)

    def token(token_id: int) -> str:
        text = backend.id_to_token(int(token_id))
        if text is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        return text

    eos = [int(i) for i in eos_token_ids]
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # The prompt the gateway renders already holds every special token the
        # template writes; the tokenizer must not add its own (kvrouter's router
        # encodes with add_special_tokens=False too).
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context_length),
    }
    if chat_template:
        tok_config["chat_template"] = chat_template
    if eos:
        tok_config["eos_token"] = token(eos[0])
    if bos_token_id is not None:
        tok_config["bos_token"] = token(bos_token_id)
    config: dict[str, Any] = {
        "vocab_size": backend.get_vocab_size(with_added_tokens=True),
        "max_position_embeddings": int(context_length),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if model_type:
        config["model_type"] = model_type
    if bos_token_id is not None:
        config["bos_token_id"] = int(bos_token_id)
    generation = {"eos_token_id": eos}
    if bos_token_id is not None:
        generation["bos_token_id"] = int(bos_token_id)
    return {
        "tokenizer.json": tokenizer_json.encode("utf-8"),
        "tokenizer_config.json": json.dumps(tok_config, indent=2).encode("utf-8"),
        "config.json": json.dumps(config, indent=2).encode("utf-8"),
        "generation_config.json": json.dumps(generation, indent=2).encode("utf-8"),
    }


def directory_files(model_dir: Path | None) -> dict[str, bytes]:
    """The tokenizer files of an mlx-lm model directory (empty for None or a file)."""
    if model_dir is None or not model_dir.is_dir():
        return {}
    return {name: (model_dir / name).read_bytes() for name in DIRECTORY_FILES if (model_dir / name).is_file()}


def build_archive(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A deflated zip of `files` (sorted by name) and its SHA-256 hex digest."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            zf.writestr(name, files[name])
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def archive_chunks(data: bytes, sha256: str) -> Iterator[tuple[bytes, str]]:
    """(bytes, sha256-or-empty) pieces of at most CHUNK_BYTES; the digest rides on the last one only."""
    for start in range(0, len(data), CHUNK_BYTES):
        end = min(start + CHUNK_BYTES, len(data))
        yield data[start:end], (sha256 if end == len(data) else "")
