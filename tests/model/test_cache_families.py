"""Every cache class mlx-lm has, in process, on small random-weight models of five
families (tests/support/tiny_models.py): how far back each kind of state can be
cut, checkpoints written and read through mlx-lm's cache API, and the engine
batching them (no store) with live-state reuse that follows the rules and never
changes an output.

Output equality: generated tokens are compared with an uncached single-sequence
greedy run (`greedy_reference`) up to the first step whose top-2 logit margin is
below MARGIN (a step that close could flip on a 1e-5 difference; the scaled
lm_head makes margins of about 1 the rule). Logits restored from a checkpoint
are compared within TOLERANCE.
"""

from __future__ import annotations

import random

import pytest

from kvrouter.cachestore.costs import CUT_ANY, ReuseRules
from kvrouter.worker.config import KvQuantization
from tests.support.engine import Call, make_engine
from tests.support.server import model_cache_dir
from tests.support.tiny_models import WINDOW, greedy_reference

MARGIN = 1e-3  # top-2 logit margin below which a greedy token is not compared
TOLERANCE = 1e-3  # max abs logit difference allowed after a restore (float32 logits up to ~60: 0 to 3e-5 measured on the reference BLAS, up to 1.6e-4 with OpenBLAS threads; a wrong state differs by whole units)
EXACT = ReuseRules(cut_any=False, window_tokens=0)

# case: (family, --kv-bits, reuse rules, batched by mlx-lm, cache classes)
CASES = {
    "llama": ("llama", None, CUT_ANY, True, "KVCachex2"),
    "llama-kv8": ("llama", KvQuantization(8), CUT_ANY, False, "QuantizedKVCache(bits=8,group=64)x2"),
    "gpt_oss": ("gpt_oss", None, ReuseRules(False, WINDOW), True, f"RotatingKVCache(window={WINDOW},keep=0),KVCache"),
    "gemma3_text": ("gemma3_text", None, ReuseRules(False, WINDOW), True,
                    f"RotatingKVCache(window={WINDOW},keep=0),KVCache"),
    "qwen3_next": ("qwen3_next", None, EXACT, True, "ArraysCache(size=2)x3,KVCache"),
    "mamba2": ("mamba2", None, EXACT, True, "ArraysCache(size=2)x2"),
}


def tokens_of(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(100, 40000) for _ in range(n)]


@pytest.fixture(scope="module")
def bundles(tiny_model):
    from kvrouter.worker.models import load_model

    loaded = {}

    def get(case: str):
        if case not in loaded:
            family, quant = CASES[case][:2]
            loaded[case] = load_model(str(tiny_model(family)), model_cache_dir(), kv_quant=quant)
        return loaded[case]

    return get


def assert_same_greedy(got, ref) -> None:
    """`got` (token ids) equals the reference wherever its margins allow a comparison."""
    assert ref.margins[0] > MARGIN, "the first token must be comparable"
    k = next((i for i, m in enumerate(ref.margins) if m < MARGIN), len(ref.margins))
    assert list(got[: k + 1]) == list(ref.tokens[: k + 1])


@pytest.mark.parametrize("case", list(CASES))
def test_layout_rules_and_batching_per_cache_class(bundles, case):
    _, _, rules, batched, layout = CASES[case]
    spec = bundles(case).state
    assert (spec.layout, spec.rules, spec.batchable, spec.serializable) == (layout, rules, batched, True)
    assert bundles(case).kv_layout.endswith(f";caches={layout}")


def test_kv_bits_is_refused_where_a_layer_is_not_a_plain_kv_cache(tiny_model):
    from kvrouter.worker.models import load_model

    with pytest.raises(ValueError, match="--kv-bits needs a model whose every layer is a plain KVCache"):
        load_model(str(tiny_model("gpt_oss")), model_cache_dir(), kv_quant=KvQuantization(8))


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoints_round_trip_and_states_cut_only_where_their_layers_allow(bundles, case, tmp_path):
    """A state of 64 tokens is written through mlx-lm's save_prompt_cache and read back
    with the same arrays and token count; continuing from it gives the logits of an
    uncached run. Cutting it back to 40 tokens works only for full KV caches; a
    sliding window can be cut while it has not wrapped (20 tokens < 32); recurrent
    state never."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from kvrouter.worker import cache_state as cs
    from kvrouter.worker.checkpoint_load import load_payload

    bundle = bundles(case)
    model, spec = bundle.model, bundle.state
    prompt = tokens_of(100, 1)
    state = spec.new()
    model(mx.array(prompt[:64])[None], cache=state)
    path = tmp_path / "cp.safetensors"
    cs.payload_writer(cs.cut(state, 64, 64), 64, "m")(path)
    loaded = load_payload(path, "m", 64, spec.layout)
    saved = [a for _, a in tree_flatten([c.state for c in cs.cut(state, 64, 64)]) if isinstance(a, mx.array)]
    read = [a for _, a in tree_flatten([c.state for c in loaded]) if isinstance(a, mx.array)]
    assert len(saved) == len(read) and all(mx.array_equal(a, b) for a, b in zip(saved, read))
    with pytest.raises(cs.CheckpointFormatError):
        load_payload(path, "m", 63, spec.layout)  # the index must say what the state holds
    restored = model(mx.array(prompt[64:])[None], cache=loaded)[0, -1]
    ref = greedy_reference(model, prompt, 1, spec.quant).first_logits
    assert float(mx.abs(restored - ref).max()) <= TOLERANCE
    if spec.rules.cut_any:
        cut = cs.cut(state, 64, 40)
        logits = model(mx.array(prompt[40:])[None], cache=cut)[0, -1]
        assert float(mx.abs(logits - ref).max()) <= TOLERANCE
    else:
        with pytest.raises(cs.CutError):
            cs.cut(state, 64, 40)
    short = spec.new()
    model(mx.array(prompt[:20])[None], cache=short)
    if spec.rules.can_cut(20):
        cut = cs.cut(short, 20, 10)
        logits = model(mx.array(prompt[10:])[None], cache=cut)[0, -1]
        assert float(mx.abs(logits - ref).max()) <= TOLERANCE
    else:
        assert spec.rules == EXACT
        with pytest.raises(cs.CutError):
            cs.cut(short, 20, 10)


@pytest.mark.parametrize("case", list(CASES))
def test_the_engine_batches_each_family_and_reuses_live_states_within_the_rules(bundles, tiny_model, case):
    """No store (--no-kv-cache): two prompts run together (one at a time where mlx-lm
    cannot batch the caches), a turn that extends a live state reuses all of it, a turn
    whose resent reply differs from what was generated reuses all its client sent
    before, and a prompt diverging inside another session's prompt reuses the shared
    prefix only where the state can be cut back to it. Every output equals the
    uncached run."""
    family, quant, rules = CASES[case][:3]
    bundle = bundles(case)
    engine = make_engine(model=tiny_model(family), decode_concurrency=2, prompt_concurrency=2, kv_quant=quant)
    try:
        def ref(prompt, n=4):
            return greedy_reference(bundle.model, prompt, n, quant)

        a, b = tokens_of(80, 2), tokens_of(70, 3)
        ca, cb = Call(engine, a), Call(engine, b)
        fa, fb = ca.wait(), cb.wait()
        assert (fa.finish_reason, fb.finish_reason) == ("length", "length")
        assert_same_greedy(ca.tokens, ref(a))
        assert_same_greedy(cb.tokens, ref(b))
        assert fa.usage.cached_tokens == fb.usage.cached_tokens == 0
        turn = a + ca.tokens + tokens_of(10, 4)  # the next turn of a's conversation
        ct = Call(engine, turn)
        ft = ct.wait()
        assert (ft.usage.cached_tokens, ft.usage.cache_source) == (len(a) + 4, "live")
        assert ct.first_reuse == (len(a) + 4, "live")
        assert_same_greedy(ct.tokens, ref(turn))
        # The turn after, with the reply re-tokenized differently (the generated part diverges):
        # everything the client sent before is reused, also where states cannot be cut back
        # (from the state kept where the prompt ended).
        retold = turn + tokens_of(8, 6)
        cr = Call(engine, retold)
        fr = cr.wait()
        assert (fr.usage.cached_tokens, fr.usage.cache_source) == (len(turn), "live")
        assert_same_greedy(cr.tokens, ref(retold))
        other = a[:50] + tokens_of(30, 5)  # another session sharing a's first 50 tokens
        co = Call(engine, other)
        fo = co.wait()
        expected = 50 if rules.cut_any else 0  # the states hold 84+ tokens: past a 32-token window
        assert fo.usage.cached_tokens == expected
        assert_same_greedy(co.tokens, ref(other))
        assert engine.batch_width == (2 if CASES[case][3] else 1)
    finally:
        engine.stop(shutdown_checkpoint=False)
