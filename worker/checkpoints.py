"""The worker's side of prefix reuse: pick the best reusable prefix, restore it,
and write the checkpoints the store's policy asks for.

Sources, cheapest first: a live state (the KV state a finished request left
in memory; the engine passes the one sharing the longest prefix), the RAM tier (recent checkpoints kept in memory) and
the disk store (`cachestore`). A restored prefix never covers the whole prompt:
at most `len(prompt) - 1` tokens are reused, so the last prompt token is always
fed and the next-token logits come from a real forward pass (store case C6:
never feed the last token twice, never skip it).

Loading never deletes or skips a checkpoint because of its length: the
cold-max limit applies to what is stored, not to what is loaded (case C3).

Load-or-recompute: a stored prefix is loaded only when loading it (its bytes
over the measured RAM-tier or disk bandwidth) is faster than prefilling the
tokens it adds (over the measured prefill rate): `router.routing.should_load`,
the same cost model the router routes by.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kvrouter.cachestore import CheckpointStore, Entry, PayloadError, StoreEvent, plan_stores
from kvrouter.cachestore.keys import common_prefix_length

from kvrouter.cachestore.costs import Rates, Reuse, should_load
from kvrouter.worker import kv_state
from kvrouter.worker.kv_state import CheckpointFormatError
from kvrouter.worker.ram_tier import RamTier

log = logging.getLogger("kvrouter.worker.checkpoints")


@dataclass
class LiveState:
    """The KV state kept in memory after a request.

    tokens: the token ids whose keys and values are in `caches`
    (len(tokens) == kv_state.state_length(caches)).
    prompt_tokens: how many of them the client sent (the rest were generated);
    the client-sent part is what comes back verbatim in the next turn, so
    `evict` and `shutdown` checkpoints stop there (generated text may
    re-tokenize differently when sent back, case C7).
    """

    namespace: str
    tokens: list[int]
    caches: list
    prompt_tokens: int
    preview: str = ""
    live_id: int = 0  # set by `worker.live_states.LiveStates.add`


@dataclass
class Restored:
    """A KV state ready for prefill: `caches` holds the first `n_tokens` prompt tokens.

    source: "none", "live", "ram" or "disk". stored_prefix_tokens: length of the
    longest stored checkpoint that matched (the policy's input), whatever source won.
    """

    caches: list
    n_tokens: int
    source: str
    stored_prefix_tokens: int
    load_seconds: float = 0.0
    entry_id: str | None = None
    loaded_bytes: int = 0


class CheckpointManager:
    """Restores and stores KV checkpoints for one model on one worker.

    store: the shared disk store, or None when the cache is off (then only the
    live state is reused). ram: the RAM tier (may have max_bytes 0).
    """

    def __init__(self, model, model_id: str, store: CheckpointStore | None, ram: RamTier | None = None):
        self.model = model
        self.model_id = model_id
        self.store = store
        self.ram = ram if ram is not None else RamTier(0)  # an empty tier is falsy (it has __len__)
        self.events: list[StoreEvent] = []  # what the store did for the current request
        if store is not None:
            store.on_event = self._on_store_event

    def _on_store_event(self, event: StoreEvent) -> None:
        self.events.append(event)

    def take_events(self) -> tuple[StoreEvent, ...]:
        """The store events since the last call (the current request's)."""
        out = tuple(self.events)
        self.events.clear()
        return out

    def restore(self, prompt: list[int], namespace: str, live: LiveState | None,
                rates: Rates | None = None, recycle: bool = True) -> Restored:
        """The longest reusable prefix of `prompt`, loaded into a fresh or recycled state.

        The live state is recycled (trimmed in place; with `recycle` False, its
        prefix is copied and it stays whole) when it gives the longest reuse; a
        stored checkpoint that reaches further is taken from the RAM tier
        or loaded from disk, unless loading it would take longer than prefilling
        the tokens it adds (`rates`: the worker's measurements; None loads always).
        A damaged checkpoint is quarantined and the request continues from the
        next best source. Never raises for cache problems.
        """
        limit = len(prompt) - 1
        live_len = 0
        if live is not None and live.namespace == namespace:
            live_len = min(common_prefix_length(live.tokens, prompt), limit)
        hit = self.store.lookup(self.model_id, namespace, prompt) if self.store is not None else None
        stored = hit.n_tokens if hit else 0
        if hit is not None and min(hit.n_tokens, limit) > live_len and self._worth_loading(hit.entry, limit,
                                                                                            live_len, rates):
            restored = self._load(hit.entry, limit)
            if restored is not None:
                restored.stored_prefix_tokens = stored
                return restored
        if live_len > 0:
            if not recycle:
                return Restored(kv_state.prefix_copy(live.caches, live_len), live_len, "live", stored)
            kv_state.trim_state(live.caches, live_len)
            return Restored(live.caches, live_len, "live", stored)
        return Restored(kv_state.new_state(self.model), 0, "none", stored)

    def stored_prefix_tokens(self, prompt: list[int], namespace: str) -> int:
        """Tokens of `prompt` the longest stored checkpoint covers (0: none or no store)."""
        if self.store is None:
            return 0
        hit = self.store.lookup(self.model_id, namespace, prompt)
        return hit.n_tokens if hit else 0

    def _worth_loading(self, entry: Entry, limit: int, base_tokens: int, rates: Rates | None) -> bool:
        if rates is None:
            return True
        source = "ram" if entry.id in self.ram else "disk"
        reuse = Reuse(source, min(entry.n_tokens, limit), entry.payload_bytes)
        if should_load(reuse, base_tokens, rates):
            return True
        log.info("recomputing instead of loading id=%s source=%s tokens=%d mib=%.1f (load slower than prefill)",
                 entry.id, source, entry.n_tokens, entry.payload_bytes / 2**20)
        return False

    def _load(self, entry: Entry, limit: int) -> Restored | None:
        t0 = time.perf_counter()
        arrays = self.ram.get(entry.id)
        source = "ram"
        try:
            if arrays is None:
                source = "disk"
                path = self.store.payload_path(entry)
                arrays = kv_state.load_arrays(path, self.model_id, entry.n_tokens)
            caches = kv_state.state_from_arrays(arrays, self.model, entry.n_tokens, entry.id)
        except (PayloadError, CheckpointFormatError, OSError) as exc:
            self.ram.discard(entry.id)
            if not isinstance(exc, PayloadError):  # payload_path quarantines by itself
                self.store.quarantine(entry.id, f"load failed: {exc}")
            log.warning("checkpoint %s unusable, prefilling without it: %s", entry.id, exc)
            return None
        if source == "disk":
            self.ram.put(entry.id, arrays)
        n = min(entry.n_tokens, limit)
        kv_state.trim_state(caches, n)
        seconds = time.perf_counter() - t0
        self.store.touch(entry.id)
        log.info(
            "hit id=%s kind=%s source=%s tokens=%d reused=%d ms=%.0f mib=%.1f",
            entry.id, entry.kind, source, entry.n_tokens, n, seconds * 1000, entry.payload_bytes / 2**20,
        )
        return Restored(caches, n, source, entry.n_tokens, seconds, entry.id, entry.payload_bytes)

    def quarantine(self, restored: Restored, reason: str) -> None:
        """Marks the checkpoint a failed restore came from so it is never loaded again (case C11)."""
        if self.store is None or restored.entry_id is None:
            return
        self.ram.discard(restored.entry_id)
        self.store.quarantine(restored.entry_id, reason)

    def plan(self, prompt_len: int, stored_prefix: int, anchor_tokens: int, hints=()):
        """The store plan for this prompt (see `cachestore.plan_stores`; `hints`: the client's
        checkpoint positions, tokens); empty without a store. Skipped stores are logged and
        reported as store events."""
        if self.store is None:
            return ()
        plan = plan_stores(prompt_len, stored_prefix, anchor_tokens or None, self.store.config, hints)
        for skip in plan.skipped:
            log.info("store skipped kind=%s tokens=%d reason=%s", skip.kind, skip.n_tokens, skip.reason)
            self.events.append(StoreEvent("skipped", skip.kind, skip.n_tokens, reason=skip.reason))
        return plan.stores

    def save(self, kind: str, caches: list, tokens: list[int], namespace: str, preview: str) -> Entry | None:
        """Writes a checkpoint of `tokens` (a prefix of what `caches` holds) and keeps
        it in the RAM tier. Returns None when the store skipped it; never raises for
        I/O errors (they are logged and reported as events)."""
        if self.store is None or not tokens:
            return None
        arrays = kv_state.snapshot(caches, len(tokens))
        writer = kv_state.payload_writer(arrays, len(tokens), self.model_id)
        entry = self.store.save(kind, self.model_id, namespace, tokens, writer, text_preview=preview)
        if entry is not None:
            self.ram.put(entry.id, arrays)
        return entry

    def save_live(self, kind: str, live: LiveState | None) -> Entry | None:
        """Stores the client-sent part of a live state as an `evict` or `shutdown`
        checkpoint, when it is long enough (min_tokens) and not stored already."""
        if live is None or self.store is None or live.prompt_tokens < self.store.config.min_tokens:
            return None
        tokens = live.tokens[: live.prompt_tokens]
        hit = self.store.lookup(self.model_id, live.namespace, tokens)
        if hit is not None and hit.n_tokens == len(tokens):
            return None
        return self.save(kind, live.caches, tokens, live.namespace, live.preview)
