"""Stalled workers: a worker that holds requests and makes no progress for
`stall_timeout_s` is taken out of routing until it moves again.

Progress is what the worker reports in its status (`WorkerStatus.progress`: an
admission, a batch step, i.e. a prefill chunk or a decoded token, or a checkpoint
written), so a long cold prefill, chunk after chunk, is never taken for a stall.
A worker frozen outright (SIGSTOP, a hung process) does not answer its status
either: that is no progress too.

While a worker is stalled, `Cluster.serving` is False for it (new requests go
elsewhere), and its `stall_event` is set: `router.dispatch` retries elsewhere the
requests waiting on it that have not had a token yet. Requests that have tokens
cannot move; they end when the worker resumes, or with an error when gRPC
keepalive gives up on the connection (`router.worker_client.KEEPALIVE_TIME_MS`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from kvrouter.router.config import DEFAULT_STALL_TIMEOUT_S
from kvrouter.router.worker_client import WorkerUnavailable

log = logging.getLogger("kvrouter.router.stalls")


class StallWatch:
    """Polls each worker of `cluster` that `leases` says holds requests (every
    `poll_s`, default a fifth of the timeout, at most 2 s) and marks it stalled or
    moving again (`cluster.set_stalled`)."""

    def __init__(self, cluster, leases, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                 poll_s: float | None = None) -> None:
        if stall_timeout_s <= 0:
            raise ValueError("the stall timeout must be positive")
        self.cluster = cluster
        self.leases = leases
        self.timeout_s = stall_timeout_s
        self.poll_s = poll_s if poll_s is not None else min(2.0, stall_timeout_s / 5)

    async def run(self) -> None:
        """Watches every worker until cancelled."""
        await asyncio.gather(*(self.watch(c) for c in self.cluster.clients))

    async def watch(self, client) -> None:
        """Watches one worker until cancelled."""
        last: int | None = None  # its progress counter at the last answer
        moved_at = time.monotonic()  # when it was last seen moving (or idle)
        while True:
            await asyncio.sleep(self.poll_s)
            view = self.cluster.view(client.name)
            busy = self.leases.in_flight(client.name) > 0
            if not busy and not view.stalled:
                moved_at, last = time.monotonic(), None
                continue
            try:
                st = await client.status(timeout_s=max(self.poll_s, 1.0))
            except WorkerUnavailable:
                st = None  # frozen or gone: no progress
            now = time.monotonic()
            if st is not None:
                if (last is not None and st.progress != last) or st.queue_depth == 0:
                    moved_at = now  # it worked since the last poll, or holds nothing
                last = st.progress
            if view.stalled:
                if moved_at == now:
                    log.warning("worker %s makes progress again; routing to it", client.name)
                    self.cluster.set_stalled(client.name, False)
            elif busy and now - moved_at >= self.timeout_s:
                log.warning("worker %s holds %d request(s) and made no progress for %.1f s: taking it out of "
                            "routing; requests without a token go elsewhere", client.name,
                            self.leases.in_flight(client.name), now - moved_at)
                self.cluster.set_stalled(client.name, True)
