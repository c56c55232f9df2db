"""The worker's side of the checkpoint store: the one lookup per request, loading
a checkpoint (RAM tier, else disk), writing the checkpoints the store's policy
plans, and quarantining damaged ones.

Which prefix a request reuses is decided in `worker.reuse.plan_restore`; this
module only moves states in and out of the store. A checkpoint holds a state of
exactly its `n_tokens` tokens (`worker.cache_state`): a state is cut down to it
before writing, where its layers allow; a state whose layers cannot be cut back
(recurrent layers, wrapped sliding windows) is written only where it ends,
which is why the engine stops prefill at every planned position.

Loading never deletes or skips a checkpoint because of its length: the
cold-max limit applies to what is stored, not to what is loaded (case C3).
A checkpoint that fails to load is quarantined (case C11).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from kvrouter.cachestore import CheckpointStore, Entry, Hit, PayloadError, StoreEvent, plan_stores
from kvrouter.cachestore.costs import lookup_span
from kvrouter.cachestore.payload_read import PayloadReadError, probe_cold_read_bps, resident_fraction_of
from kvrouter.worker import cache_state
from kvrouter.worker.cache_events import StoreListeners
from kvrouter.worker.cache_state import CheckpointFormatError, CutError, StateSpec
from kvrouter.worker.checkpoint_load import LoadInterrupted, LoadStages, load_state, probe_warm_load_bps
from kvrouter.worker.checkpoint_writer import WriteJob
from kvrouter.worker.live_states import LiveState
from kvrouter.worker.prefetch import Prefetcher
from kvrouter.worker.ram_tier import RamTier

log = logging.getLogger("kvrouter.worker.checkpoints")

PREFETCH_BYTES = 2 << 30  # payload bytes read ahead for queued requests at most (2 reads: worker.prefetch)


@dataclass
class Restored:
    """A state ready for prefill: `caches` holds the first `n_tokens` prompt tokens.

    source: "none", "live", "ram" or "disk". stored_prefix_tokens: length of the
    longest stored checkpoint that matched (the policy's input), whatever source won.
    load_seconds / loaded_bytes: time and payload bytes of a checkpoint load;
    entry_id: the checkpoint it came from (quarantined if the prefill then fails).
    stages: where a disk load's time went (`checkpoint_load.LoadStages`), else None.
    """

    caches: list
    n_tokens: int
    source: str
    stored_prefix_tokens: int
    load_seconds: float = 0.0
    entry_id: str | None = None
    loaded_bytes: int = 0
    stages: LoadStages | None = None


class CheckpointManager:
    """Loads and stores checkpoints of one model on one worker.

    model_id: the model identity (part of every key). spec: the model's state
    layout (`cache_state.StateSpec`). store: the shared disk store, or None (then
    only live states are reused). ram: the RAM tier (may have max_bytes 0).
    store_listeners: the store's `on_event` (None: a new, empty one), where the
    engine and the cache event hub add themselves. prefetch_bytes: payload bytes read
    ahead for queued requests at most (`prefetch_for`; 0: no prefetch).
    """

    def __init__(self, model_id: str, spec: StateSpec, store: CheckpointStore | None, ram: RamTier | None = None,
                 store_listeners: StoreListeners | None = None, prefetch_bytes: int = PREFETCH_BYTES):
        self.model_id = model_id
        self.spec = spec
        self.store = store
        self.ram = ram if ram is not None else RamTier(0)
        self.store_listeners = store_listeners if store_listeners is not None else StoreListeners()
        self._round: dict[str, list] = {}  # checkpoints loaded during this admission round, by entry id
        self.prefetch = Prefetcher(store, prefetch_bytes) if store is not None and prefetch_bytes > 0 else None
        # Makes the `pause` of each payload write (the engine's `CheckpointWriter.pauser`:
        # writes hold between tensors while first tokens are pending); None: never held.
        self.write_pauser: Callable[[], Callable[[], None]] | None = None

    def prefetch_for(self, prompt, namespace: str, owner) -> bool:
        """Starts reading the checkpoint `prompt` would load from disk while its request
        (`owner`) waits in the queue (`worker.prefetch`); `release(owner)` once it is
        admitted or gone. True when a read was started or joined."""
        if self.prefetch is None:
            return False
        try:
            hit = self.lookup(prompt, namespace)
            if hit is None or hit.entry.id in self.ram:
                return False
            return self.prefetch.start(hit.entry, owner)
        except Exception:  # a prefetch is an optimisation: the load at admission reports real failures
            log.warning("prefetch for a queued request failed", exc_info=True)
            return False

    def release(self, owner) -> None:
        """`owner` needs no prefetched read any more; reads nobody needs are cancelled."""
        if self.prefetch is not None:
            self.prefetch.release(owner)

    def end_admission_round(self) -> None:
        """Forgets the checkpoints loaded for the requests admitted together (see `load`)."""
        self._round.clear()

    def lookup(self, prompt, namespace: str) -> Hit | None:
        """The request's one store lookup: the longest checkpoint the worker could use
        for `prompt` (`cachestore.costs.lookup_span` of it), or None (miss, no store)."""
        if self.store is None:
            return None
        return self.store.lookup(self.model_id, namespace, prompt[: lookup_span(len(prompt), self.spec.rules)])

    def resident(self, entry: Entry) -> float | None:
        """Fraction (0..1) of `entry`'s payload the page cache holds now (mincore; nothing
        is read), None when unknown (no store, a missing file, no mincore)."""
        if self.store is None:
            return None
        try:
            return resident_fraction_of(self.store.payload_dir / entry.payload_name)
        except OSError:
            return None

    def probe_disk(self, entry: Entry | None = None) -> float | None:
        """Cold read bandwidth of the store's disk, bytes per second: up to
        `cachestore.payload_read.PROBE_BYTES` of `entry`'s payload (None: the store's
        largest usable payload, by its index) read with the page cache bypassed. None without a store,
        a payload, or a filesystem that allows such reads. Seeds load-or-recompute
        before the first real load (a prior that is too slow would never be corrected:
        a worker that never loads never measures a load)."""
        path = self._probe_path(entry)
        return None if path is None else probe_cold_read_bps(path)

    def probe_warm_load(self, entry: Entry | None = None) -> float | None:
        """Load bandwidth when the page cache holds the payload (read, copy to the
        device), bytes per second: `checkpoint_load.probe_warm_load_bps` on `entry`'s
        payload (None: the store's largest). None without a store or a payload."""
        path = self._probe_path(entry)
        return None if path is None else probe_warm_load_bps(path)

    def _probe_path(self, entry: Entry | None):
        """The payload file a probe reads: `entry`'s, else the store's largest (the index
        knows every payload's size: no directory listing). None without a store or one."""
        if self.store is None:
            return None
        if entry is None:
            entry = max(self.store.entries(), key=lambda e: e.payload_bytes, default=None)
            if entry is None:
                return None
        return self.store.payload_dir / entry.payload_name

    def load(self, entry: Entry, n_tokens: int) -> Restored | None:
        """The checkpoint `entry` as a fresh state cut to `n_tokens` tokens (from the
        RAM tier, else from a load made for another request admitted in the same round,
        else from disk, then kept in the RAM tier): requests restored from one
        checkpoint together share one loaded state until the batch copies it. A
        checkpoint that cannot be read is quarantined and None is returned (the caller
        falls back)."""
        t0 = time.perf_counter()
        caches = self.ram.get(entry.id)
        if caches is None:
            caches = self._round.get(entry.id)
        source, stages = "ram", None
        try:
            if caches is None:
                source = "disk"
                read = self.prefetch.take(entry.id) if self.prefetch is not None else None
                if read is None:
                    read = self.store.open_read(entry)  # one read, hashed as it goes (C11 checked at its end)
                caches, stages = load_state(read, self.model_id, entry.n_tokens, self.spec.layout,
                                            verify=lambda r: self.store.finish_read(entry, r))
                self.ram.put(entry.id, caches)
                self._round[entry.id] = caches
            state = cache_state.cut(caches, entry.n_tokens, n_tokens)
        except (PayloadError, PayloadReadError, CheckpointFormatError, CutError, OSError) as exc:
            self._unusable(entry, exc, "prefilling without it")
            return None
        seconds = time.perf_counter() - t0
        self.store.touch(entry.id)
        log.info(
            "hit id=%s kind=%s source=%s tokens=%d reused=%d ms=%.0f mib=%.1f%s",
            entry.id, entry.kind, source, entry.n_tokens, n_tokens, seconds * 1000, entry.payload_bytes / 2**20,
            "" if stages is None else f" read_ms={stages.read_s * 1000:.0f} device_ms={stages.device_s * 1000:.0f} "
            f"build_ms={stages.build_s * 1000:.0f} resident={stages.resident}",
        )
        return Restored(state, n_tokens, source, entry.n_tokens, seconds, entry.id, entry.payload_bytes, stages)

    def warm_candidates(self, max_bytes: int) -> list[Entry]:
        """Stored checkpoints of this model to load into the RAM tier while the worker is
        idle after its start (`warm`), most valuable first: the most reused (hits), then
        anchors (blocks several sessions share) before other kinds, then the most
        recently used; as many as fit in `max_bytes` bytes in all. Empty without a store.
        (Hits first: an anchor never reused, such as one of a one-off long prompt, is
        worth less than a conversation's checkpoint that was.)"""
        if self.store is None or max_bytes <= 0:
            return []
        rows = [e for e in self.store.entries() if e.model_id == self.model_id and e.id not in self.ram]
        rows.sort(key=lambda e: (e.hits, e.kind == "anchor", e.last_used), reverse=True)
        chosen, total = [], 0
        for e in rows:
            if total + e.payload_bytes <= max_bytes:
                chosen.append(e)
                total += e.payload_bytes
        return chosen

    def warm(self, entry: Entry, should_stop: Callable[[], bool]) -> LoadStages | None:
        """Loads `entry` from disk into the RAM tier (the RAM tier's warm-up after a
        start), giving way between tensors when `should_stop()` says so. Returns the
        load's stages; None when it was given up (LoadInterrupted: nothing is wrong
        with it) or unusable (then quarantined, as a failed load is)."""
        if self.store is None or entry.id in self.ram:
            return None
        try:
            read = self.store.open_read(entry)
            caches, stages = load_state(read, self.model_id, entry.n_tokens, self.spec.layout,
                                        verify=lambda r: self.store.finish_read(entry, r), should_stop=should_stop)
        except LoadInterrupted:
            return None
        except (PayloadError, PayloadReadError, CheckpointFormatError, OSError) as exc:
            self._unusable(entry, exc, "not kept in the RAM tier")
            return None
        self.ram.put(entry.id, caches)
        return stages

    def _unusable(self, entry: Entry, exc: Exception, outcome: str) -> None:
        """A load of `entry` failed with `exc`: it leaves the RAM tier and is quarantined
        (open_read/finish_read quarantine a PayloadError by themselves), and is logged."""
        self.ram.discard(entry.id)
        if not isinstance(exc, PayloadError):
            self.store.quarantine(entry.id, f"load failed: {exc}")
        log.warning("checkpoint %s unusable, %s: %s", entry.id, outcome, exc)

    def quarantine(self, entry_id: str, reason: str) -> None:
        """Marks the checkpoint a failed restore came from so it is never loaded again (case C11)."""
        if self.store is None:
            return
        self.ram.discard(entry_id)
        self.store.quarantine(entry_id, reason)

    def plan(self, prompt_len: int, stored_prefix: int, anchor_tokens: int,
             hints=()) -> tuple[tuple, tuple[StoreEvent, ...]]:
        """(planned stores, skip events) for this prompt (see `cachestore.plan_stores`;
        `hints`: the client's checkpoint positions, tokens); nothing without a store. Skips
        are logged."""
        if self.store is None:
            return (), ()
        plan = plan_stores(prompt_len, stored_prefix, anchor_tokens or None, self.store.config, hints)
        skips = []
        for skip in plan.skipped:
            log.info("store skipped kind=%s tokens=%d reason=%s", skip.kind, skip.n_tokens, skip.reason)
            skips.append(StoreEvent("skipped", skip.kind, skip.n_tokens, reason=skip.reason))
        return plan.stores, tuple(skips)

    def can_store(self, held: int, n_tokens: int) -> bool:
        """True when a checkpoint of `n_tokens` can be taken from a state holding `held`
        tokens (where it ends, or where the state can be cut back)."""
        return n_tokens == held or (n_tokens < held and self.spec.rules.can_cut(held))

    def prepare(self, kind: str, caches: list, held: int, tokens, namespace: str, preview: str) -> WriteJob | None:
        """A WriteJob for a checkpoint of `tokens` (the first len(tokens) of the `held`
        tokens `caches` holds): the state is cut and evaluated now, on the engine thread;
        `job.write()` stores it from any thread (the worker's `CheckpointWriter`) and
        returns (the Entry or None, ()); then `stored` keeps it in the RAM tier. Until
        then `job.reuse` offers the snapshot as a copy-only `LiveState`. None
        without a store. Store failures are skips (store events), never exceptions.
        Raises CutError when the state cannot be cut to len(tokens) (see `can_store`)."""
        if self.store is None or not tokens:
            return None
        state = cache_state.cut(caches, held, len(tokens))
        mx.eval([c.state for c in state])  # the writer thread only reads finished arrays
        size = cache_state.nbytes(state)
        pause = self.write_pauser() if self.write_pauser is not None else None
        guard = threading.Lock()
        payload_writer = cache_state.payload_writer(state, len(tokens), self.model_id, pause, guard)
        store, model_id, tokens = self.store, self.model_id, list(tokens)

        def write():
            return store.save(kind, model_id, namespace, tokens, payload_writer, text_preview=preview,
                              size_hint=size), ()

        job = WriteJob(kind, len(tokens), size, write, payload=state, guard=guard)
        # Until it is written, the snapshot is a state the engine may copy from (under `guard`).
        job.reuse = LiveState(namespace, tokens, state, len(tokens), preview, writing=job)
        return job

    def stored(self, job: WriteJob, entry: Entry | None) -> None:
        """After a job's write (engine thread): keeps a stored checkpoint in the RAM tier."""
        if entry is not None:
            self.ram.put(entry.id, job.payload)

    def prepare_live(self, kind: str, live: LiveState | None) -> WriteJob | None:
        """A WriteJob storing a live state as an `evict` or `shutdown` checkpoint: its
        client-sent part (cut back there, or its `prompt_state` where states cannot be
        cut back); without either (a request cancelled in its prefill), the whole state.
        None when shorter than min_tokens or stored already."""
        if live is None or self.store is None:
            return None
        caches, held = live.caches, live.held
        if live.prompt_state is not None:
            caches, held = live.prompt_state, live.prompt_tokens
        n = live.prompt_tokens if self.can_store(held, live.prompt_tokens) else held
        if n < self.store.config.min_tokens:
            return None
        tokens = live.tokens[:n]
        hit = self.store.lookup(self.model_id, live.namespace, tokens)
        if hit is not None and hit.n_tokens == n:
            return None
        return self.prepare(kind, caches, held, tokens, live.namespace, live.preview)
