"""``load_model``: any supported model spec → a ready ``ModelBundle``.

Specs: None (the default SmolLM2-135M-Instruct GGUF), a ``.gguf`` path, an mlx-lm
model directory (with ``config.json``), or a Hugging Face repo id already in the
local HF cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx.utils import tree_flatten

from kvrouter.worker.cache_state import StateSpec, state_spec
from kvrouter.worker.config import KvQuantization

from .identity import model_identity, weights_digest
from .resolve import DEFAULT_MODEL_NAME, ModelNotFoundError, default_model_path, hf_snapshot_path
from .tokenizer import gguf_tokenizer_fields
from .tool_parser import declared_tool_parser

if TYPE_CHECKING:
    import mlx.nn as nn

logger = logging.getLogger("kvrouter.models")

DEFAULT_CONTEXT_LENGTH = 4096
"""Used when a model directory declares no context length."""


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model and everything needed to serve it.

    Attributes:
        name: id shown by ``/v1/models``: ``"SmolLM2-135M-Instruct"`` for the default model,
            else the GGUF file stem, the directory name, or the HF repo id.
        model: mlx-lm model (``mlx_lm.models.llama.Model`` for GGUF), called as
            ``model(inputs, cache=cache)`` with int32 ids of shape (batch, tokens),
            returning logits (batch, tokens, vocab).
        tokenizer_json: full JSON of a ``tokenizers`` Tokenizer.
        chat_template: Jinja chat template, or None.
        eos_token_ids: ids that end generation.
        bos_token_id: beginning-of-sequence id, or None.
        context_length: maximum context in tokens.
        identity: hex digest of weights + tokenizer + KV layout + format + versions.
        kv_layout: e.g. ``"layers=30;kv_heads=3;head_dim=64;dtype=float32;caches=KVCachex30"``
            (see ``kv_layout_of``).
        state: how its caches behave (``worker.cache_state.StateSpec``: layout, reuse
            rules, batchable, serializable).
        tool_parser: the mlx-lm tool parser ``mlx_lm.load`` chose for a model directory
            (named in its files or found in its template), or None (GGUF: chosen later
            from the template, ``worker.models.tool_parser``).
    """

    name: str
    model: nn.Module
    tokenizer_json: str
    chat_template: str | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    context_length: int
    identity: str
    kv_layout: str
    state: StateSpec
    tool_parser: str | None = None


def default_dequantize() -> bool:
    """True on MLX's CPU backend (quantized matmul there is ~25x slower than float32 BLAS),
    False on a GPU (Metal/CUDA run quantized weights fast)."""
    return mx.default_device() == mx.cpu


def load_model(spec: str | None, cache_dir: Path, *, dequantize: bool | None = None,
               kv_quant: KvQuantization | None = None) -> ModelBundle:
    """Load a model for MLX inference.

    Args:
        spec: None for the default model; a path ending ``.gguf`` (llama architecture,
            Q4_0/Q4_1/Q8_0/F16/F32); a directory with ``config.json`` (mlx-lm format);
            or a Hugging Face repo id present in the local HF cache.
        cache_dir: kvrouter cache directory (default-model download, digest cache).
        dequantize: True → float32 weights and model dtype; False → keep quantized weights;
            None → ``default_dequantize()``.
        kv_quant: quantized KV cache (``--kv-bits``), or None for the model's own caches.

    Returns:
        A ``ModelBundle`` with parameters evaluated.

    Raises:
        ModelNotFoundError: the spec names nothing loadable locally (or the default
            model could not be fetched).
        ValueError: unsupported GGUF architecture, tensor or tokenizer; ``kv_quant`` for
            a model whose layers are not all plain ``KVCache``.
    """
    cache_dir = Path(cache_dir)
    if dequantize is None:
        dequantize = default_dequantize()
    if spec is None:
        return _load_gguf(default_model_path(cache_dir), cache_dir, dequantize, DEFAULT_MODEL_NAME, kv_quant)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, cache_dir, dequantize, path.name[: -len(".gguf")], kv_quant)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json")
        return _load_mlx_dir(path, cache_dir, dequantize, path.resolve().name, kv_quant)
    return _load_mlx_dir(hf_snapshot_path(spec), cache_dir, dequantize, spec, kv_quant)


def _load_gguf(path: Path, cache_dir: Path, dequantize: bool, name: str, kv_quant) -> ModelBundle:
    from .gguf import load_gguf_model

    logger.info("loading GGUF %s (dequantize=%s)", path, dequantize)
    model, metadata = load_gguf_model(path, dequantize=dequantize)
    fields = gguf_tokenizer_fields(metadata)
    return _bundle(
        name=name,
        model=model,
        weights_path=path,
        cache_dir=cache_dir,
        weights_mode="dequantized" if dequantize else "as_stored",
        context_length=int(metadata["llama.context_length"]),
        kv_quant=kv_quant,
        **fields,
    )


def _load_mlx_dir(path: Path, cache_dir: Path, dequantize: bool, name: str, kv_quant) -> ModelBundle:
    import mlx_lm
    from mlx_lm.utils import dequantize_model

    logger.info("loading mlx-lm model %s (dequantize=%s)", path, dequantize)
    model, wrapper, config = mlx_lm.load(str(path), return_config=True)
    if dequantize:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    hf_tokenizer = wrapper._tokenizer
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer_json = tokenizer_file.read_text(encoding="utf-8")
    else:
        tokenizer_json = hf_tokenizer.backend_tokenizer.to_str()
    eos_ids = list(wrapper.eos_token_ids or [])
    first = hf_tokenizer.eos_token_id
    ordered = ([first] if first is not None else []) + sorted(i for i in eos_ids if i != first)
    text_config: dict[str, Any] = config.get("text_config", config)
    context = (
        text_config.get("max_position_embeddings")
        or getattr(hf_tokenizer, "model_max_length", None)
        or DEFAULT_CONTEXT_LENGTH
    )
    if context > 1 << 24:  # transformers' "unbounded" sentinel
        context = DEFAULT_CONTEXT_LENGTH
    return _bundle(
        name=name,
        model=model,
        weights_path=path,
        cache_dir=cache_dir,
        weights_mode="dequantized" if dequantize else "as_stored",
        tokenizer_json=tokenizer_json,
        chat_template=getattr(hf_tokenizer, "chat_template", None),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in ordered)),
        bos_token_id=hf_tokenizer.bos_token_id,
        context_length=int(context),
        kv_quant=kv_quant,
        tool_parser=declared_tool_parser(wrapper),
    )


def _bundle(
    *, name: str, model: Any, weights_path: Path, cache_dir: Path, tokenizer_json: str, weights_mode: str,
    kv_quant: KvQuantization | None, **rest: Any,
) -> ModelBundle:
    try:
        spec = state_spec(model, kv_quant)
    except ValueError as exc:
        raise ValueError(f"model {name}: {exc}") from exc
    layout = kv_layout_of(model, spec)
    # The same file dequantized (CPU) or kept quantized (GPU) computes slightly
    # different KV values: checkpoints of one must never load into the other.
    identity = model_identity(
        weights_digest(weights_path, cache_dir),
        tokenizer_json,
        f"{layout};weights={weights_mode}",
        mlx_version=mx.__version__,
        mlx_lm_version=version("mlx-lm"),
    )
    logger.info("model %s ready: %s, identity %s", name, layout, identity)
    return ModelBundle(
        name=name, model=model, tokenizer_json=tokenizer_json, identity=identity, kv_layout=layout, state=spec,
        **rest,
    )


def kv_layout_of(model: Any, spec: StateSpec) -> str:
    """Describe the state a model produces: shapes measured by running one token
    through its own caches, then ``caches=`` and the cache class of every layer with
    what fixes its layout (window, kv bits, group size: ``cache_state.describe_layout``).

    Returns:
        ``"layers=L;kv_heads=H;head_dim=D;dtype=T;caches=..."`` for models whose caches
        all hold keys of shape (batch, heads, tokens, head_dim); otherwise the cache
        class names and state shapes, joined with ``;``, then ``;caches=...``.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]], dtype=mx.int32), cache=cache)
    keys = [getattr(c, "keys", None) for c in cache]
    shapes = {(k.shape[1], k.shape[3], k.dtype) for k in keys if isinstance(k, mx.array) and k.ndim == 4}
    if len(shapes) == 1 and all(isinstance(k, mx.array) and k.ndim == 4 for k in keys):
        heads, head_dim, dtype = shapes.pop()
        measured = f"layers={len(cache)};kv_heads={heads};head_dim={head_dim};dtype={_dtype_name(dtype)}"
    else:
        parts = []
        for c in cache:
            arrays = [a for _, a in tree_flatten([c.state]) if isinstance(a, mx.array)]
            desc = ",".join(f"{a.shape[1:]}:{_dtype_name(a.dtype)}" for a in arrays)
            parts.append(f"{type(c).__name__}[{desc}]")
        measured = f"layers={len(cache)};" + ";".join(parts)
    return f"{measured};caches={spec.layout}"


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")

