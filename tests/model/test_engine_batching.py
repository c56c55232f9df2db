"""The batching engine in process with the real default model: cancellation and
admission edge cases (short prompts, few tokens; no server)."""

from __future__ import annotations

import random

import pytest

from tests.support.engine import Call, make_engine


def prompt_of(n: int, seed: int) -> tuple[int, ...]:
    r = random.Random(seed)
    return tuple(r.randrange(100, 40000) for _ in range(n))


@pytest.fixture(scope="module")
def one_slot():
    engine = make_engine(decode_concurrency=1)
    yield engine
    engine.stop(shutdown_checkpoint=False)


def test_a_request_cancelled_while_waiting_for_a_slot_ends_at_once(one_slot):
    """A client that gives up while its request waits for a slot is answered (and
    stops counting in queue_depth / --max-queue) without waiting for the slot."""
    running = Call(one_slot, prompt_of(20, 3), max_tokens=300)  # no EOS in its first 300 tokens
    running.next_event()
    waiting = Call(one_slot, prompt_of(20, 2))
    waiting.job.cancelled.set()
    assert waiting.wait().finish_reason == "cancelled"
    from kvrouter.worker.events import FinishEvent

    assert not any(isinstance(ev, FinishEvent) for ev in list(running.events.queue)), \
        "the request in the slot must still be running"
    assert one_slot.queue_depth == 1
    running.job.cancelled.set()
    assert running.wait().finish_reason == "cancelled"
    assert one_slot.queue_depth == 0


def test_a_session_sharing_only_a_prefix_does_not_take_another_sessions_live_state():
    """Two sessions share their first tokens (a chat template's header) and then
    diverge. With two slots, the second one reuses the shared prefix from the first
    one's live state without destroying it: the first session's next turn still
    continues from everything it had."""
    engine = make_engine(decode_concurrency=2)
    try:
        header = prompt_of(10, 7)
        first = header + prompt_of(40, 8)
        second = header + prompt_of(40, 9)
        a = Call(engine, first, max_tokens=2).wait()
        b = Call(engine, second, max_tokens=2).wait()
        assert (b.usage.cached_tokens, b.usage.cache_source) == (10, "live")
        assert len(engine.live_states) == 2
        again = Call(engine, first + prompt_of(5, 10), max_tokens=2).wait()
        assert again.usage.cache_source == "live"
        assert again.usage.cached_tokens >= a.usage.prompt_tokens
    finally:
        engine.stop(shutdown_checkpoint=False)


def assert_the_second_shares_the_prefix(engine, shared_tokens: int, seed: int) -> None:
    """Two prompts sharing `shared_tokens` tokens, sent together (20 tokens of their own
    each, seeds seed+1 and seed+2): the first computes everything, the second starts
    from a copy of the first one's state and computes only its own 20 tokens."""
    shared = prompt_of(shared_tokens, seed)
    a = Call(engine, shared + prompt_of(20, seed + 1), max_tokens=2)
    b = Call(engine, shared + prompt_of(20, seed + 2), max_tokens=2)
    fa, fb = a.wait(), b.wait()
    assert (fa.usage.cached_tokens, fa.usage.cache_source) == (0, "none")
    assert (fb.usage.cached_tokens, fb.usage.cache_source) == (shared_tokens, "live")
    assert fa.usage.prefilled_tokens + fb.usage.prefilled_tokens == shared_tokens + 20 + 20


def test_requests_arriving_together_prefill_their_shared_prefix_once():
    """Prefill sharing inside a worker: the second of two requests that share a
    300-token prefix nobody holds waits for the first one's prefill to pass it,
    then starts from a copy of that KV state instead of computing it again."""
    engine = make_engine(decode_concurrency=2, prompt_concurrency=2)
    try:
        assert_the_second_shares_the_prefix(engine, 300, seed=11)
        # Unrelated prompts never wait for each other.
        c = Call(engine, prompt_of(40, 14), max_tokens=2)
        d = Call(engine, prompt_of(40, 15), max_tokens=2)
        assert c.wait().usage.cached_tokens == 0 and d.wait().usage.cached_tokens == 0
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_a_client_hint_becomes_a_checkpoint_that_another_prompt_reuses(tmp_path):
    """A cache_control breakpoint placed at token 300 (kind `hint`) is stored while the
    prefill passes it, besides the cold store the policy plans anyway; after a restart,
    a prompt that shares only those 300 tokens restores them from the store."""
    engine = make_engine(tmp_path, decode_concurrency=1)
    try:
        stable = prompt_of(300, 21)
        first = Call(engine, stable + prompt_of(400, 22), max_tokens=1, hint_tokens=(300, 5000)).wait()
        stored = {(e.kind, e.n_tokens) for e in first.store_events if e.action == "stored"}
        assert stored == {("hint", 300), ("anchor", 512)}  # the cold store: 700 - 32 aligned down to 256s
    finally:
        engine.stop(shutdown_checkpoint=False)
    engine = make_engine(tmp_path, decode_concurrency=1, warm_bytes=0)  # no live state, no RAM warm-up: the disk
    try:
        other = Call(engine, stable + prompt_of(100, 23), max_tokens=1).wait()
        assert (other.usage.cached_tokens, other.usage.cache_source) == (300, "disk")
    finally:
        engine.stop(shutdown_checkpoint=False)
