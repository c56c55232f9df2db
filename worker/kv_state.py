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


def prefix_copy(caches: list[KVCache], n_tokens: int) -> list[KVCache]:
    """A new state holding the first `n_tokens` tokens of `caches`, which stay as they are."""
    out = []
    for c in caches:
        copy = KVCache()
        copy.keys, copy.values, copy.offset = c.keys[..., :n_tokens, :], c.values[..., :n_tokens, :], n_tokens
        out.append(copy)
    return out


def snapshot(caches: list[KVCache], n_tokens: int) -> dict[str, mx.array]:
    """The first `n_tokens` of the state as evaluated arrays named "{layer}.keys" /
    "{layer}.values", each of shape (1, kv_heads, n_tokens, head_dim).

    The slices are new array objects, independent of later updates to `caches`.
    Raises ValueError when the state holds fewer than `n_tokens` tokens.
    """
    if state_length(caches) < n_tokens:
        raise ValueError(f"state holds {state_length(caches)} tokens, cannot snapshot {n_tokens}")
    arrays: dict[str, mx.array] = {}
    for i, c in enumerate(caches):
        arrays[f"{i}.keys"] = c.keys[..., :n_tokens, :]
        arrays[f"{i}.values"] = c.values[..., :n_tokens, :]
    mx.eval(list(arrays.values()))
    return arrays


def snapshot_bytes(arrays: dict[str, mx.array]) -> int:
    """Memory held by a snapshot, bytes."""
    return sum(a.nbytes for a in arrays.values())


def payload_writer(arrays: dict[str, mx.array], n_tokens: int, model_id: str) -> Callable[[Path], None]:
    """A function that writes a snapshot to a path ending in ".safetensors"."""
    metadata = {"format": CHECKPOINT_FORMAT, "model_id": model_id, "n_tokens": str(n_tokens)}

    def write(path: Path) -> None:
        mx.save_safetensors(str(path), arrays, metadata=metadata)

    return write


def state_from_arrays(arrays: dict[str, mx.array], model, n_tokens: int, name: str = "snapshot") -> list[KVCache]:
    """A fresh state holding a snapshot of `n_tokens` tokens (new array objects:
    later prefill never changes `arrays`).

    Raises CheckpointFormatError when the layer count or token count does not match.
    """
    caches = new_state(model)
    if len(arrays) != 2 * len(caches):
        raise CheckpointFormatError(f"{name}: {len(arrays) // 2} layers, model has {len(caches)}")
    for i, c in enumerate(caches):
        keys, values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        if keys.shape[2] != n_tokens or values.shape[2] != n_tokens:
            raise CheckpointFormatError(f"{name}: layer {i} holds {keys.shape[2]} tokens, expected {n_tokens}")
        c.keys, c.values, c.offset = keys[..., :n_tokens, :], values[..., :n_tokens, :], n_tokens
    return caches


def load_arrays(path: Path, model_id: str, n_tokens: int) -> dict[str, mx.array]:
    """Reads a checkpoint file written by `payload_writer`, evaluated.

    Raises:
        CheckpointFormatError: unreadable file, wrong format tag, model identity or
            token count (the file is then useless and should be quarantined).
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
    mx.eval(list(arrays.values()))
    return arrays
