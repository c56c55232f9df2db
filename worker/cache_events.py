"""Cache events: what changed in a worker's caches, as typed values.

The engine reports its live states and RAM tier (`LiveChanged`, `RamChanged`);
the store reports checkpoints (`cachestore.StoreEvent`). The servicer's
`CacheEventHub` numbers them and turns them into `CacheEvent` messages for the
router. `StoreListeners` is the store's one `on_event` listener (set when the
store is made, in `worker.server.build_engine`): it passes each store event on
to the engine (which reports a request's store actions in its Final) and to
the hub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from kvrouter.cachestore import StoreEvent

log = logging.getLogger("kvrouter.worker.cache_events")


@dataclass(frozen=True)
class LiveChanged:
    """Live state `live_id` now holds `tokens` in `namespace`, or was dropped
    (`removed`, tokens empty). live_id 0 with removed: "no live state" (the first
    event of a subscription when none is held)."""

    live_id: int
    namespace: str
    tokens: tuple[int, ...]
    removed: bool = False


@dataclass(frozen=True)
class RamChanged:
    """Store entry `entry_id` entered (`added`) or left the RAM tier."""

    entry_id: str
    added: bool


CacheEvent = LiveChanged | RamChanged | StoreEvent


class StoreListeners:
    """The store's `on_event`: calls every listener in `listeners` in order, in the
    thread that acted on the store. A listener that raises is logged and the
    others still run."""

    def __init__(self, *listeners: Callable[[StoreEvent], None]):
        self.listeners = list(listeners)

    def add(self, listener: Callable[[StoreEvent], None]) -> None:
        """Calls `listener` too, after the others."""
        self.listeners.append(listener)

    def __call__(self, event: StoreEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("store event listener failed")
