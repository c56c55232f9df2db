"""The gRPC `kvrouter.worker.v1.Worker` service: translates protobuf messages
to engine requests and engine events back to protobuf, and engine failures to
gRPC status codes:

    invalid request            INVALID_ARGUMENT   (a client error; never the worker's health)
    queue full (--max-queue)   RESOURCE_EXHAUSTED (the router tries another worker)
    engine thread dead         UNAVAILABLE        (also for requests already waiting or running:
                                                   their streams end with this error, case C15)
    request failed             INTERNAL

`CacheEventHub` numbers the engine's cache events (live state, RAM tier) and
the store's (checkpoints stored and removed), typed as in
`worker.cache_events`, and fans them out to `SubscribeCacheEvents` streams;
`ListCheckpoints` lists the store.
"""

from __future__ import annotations

import asyncio
import logging
import os

import grpc

from kvrouter.cachestore import StoreEvent
from kvrouter.cachestore.costs import ReuseRules
from kvrouter_proto import worker_pb2, worker_pb2_grpc
from kvrouter.worker.cache_events import CacheEvent, LiveChanged, RamChanged
from kvrouter.worker.engine import Engine, EngineBusyError, EngineDeadError
from kvrouter.worker.events import ErrorEvent, FinishEvent, GenerationRequest, SamplingConfig, TokenEvent
from kvrouter.worker.models.tool_parser import tool_parser_for

log = logging.getLogger("kvrouter.worker.servicer")

_SOURCES = {
    "none": worker_pb2.CACHE_SOURCE_NONE,
    "live": worker_pb2.CACHE_SOURCE_LIVE,
    "ram": worker_pb2.CACHE_SOURCE_RAM,
    "disk": worker_pb2.CACHE_SOURCE_DISK,
}


def request_from_proto(msg: worker_pb2.GenerateRequest, context_length: int) -> GenerationRequest:
    """Validates and converts a GenerateRequest. Raises ValueError with a client-facing message."""
    prompt = tuple(msg.prompt_token_ids)
    if not prompt:
        raise ValueError("prompt_token_ids is empty")
    if len(prompt) >= context_length:
        raise ValueError(f"prompt is {len(prompt)} tokens; the model's context is {context_length} tokens")
    sp = msg.sampling
    if sp.temperature < 0 or not (0 <= sp.top_p <= 1):
        raise ValueError("temperature must be >= 0 and top_p within [0, 1]")
    sampling = SamplingConfig(
        temperature=sp.temperature,
        top_p=sp.top_p or 1.0,
        max_tokens=sp.max_tokens or 256,
        seed=sp.seed if sp.HasField("seed") else None,
    )
    return GenerationRequest(
        request_id=msg.request_id,
        prompt=prompt,
        sampling=sampling,
        namespace=msg.namespace,
        anchor_tokens=msg.anchor_tokens,
        text_preview=msg.text_preview,
        hint_tokens=tuple(sorted({h for h in msg.hint_tokens if 0 < h < len(prompt)})),
    )


ENGINE_POLL_S = 0.5  # how often a waiting stream checks that the engine thread lives
SUBSCRIBER_QUEUE = 10_000  # cache events buffered per subscriber before it is dropped
LISTING_BATCH = 64  # store entries read per thread hop by ListCheckpoints
CHECKPOINT_ACTIONS = ("stored", "evicted", "quarantined", "removed")  # store events that change what it holds


def rates_message(rates) -> worker_pb2.Rates:
    return worker_pb2.Rates(prefill_tokens_per_second=rates.prefill_tps, disk_load_bytes_per_second=rates.disk_bps,
                            ram_load_bytes_per_second=rates.ram_bps, decode_tokens_per_second=rates.decode_tps,
                            prefill_fixed_seconds=rates.prefill_fixed_s,
                            prefill_linear_seconds_per_token=rates.prefill_linear_s,
                            prefill_quadratic_seconds_per_token2=rates.prefill_quad_s,
                            disk_cold_bytes_per_second=rates.disk_cold_bps,
                            disk_warm_bytes_per_second=rates.disk_warm_bps)


def _stage_fields(stages) -> dict:
    """Usage's load_*_seconds fields from `events.Usage.load_stages` (none: all 0)."""
    if stages is None:
        return {}
    read, device, build = stages
    return {"load_read_seconds": read, "load_device_seconds": device, "load_build_seconds": build}


class CacheEventHub:
    """Numbers cache events (1, 2, ...) and hands them to subscribers' queues.

    `publish_threadsafe` is the engine's `on_cache_event`. A subscriber whose
    queue overflows is dropped (its stream ends; it resubscribes and resyncs).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.seq = 0
        self.subscribers: set[asyncio.Queue] = set()
        self.closed = False

    def publish_threadsafe(self, event: CacheEvent) -> None:
        self.loop.call_soon_threadsafe(self.publish, event)

    def publish_store_event(self, event: StoreEvent) -> None:
        """A `CheckpointStore.on_event` listener (any thread): stores and removals of an
        entry become `checkpoint` events; skips and the rest are not sent."""
        if event.action in CHECKPOINT_ACTIONS and event.entry_id and not self.loop.is_closed():
            self.publish_threadsafe(event)

    def publish(self, event: CacheEvent) -> None:
        """Numbers `event` (a LiveChanged, RamChanged or store event) and queues its
        message for every subscriber."""
        self.seq += 1
        ev = event_message(self.seq, event)
        for q in list(self.subscribers):
            if q.qsize() >= SUBSCRIBER_QUEUE:
                self.subscribers.discard(q)
                q.put_nowait(None)  # ends that stream: the subscriber resyncs
            else:
                q.put_nowait(ev)

    def close(self) -> None:
        """Ends every subscriber's stream (at shutdown, so the server need not wait for them)."""
        self.closed = True
        for q in list(self.subscribers):
            q.put_nowait(None)
        self.subscribers.clear()

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        return q


def checkpoint_message(event: StoreEvent) -> worker_pb2.CheckpointChanged:
    """A store event (see CHECKPOINT_ACTIONS) as the CheckpointChanged it announces."""
    added = event.action == "stored"
    return worker_pb2.CheckpointChanged(
        entry_id=event.entry_id, added=added, namespace=event.namespace, model_identity=event.model_id,
        kind=event.kind, token_ids=event.token_ids if added else (), n_tokens=event.n_tokens,
        payload_bytes=event.n_bytes, reason="" if added else event.reason)


def listing_messages(store, entries: list) -> list[worker_pb2.CheckpointChanged]:
    """CheckpointChanged (added) messages of `entries` with their token ids, read from
    `store` (blocking: run it in a thread); entries removed meanwhile are left out."""
    out = []
    for e in entries:
        try:
            tokens = store.tokens_of(e.id)
        except KeyError:
            continue
        out.append(worker_pb2.CheckpointChanged(
            entry_id=e.id, added=True, namespace=e.namespace, model_identity=e.model_id, kind=e.kind,
            token_ids=tokens, n_tokens=e.n_tokens, payload_bytes=e.payload_bytes))
    return out


def event_message(seq: int, event: CacheEvent) -> worker_pb2.CacheEvent:
    """The CacheEvent message numbered `seq` for a typed cache event."""
    if isinstance(event, LiveChanged):
        return worker_pb2.CacheEvent(seq=seq, live=worker_pb2.LiveStateChanged(
            namespace=event.namespace, token_ids=event.tokens, live_id=event.live_id, removed=event.removed))
    if isinstance(event, RamChanged):
        return worker_pb2.CacheEvent(seq=seq, ram=worker_pb2.RamTierChanged(entry_id=event.entry_id,
                                                                            added=event.added))
    return worker_pb2.CacheEvent(seq=seq, checkpoint=checkpoint_message(event))


def reuse_rules_message(rules: ReuseRules) -> worker_pb2.ReuseRules:
    """`ModelInfo.reuse` for a model's reuse rules."""
    if rules.cut_any:
        return worker_pb2.ReuseRules()
    return worker_pb2.ReuseRules(whole_only=rules.window_tokens == 0, cut_below_tokens=rules.window_tokens)


async def submit_or_abort(engine, gen: GenerationRequest, context) -> tuple:
    """Queues `gen` on the engine with its events delivered to an asyncio.Queue on
    this loop. Returns (job, queue). Aborts the gRPC call with UNAVAILABLE when the
    engine thread is dead and RESOURCE_EXHAUSTED when its queue is full (shared
    by every gRPC service the worker serves)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    try:
        job = engine.submit(gen, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except EngineDeadError as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    except EngineBusyError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    return job, events


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one engine. `model_info` is the prebuilt ModelInfo message.

    store_id: "host:directory" of the store the engine reads ("" without one).
    hub: the cache event hub (None: SubscribeCacheEvents is unavailable).
    store: that store (a `cachestore.CheckpointStore`, read by ListCheckpoints; None: none).
    """

    def __init__(self, engine: Engine, model_info: worker_pb2.ModelInfo, store_id: str = "",
                 worker_name: str = "", hub: CacheEventHub | None = None, store=None):
        self.engine = engine
        self.model_info = model_info
        self.store_id = store_id
        self.worker_name = worker_name
        self.hub = hub
        self.store = store

    async def Generate(self, request, context):
        try:
            gen = request_from_proto(request, self.model_info.context_length)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        job, events = await submit_or_abort(self.engine, gen, context)
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), ENGINE_POLL_S)
                except asyncio.TimeoutError:
                    if not self.engine.alive:  # case C15: never leave a stream hanging
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "the generation thread died")
                    continue
                if isinstance(ev, TokenEvent):
                    delta = worker_pb2.TokenDelta(token_ids=ev.token_ids, text=ev.text)
                    if ev.reuse is not None:
                        delta.cached_tokens, delta.cache_source = ev.reuse[0], _SOURCES[ev.reuse[1]]
                    yield worker_pb2.GenerateResponse(delta=delta)
                elif isinstance(ev, FinishEvent):
                    u = ev.usage
                    yield worker_pb2.GenerateResponse(
                        final=worker_pb2.Final(
                            finish_reason=ev.finish_reason,
                            usage=worker_pb2.Usage(
                                prompt_tokens=u.prompt_tokens,
                                completion_tokens=u.completion_tokens,
                                cached_tokens=u.cached_tokens,
                                cache_source=_SOURCES[u.cache_source],
                                prefill_seconds=u.prefill_seconds,
                                load_seconds=u.load_seconds,
                                loaded_bytes=u.loaded_bytes,
                                **_stage_fields(u.load_stages),
                            ),
                            store_events=[
                                worker_pb2.StoreEvent(action=e.action, kind=e.kind, tokens=e.n_tokens,
                                                      bytes=e.n_bytes, seconds=e.seconds, reason=e.reason)
                                for e in ev.store_events
                            ],
                            rates=rates_message(self.engine.rates),
                            live_id=ev.live_id,
                        )
                    )
                    return
                elif isinstance(ev, ErrorEvent):
                    await context.abort(grpc.StatusCode.INTERNAL, ev.message)
        finally:
            # Client went away (or we finished): stop the engine work for this request.
            job.cancelled.set()

    async def GetModelInfo(self, request, context):
        """The prebuilt ModelInfo; with `request.chat_template` (the router renders with
        its own template), `tool_parser` is mlx-lm's choice for that template."""
        if not request.chat_template:
            return self.model_info
        info = worker_pb2.ModelInfo()
        info.CopyFrom(self.model_info)
        info.tool_parser = await asyncio.to_thread(tool_parser_for, self.engine.tokenizer, request.chat_template)
        return info

    async def GetStatus(self, request, context):
        engine = self.engine
        ram = engine.checkpoints.ram
        lives = engine.live_states if request.include_live_states else ()
        return worker_pb2.WorkerStatus(
            model_name=self.model_info.model_name,
            queue_depth=engine.queue_depth,
            pid=os.getpid(),
            rates=rates_message(engine.rates),
            ram_entry_ids=ram.ids(),
            ram_bytes=ram.bytes,
            store_id=self.store_id,
            store_budget_bytes=(self.store.config.disk_budget_bytes or 0) if self.store is not None else 0,
            max_queue=engine.config.max_queue,
            event_seq=self.hub.seq if self.hub is not None else 0,
            live_states=[worker_pb2.LiveState(live_id=s.live_id, namespace=s.namespace, token_ids=s.tokens)
                         for s in lives],
            decode_concurrency=engine.batch_width,
            prompt_concurrency=min(engine.config.prompt_concurrency, engine.batch_width),
            progress=engine.progress,
        )

    async def SubscribeCacheEvents(self, request, context):
        """Streams cache events; the first ones are the live states held now (a full picture)."""
        if self.hub is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "cache events are off")
        if self.hub.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is stopping")
        q = self.hub.subscribe()
        try:
            lives = self.engine.live_states
            for live in lives:
                self.hub.publish(LiveChanged(live.live_id, live.namespace, tuple(live.tokens)))
            if not lives:  # still one event, so the subscriber knows where the numbering stands
                self.hub.publish(LiveChanged(0, "", (), True))
            while True:
                ev = await q.get()
                if ev is None:
                    return  # dropped for falling behind
                yield ev
        finally:
            self.hub.subscribers.discard(q)

    async def ListCheckpoints(self, request, context):
        """Streams every usable entry of the store with its token ids (a scan: for a
        subscriber's resync, never the request path); nothing without a store."""
        if self.store is None:
            return
        entries = await asyncio.to_thread(self.store.entries)
        for i in range(0, len(entries), LISTING_BATCH):
            for msg in await asyncio.to_thread(listing_messages, self.store, entries[i: i + LISTING_BATCH]):
                yield msg
