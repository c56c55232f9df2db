"""The model state of one sequence: every layer's mlx-lm cache, made, cut,
copied, written to a checkpoint file and read back through mlx-lm's cache API.

A state is the list `mlx_lm.models.cache.make_prompt_cache(model)` returns: per
layer a cache object (`KVCache`, `RotatingKVCache` for sliding-window layers,
`ArraysCache` for recurrent layers, `QuantizedKVCache` with `--kv-bits`,
`ChunkedKVCache`, `CacheList` of several). Checkpoint files have the layout of mlx-lm's
`save_prompt_cache` (each layer's class name and its `state`, scalars
included) plus our metadata, written one tensor at a time (`worker.payload_write`),
and are read back in the same layout by
`worker.checkpoint_load` (one hashed read, arrays built per tensor); nothing here
slices tensors by layer kind except `cut`, which compacts a state to exactly the
tokens it keeps.

A state holds `held` tokens: the engine counts the tokens it fed. Layers that
know their own count (every attention cache's `offset`) must agree with it;
recurrent layers have no count of their own, so the engine's count is what a
checkpoint records.

Cutting back (`cut`): full KV caches give any shorter prefix (attention is
causal, so keys and values before n do not depend on later tokens);
sliding-window caches only while their window has not wrapped
(`RotatingKVCache.is_trimmable`); recurrent state never: such a state is used
whole, and its checkpoints are taken exactly where a prefill segment ends
(`reuse_rules` says which, `cachestore.costs.reusable_tokens` applies it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    ChunkedKVCache,
    ConcatenateKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

from kvrouter.cachestore.costs import ReuseRules
from kvrouter.worker.config import KvQuantization
from kvrouter.worker.payload_format import FORMAT_TAG
from kvrouter.worker.payload_write import prompt_cache_arrays, write_safetensors

_FULL = (KVCache, QuantizedKVCache, ConcatenateKVCache)  # keep every token: cut anywhere


class CheckpointFormatError(RuntimeError):
    """A checkpoint file that does not hold a state this worker can use."""


class CutError(ValueError):
    """A state cannot be cut back to the requested number of tokens (its sliding
    window has wrapped, or it has recurrent layers)."""


def new_state(model, quant: KvQuantization | None = None) -> list:
    """An empty state for `model`: mlx-lm's `make_prompt_cache`, or with `quant` a
    `QuantizedKVCache` per layer.

    Raises ValueError when `quant` is given and not every layer is a plain `KVCache`
    (sliding-window and recurrent layers have no quantized form in mlx-lm)."""
    caches = make_prompt_cache(model)
    if quant is None:
        return caches
    kinds = sorted({type(c).__name__ for c in caches} - {"KVCache"})
    if kinds:
        raise ValueError(f"--kv-bits needs a model whose every layer is a plain KVCache; this one also has {kinds}")
    return [QuantizedKVCache(group_size=quant.group_size, bits=quant.bits) for _ in caches]


def leaves(caches) -> list:
    """The caches of a state with every `CacheList` opened, in order."""
    out = []
    for c in caches:
        out += leaves(c.caches) if isinstance(c, CacheList) else [c]
    return out


def reuse_rules(caches) -> ReuseRules:
    """How far back states of this layout can be cut (see `cachestore.costs.ReuseRules`),
    from the cache classes of a state (an empty one will do)."""
    windows, exact = [], False
    for c in leaves(caches):
        if isinstance(c, _FULL):
            continue
        if isinstance(c, RotatingKVCache):
            windows.append(c.max_size)
        elif isinstance(c, ChunkedKVCache):
            windows.append(c.chunk_size)
        else:  # ArraysCache (recurrent) and any class we do not know
            exact = True
    if exact:
        return ReuseRules(cut_any=False, window_tokens=0)
    if windows:
        return ReuseRules(cut_any=False, window_tokens=min(windows))
    return ReuseRules()


def batchable(caches) -> bool:
    """True when mlx-lm's `BatchGenerator` can merge these caches (every layer has
    `merge`; `QuantizedKVCache` and `ChunkedKVCache` do not)."""
    return all(hasattr(c, "merge") for c in caches)


def serializable(caches) -> bool:
    """True when `load_prompt_cache` can rebuild every layer (its class is one of
    `mlx_lm.models.cache`'s: it looks classes up there by name)."""
    return all(getattr(mlx_cache, type(c).__name__, None) is type(c) for c in leaves(caches))


def describe_layout(caches) -> str:
    """The layout part of the model identity: each layer's cache class with what fixes
    its shape (window, chunk, kv bits and group size), runs of equal layers as `xN`.
    E.g. "RotatingKVCache(window=128),KVCache" or "QuantizedKVCache(bits=8,group=64)x30"."""

    def one(c) -> str:
        name = type(c).__name__
        if isinstance(c, CacheList):
            return f"{name}[{describe_layout(c.caches)}]"
        if isinstance(c, RotatingKVCache):
            return f"{name}(window={c.max_size},keep={c.keep})"
        if isinstance(c, ChunkedKVCache):
            return f"{name}(chunk={c.chunk_size})"
        if isinstance(c, QuantizedKVCache):
            return f"{name}(bits={c.bits},group={c.group_size})"
        if isinstance(c, ArraysCache):
            return f"{name}(size={len(c.cache)})"
        return name

    runs: list[list] = []
    for c in caches:
        d = one(c)
        if runs and runs[-1][0] == d:
            runs[-1][1] += 1
        else:
            runs.append([d, 1])
    return ",".join(d if n == 1 else f"{d}x{n}" for d, n in runs)


def layer_tokens(cache) -> int | None:
    """Tokens a layer says it holds (its `offset`), or None for layers that keep no
    count (recurrent `ArraysCache`). For a `CacheList`, its children's common count."""
    if isinstance(cache, CacheList):
        counts = {layer_tokens(c) for c in cache.caches} - {None}
        return counts.pop() if len(counts) == 1 else (None if not counts else -1)
    offset = getattr(cache, "offset", None)
    return offset if isinstance(offset, int) else None


def check_tokens(caches, held: int, what: str = "state") -> None:
    """Raises CheckpointFormatError unless every layer that counts its tokens holds `held`."""
    for i, c in enumerate(caches):
        n = layer_tokens(c)
        if n is not None and n != held:
            raise CheckpointFormatError(f"{what}: layer {i} ({type(c).__name__}) holds {n} tokens, expected {held}")


def nbytes(caches) -> int:
    """Memory held by a state's arrays, bytes."""
    return sum(c.nbytes for c in caches)


def _fresh(x):
    """A new array object over the same data: writes into a cache's copy never reach the original."""
    return x[...] if isinstance(x, mx.array) else x


def _cut_layer(c, held: int, n: int):
    """A new cache object holding the first `n` of the `held` tokens of layer `c`."""
    if isinstance(c, CacheList):
        return CacheList(*(_cut_layer(x, held, n) for x in c.caches))
    if isinstance(c, (KVCache, ConcatenateKVCache)):
        out = type(c)()
        if c.keys is not None and n > 0:
            out.keys, out.values = c.keys[..., :n, :], c.values[..., :n, :]
        out.offset = n if out.keys is not None else 0
        return out
    if isinstance(c, QuantizedKVCache):
        out = QuantizedKVCache(group_size=c.group_size, bits=c.bits)
        if c.keys is not None and n > 0:
            out.keys, out.values = tree_map(lambda x: x[..., :n, :], (c.keys, c.values))
        out.offset = n if out.keys is not None else 0
        return out
    if isinstance(c, RotatingKVCache) and (n < held or (c.keys is not None and c.is_trimmable())):
        if not c.is_trimmable() or c.keys is None or c.keys.shape[2] < n:
            raise CutError(f"sliding window of {c.max_size} tokens has wrapped ({held} tokens): cannot cut to {n}")
        out = RotatingKVCache(c.max_size, keep=c.keep)
        out.keys, out.values, out.offset, out._idx = c.keys[..., :n, :], c.values[..., :n, :], n, n
        return out
    if isinstance(c, ChunkedKVCache) and (n < held or (c.keys is not None and c.start_position == 0)):
        if c.start_position != 0:
            raise CutError(f"chunked attention cache past its first chunk: cannot cut {held} tokens to {n}")
        out = ChunkedKVCache(c.chunk_size)
        out.keys, out.values, out.offset = c.keys[..., :n, :], c.values[..., :n, :], n
        return out
    if n != held:
        raise CutError(f"{type(c).__name__} holds one state for all {held} tokens: cannot cut to {n}")
    if isinstance(c, ArraysCache):
        out = ArraysCache(len(c.cache))
        out.cache = [_fresh(x) for x in c.cache]
        return out
    return type(c).from_state(tree_map(_fresh, c.state))


def cut(caches, held: int, n: int) -> list:
    """A new state holding the first `n` of the `held` tokens of `caches` (new array
    objects: later writes into either state never reach the other; `caches` stay as
    they are). Full KV caches are compacted to exactly `n` tokens.

    Raises CutError when a layer cannot be cut back that far (n < held on a wrapped
    sliding window or a recurrent layer) and ValueError when n > held."""
    if not 0 <= n <= held:
        raise ValueError(f"cannot take {n} tokens of a state holding {held}")
    return [_cut_layer(c, held, n) for c in caches]


def trim(caches, held: int, n: int) -> None:
    """Shrinks a state in place to its first `n` of `held` tokens (mlx-lm's `trim`).
    Raises CutError when a layer cannot be trimmed that far (checked before any
    layer changes)."""
    if n == held:
        return
    if not all(c.is_trimmable() for c in caches):
        raise CutError(f"state of {held} tokens cannot be trimmed to {n}")
    for c in caches:
        c.trim(held - n)


def payload_writer(caches, n_tokens: int, model_id: str,
                   pause: Callable[[], None] | None = None, guard=None) -> Callable[[Path], None]:
    """A function that writes a state holding exactly `n_tokens` tokens to a path
    ending in ".safetensors", in mlx-lm's `save_prompt_cache` layout (each layer's class
    and `state`), with metadata: format tag, model identity, token count. It writes one
    tensor at a time (`worker.payload_write`) and calls `pause()` before each (the
    worker's writer holds there while first tokens are pending); `guard` (a lock, or
    None) is held while each tensor is handed to the host. Raises CutError when the
    state does not hold `n_tokens` tokens."""
    check_tokens(caches, n_tokens)
    metadata = {"format": FORMAT_TAG, "model_id": model_id, "n_tokens": str(n_tokens)}

    def write(path: Path) -> None:
        arrays, flat_meta = prompt_cache_arrays(caches, metadata)
        write_safetensors(path, arrays, flat_meta, pause, guard)

    return write


@dataclass(frozen=True)
class StateSpec:
    """What one model's state looks like, worked out once at load (`state_spec`).

    model: the mlx-lm model; quant: `--kv-bits` quantization or None;
    layout: `describe_layout` of an empty state (part of the model identity);
    rules: how far back its states can be cut; batchable: mlx-lm's `BatchGenerator`
    can batch it (else requests run one at a time); serializable: its checkpoints
    can be written and read back (`load_prompt_cache` knows every class).
    """

    model: object
    quant: KvQuantization | None
    layout: str
    rules: ReuseRules
    batchable: bool
    serializable: bool

    def new(self) -> list:
        """An empty state."""
        return new_state(self.model, self.quant)


def state_spec(model, quant: KvQuantization | None = None) -> StateSpec:
    """The `StateSpec` of `model`. Raises ValueError as `new_state` does, and when
    `quant` cannot quantize this model's keys (checked by running one token: mx.quantize
    needs the head dimension to be a multiple of the group size)."""
    caches = new_state(model, quant)
    if quant is not None:
        try:
            mx.eval(model(mx.array([[0]], dtype=mx.int32), cache=new_state(model, quant)))
        except ValueError as exc:
            raise ValueError(f"--kv-bits {quant.bits} --kv-group-size {quant.group_size}: {exc}") from exc
    return StateSpec(model, quant, describe_layout(caches), reuse_rules(caches), batchable(caches),
                     serializable(caches))
