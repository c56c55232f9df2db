"""GGUF (llama architecture) → ``mlx_lm.models.llama.Model``.

``mx.load`` reads GGUF files natively and returns Q4_0/Q4_1/Q8_0 tensors already
in MLX's affine quantized format (uint32 ``weight`` + ``scales`` + ``biases``,
group size 32). This module renames them onto mlx-lm's llama module tree and
either keeps them quantized or dequantizes them to float32.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama

logger = logging.getLogger("kvrouter.models")

GGUF_GROUP_SIZE = 32
"""Quantization group size of the GGUF block formats mx.load understands."""

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|scales|biases|bias)$")


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Read a GGUF file.

    Args:
        path: the ``.gguf`` file.

    Returns:
        (tensors by GGUF name, metadata with ``mx.array`` values turned into Python
        ints/floats/bools/lists).

    Raises:
        ValueError: mx.load cannot parse the file (e.g. unsupported quantization type).
    """
    tensors, metadata = mx.load(str(path), return_metadata=True)
    return tensors, {key: _to_python(value) for key, value in metadata.items()}


def _to_python(value: Any) -> Any:
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def model_args_from_metadata(metadata: dict[str, Any], tie_word_embeddings: bool) -> llama.ModelArgs:
    """Build llama ``ModelArgs`` from GGUF metadata (``llama.*`` keys).

    GGUF stores Q/K rows in the interleaved rotary layout, hence ``rope_traditional=True``.

    Raises:
        ValueError: the architecture is not ``llama`` or a required key is missing.
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; only 'llama'")

    def need(key: str) -> Any:
        if f"llama.{key}" not in metadata:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return metadata[f"llama.{key}"]

    vocab_size = metadata.get("llama.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    heads = int(need("attention.head_count"))
    rope_dim = metadata.get("llama.rope.dimension_count")
    hidden = int(need("embedding_length"))
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=int(need("block_count")),
        intermediate_size=int(need("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(metadata.get("llama.attention.head_count_kv", heads)),
        head_dim=int(rope_dim) if rope_dim else hidden // heads,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        vocab_size=int(vocab_size),
        max_position_embeddings=int(need("context_length")),
        rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
        rope_traditional=True,
        tie_word_embeddings=tie_word_embeddings,
    )


def rename_tensors(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map GGUF tensor names onto mlx-lm llama parameter names.

    Raises:
        ValueError: a tensor name has no mapping.
    """
    renamed = {}
    for name, value in tensors.items():
        block = _BLOCK.match(name)
        top = _TOP.match(name)
        if block and block.group(2) in _LAYER_NAMES:
            layer, part, leaf = block.groups()
            renamed[f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}"] = value
        elif top and top.group(1) in _TOP_NAMES:
            renamed[f"{_TOP_NAMES[top.group(1)]}.{top.group(2)}"] = value
        elif name.endswith("rope_freqs.weight"):
            raise ValueError("GGUF with rope_freqs (llama3 rope scaling) is not supported")
        else:
            raise ValueError(f"unknown GGUF tensor {name!r}")
    return renamed


def quantized_bits(weights: dict[str, mx.array], prefix: str) -> int | None:
    """Bits per weight of the quantized tensor ``prefix`` (None when not quantized).

    Inferred from shapes: ``weight`` packs ``32 / bits`` values per uint32 column and
    ``scales`` has one column per group of ``GGUF_GROUP_SIZE`` inputs.
    """
    scales = weights.get(f"{prefix}.scales")
    if scales is None:
        return None
    in_features = scales.shape[-1] * GGUF_GROUP_SIZE
    return weights[f"{prefix}.weight"].shape[-1] * 32 // in_features


def dequantize_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace every quantized ``weight``/``scales``/``biases`` triple by a float32 weight;
    cast every other float tensor to float32."""
    quantized = {name[: -len(".scales")] for name in weights if name.endswith(".scales")}
    out = {}
    for name, value in weights.items():
        prefix, leaf = name.rsplit(".", 1)
        if prefix in quantized and leaf in ("scales", "biases"):
            continue
        if prefix in quantized and leaf == "weight":
            value = mx.dequantize(
                value,
                weights[f"{prefix}.scales"],
                weights[f"{prefix}.biases"],
                GGUF_GROUP_SIZE,
                quantized_bits(weights, prefix),
            )
        out[name] = value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value
    return out


def load_gguf_model(path: Path, *, dequantize: bool) -> tuple[llama.Model, dict[str, Any]]:
    """Load a llama-architecture GGUF file as an mlx-lm model.

    Args:
        path: the ``.gguf`` file.
        dequantize: True → float32 weights and float32 model dtype; False → keep the
            quantized weights (``nn.QuantizedLinear``/``QuantizedEmbedding`` with the bits
            found in the file, group size 32).

    Returns:
        (model with parameters evaluated, GGUF metadata as Python values).

    Raises:
        ValueError: unsupported architecture, tensor or quantization type.
    """
    tensors, metadata = read_gguf(path)
    weights = rename_tensors(tensors)
    tied = "lm_head.weight" not in weights
    args = model_args_from_metadata(metadata, tie_word_embeddings=tied)
    model = llama.Model(args)
    if dequantize:
        weights = dequantize_weights(weights)
        model.set_dtype(mx.float32)
    else:
        nn.quantize(
            model,
            group_size=GGUF_GROUP_SIZE,
            class_predicate=lambda name, _module: (
                {"group_size": GGUF_GROUP_SIZE, "bits": quantized_bits(weights, name)}
                if f"{name}.scales" in weights
                else False
            ),
        )
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    logger.info(
        "loaded GGUF %s: %d layers, %d packed parameters, %s",
        path.name,
        args.num_hidden_layers,
        n_params,
        "dequantized to float32" if dequantize else "quantized",
    )
    return model, metadata
