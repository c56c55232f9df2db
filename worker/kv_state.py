"""KV state of one sequence: make, snapshot to a checkpoint file, restore from one.

The KV state is mlx-lm's per-layer `KVCache` list (`make_prompt_cache`). Each
layer holds keys and values of shape (1, kv_heads, capacity, head_dim) and an
`offset` (tokens filled). A checkpoint of the first `n` tokens is the slice
`[..., :n, :]` of every layer, written as one safetensors file with tensors
`"{layer}.keys"` / `"{layer}.values"` and metadata naming the format and model.

Because attention is causal, the keys and values at positions < n do not depend
on later tokens, so a checkpoint of n tokens can be cut from a state that has
already run past n (a prefill chunk that crossed the store point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

CHECKPOINT_FORMAT = "kvrouter-kv-1"


class CheckpointFormatError(RuntimeError):
    """A checkpoint file that does not hold a KV state this worker can use."""


def new_state(model) -> list[KVCache]:
    """An empty KV state for `model`.

    Raises:
        CheckpointFormatError: the model's cache is not a plain `KVCache` per
            layer (sliding-window or recurrent layers), which checkpoints do not
            support.
    """
    caches = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in caches):
        kinds = sorted({type(c).__name__ for c in caches})
        raise CheckpointFormatError(f"unsupported cache types for checkpoints: {kinds}")
    return caches


def state_length(caches: list[KVCache]) -> int:
    """Tokens held in the state (the first layer's offset)."""
    return caches[0].offset if caches else 0


def trim_state(caches: list[KVCache], n_tokens: int) -> None:
    """Shrinks the state in place so it holds exactly the first `n_tokens` tokens."""
    for c in caches:
        excess = c.offset - n_tokens
        if excess > 0:
            c.trim(excess)


def snapshot_writer(caches: list[KVCache], n_tokens: int, model_id: str) -> Callable[[Path], None]:
    """A function that writes the first `n_tokens` of the state to a path.

    The slices are taken now (MLX arrays are values, so later prefill does not
    change them); the file is written when the returned function is called with
    a path ending in ".safetensors". Raises ValueError when the state holds
    fewer than `n_tokens` tokens.
    """
    if state_length(caches) < n_tokens:
        raise ValueError(f"state holds {state_length(caches)} tokens, cannot snapshot {n_tokens}")
    arrays: dict[str, mx.array] = {}
    for i, c in enumerate(caches):
        arrays[f"{i}.keys"] = c.keys[..., :n_tokens, :]
        arrays[f"{i}.values"] = c.values[..., :n_tokens, :]
    mx.eval(list(arrays.values()))
    metadata = {"format": CHECKPOINT_FORMAT, "model_id": model_id, "n_tokens": str(n_tokens)}

    def write(path: Path) -> None:
        mx.save_safetensors(str(path), arrays, metadata=metadata)

    return write


def load_state(path: Path, model, model_id: str, n_tokens: int) -> list[KVCache]:
    """Restores a KV state of `n_tokens` tokens from a checkpoint file.

    Raises:
        CheckpointFormatError: wrong format tag, model identity, token count or
            layer count (the file is then useless and should be quarantined).
    """
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError on damaged files
        raise CheckpointFormatError(f"cannot read checkpoint {path.name}: {exc}") from exc
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointFormatError(f"{path.name}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    if metadata.get("model_id") != model_id:
        raise CheckpointFormatError(f"{path.name}: written for another model identity")
    if metadata.get("n_tokens") != str(n_tokens):
        raise CheckpointFormatError(f"{path.name}: holds {metadata.get('n_tokens')} tokens, index says {n_tokens}")
    caches = new_state(model)
    if len(arrays) != 2 * len(caches):
        raise CheckpointFormatError(f"{path.name}: {len(arrays) // 2} layers, model has {len(caches)}")
    for i, c in enumerate(caches):
        keys, values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        if keys.shape[2] != n_tokens or values.shape[2] != n_tokens:
            raise CheckpointFormatError(f"{path.name}: layer {i} holds {keys.shape[2]} tokens")
        c.keys, c.values, c.offset = keys, values, n_tokens
    mx.eval([a for c in caches for a in (c.keys, c.values)])
    return caches
