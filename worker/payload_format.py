"""The checkpoint payload format: one version number, and reading a payload's
version without MLX (the router's `kvrouter cache` commands use it).

Version 2 (this one): mlx-lm's `save_prompt_cache` layout (each layer's cache
class and `state`) with metadata `format`, `model_id`, `n_tokens`; written and
read by `worker.cache_state`. Version 1 held hand-sliced `{layer}.keys` /
`{layer}.values` tensors of plain KV caches only. The version is part of the
model identity (`worker.models.identity`), so a worker never looks up a payload
of another version; `kvrouter cache verify` reports such payloads and
`kvrouter cache gc` removes them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

CHECKPOINT_FORMAT = 2
"""Version of the checkpoint payload format; bump when stored checkpoints become incompatible."""

FORMAT_TAG = f"kvrouter-kv-{CHECKPOINT_FORMAT}"
"""The `format` metadata value of a payload of this version."""

_HEADER_LIMIT = 100 << 20  # safetensors caps its JSON header at 100 MB


def read_format_tag(path: Path) -> str | None:
    """The `format` metadata of a safetensors payload (version 1 kept it at the top
    level, version 2 under `save_prompt_cache`'s "0." prefix), read from the file's
    JSON header only. None when the file has no such tag or is not a readable
    safetensors file. Raises OSError when the file cannot be opened."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return None
        (size,) = struct.unpack("<Q", head)
        if size > _HEADER_LIMIT:
            return None
        try:
            meta = json.loads(f.read(size)).get("__metadata__") or {}
        except (ValueError, AttributeError):
            return None
    tag = meta.get("0.format", meta.get("format"))
    return tag if isinstance(tag, str) else None
