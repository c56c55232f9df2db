"""An in-memory worker behind `router.worker_client.WorkerClient`, for router tests
without a model or a process (the fake at the router-worker process boundary)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import AsyncIterator

from kvrouter.cachestore.costs import Rates
from kvrouter.router.remote_stores import Checkpoint
from kvrouter.router.worker_client import (CacheUpdate, Completion, Delta, GenerateRequest, LiveStateInfo,
                                           ModelInfo, WorkerBusy, WorkerStatus, WorkerUnavailable)


class FakeWorkerClient:
    """An in-memory worker behind the same interface, for policy tests (no model).

    It serves one request at a time, like a worker with --decode-concurrency 1: a request waits for the
    ones before it, "prefills" the tokens its live state does not hold at
    `prefill_tps` (simulated with asyncio.sleep scaled by `time_scale`), then
    yields one Delta per generated token. Its live state is the last prompt plus
    its output. `fail_next`: raise this exception class for the next request
    (before any token; or after the first token with `fail_mid_stream`).
    `requests` records every GenerateRequest it received.

    Its store: `store_id` names it ("" none) and `stored` holds its entries by id
    (pass the same dict to fakes of one host: they share the store).
    `store_checkpoint` / `remove_checkpoint` change it and send the `checkpoint`
    event a worker sends; `list_checkpoints` lists it. `store_anchors`: a request's
    prefill stores its anchor (its first `anchor_tokens` tokens), as a worker does.

    Faults: `freeze()` makes it a SIGSTOPped process (calls hang, status does not
    answer, requests get no token) until `thaw()`; `quarantine_next` makes the next
    request report no reuse (its checkpoint turned out damaged). `progress` counts
    its steps of work, as a worker's status reports them.
    """

    LIVE_ID = 1  # its one live state (one batch slot)

    def __init__(self, name: str, model_name: str = "fake", *, prefill_tps: float = 1000.0,
                 time_scale: float = 0.0, max_queue: int = 0, healthy: bool = True, local: bool = True,
                 store_id: str = "", stored: dict[str, Checkpoint] | None = None, store_budget_bytes: int = 0):
        self.name = name
        self.store_budget_bytes = store_budget_bytes  # reported in its status, as a worker's store applies it
        self.address = f"fake://{name}"
        self.local = local
        self.model_name = model_name
        self.healthy = healthy
        self.prefill_tps = prefill_tps
        self.time_scale = time_scale
        self.max_queue = max_queue
        self.decode_s = 0.0  # seconds per generated token
        self.live: tuple[int, ...] = ()
        self.live_namespace = ""
        self.requests: list[GenerateRequest] = []
        self.prefilled_tokens = 0
        self.fail_next: type[Exception] | None = None
        self.fail_mid_stream = False
        self._lock = asyncio.Lock()
        self._queued = 0
        self._events: asyncio.Queue | None = None
        self._seq = 0
        self.store_id = store_id
        self.stored: dict[str, Checkpoint] = stored if stored is not None else {}
        self.store_anchors = False
        self.quarantine_next = False
        self.progress = 0
        self._thawed = asyncio.Event()
        self._thawed.set()

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    async def wait_ready(self, timeout_s: float) -> None:
        if not self.healthy:
            raise WorkerUnavailable(f"worker {self.name} not ready")

    async def watch_health(self) -> None:
        await asyncio.Event().wait()  # health is set directly by tests

    async def model_info(self, chat_template: str | None = None) -> ModelInfo:
        return ModelInfo(self.model_name, f"id-{self.model_name}", 4096)

    async def status(self, live_states: bool = False, timeout_s: float = 5.0) -> WorkerStatus:
        if self.frozen:
            await asyncio.sleep(timeout_s)
            raise WorkerUnavailable(f"worker {self.name} status: DEADLINE_EXCEEDED")
        lives = (LiveStateInfo(self.LIVE_ID, self.live_namespace, self.live),) if self.live and live_states else ()
        return WorkerStatus(
            model_name=self.model_name, queue_depth=self._queued, pid=0,
            rates=Rates(prefill_tps=self.prefill_tps), max_queue=self.max_queue, event_seq=self._seq,
            store_id=self.store_id, slots=1, prompt_slots=1, live_states=lives, progress=self.progress,
            store_budget_bytes=self.store_budget_bytes,
        )

    async def cache_events(self) -> AsyncIterator[CacheUpdate]:
        self._events = asyncio.Queue()
        self._emit_live()
        while True:
            yield await self._events.get()

    def _emit_live(self) -> None:
        self._emit(CacheUpdate(0, "live", self.live_namespace, self.live, live_id=self.LIVE_ID,
                               removed=not self.live))

    def _emit(self, update: CacheUpdate) -> None:
        """Numbers `update` as the next event (its own seq is replaced) and sends it."""
        self._seq += 1
        if self._events is not None:
            self._events.put_nowait(replace(update, seq=self._seq))

    def store_checkpoint(self, tokens, namespace: str = "", kind: str = "anchor",
                         payload_bytes: int = 1000) -> Checkpoint:
        """Stores a checkpoint of `tokens` (as a prefill of this worker would) and sends its event."""
        cp = Checkpoint(uuid.uuid4().hex, namespace, f"id-{self.model_name}", kind, tuple(tokens), len(tokens),
                        payload_bytes)
        self.stored[cp.entry_id] = cp
        self._emit(CacheUpdate(0, "checkpoint", entry_id=cp.entry_id, added=True, checkpoint=cp))
        return cp

    def remove_checkpoint(self, entry_id: str, *, event: bool = True) -> None:
        """Removes an entry (evicted or quarantined by this worker; `event=False`: by
        someone who sends no event, like `kvrouter cache rm`)."""
        cp = self.stored.pop(entry_id)
        if event:
            gone = replace(cp, token_ids=())
            self._emit(CacheUpdate(0, "checkpoint", entry_id=entry_id, added=False, checkpoint=gone,
                                   reason="removed"))

    async def list_checkpoints(self) -> AsyncIterator[Checkpoint]:
        for cp in list(self.stored.values()):
            yield cp

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta | Completion]:
        self.requests.append(request)
        if self.fail_next is not None and not self.fail_mid_stream:
            exc, self.fail_next = self.fail_next, None
            raise exc(f"worker {self.name}: injected failure")
        if self.max_queue and self._queued >= self.max_queue:
            raise WorkerBusy(f"worker {self.name}: queue full")
        prompt = tuple(request.prompt)
        self._queued += 1
        try:
            await self._thawed.wait()
            async with self._lock:
                await self._thawed.wait()
                cached = 0
                if request.namespace == self.live_namespace:
                    for a, b in zip(self.live, prompt[:-1]):
                        if a != b:
                            break
                        cached += 1
                if self.quarantine_next:
                    cached, self.quarantine_next = 0, False
                prefilled = len(prompt) - cached
                self.prefilled_tokens += prefilled
                if self.time_scale:  # in chunks of at most 0.1 s, each a step of progress
                    left = prefilled / self.prefill_tps * self.time_scale
                    while left > 0:
                        await asyncio.sleep(min(0.1, left))
                        left -= 0.1
                        self.progress += 1
                self.progress += 1
                if self.store_anchors and request.anchor_tokens:
                    self.store_checkpoint(prompt[: request.anchor_tokens], request.namespace)
                out = []
                for i in range(max(1, request.max_tokens)):
                    if i == 1 and self.fail_next is not None and self.fail_mid_stream:
                        exc, self.fail_next = self.fail_next, None
                        raise exc(f"worker {self.name}: injected failure mid-stream")
                    token = 1000 + i
                    out.append(token)
                    await self._thawed.wait()
                    self.progress += 1
                    reuse = (cached, "live" if cached else "none") if i == 0 else None
                    yield Delta((token,), f"t{i} ", reuse)
                    await asyncio.sleep(self.decode_s)
                self.live, self.live_namespace = prompt + tuple(out), request.namespace
                self._emit_live()
                yield Completion("length", len(prompt), len(out), cached, "live" if cached else "none",
                                 prefilled / self.prefill_tps, 0.0,
                                 rates=Rates(prefill_tps=self.prefill_tps), live_id=self.LIVE_ID)
        finally:
            self._queued -= 1

    async def close(self) -> None:
        return None
