"""The checkpoint writer's queue: bounded in items and bytes, lower-value stores make room
or are skipped, completions come back in order, and a shutdown drains in parallel within
a deadline (issue 15 item 1, shared with issue 13's store-failure handling)."""

from __future__ import annotations

import threading

from kvrouter.worker.checkpoint_writer import CheckpointWriter, WriteJob


class Gate:
    """Write functions that block until opened, recording the order they ran in."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started = threading.Event()
        self.ran: list[str] = []
        self.lock = threading.Lock()

    def job(self, name: str, kind: str = "waypoint", n_tokens: int = 100, n_bytes: int = 10,
            block: bool = True) -> WriteJob:
        def write():
            self.started.set()
            if block:
                assert self.open.wait(30)
            with self.lock:
                self.ran.append(name)
            return name, ()

        return WriteJob(kind, n_tokens, n_bytes, write, owner=name)


def wait_for(writer: CheckpointWriter, n: int) -> list:
    done = []
    for _ in range(3000):
        done += writer.take_completed()
        if len(done) >= n:
            return done
        threading.Event().wait(0.01)
    raise AssertionError(f"{len(done)} of {n} completions")


def test_jobs_run_in_order_and_complete_on_the_writer_thread():
    gate = Gate()
    woken = []
    writer = CheckpointWriter(max_items=4, max_bytes=1000, on_complete=lambda: woken.append(1))
    gate.open.set()
    for name in "abc":
        assert writer.submit(gate.job(name, block=False)) == []
    done = wait_for(writer, 3)
    assert [c.entry for c in done] == ["a", "b", "c"] and [c.job.owner for c in done] == ["a", "b", "c"]
    assert len(woken) == 3 and writer.pending() == 0
    writer.close()


def test_when_behind_lower_value_stores_make_room_or_are_skipped():
    gate = Gate()
    writer = CheckpointWriter(max_items=2, max_bytes=1000)
    writer.submit(gate.job("busy"))  # being written: not in the queue any more
    assert gate.started.wait(10)
    assert writer.submit(gate.job("evict1", "evict")) == []
    assert writer.submit(gate.job("way1", "waypoint")) == []
    skipped = writer.submit(gate.job("anchor1", "anchor"))  # full: the evict store gives way
    assert [j.owner for j in skipped] == ["evict1"]
    skipped = writer.submit(gate.job("evict2", "evict"))  # nothing lower queued: skipped itself
    assert [j.owner for j in skipped] == ["evict2"]
    skipped = writer.submit(gate.job("way2", "waypoint", n_tokens=50))  # a shorter waypoint is worth less
    assert [j.owner for j in skipped] == ["way2"]
    gate.open.set()
    done = wait_for(writer, 3)
    assert [c.entry for c in done] == ["busy", "way1", "anchor1"]
    writer.close()


def test_bytes_bound_and_one_oversized_job_alone():
    gate = Gate()
    writer = CheckpointWriter(max_items=10, max_bytes=100)
    writer.submit(gate.job("busy"))
    assert gate.started.wait(10)
    assert writer.submit(gate.job("big", n_bytes=500)) == []  # alone in the queue: taken
    assert [j.owner for j in writer.submit(gate.job("small", n_bytes=10))] == ["small"]
    assert writer.queued_bytes == 500
    gate.open.set()
    assert [c.entry for c in wait_for(writer, 2)] == ["busy", "big"]
    writer.close()


def test_an_unbounded_submit_queues_past_the_bounds_for_a_shutdown():
    gate = Gate()
    writer = CheckpointWriter(max_items=1, max_bytes=10)
    writer.submit(gate.job("busy"))
    assert gate.started.wait(10)
    assert writer.submit(gate.job("a", kind="shutdown", n_bytes=10)) == []
    assert [j.owner for j in writer.submit(gate.job("b", kind="shutdown", n_bytes=10))] == ["b"]  # bounded: skipped
    assert writer.submit(gate.job("b", kind="shutdown", n_bytes=10), bounded=False) == []
    assert writer.submit(gate.job("c", kind="shutdown", n_bytes=10), bounded=False) == []
    gate.open.set()
    assert [c.entry for c in wait_for(writer, 4)] == ["busy", "a", "b", "c"]
    writer.close()


def test_drain_writes_in_parallel_within_the_deadline():
    gate = Gate()
    writer = CheckpointWriter(max_items=10, max_bytes=10**6)
    writer.submit(gate.job("busy"))
    assert gate.started.wait(10)
    barrier = threading.Barrier(3, timeout=10)

    def parallel_job(name):
        def write():
            barrier.wait()  # passes only when three writes run at once
            return name, ()

        return WriteJob("shutdown", 100, 10, write, owner=name)

    for name in ("s1", "s2", "s3"):
        writer.submit(parallel_job(name))
    gate.open.set()
    assert writer.drain(timeout_s=30, threads=3) == []
    assert sorted(c.entry for c in writer.take_completed()) == ["busy", "s1", "s2", "s3"]
    assert writer.submit(gate.job("late")) != []  # closed: skipped


def test_drain_past_the_deadline_returns_what_it_did_not_start():
    gate = Gate()
    writer = CheckpointWriter(max_items=10, max_bytes=10**6)
    writer.submit(gate.job("busy"))
    assert gate.started.wait(10)
    for name in ("a", "b"):
        writer.submit(gate.job(name, "shutdown", block=False))
    left = writer.drain(timeout_s=0.0)
    assert sorted(j.owner for j in left) == ["a", "b"]
    gate.open.set()


def test_a_write_holds_while_first_tokens_are_pending_within_its_budget():
    """pause() returns at once with no first token pending; with one pending it waits
    until the engine reports none; a write is held at most max_hold_s in all; after
    close (shutdown) it never holds."""
    import time

    w = CheckpointWriter()
    try:
        pause = w.pauser(max_hold_s=5.0)
        t0 = time.monotonic()
        pause()
        assert time.monotonic() - t0 < 0.05
        w.first_tokens_pending = 2
        threading.Timer(0.2, lambda: setattr(w, "first_tokens_pending", 0)).start()
        t0 = time.monotonic()
        pause()
        assert 0.15 < time.monotonic() - t0 < 2.0  # released when the first tokens came
        w.first_tokens_pending = 1  # never released: the budget ends the holds
        short = w.pauser(max_hold_s=0.1)
        t0 = time.monotonic()
        for _ in range(5):
            short()
        assert 0.09 < time.monotonic() - t0 < 1.0
    finally:
        w.close()
    t0 = time.monotonic()
    w.pauser(max_hold_s=5.0)()
    assert time.monotonic() - t0 < 0.05  # closed: shutdown writes are never held



def test_unwritten_lists_the_job_being_written_then_the_queue_until_each_is_written():
    """What the engine may still copy from: a job stays listed until its write ends."""
    gate = Gate()
    writer = CheckpointWriter(max_items=4, max_bytes=1000)
    busy = gate.job("busy")
    writer.submit(busy)
    assert gate.started.wait(5)
    a = gate.job("a", block=False)
    writer.submit(a)
    assert writer.unwritten() == [busy, a]
    gate.open.set()
    wait_for(writer, 2)
    assert writer.unwritten() == []
    writer.close()


def test_the_payload_write_holds_the_guard_while_it_hands_each_tensor_to_the_host(tmp_path):
    """A device copy of a snapshot not yet written (the engine, under the job's guard)
    never overlaps a tensor's move to host memory: the write takes the guard for each
    tensor, and waits while someone else holds it."""
    import mlx.core as mx

    from kvrouter.worker.payload_write import write_safetensors

    class Recording:
        def __init__(self):
            self.lock, self.entered = threading.Lock(), 0

        def __enter__(self):
            self.lock.acquire()
            self.entered += 1

        def __exit__(self, *exc):
            self.lock.release()

    guard = Recording()
    arrays = {"a": mx.arange(6), "b": mx.ones((2, 3)), "empty": mx.zeros((0,))}
    write_safetensors(tmp_path / "p.safetensors", arrays, {}, guard=guard)
    assert guard.entered == 2  # one per non-empty tensor
    assert mx.load(str(tmp_path / "p.safetensors"))["b"].tolist() == [[1.0] * 3] * 2
    guard.lock.acquire()  # a reader copying the snapshot: the write must wait for it
    done = threading.Event()
    t = threading.Thread(target=lambda: (write_safetensors(tmp_path / "q.safetensors", arrays, {}, guard=guard),
                                         done.set()))
    t.start()
    assert not done.wait(0.3)
    guard.lock.release()
    assert done.wait(10)
    t.join()
