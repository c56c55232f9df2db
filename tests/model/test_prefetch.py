"""A checkpoint's read starts while its request waits in the queue (issue 15 item 2):
the load at admission takes the bytes already read, and the output is the same as
without a prefetch. In process, the default model, a real store."""

from __future__ import annotations

import threading

from tests.model.test_engine_batching import prompt_of
from tests.support.engine import Call, make_engine


def test_a_queued_request_loads_from_the_read_started_while_it_waited(tmp_path):
    shared = prompt_of(300, 91)
    suffix = prompt_of(20, 92)
    first = make_engine(tmp_path / "kv", decode_concurrency=1, ram_bytes=0)
    try:
        stored = Call(first, shared, max_tokens=1).wait()
        assert [(e.action, e.n_tokens) for e in stored.store_events] == [("stored", 256)]
        idle = Call(first, shared[:256] + suffix, max_tokens=4)  # admitted at once: no prefetch
        idle.wait()
        assert first.checkpoints.prefetch.started == 0
        assert idle.final.usage.cached_tokens == 256
    finally:
        first.stop(shutdown_checkpoint=False)
    engine = make_engine(tmp_path / "kv", decode_concurrency=2, prompt_concurrency=2, ram_bytes=0)
    try:
        busy = Call(engine, prompt_of(300, 93), max_tokens=1)  # the engine is inside a step when the next arrives
        while engine.progress == 0:
            threading.Event().wait(0.01)
        queued = Call(engine, shared[:256] + suffix, max_tokens=4)
        busy.wait()
        done = queued.wait()
        pf = engine.checkpoints.prefetch
        assert (pf.started, pf.used) == (1, 1)  # read while queued, then taken by the load
        assert done.usage.cache_source == "disk" and done.usage.cached_tokens == 256
        assert queued.tokens == idle.tokens  # same output as the load without a prefetch
        assert done.usage.load_stages is not None and done.usage.load_stages[0] > 0
        assert not any(pf.has(e.id) for e in engine.checkpoints.store.entries())  # nothing left held
    finally:
        engine.stop(shutdown_checkpoint=False)

