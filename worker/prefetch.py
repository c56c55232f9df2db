"""Checkpoint reads started while their request waits in the queue.

When a request arrives, the engine asks (off its own thread) where its reused
prefix would come from; when that is a checkpoint on disk, its read starts at
once (`cachestore.payload_read.SequentialRead`, reading the whole file ahead and
hashing it), so by the time the request is admitted its bytes are in memory or
on their way, and the load only moves them to the device. A read belongs to the
requests that asked for it; when the last of them is admitted without it,
cancelled or finished, the read is cancelled and its memory freed. Reads held
at once are bounded in count and bytes; past the bound a request simply loads at
admission.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from kvrouter.cachestore import Entry, PayloadError
from kvrouter.cachestore.payload_read import SequentialRead

log = logging.getLogger("kvrouter.worker.prefetch")

MAX_READS = 2  # prefetched payloads held at once


@dataclass
class _Held:
    entry: Entry
    read: SequentialRead
    owners: set = field(default_factory=set)  # id() of the requests waiting for it


class Prefetcher:
    """Reads of checkpoints (by entry id) started ahead of their load, for `store`
    (a `cachestore.CheckpointStore`), holding at most `max_bytes` of payloads and
    `max_reads` reads. Thread-safe: `start` runs on a helper thread, the rest on
    the engine thread."""

    def __init__(self, store, max_bytes: int, max_reads: int = MAX_READS):
        self.store = store
        self.max_bytes = max_bytes
        self.max_reads = max_reads
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self.started = 0  # reads started, for tests and logs
        self.used = 0  # reads a load took

    def start(self, entry: Entry, owner) -> bool:
        """Starts reading `entry`'s payload for `owner` (a request), or adds `owner` to a
        read already running. False when the bounds leave no room or the payload cannot
        be opened (the store quarantines it; the request will find that at admission)."""
        with self._lock:
            held = self._held.get(entry.id)
            if held is not None:
                held.owners.add(id(owner))
                return True
            if len(self._held) >= self.max_reads or \
                    sum(h.entry.payload_bytes for h in self._held.values()) + entry.payload_bytes > self.max_bytes:
                return False
        try:
            read = self.store.open_read(entry, ahead_bytes=entry.payload_bytes)
        except PayloadError as exc:
            log.warning("prefetch of checkpoint %s failed: %s", entry.id, exc)
            return False
        with self._lock:
            if entry.id in self._held:  # another request started it meanwhile
                read.cancel()
                self._held[entry.id].owners.add(id(owner))
                return True
            self._held[entry.id] = _Held(entry, read, {id(owner)})
            self.started += 1
        log.debug("prefetch started id=%s mib=%.1f resident=%s", entry.id, entry.payload_bytes / 2**20, read.resident)
        return True

    def take(self, entry_id: str) -> SequentialRead | None:
        """The read of `entry_id`, now the caller's to consume (it leaves the prefetcher),
        or None when none was started."""
        with self._lock:
            held = self._held.pop(entry_id, None)
            if held is not None:
                self.used += 1
        return held.read if held is not None else None

    def has(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._held

    def release(self, owner) -> None:
        """`owner` no longer needs any read (admitted, cancelled or finished); reads no
        request needs any more are cancelled."""
        drop = []
        with self._lock:
            for entry_id, held in list(self._held.items()):
                held.owners.discard(id(owner))
                if not held.owners:
                    drop.append(self._held.pop(entry_id))
        for held in drop:
            held.read.cancel()
            log.debug("prefetch of %s cancelled: no waiting request needs it", held.entry.id)

    def cancel_all(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.read.cancel()
