"""The engine in process with the real default model, under the faults of issue 13 (and
the checkpoint writer shared with issue 15): a checkpoint write never holds a first
token, a request's Final still reports its stores, and a writer that is behind skips
stores instead of queueing them without bound."""

from __future__ import annotations

import threading
import time

import pytest

from kvrouter.worker import cache_state, checkpoints
from kvrouter.worker.events import FinishEvent, TokenEvent
from tests.model.test_engine_batching import prompt_of
from tests.support.engine import Call, make_engine

SMOLLM_KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4  # layers x kv heads x head dim x (keys, values) x fp32


@pytest.fixture
def blocked_writes(monkeypatch):
    """Payload writes wait until `release` is set (a slow disk); `started` is set by the first."""
    started, release = threading.Event(), threading.Event()
    real = cache_state.payload_writer

    def slow_writer(caches, n_tokens, model_id, pause=None, guard=None):
        write = real(caches, n_tokens, model_id, pause, guard)

        def blocked(path):
            started.set()
            assert release.wait(120)
            write(path)

        return blocked

    monkeypatch.setattr(cache_state, "payload_writer", slow_writer)
    yield started, release
    release.set()


def test_a_checkpoint_write_never_holds_the_first_token(tmp_path, blocked_writes):
    started, release = blocked_writes
    engine = make_engine(tmp_path / "kv", decode_concurrency=2)
    try:
        call = Call(engine, prompt_of(300, 21), max_tokens=3)  # a cold store at 256 tokens
        assert started.wait(120)  # the write is under way (and stuck)...
        first = call.next_event()
        assert isinstance(first, TokenEvent)  # ...and the first token came anyway
        while len(call.tokens) < 3:
            assert isinstance(call.next_event(), TokenEvent)
        assert call.final is None and engine.writer.pending() == 1  # the Final waits for its store
        release.set()
        final = call.wait()
        assert isinstance(final, FinishEvent)
        assert [(e.action, e.kind, e.n_tokens) for e in final.store_events] == [("stored", "anchor", 256)]
    finally:
        release.set()
        engine.stop(shutdown_checkpoint=False)


def test_a_final_does_not_wait_for_the_evict_checkpoint_its_admission_caused(tmp_path, blocked_writes):
    """One batch slot: b's admission drops a's live state, whose evict checkpoint goes to
    a stuck writer; b has no store of its own (under min_tokens), so its Final comes at
    once, and the evict checkpoint is still written once the disk moves."""
    started, gate = blocked_writes
    gate.set()  # a's own store goes through
    engine = make_engine(tmp_path / "kv", decode_concurrency=1)
    try:
        a = Call(engine, prompt_of(300, 41), max_tokens=1)
        assert [e.kind for e in a.wait().store_events] == ["anchor"]  # its own store: waited for
        gate.clear()
        started.clear()
        b = Call(engine, prompt_of(100, 42), max_tokens=1)
        assert started.wait(120)  # a's evict checkpoint is being written (and stuck)...
        final = b.wait()  # ...and b ends anyway (before: it waited for that write)
        assert isinstance(final, FinishEvent) and engine.writer.pending() == 1
        gate.set()
        deadline = time.monotonic() + 60
        while engine.writer.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.writer.pending() == 0
        assert engine.checkpoints.store.stats().entries["evict"] == 1
    finally:
        gate.set()
        engine.stop(shutdown_checkpoint=False)


def test_a_conversation_copies_its_evict_snapshot_while_the_writer_still_holds_it(tmp_path, blocked_writes):
    """One batch slot and a stuck disk: a's state is dropped for b, and its 300-token
    evict checkpoint waits in the writer's queue behind another write. a's next turn
    arrives before any of them is written: it reuses all 300 tokens from that snapshot
    (reported as a RAM-tier restore; before, it found nothing stored and prefilled
    everything), answers as an engine without a store does, and the snapshot is still
    written once the disk moves."""
    started, gate = blocked_writes
    engine = make_engine(tmp_path / "kv", decode_concurrency=1)
    plain = make_engine(decode_concurrency=1)
    try:
        x = Call(engine, prompt_of(300, 40), max_tokens=1)
        assert started.wait(120)  # x's anchor is being written, and stuck: what follows queues
        a = Call(engine, prompt_of(300, 41), max_tokens=1)
        while not a.tokens:
            a.next_event()
        b = Call(engine, prompt_of(100, 42), max_tokens=1)  # takes the slot: a's evict snapshot queues
        while not b.tokens:
            b.next_event()
        assert any(j.kind == "evict" and j.n_tokens == 300 for j in engine.writer.unwritten())
        turn = prompt_of(300, 41) + prompt_of(20, 43)
        again = Call(engine, turn, max_tokens=3)
        while not again.tokens:
            again.next_event()
        assert again.first_reuse == (300, "ram"), again.first_reuse
        assert engine.checkpoints.store.stats().entries.get("evict", 0) == 0  # nothing written yet
        gate.set()
        final = again.wait()
        assert final.usage.cached_tokens == 300 and final.usage.cache_source == "ram"
        reference = Call(plain, turn, max_tokens=3)
        reference.wait()
        assert again.tokens == reference.tokens
        for call in (x, a, b):
            call.wait()
        deadline = time.monotonic() + 60
        while engine.writer.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.checkpoints.store.stats().entries["evict"] >= 1
    finally:
        gate.set()
        engine.stop(shutdown_checkpoint=False)
        plain.stop(shutdown_checkpoint=False)


def test_every_live_state_gets_its_shutdown_checkpoint_past_the_writer_queue_bound(tmp_path):
    """Three live states and a writer queue of one item: a stop stores all three shutdown
    checkpoints (before, the queue bound skipped the shorter ones as writer_behind; a CPU
    bench run lost 6 of 15 that way, and with them a session's reuse after the restart)."""
    from kvrouter.worker.config import MemoryConfig

    engine = make_engine(tmp_path / "kv", decode_concurrency=3, prompt_concurrency=3,
                         store_kw={"min_tokens": 64}, memory=MemoryConfig(writer_max_items=1))
    try:
        for seed in (51, 52, 53):
            Call(engine, prompt_of(100, seed), max_tokens=1).wait()
        assert len(engine.live_states) == 3
    finally:
        engine.stop(shutdown_checkpoint=True)
    assert engine.shutdown_report == (3, 0)
    assert engine.checkpoints.store.stats().entries["shutdown"] == 3


def test_a_stored_checkpoint_is_published_as_joining_the_ram_tier(tmp_path):
    """The stored checkpoint joins the RAM tier when its write is collected; the RAM tier
    event must go out (the router routes RAM hits by these events; it once missed
    every one of them and learnt the RAM tier only from a status resync)."""
    from kvrouter.worker.cache_events import RamChanged

    engine = make_engine(tmp_path / "kv", decode_concurrency=2)
    events = []
    engine.on_cache_event = events.append
    try:
        call = Call(engine, prompt_of(300, 51), max_tokens=1)
        stored = [e for e in call.wait().store_events if e.action == "stored"]
        assert [e.kind for e in stored] == ["anchor"]
        deadline = time.monotonic() + 10
        while not any(isinstance(e, RamChanged) for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        ram = [e for e in events if isinstance(e, RamChanged)]
        assert [(e.entry_id, e.added) for e in ram] == [(stored[0].entry_id, True)]
        assert stored[0].entry_id in engine.checkpoints.ram
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_disk_rates_start_from_a_cold_read_probe_not_the_prior(tmp_path):
    """Before any load the worker probes the store's disk (page cache bypassed): after
    its first stored checkpoint, and at start when the store holds payloads already."""
    def seeded(engine) -> float:
        deadline = time.monotonic() + 10
        while engine.rates.disk_bps == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return engine.rates.disk_bps

    engine = make_engine(tmp_path / "kv", decode_concurrency=2)
    try:
        assert engine.rates.disk_bps == 0  # an empty store: nothing to probe yet
        call = Call(engine, prompt_of(300, 61), max_tokens=1)
        assert [e.kind for e in call.wait().store_events if e.action == "stored"] == ["anchor"]
        bps = seeded(engine)
        assert bps > 0 and engine.rates.disk_cold_bps == bps
        # the warm probe went through the real load path: a rate, never below the cold one
        assert engine.rates.disk_warm_bps >= bps
    finally:
        engine.stop(shutdown_checkpoint=False)
    again = make_engine(tmp_path / "kv", decode_concurrency=2)  # a restart: the payload is there
    try:
        assert seeded(again) > 0
    finally:
        again.stop(shutdown_checkpoint=False)


def test_a_writer_behind_skips_lower_value_stores(tmp_path, blocked_writes):
    started, release = blocked_writes
    engine = make_engine(tmp_path / "kv", decode_concurrency=1)
    object.__setattr__(engine.writer, "max_items", 1)
    try:
        a = Call(engine, prompt_of(300, 31), max_tokens=1)  # its store blocks the writer
        assert started.wait(120)
        b = Call(engine, prompt_of(300, 32), max_tokens=1)  # its store waits in the queue (1 item)
        for call in (a, b):
            while not call.tokens:
                call.next_event()
        c = Call(engine, prompt_of(300, 33), max_tokens=1)  # evicts b's live state: queue full
        while not c.tokens:
            c.next_event()
        release.set()
        events = {name: call.wait().store_events for name, call in zip("abc", (a, b, c))}
        # b's anchor displaced a's queued evict store; b's evict store and c's anchor (no
        # lower-valued store queued) were skipped; the queue never held more than one
        assert [(e.action, e.kind) for e in events["a"]] == [("stored", "anchor")]
        assert sorted((e.action, e.kind, e.reason) for e in events["b"]) == [
            ("skipped", "evict", "writer_behind"), ("stored", "anchor", "")]
        assert sorted((e.action, e.kind, e.reason) for e in events["c"]) == [
            ("skipped", "anchor", "writer_behind"), ("skipped", "evict", "writer_behind")]
    finally:
        release.set()
        engine.stop(shutdown_checkpoint=False)


def test_a_burst_on_a_new_prefix_stays_within_the_admitted_bytes_budget(tmp_path):
    """Issue 13 item 5: admission counts the KV each running sequence will hold (padded
    as mlx-lm pads the batch) against the worker's budget, so a burst queues."""
    from kvrouter.worker.config import MemoryConfig
    from kvrouter.worker.sizing import batch_bytes

    kv_per_token = SMOLLM_KV_BYTES_PER_TOKEN
    shared = prompt_of(200, 41)
    prompts = [shared + prompt_of(20, 50 + i) for i in range(6)]
    per_request = batch_bytes([len(prompts[0]) + 2], kv_per_token)
    budget = 2 * per_request  # room for two sequences at a time
    engine = make_engine(tmp_path / "kv", decode_concurrency=6, prompt_concurrency=6,
                         memory=MemoryConfig(running_kv_bytes=budget))
    try:
        calls = [Call(engine, p, max_tokens=2) for p in prompts]
        finals = [c.wait() for c in calls]
        assert all(f.finish_reason in ("stop", "length") for f in finals)
        assert engine.peak_admitted_kv_bytes == budget  # two at a time, never three
        assert engine.admitted_kv_bytes == 0
        # the shared prefix was still computed once (prefill sharing inside the budget)
        assert sum(f.usage.prefilled_tokens for f in finals) < 2 * len(shared) + 6 * 20 + 6
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_a_seeded_request_is_reproducible_alone_or_in_a_busy_batch():
    """Issue 13 item 6: a seeded sampling request runs unbatched, so other requests'
    draws never change its own, and it never changes theirs."""
    engine = make_engine(decode_concurrency=4, prompt_concurrency=4)
    try:
        seeded_prompt = prompt_of(24, 61)

        def seeded():
            return Call(engine, seeded_prompt, max_tokens=8, temperature=1.0, seed=1234)

        warm = seeded()
        warm.wait()  # its live state now exists: the next two start from the same state
        alone = seeded()
        alone.wait()
        busy = [Call(engine, prompt_of(24, 70 + i), max_tokens=12, temperature=1.0) for i in range(2)]
        for b in busy:
            while not b.tokens:
                b.next_event()
        crowded = seeded()  # submitted while two sampling requests decode
        crowded.wait()
        for b in busy:
            b.wait()
        assert crowded.tokens == alone.tokens
        assert len(alone.tokens) == 8
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_memory_is_handed_back_after_load_and_the_cache_limit_set():
    import mlx.core as mx

    engine = make_engine(decode_concurrency=1)
    try:
        limit = mx.set_cache_limit(0)
        mx.set_cache_limit(limit)
        assert 0 < limit <= 2048 * 2**20  # the sized default, not MLX's own (the memory limit)
        assert mx.get_cache_memory() <= limit
        assert engine.config.running_kv_bytes > 0
        assert engine.config.kv_bytes_per_token == SMOLLM_KV_BYTES_PER_TOKEN
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_requests_admitted_together_share_one_restored_checkpoint(tmp_path, monkeypatch):
    """Issue 13 item 5: two requests restored from the same disk checkpoint in one
    admission round load it once (the RAM tier is off here, so nothing else would share)."""
    first = make_engine(tmp_path / "kv", decode_concurrency=1, ram_bytes=0)
    shared = prompt_of(300, 81)
    try:
        stored = Call(first, shared, max_tokens=1).wait()
        assert [(e.action, e.n_tokens) for e in stored.store_events] == [("stored", 256)]
    finally:
        first.stop(shutdown_checkpoint=False)
    loads = []
    real = checkpoints.load_state

    def counting(read, *args, **kwargs):
        loads.append(read.path)
        return real(read, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "load_state", counting)
    engine = make_engine(tmp_path / "kv", decode_concurrency=3, prompt_concurrency=3, ram_bytes=0)
    try:
        # an unrelated long prefill keeps the engine inside a batch step while the two arrive,
        # so they wait in the queue together and are admitted in one round
        busy = Call(engine, prompt_of(300, 84), max_tokens=1)
        while engine.progress == 0:
            threading.Event().wait(0.01)
        b = Call(engine, shared[:256] + prompt_of(30, 82), max_tokens=1)
        c = Call(engine, shared[:256] + prompt_of(30, 83), max_tokens=1)
        busy.wait()
        fb, fc = b.wait(), c.wait()
        assert (fb.usage.cached_tokens, fc.usage.cached_tokens) == (256, 256)
        assert len(loads) == 1  # one read of the payload for both
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_the_writer_is_told_while_a_request_waits_for_its_first_token(tmp_path):
    """While a request is queued or prefilling, the engine reports it to the checkpoint
    writer (whose payload writes hold between tensors meanwhile); once it has its
    first token, and at its end, the count is back to 0."""
    engine = make_engine(tmp_path / "kv", decode_concurrency=2)
    try:
        seen = []
        call = Call(engine, prompt_of(400, 81), max_tokens=8)
        while call.events.empty():  # until its first token
            seen.append(engine.writer.first_tokens_pending)
            time.sleep(0.001)
        assert max(seen) >= 1
        call.wait()
        assert engine.writer.first_tokens_pending == 0
    finally:
        engine.stop(shutdown_checkpoint=False)


def test_after_a_restart_stored_checkpoints_are_loaded_into_the_ram_tier_while_idle(tmp_path):
    """A restarted worker loads the stored anchors into its RAM tier before any request
    asks for them, and keeps them in recency order by value: the most recently used
    anchor is loaded first but ends most recent, so when a new checkpoint needs room
    (a RAM tier that holds just the two), the other one goes. A request sharing the
    kept prefix restores it from the RAM tier."""
    engine = make_engine(tmp_path / "kv", decode_concurrency=2)
    try:
        a = Call(engine, prompt_of(300, 91), max_tokens=1)
        assert [e.kind for e in a.wait().store_events if e.action == "stored"] == ["anchor"]
        c = Call(engine, prompt_of(300, 93), max_tokens=1)
        assert [e.kind for e in c.wait().store_events if e.action == "stored"] == ["anchor"]
    finally:
        engine.stop(shutdown_checkpoint=False)
    from kvrouter.cachestore import CheckpointStore, StoreConfig

    with CheckpointStore(StoreConfig(tmp_path / "kv")) as store:
        old, recent = sorted(store.entries(), key=lambda e: e.last_used)
    again = make_engine(tmp_path / "kv", decode_concurrency=2, ram_bytes=old.payload_bytes + recent.payload_bytes + 2**20)
    try:
        deadline = time.monotonic() + 60
        while not {old.id, recent.id} <= set(again.checkpoints.ram.ids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {old.id, recent.id} <= set(again.checkpoints.ram.ids())
        new = Call(again, prompt_of(300, 95), max_tokens=1)
        assert [e.kind for e in new.wait().store_events if e.action == "stored"] == ["anchor"]
        assert recent.id in again.checkpoints.ram and old.id not in again.checkpoints.ram
        b = Call(again, prompt_of(300, 93)[:280] + prompt_of(20, 92), max_tokens=1)
        b.wait()
        assert b.first_reuse == (256, "ram")
    finally:
        again.stop(shutdown_checkpoint=False)


def test_the_step_trace_logs_each_batch_step_when_asked(monkeypatch, caplog):
    """KVROUTER_TRACE_STEPS=1: one line per batch step with its prompt and decode figures
    (for finding where a time to first token goes); without it, none."""
    import logging

    monkeypatch.setenv("KVROUTER_TRACE_STEPS", "1")
    engine = make_engine(decode_concurrency=1)
    monkeypatch.delenv("KVROUTER_TRACE_STEPS")
    quiet = make_engine(decode_concurrency=1)
    try:
        with caplog.at_level(logging.INFO, logger="kvrouter.worker.engine"):
            Call(engine, prompt_of(40, 5), max_tokens=3).wait()
            Call(quiet, prompt_of(40, 6), max_tokens=3).wait()
        steps = [r for r in caplog.records if r.getMessage().startswith("step ")]
        assert len(steps) >= 3 and all(r.thread == steps[0].thread for r in steps)  # the traced engine only
        assert "prompt_tokens=40" in steps[0].getMessage() or "prompt_tokens=39" in steps[0].getMessage()
        assert "decoded=1" in steps[-1].getMessage()
    finally:
        engine.stop(shutdown_checkpoint=False)
        quiet.stop(shutdown_checkpoint=False)
