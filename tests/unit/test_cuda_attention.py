"""Plain attention for short query chunks (worker.cuda_attention): the same numbers as a
reference softmax(QK^T)V for every mask form mlx-lm passes, the fused kernel for what
it does not cover, and installed only on CUDA, from the command line down."""

import mlx.core as mx
import numpy as np
import pytest

from kvrouter.router.cli import batching_config, build_parser
from kvrouter.worker import cuda_attention
from kvrouter.worker.cuda_attention import short_query_attention


def reference(q, k, v, scale, mask):
    """Attention in numpy float64, keys and values tiled to the query heads."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    reps = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, reps, axis=1), np.repeat(v, reps, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    t_q, t_kv = q.shape[2], k.shape[2]
    if isinstance(mask, str):
        mask = np.arange(t_kv)[None] <= np.arange(t_kv - t_q, t_kv)[:, None]
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    w = np.exp(scores - scores.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def qkv(b=2, n_q=8, n_kv=2, t_q=7, t_kv=30, d=16):
    mx.random.seed(3)
    return (mx.random.normal((b, n_q, t_q, d)), mx.random.normal((b, n_kv, t_kv, d)),
            mx.random.normal((b, n_kv, t_kv, d)))


@pytest.mark.parametrize("mask_kind", ["causal", "none", "bool_per_sequence", "additive_per_head", "bool_2d",
                                       "additive_3d"])
def test_plain_attention_matches_the_reference_for_every_mask_form(mask_kind):
    q, k, v = qkv()
    b, n_q, t_q, t_kv = 2, 8, 7, 30
    mask = {"causal": "causal", "none": None,
            "bool_per_sequence": mx.random.uniform(shape=(b, 1, t_q, t_kv)) > 0.3,
            "additive_per_head": mx.random.normal((b, n_q, t_q, t_kv)),
            "bool_2d": mx.random.uniform(shape=(t_q, t_kv)) > 0.2,
            "additive_3d": mx.random.normal((n_q, t_q, t_kv))}[mask_kind]
    got = short_query_attention(q, k, v, scale=0.25, mask=mask)
    assert got.shape == (b, n_q, t_q, 16)
    np.testing.assert_allclose(np.array(got), reference(q, k, v, 0.25, mask), atol=1e-4)


def test_a_query_that_may_see_no_key_gets_finite_weights_as_the_fused_kernel_gives():
    """A batch's left padding: a query row with every key masked. NaN there would reach
    the padded positions' keys and values in the next layers, and from them every real
    query's sums (0 x NaN is NaN)."""
    from kvrouter.worker.cuda_attention import _fused

    q, k, v = qkv(b=1, n_q=2, n_kv=2, t_q=3, t_kv=5, d=4)
    mask = mx.array([[False] * 5, [True, True, False, False, False], [True] * 5])
    got = short_query_attention(q, k, v, scale=1.0, mask=mask)
    assert not mx.isnan(got).any().item()
    np.testing.assert_allclose(np.array(got), np.array(_fused(q, k, v, scale=1.0, mask=mask)), atol=1e-5)


def test_a_causal_mask_lets_each_query_see_the_cache_and_the_chunk_up_to_itself():
    q, k, v = qkv(b=1, n_q=2, n_kv=1, t_q=3, t_kv=5, d=4)
    got = np.array(short_query_attention(q, k, v, scale=1.0, mask="causal"))
    # the first query (position 2 of 5) must ignore keys 3 and 4: changing them changes nothing for it
    v2 = mx.concatenate([v[:, :, :3], v[:, :, 3:] + 100.0], axis=2)
    k2 = mx.concatenate([k[:, :, :3], k[:, :, 3:] * -5.0], axis=2)
    moved = np.array(short_query_attention(q, k2, v2, scale=1.0, mask="causal"))
    np.testing.assert_allclose(moved[:, :, 0], got[:, :, 0], atol=1e-5)
    assert np.abs(moved[:, :, 2] - got[:, :, 2]).max() > 1.0  # the last query sees them


def test_calls_it_does_not_cover_go_to_the_fused_kernel(monkeypatch):
    calls = []

    def fused(q, k, v, **kw):
        calls.append((q.shape[2], kw.get("sinks") is not None))
        return mx.zeros((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))

    monkeypatch.setattr(cuda_attention, "_fused", fused)
    monkeypatch.setattr(cuda_attention, "_max_query_tokens", 8)
    q, k, v = qkv(t_q=1)
    short_query_attention(q, k, v, scale=1.0, mask=None)  # decode: the vector kernel
    q, k, v = qkv(t_q=9)
    short_query_attention(q, k, v, scale=1.0, mask="causal")  # longer than the bound
    q, k, v = qkv(t_q=4)
    short_query_attention(q, k, v, scale=1.0, mask="causal", sinks=mx.zeros((8,)))
    assert calls == [(1, False), (9, False), (4, True)]
    monkeypatch.setattr(cuda_attention, "MAX_SCORE_BYTES", 2 * 8 * 4 * 30 * 4 - 1)  # one byte short of the scores
    short_query_attention(q, k, v, scale=1.0, mask="causal")
    assert calls[-1] == (4, False)
    monkeypatch.setattr(cuda_attention, "MAX_SCORE_BYTES", 2**30)
    with pytest.raises(ValueError, match="unsupported attention mask"):
        short_query_attention(q, k, v, scale=1.0, mask="sliding")


def test_install_leaves_the_fused_kernel_in_place_off_cuda():
    assert not mx.cuda.is_available()  # this machine and CI: the CPU backend
    before = mx.fast.scaled_dot_product_attention
    assert cuda_attention.install(512) is False
    assert mx.fast.scaled_dot_product_attention is before


def test_the_flag_reaches_the_worker_config_and_its_command_line():
    ns = build_parser().parse_args(["serve"])
    assert batching_config(ns).plain_attention_tokens == 512
    ns = build_parser().parse_args(["serve", "--plain-attention-tokens", "0"])
    cfg = batching_config(ns)
    assert cfg.plain_attention_tokens == 0
    args = cfg.as_args()
    assert args[args.index("--plain-attention-tokens") + 1] == "0"
    assert batching_config(build_parser().parse_args(["worker", *args])).plain_attention_tokens == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--plain-attention-tokens", "-1"])
