"""Attention for short query chunks on MLX's CUDA backend, without a cuDNN graph per shape.

On CUDA, `mx.fast.scaled_dot_product_attention` runs a query longer than one token
through cuDNN's fused attention, and MLX keeps one cuDNN graph per exact query, key,
value (and mask) shape and strides (`SDPACacheKey` in MLX's
`backend/cuda/scaled_dot_product_attention.cpp`), and building one takes tens of
milliseconds. A prefill chunk's shape is (its length, the cache's length), so nearly
every hit's suffix is a new shape. Measured on an H200 (8B shape, bf16; README,
"Fifth pass on the H200"): the attention call alone took 38-44 ms for a new shape
against 0.2 ms for a repeated one; a 160-token suffix over a 5.4K-token prefix took
53-80 ms with a new shape against 13 ms with a repeated one, and through this module
28-48 ms with a new shape (22 ms repeated: the fused kernel stays faster for shapes
it has seen, which prefill chunks rarely are). In the worker, the suffix chunks of a
compare run's hits took 74 ms at the median with the fused kernel and 45-48 ms with
this module. `mlx_lm.server` pays the same graph builds.

`short_query_attention` has the signature of `mx.fast.scaled_dot_product_attention`.
For a query of `MIN_QUERY_TOKENS` to `max_query_tokens` tokens, with no attention
sinks, it computes attention with plain MLX operations (two matmuls and a float32
softmax: grouped-query heads by reshaping, never by tiling), which need no graph
build; every other call goes to the fused kernel. The plain form costs O(query x
keys) memory, which is small for short chunks: 32 heads x 512 queries x 32K keys in
float32 is 2 GiB, hence the bounds (`MAX_SCORE_BYTES`). Decode (one query token)
keeps MLX's vector kernel.

`install` puts it in place of `mx.fast.scaled_dot_product_attention` (mlx-lm's
attention layers look that name up at each call), only where MLX runs on CUDA:
Metal's fused attention builds no graphs, and the CPU backend has none.
"""

from __future__ import annotations

import logging

import mlx.core as mx

from kvrouter.worker.config import DEFAULT_PLAIN_ATTENTION_TOKENS

log = logging.getLogger("kvrouter.worker.cuda_attention")

MIN_QUERY_TOKENS = 2  # one query token is decode: MLX's vector kernel, no graph build
MAX_SCORE_BYTES = 2 * 2**30
"""The plain form holds the float32 scores of one layer at once (batch x query heads x
query tokens x keys x 4 bytes); a call that would hold more goes to the fused kernel."""

_fused = mx.fast.scaled_dot_product_attention
_max_query_tokens = DEFAULT_PLAIN_ATTENTION_TOKENS


def short_query_attention(q, k, v, *, scale: float, mask=None, sinks=None, **kwargs):
    """softmax(q @ k.T * scale + mask) @ v, as `mx.fast.scaled_dot_product_attention`.

    q: [B, N_q, T_q, D]; k: [B, N_kv, T_kv, D]; v: [B, N_kv, T_kv, D_v] (N_q a
    multiple of N_kv); mask: None, "causal" (query i sees keys up to T_kv - T_q + i),
    a boolean array (True: attend) or an additive array, broadcastable to
    [B, N_q, T_q, T_kv]. Returns [B, N_q, T_q, D_v] in q's dtype. Queries outside
    [MIN_QUERY_TOKENS, max query tokens], scores past MAX_SCORE_BYTES, attention sinks
    and any other keyword go to the fused kernel. Raises ValueError for a mask string
    other than "causal"."""
    b, n_q, t_q, d = q.shape
    n_kv, t_kv = k.shape[1], k.shape[2]
    if (sinks is not None or kwargs or not MIN_QUERY_TOKENS <= t_q <= _max_query_tokens
            or b * n_q * t_q * t_kv * 4 > MAX_SCORE_BYTES):
        return _fused(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
    groups = n_q // n_kv
    qg = (q * scale).reshape(b, n_kv, groups, t_q, d)
    scores = (qg @ mx.expand_dims(k, 2).swapaxes(-1, -2)).astype(mx.float32)  # [B, N_kv, G, T_q, T_kv]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        mask = mx.arange(t_kv)[None] <= mx.arange(t_kv - t_q, t_kv)[:, None]
    if mask is not None:
        while mask.ndim < 4:
            mask = mask[None]
        # [B or 1, N_q or 1, T_q, T_kv]: the heads' axis splits as the queries' did
        heads = mask.shape[1] != 1
        mask = mask.reshape(mask.shape[0], n_kv if heads else 1, groups if heads else 1, *mask.shape[2:])
        if mask.dtype == mx.bool_:
            # The lowest finite value, not -inf, as MLX's own fallback: a query that may see
            # no key (a batch's left padding) gets finite weights instead of NaN, which its
            # later layers' keys and values would carry into every real query's sums.
            scores = mx.where(mask, scores, mx.array(mx.finfo(mx.float32).min, mx.float32))
        else:
            scores = scores + mask.astype(mx.float32)
    weights = mx.softmax(scores, axis=-1).astype(v.dtype)
    out = weights @ mx.expand_dims(v, 2)  # [B, N_kv, G, T_q, D_v]
    return out.reshape(b, n_q, t_q, v.shape[-1])


def install(max_query_tokens: int = DEFAULT_PLAIN_ATTENTION_TOKENS) -> bool:
    """Routes short query chunks around cuDNN (see module docstring) when MLX runs on
    CUDA; returns whether it did. max_query_tokens: the longest query (tokens) computed
    with plain operations; 0 leaves MLX's attention alone."""
    global _max_query_tokens
    cuda = getattr(mx, "cuda", None)
    if max_query_tokens <= 0 or cuda is None or not cuda.is_available() or mx.default_device() != mx.gpu:
        return False
    _max_query_tokens = max_query_tokens
    mx.fast.scaled_dot_product_attention = short_query_attention
    log.info("CUDA: query chunks of %d-%d tokens take plain attention (no cuDNN graph per shape)",
             MIN_QUERY_TOKENS, max_query_tokens)
    return True
