"""The load the router has sent each worker, counted from the moment a route is
decided until the request ends, whatever way it ends (case C13: load counted
too late sends every long prompt to one worker).

A `Lease` is one request's share of a worker's load: a request in flight, its
predicted service time (`seconds`, added to the worker's queue) and the part of
it before the first token (`prefill_s`, in the worker's prefill backlog until
`first_token()`). `Leases.hold(...)` is the one scope that takes a lease and
gives it back: a `with` block, so a lease ends exactly once, when the block
ends (completion, error, client disconnect or cancellation alike). The
`kvrouter_worker_in_flight` gauge follows the same counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class WorkerLoad:
    """What the router sent one worker and has not seen end.

    in_flight: requests. queued_s: their predicted service time, seconds.
    prefill_backlog_s: predicted load + prefill seconds of those that have not
    produced a first token yet (see `router.routing.Candidate`).
    """

    in_flight: int = 0
    queued_s: float = 0.0
    prefill_backlog_s: float = 0.0


@dataclass
class Lease:
    """One request's share of `worker`'s load (seconds as in WorkerLoad)."""

    worker: str
    seconds: float
    prefill_s: float
    _load: WorkerLoad
    prefilled: bool = False

    def first_token(self) -> None:
        """The worker produced the request's first token: its prefill is done."""
        if not self.prefilled:
            self.prefilled = True
            self._load.prefill_backlog_s = max(0.0, self._load.prefill_backlog_s - self.prefill_s)


class Leases:
    """Every worker's load. `gauge`: a prometheus Gauge labelled by worker (or None)."""

    def __init__(self, gauge=None):
        self._loads: dict[str, WorkerLoad] = {}
        self._gauge = gauge

    def load(self, worker: str) -> WorkerLoad:
        """The load of `worker` (zero for one never leased)."""
        load = self._loads.get(worker)
        if load is None:
            load = self._loads[worker] = WorkerLoad()
        return load

    def in_flight(self, worker: str) -> int:
        return self.load(worker).in_flight

    @contextlib.contextmanager
    def hold(self, worker: str, seconds: float, prefill_s: float) -> Iterator[Lease]:
        """Counts one request against `worker` for the duration of the block."""
        load = self.load(worker)
        lease = Lease(worker, seconds, prefill_s, load)
        load.in_flight += 1
        load.queued_s += seconds
        load.prefill_backlog_s += prefill_s
        if self._gauge is not None:
            self._gauge.labels(worker).inc()
        try:
            yield lease
        finally:
            lease.first_token()
            load.in_flight -= 1
            load.queued_s = max(0.0, load.queued_s - seconds) if load.in_flight else 0.0
            if not load.in_flight:
                load.prefill_backlog_s = 0.0
            if self._gauge is not None:
                self._gauge.labels(worker).dec()
