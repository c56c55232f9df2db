"""The worker's checkpoint writer: one thread that writes checkpoints, so that no
write delays a first token or a request's next prefill chunk.

The engine thread cuts the state to store and evaluates it (`CheckpointManager.prepare`)
and hands it here with `submit`; the writer thread runs the store (payload write
hashed, fsynced, renamed, then the index commit: `CheckpointStore.save`) and puts
the outcome on a completion list that the engine thread collects
(`take_completed`), so the RAM tier and each request's store events stay on the
engine thread. `on_complete` wakes the engine when an outcome is ready.

The queue is bounded in items and in bytes (snapshots hold memory until they are
written). When a new store does not fit, queued stores of lower value make room
(anchor > waypoint > evict > shutdown; longer before shorter within a kind); when
none is lower, the new store is skipped. Skipped stores are returned to the
caller, which counts them (`skipped`, reason `writer_behind`).

At shutdown `drain` writes what is queued on several threads at once, within a
deadline, and returns what it could not write.

Until a job is written its snapshot stays reusable (`WriteJob.reuse`, `unwritten`):
the engine may copy it on the device meanwhile, holding `WriteJob.guard`, which the
payload write also holds while it hands each tensor to the host (on CUDA that moves an
MLX buffer to unified memory and frees the device copy, which a device copy must not
overlap).

First tokens go first: a payload is written one tensor at a time
(`worker.payload_write`), and before each tensor the write holds while the engine
reports requests waiting for their first token (`first_tokens_pending`), at most
MAX_WRITE_HOLD_S per write (`pauser`). (On the H200 hits that overlapped 0.64 GB
evict writes took 0.3-0.5 s to their first token; with the writes held they still
did, so the writes were not what cost them there: README, "Third pass on the H200".)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvrouter.worker.writer")

KIND_VALUE = {"anchor": 3, "waypoint": 2, "evict": 1, "shutdown": 0}
"""What a store is worth when the writer is behind (higher is kept)."""

DEFAULT_MAX_ITEMS = 8
MAX_WRITE_HOLD_S = 2.0
"""The longest one checkpoint write is held, in all, while first tokens are pending
(`CheckpointWriter.pauser`): first tokens go first, but a steady stream of requests
must not stop the writes (the queue would fill and skip stores)."""
HOLD_POLL_S = 0.002  # how often a held write looks again
SHUTDOWN_THREADS = 4  # payload writes in parallel at shutdown (disks overlap several streams)


@dataclass(eq=False)
class WriteJob:
    """One checkpoint to write.

    kind: a cachestore kind. n_tokens: its length, tokens. n_bytes: memory its
    snapshot holds (about its payload size), bytes. write: does the store on the
    writer thread and returns (the committed Entry or None, the store events of
    that save). owner: whatever the caller wants back with the outcome (the
    request the store belongs to). payload: the snapshot, kept for the caller
    (the RAM tier keeps it once stored). reuse: what the caller may reuse from the
    snapshot until it is written (the engine's copy-only live state), or None.
    guard: a lock held by the payload write while it moves a tensor to the host and
    by a reader copying the snapshot on the device (see the module docstring), or None.
    """

    kind: str
    n_tokens: int
    n_bytes: int
    write: Callable[[], tuple[Any, tuple]]
    owner: Any = None
    payload: Any = None
    reuse: Any = None
    guard: Any = None
    submitted: float = field(default_factory=time.monotonic)

    @property
    def value(self) -> tuple[int, int]:
        return KIND_VALUE.get(self.kind, 0), self.n_tokens


@dataclass(frozen=True)
class Completion:
    """The outcome of one job: entry is the committed store Entry (None: skipped by the
    store or failed); events: the store events of that save; seconds: queue + write time."""

    job: WriteJob
    entry: Any
    events: tuple
    seconds: float


class CheckpointWriter:
    """A bounded queue of WriteJobs and the thread that runs them (see module docstring).

    max_items / max_bytes: bounds on queued jobs (a job alone may exceed max_bytes,
    so one very large checkpoint is still written). on_complete: called on the writer
    thread after each completion is listed (must be quick and thread-safe).
    """

    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS, max_bytes: int = 2**30,
                 on_complete: Callable[[], None] | None = None) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.on_complete = on_complete
        self._cond = threading.Condition()
        self._queue: deque[WriteJob] = deque()
        self._bytes = 0
        self._busy = 0  # jobs being written now
        self._writing: list[WriteJob] = []  # by the writer thread (not by `drain`'s threads)
        self._completed: list[Completion] = []
        self._closed = False
        # Requests waiting for their first token, set by the engine thread (`pauser`).
        self.first_tokens_pending = 0
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------
    @property
    def queued_bytes(self) -> int:
        """Snapshot bytes waiting to be written (not counting the one being written)."""
        return self._bytes

    def pending(self) -> int:
        """Jobs queued or being written."""
        with self._cond:
            return len(self._queue) + self._busy

    def submit(self, job: WriteJob, bounded: bool = True) -> list[WriteJob]:
        """Queues `job`; returns the jobs skipped to respect the bounds (possibly `job`
        itself, possibly lower-valued queued ones), which the caller counts. After
        `close`, every job is skipped. bounded=False queues it past the bounds (at
        shutdown, where its snapshot exists already and nothing else will use the
        memory: `drain` writes them all, within its deadline)."""
        with self._cond:
            if self._closed:
                return [job]
            skipped: list[WriteJob] = []
            while bounded and self._queue and not self._fits(job):
                lowest = min(self._queue, key=lambda j: j.value)
                if lowest.value >= job.value:
                    return [job]
                self._queue.remove(lowest)
                self._bytes -= lowest.n_bytes
                skipped.append(lowest)
            self._queue.append(job)
            self._bytes += job.n_bytes
            self._cond.notify_all()
            return skipped

    def unwritten(self) -> list[WriteJob]:
        """The jobs being written, then those waiting, oldest first."""
        with self._cond:
            return [*self._writing, *self._queue]

    def _fits(self, job: WriteJob) -> bool:
        return len(self._queue) < self.max_items and self._bytes + job.n_bytes <= self.max_bytes

    def pauser(self, max_hold_s: float = MAX_WRITE_HOLD_S) -> Callable[[], None]:
        """A `pause` for one payload write (`cache_state.payload_writer`): each call
        returns at once when no first token is pending, else waits until none is, the
        writer closes (shutdown), or the write has been held `max_hold_s` seconds in all."""
        left = [max_hold_s]

        def pause() -> None:
            if left[0] <= 0 or self._closed or self.first_tokens_pending <= 0:
                return
            t0 = time.monotonic()
            while self.first_tokens_pending > 0 and not self._closed and time.monotonic() - t0 < left[0]:
                time.sleep(HOLD_POLL_S)
            left[0] -= time.monotonic() - t0

        return pause

    def take_completed(self) -> list[Completion]:
        """Outcomes since the last call, in completion order."""
        with self._cond:
            done, self._completed = self._completed, []
        return done

    def drain(self, timeout_s: float, threads: int = SHUTDOWN_THREADS) -> list[WriteJob]:
        """Writes everything queued, `threads` at a time, until done or `timeout_s`
        passes; then closes the writer. Returns the jobs not written (not started by
        the deadline), highest value first written. Their outcomes, and those written,
        are in `take_completed`."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._closed = True  # the writer thread finishes its current job and stops
            jobs = sorted(self._queue, key=lambda j: j.value, reverse=True)
            self._queue.clear()
            self._bytes = 0
            self._cond.notify_all()
        left: list[WriteJob] = []
        lock = threading.Lock()

        def run(job: WriteJob) -> None:
            if time.monotonic() >= deadline:
                with lock:
                    left.append(job)
                return
            self._execute(job)

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="checkpoint-shutdown") as pool:
            list(pool.map(run, jobs))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return left

    def close(self) -> list[WriteJob]:
        """Stops the thread after its current job; returns the jobs never written."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._bytes = 0
            self._cond.notify_all()
        return left

    # -- the writer thread -------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._bytes -= job.n_bytes
                self._busy += 1
                self._writing.append(job)
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._writing.remove(job)

    def _execute(self, job: WriteJob) -> None:
        try:
            entry, events = job.write()
        except Exception:  # the store turns I/O failures into skips; anything else is a bug, logged
            log.exception("checkpoint write failed kind=%s tokens=%d", job.kind, job.n_tokens)
            entry, events = None, ()
        with self._cond:
            self._completed.append(Completion(job, entry, tuple(events), time.monotonic() - job.submitted))
        if self.on_complete is not None:
            self.on_complete()
