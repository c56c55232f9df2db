"""Long prompts prefilled outside mlx-lm's batch (issue 15, item 4;
`worker.long_prefill`), in process: on small random-weight models of the batchable
families, the generator keeps the segments (states at planned positions equal a
plain run's), decodes the batch at every step meanwhile, and then decodes the
long prompt in the batch as an uncached run would; with the default model through
the engine, checkpoints, prefill sharing and cancellation work on that path too.
"""

from __future__ import annotations

import time

import pytest

from tests.model.test_cache_families import assert_same_greedy, tokens_of
from tests.model.test_engine_batching import assert_the_second_shares_the_prefix, prompt_of
from tests.support.engine import Call, make_engine
from tests.support.server import model_cache_dir
from tests.support.tiny_models import greedy_reference

CHUNK = 16  # prefill chunk of the tiny-model runs, tokens


def state_arrays(caches) -> list:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [a for _, a in tree_flatten([c.state for c in caches]) if isinstance(a, mx.array)]


def llama_with_a_stored_prefix(tiny_model, completion_batch_size: int):
    """(model, its cache spec, a LongPrefillGenerator over a BatchGenerator of
    `completion_batch_size` (threshold 60, CHUNK budget), 70 prompt tokens, a state
    holding exactly them) on the tiny llama: what the hit tests restore from."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from kvrouter.worker.long_prefill import LongPrefillGenerator
    from kvrouter.worker.models import load_model

    bundle = load_model(str(tiny_model("llama")), model_cache_dir())
    model, spec = bundle.model, bundle.state
    batch = BatchGenerator(model, completion_batch_size=completion_batch_size, prefill_batch_size=4,
                           prefill_step_size=CHUNK)
    gen = LongPrefillGenerator(model, batch, min_tokens=60, prefill_step_size=CHUNK)
    shared = tokens_of(70, 5)
    base = spec.new()
    for a in range(0, 70, CHUNK):
        model(mx.array(shared[a:a + CHUNK])[None], cache=base)
    mx.eval([c.state for c in base])
    return model, spec, gen, shared, base


@pytest.mark.parametrize("family", ["llama", "gpt_oss", "qwen3_next", "mamba2"])
def test_a_long_prompt_prefills_on_its_own_caches_while_the_batch_decodes(tiny_model, family):
    """A 100-token prompt (threshold 60) is prefilled chunk by chunk outside the batch,
    one chunk per step, while a short request decodes a token at every step; every
    segment end (chunk multiples and a planned checkpoint at 40) is reported, and the
    state read there is exactly a plain run's. Its first token comes from the long path
    itself, in the step of its last chunk where the caches can be trimmed back (llama:
    the end of that chunk, 99, is then not reported), in the next step where they
    cannot (gpt_oss's 32-token window has wrapped; qwen3_next, mamba2 are recurrent: 99
    is reported, so the engine can store exactly there). Then it decodes in the batch: greedy tokens equal the uncached
    single-sequence run's."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from kvrouter.worker.long_prefill import LongPrefillGenerator
    from kvrouter.worker.models import load_model
    from kvrouter.worker.segments import prefill_segments

    bundle = load_model(str(tiny_model(family)), model_cache_dir())
    model, spec = bundle.model, bundle.state
    batch = BatchGenerator(model, completion_batch_size=2, prefill_batch_size=2, prefill_step_size=CHUNK)
    gen = LongPrefillGenerator(model, batch, min_tokens=60, prefill_step_size=CHUNK)
    short, long = tokens_of(20, 1), tokens_of(100, 2)
    (su,) = gen.insert_segments([prefill_segments(short, 0, CHUNK)], max_tokens=[200], caches=[spec.new()])
    assert gen.prefilling == ()  # short prompts stay in the batch
    while not gen.next()[1]:
        pass
    (lu,) = gen.insert_segments([prefill_segments(long, 0, CHUNK, [40])], max_tokens=[4], caches=[spec.new()])
    assert gen.prefilling == (lu,)
    positions, tokens, end_of_prompt, steps = [], [], [], 0
    while lu in gen.prefilling:
        prompt_out, gen_out = gen.next()
        steps += 1
        assert su in [r.uid for r in gen_out], "the batch decodes at every step"
        tokens += [r.token for r in gen_out if r.uid == lu]
        for r in [r for r in prompt_out if r.uid == lu]:
            if r.end_of_prompt:
                end_of_prompt.append((r.progress, steps))
                continue
            assert r.end_of_segment and r.progress[1] == 100
            positions.append(r.progress[0])
            if r.progress[0] == 40:  # a planned checkpoint: the state is read exactly there
                caches, held = gen.extract_cache([lu])[lu]
                assert held == long[:40]
                ref = spec.new()
                for a, b in ((0, 16), (16, 32), (32, 40)):
                    model(mx.array(long[a:b])[None], cache=ref)
                got, want = state_arrays(caches), state_arrays(ref)
                assert len(got) == len(want) and all(mx.array_equal(x, y) for x, y in zip(got, want))
    trimmable = family == "llama"
    assert positions == [16, 32, 40, 48, 64, 80, 96] + ([] if trimmable else [99])
    assert end_of_prompt == [((100, 100), steps)]
    assert len(tokens) == 1, "the first token comes with the end of the prompt"
    while True:
        prompt_out, gen_out = gen.next()
        assert not [r for r in prompt_out if r.uid == lu], "its prompt was reported once"
        tokens += [r.token for r in gen_out if r.uid == lu]
        if any(r.uid == lu and r.finish_reason for r in gen_out):
            break
    assert_same_greedy(tokens, greedy_reference(model, long, 4, eos=(), chunk=CHUNK))
    gen.remove([su])
    assert gen.extract_cache([su, lu]) == {}


def test_hits_arriving_together_join_the_batch_in_one_step_when_their_suffixes_fit_its_budget(tiny_model):
    """Three requests restored from a 70-token prefix, each with a 5-token suffix
    (threshold 60: all take the long path): one step prefills all three suffixes, last
    tokens included (15 tokens of a 16-token budget), and gives their first tokens (the
    step trace times the batch's part and each suffix); they join the batch together,
    then decode as an uncached run would. A fourth whose segment is longer than the budget left waits for the next
    step (no sliver chunk)."""
    from kvrouter.worker import cache_state
    from kvrouter.worker.segments import prefill_segments

    model, spec, gen, shared, base = llama_with_a_stored_prefix(tiny_model, 4)
    prompts = [shared + tokens_of(5, 10 + i) for i in range(3)] + [shared + tokens_of(20, 20)]
    uids = gen.insert_segments([prefill_segments(p, 70, CHUNK) for p in prompts], max_tokens=[3] * 4,
                               caches=[cache_state.cut(base, 70, 70) for _ in prompts],
                               all_tokens=[list(shared)] * 4)
    assert gen.prefilling == tuple(uids)
    gen.trace = []  # KVROUTER_TRACE_STEPS: the step's parts, timed
    prompt_out, gen_out = gen.next()
    assert gen.prefilling == (uids[3],), "the three short suffixes joined the batch in one step"
    assert [p[0] for p in gen.trace] == ["batch", "long", "long", "long"]
    assert [p[1:3] for p in gen.trace[1:]] == [(5, 70)] * 3 and all(p[-1] >= 0 for p in gen.trace)
    gen.trace = None
    assert sorted((r.uid, r.progress, r.end_of_prompt) for r in prompt_out) == [(u, (5, 5), True) for u in uids[:3]]
    tokens = {u: [] for u in uids}
    for r in gen_out:
        tokens[r.uid].append(r.token)
    assert sorted(tokens) == uids and [len(tokens[u]) for u in uids] == [1, 1, 1, 0], "first tokens in that step"
    while any(len(t) < 3 for t in tokens.values()):
        for r in gen.next()[1]:
            tokens[r.uid].append(r.token)
    for u, p in zip(uids, prompts):
        assert_same_greedy(tokens[u], greedy_reference(model, p, 3, eos=(), chunk=CHUNK))


def test_a_hit_goes_before_a_cold_long_prefill_which_still_moves_every_other_step(tiny_model):
    """A cold 100-token prompt is queued first, then hits restored from a 70-token
    prefix with 5-token suffixes, a new one before every step (threshold 60, 16-token
    budget): the first hit gets its first token in the first step, before the cold
    prompt; the cold one, left out for lack of budget, goes first in the next step (a
    hit left out then goes first in the one after), so the cold prompt moves at least
    every other step and finishes, and no hit waits more than one extra step."""
    from kvrouter.worker import cache_state
    from kvrouter.worker.segments import prefill_segments

    _, spec, gen, shared, base = llama_with_a_stored_prefix(tiny_model, 16)
    (cold,) = gen.insert_segments([prefill_segments(tokens_of(100, 6), 0, CHUNK)], max_tokens=[1],
                                  caches=[spec.new()])
    cold_steps, arrived, first_token, step = [], {}, {}, 0
    while cold in gen.prefilling:
        step += 1
        (hit,) = gen.insert_segments([prefill_segments(shared + tokens_of(5, 30 + step), 70, CHUNK)],
                                     max_tokens=[1], caches=[cache_state.cut(base, 70, 70)],
                                     all_tokens=[list(shared)])
        arrived[hit] = step
        prompt_out, gen_out = gen.next()
        first_token.update((r.uid, step) for r in gen_out)
        if cold in [r.uid for r in prompt_out]:
            cold_steps.append(step)
        assert step < 30
    assert first_token[min(arrived)] == 1 and cold_steps[0] == 2, "the hit first; the cold one in the next step"
    assert all(first_token.get(h, step + 1) - a <= 1 for h, a in arrived.items()), (arrived, first_token)
    assert all(b - a <= 2 for a, b in zip(cold_steps, cold_steps[1:])), cold_steps
    assert len(cold_steps) == 7  # 100 tokens: six 16-token chunks, then the last 3 with its last token


def test_a_long_prompt_through_the_engine_stores_its_checkpoint_and_answers_as_uncached(tmp_path):
    """Default model, store on, --long-prefill-tokens 300: a 600-token prompt is
    prefilled outside the batch beside a decoding request; its cold checkpoint is
    stored at the planned 512 tokens, its output is the uncached run's, and the
    prefill rate is measured."""
    engine = make_engine(tmp_path / "kv", decode_concurrency=2, long_prefill_tokens=300)
    try:
        prompt = prompt_of(600, 61)
        busy = Call(engine, prompt_of(20, 62), max_tokens=30)
        busy.next_event()
        call = Call(engine, prompt, max_tokens=4)
        final = call.wait()
        busy.wait()
        assert [(e.action, e.kind, e.n_tokens) for e in final.store_events] == [("stored", "anchor", 512)]
        assert_same_greedy(call.tokens, greedy_reference(engine.model, prompt, 4))
        assert final.usage.prefill_seconds > 0 and engine.rates.prefill_tps > 0
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_long_prompts_arriving_together_share_their_prefix_prefilled_outside_the_batch():
    """Prefill sharing on the long path: the second of two long prompts that share 512
    tokens waits for the first one's prefill to pass them, then starts from a copy."""
    engine = make_engine(decode_concurrency=2, prompt_concurrency=2, long_prefill_tokens=300)
    try:
        assert_the_second_shares_the_prefix(engine, 512, seed=71)
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_a_long_prefill_cancelled_midway_keeps_what_it_prefilled():
    """A request cancelled while its long prompt is being prefilled ends "cancelled";
    the tokens prefilled so far (a whole number of chunks) stay as a live state, which
    the same prompt sent again reuses."""
    engine = make_engine(decode_concurrency=2, long_prefill_tokens=300)
    try:
        prompt = prompt_of(1100, 81)
        start = engine.progress
        call = Call(engine, prompt, max_tokens=2)
        deadline = time.monotonic() + 300
        while engine.progress < start + 3 and time.monotonic() < deadline:  # admitted, then two chunks
            time.sleep(0.01)
        call.job.cancelled.set()
        assert call.wait().finish_reason == "cancelled"
        (live,) = engine.live_states
        assert 0 < live.held < len(prompt) - 1 and live.held % 256 == 0
        held = live.held
        again = Call(engine, prompt, max_tokens=2).wait()
        assert (again.usage.cached_tokens, again.usage.cache_source) == (held, "live")
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_a_recurrent_model_stores_exact_position_checkpoints_on_the_long_path(tiny_model, tmp_path):
    """qwen3_next (recurrent layers: states are never cut back): a 300-token prompt on
    the long path stores its anchor exactly at the planned 256 tokens (a segment end),
    and a new worker on the same store continues from it with the uncached output."""
    from kvrouter.worker.models import load_model

    model_dir = tiny_model("qwen3_next")
    prompt = tokens_of(300, 91)
    first = make_engine(tmp_path / "kv", model=model_dir, decode_concurrency=2, long_prefill_tokens=100)
    try:
        final = Call(first, prompt, max_tokens=2).wait()
        assert [(e.action, e.kind, e.n_tokens) for e in final.store_events] == [("stored", "anchor", 256)]
    finally:
        first.stop(shutdown_checkpoint=False)
    second = make_engine(tmp_path / "kv", model=model_dir, decode_concurrency=2, long_prefill_tokens=100,
                         warm_bytes=0)  # the load from disk, not a RAM-tier warm-up
    try:
        longer = prompt + tokens_of(30, 92)
        call = Call(second, longer, max_tokens=4)
        final = call.wait()
        assert (final.usage.cached_tokens, final.usage.cache_source) == (256, "disk")
        model = load_model(str(model_dir), model_cache_dir()).model
        assert_same_greedy(call.tokens, greedy_reference(model, longer, 4))
    finally:
        second.stop(shutdown_checkpoint=False)
