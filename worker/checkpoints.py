"""The worker's side of prefix reuse: pick the best reusable prefix, restore it,
and write the checkpoints the store's policy asks for.

Sources, cheapest first: the live state (the KV state of this worker's last
request, still in memory) and the disk store (`cachestore`). A restored prefix
never covers the whole prompt: at most `len(prompt) - 1` tokens are reused, so
the last prompt token is always fed and the next-token logits come from a real
forward pass (store case C6: never feed the last token twice, never skip it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cachestore import CheckpointStore, Entry, PayloadError, StoreEvent, plan_stores

from worker import kv_state
from worker.kv_state import CheckpointFormatError

log = logging.getLogger("kvrouter.worker.checkpoints")


@dataclass
class LiveState:
    """The KV state kept in memory after a request.

    tokens: the token ids whose keys and values are in `caches`
    (len(tokens) == kv_state.state_length(caches)).
    """

    namespace: str
    tokens: list[int]
    caches: list


@dataclass
class Restored:
    """A KV state ready for prefill: `caches` holds the first `n_tokens` prompt tokens."""

    caches: list
    n_tokens: int
    source: str  # "none", "live", "disk"
    stored_prefix_tokens: int  # longest stored checkpoint that matched (policy input)
    load_seconds: float = 0.0


def common_prefix_length(a, b) -> int:
    """Number of leading token ids equal in both sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CheckpointManager:
    """Restores and stores KV checkpoints for one model on one worker.

    store: the shared disk store, or None when the cache is off (then only the
    live state is reused).
    """

    def __init__(self, model, model_id: str, store: CheckpointStore | None):
        self.model = model
        self.model_id = model_id
        self.store = store
        self.events: list[StoreEvent] = []  # what the store did for the current request
        if store is not None:
            store.on_event = self.events.append

    def take_events(self) -> tuple[StoreEvent, ...]:
        """The store events since the last call (the current request's)."""
        out = tuple(self.events)
        self.events.clear()
        return out

    def restore(self, prompt: list[int], namespace: str, live: LiveState | None) -> Restored:
        """The longest reusable prefix of `prompt`, loaded into a fresh or recycled state.

        The live state is recycled (trimmed in place) when it gives the longest
        reuse; a disk checkpoint that reaches further is loaded instead. A damaged
        checkpoint is quarantined and the request continues from the next best
        source. Never raises for cache problems.
        """
        limit = len(prompt) - 1
        live_len = 0
        if live is not None and live.namespace == namespace:
            live_len = min(common_prefix_length(live.tokens, prompt), limit)
        hit = None
        if self.store is not None:
            hit = self.store.lookup(self.model_id, namespace, prompt)
        stored = hit.n_tokens if hit else 0
        if hit is not None and min(hit.n_tokens, limit) > live_len:
            restored = self._load(hit.entry, limit)
            if restored is not None:
                restored.stored_prefix_tokens = stored
                return restored
        if live_len > 0:
            kv_state.trim_state(live.caches, live_len)
            return Restored(live.caches, live_len, "live", stored)
        return Restored(kv_state.new_state(self.model), 0, "none", stored)

    def _load(self, entry: Entry, limit: int) -> Restored | None:
        t0 = time.perf_counter()
        try:
            path = self.store.payload_path(entry)
            caches = kv_state.load_state(path, self.model, self.model_id, entry.n_tokens)
        except (PayloadError, CheckpointFormatError, OSError) as exc:
            if not isinstance(exc, PayloadError):  # payload_path quarantines by itself
                self.store.quarantine(entry.id, f"load failed: {exc}")
            log.warning("checkpoint %s unusable, prefilling cold: %s", entry.id, exc)
            return None
        n = min(entry.n_tokens, limit)
        kv_state.trim_state(caches, n)
        seconds = time.perf_counter() - t0
        self.store.touch(entry.id)
        log.info(
            "hit %s kind=%s tokens=%d reused=%d load_ms=%.0f MiB=%.1f",
            entry.id, entry.kind, entry.n_tokens, n, seconds * 1000, entry.payload_bytes / 2**20,
        )
        return Restored(caches, n, "disk", entry.n_tokens, seconds)

    def quarantine(self, restored: Restored, prompt: list[int], namespace: str, reason: str) -> None:
        """Marks the checkpoint a failed restore came from so it is never loaded again (case C11)."""
        if self.store is None or restored.source != "disk":
            return
        hit = self.store.lookup(self.model_id, namespace, prompt)
        if hit is not None:
            self.store.quarantine(hit.entry.id, reason)

    def plan(self, prompt_len: int, stored_prefix: int, anchor_tokens: int):
        """The store plan for this prompt (see `cachestore.plan_stores`); empty without a store."""
        if self.store is None:
            return ()
        plan = plan_stores(prompt_len, stored_prefix, anchor_tokens or None, self.store.config)
        for skip in plan.skipped:
            log.info("skip store tokens=%d reason=%s", skip.n_tokens, skip.reason)
            self.events.append(StoreEvent("skipped", "anchor", skip.n_tokens, reason=skip.reason))
        return plan.stores

    def save(self, kind: str, caches: list, tokens: list[int], namespace: str, preview: str) -> Entry | None:
        """Writes a checkpoint of `tokens` (a prefix of what `caches` holds). Never raises for I/O errors."""
        if self.store is None or not tokens:
            return None
        writer = kv_state.snapshot_writer(caches, len(tokens), self.model_id)
        return self.store.save(kind, self.model_id, namespace, tokens, writer, text_preview=preview)
