"""Pure parts of continuous batching: prefill segments and the live-state slots."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvrouter.worker.live_states import LiveState, LiveStates
from kvrouter.worker.segments import prefill_segments


def test_segments_cut_at_absolute_chunk_multiples_and_store_points():
    prompt = list(range(1000))
    segs = prefill_segments(prompt, 300, 256, store_points=[700, 999, 1000, 100])
    assert sum(segs, []) == prompt[300:]
    ends = [300 + sum(len(s) for s in segs[: i + 1]) for i in range(len(segs))]
    # 512 and 768 are chunk multiples, 700 a planned store, 999 the last prompt token's start.
    assert ends == [512, 700, 768, 999, 1000]
    assert segs[-1] == [999]
    assert max(len(s) for s in segs) <= 256


def test_segments_of_a_prompt_restored_up_to_its_last_token():
    assert prefill_segments([5, 6, 7], 2, 256) == [[7]]
    assert prefill_segments([5], 0, 256) == [[5]]
    with pytest.raises(ValueError):
        prefill_segments([5, 6], 2, 256)


def live(ns, tokens, nbytes=0):
    cache = SimpleNamespace(nbytes=nbytes)
    return LiveState(ns, list(tokens), [cache], len(tokens))


def test_live_states_get_ids_and_a_snapshot():
    lives = LiveStates(slots=4)
    a = lives.add(live("", [1, 2, 3, 4]))
    b = lives.add(live("", [1, 2, 9]))
    assert len({a.live_id, b.live_id}) == 2 and a.live_id and b.live_id
    assert (a.held, b.held) == (4, 3)
    lives.take(a)
    assert list(lives) == [b] and lives.snapshot == (b,)


def test_slots_drop_the_least_recently_used_first():
    lives = LiveStates(slots=2)
    a, b = lives.add(live("", [1])), lives.add(live("", [2]))
    assert lives.to_drop(running=0) == []
    assert lives.to_drop(running=1) == [a]  # a new request needs a slot
    c = lives.add(live("", [3]))
    assert lives.to_drop(running=0) == []
    assert [s.live_id for s in lives] == [b.live_id, c.live_id]
    assert lives.clear() == [b, c] and len(lives) == 0


def test_idle_live_states_are_bounded_in_bytes():
    lives = LiveStates(slots=8, max_bytes=100)
    a = lives.add(live("", [1], nbytes=60))
    b = lives.add(live("", [2], nbytes=30))
    assert lives.to_drop(running=0) == []
    c = lives.add(live("", [3], nbytes=30))
    assert lives.to_drop(running=0) == [a] and lives.bytes == 60
    assert list(lives) == [b, c]
