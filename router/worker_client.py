"""The router's view of one worker: a small interface and its gRPC implementation.

`WorkerClient` is what the pool, the dispatcher and the HTTP views use;
`GrpcWorkerClient` speaks `kvrouter.worker.v1.Worker` and `grpc.health.v1` to a
worker process; `FakeWorkerClient` is an in-memory worker for policy tests.
gRPC errors are translated here, at the process boundary:

    RuntimeError
    ├── WorkerUnavailable   nothing was generated: safe to retry elsewhere
    │   └── WorkerBusy      the worker's queue is full (--max-queue)
    └── WorkerError         the worker failed the request after it started

and invalid requests become `router.errors.BadRequest` (a client error: it
never counts against the worker's health, case C14).

In-flight counts are not kept here: the dispatcher raises `in_flight` when it
decides the route and lowers it when the request ends, whatever way it ends.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrouter_proto import worker_pb2, worker_pb2_grpc
from kvrouter.router.errors import BadRequest
from kvrouter.router.remote_stores import Checkpoint
from kvrouter.cachestore.costs import Rates

log = logging.getLogger("kvrouter.router.worker_client")


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached or is not serving."""


class WorkerBusy(WorkerUnavailable):
    """The worker's queue is full."""


class WorkerError(RuntimeError):
    """The worker accepted the request and then failed it."""


@dataclass(frozen=True)
class Delta:
    """Generated tokens and their text."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class StoreEvent:
    """A checkpoint store action a worker took for the request (see worker.proto)."""

    action: str
    kind: str
    tokens: int
    bytes: int
    seconds: float
    reason: str


@dataclass(frozen=True)
class CacheUpdate:
    """A cache event from a worker. kind "live": live state `live_id` now holds
    `tokens` (in `namespace`), or was dropped (`removed`); kind "ram": `entry_id`
    entered (added) or left its RAM tier; kind "checkpoint": the worker stored
    (added) or removed `checkpoint` (id `entry_id`) in the store it reads (token
    ids only when added)."""

    seq: int
    kind: str
    namespace: str = ""
    tokens: tuple[int, ...] = ()
    entry_id: str = ""
    added: bool = False
    live_id: int = 0
    removed: bool = False
    checkpoint: Checkpoint | None = None


@dataclass(frozen=True)
class Completion:
    """The end of a generation. Counts in tokens, times in seconds."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_source: str
    prefill_seconds: float
    load_seconds: float
    store_events: tuple[StoreEvent, ...] = ()
    loaded_bytes: int = 0
    rates: Rates | None = None  # the worker's measurements after this request
    live_id: int = 0  # the live state the request left on the worker (0: none)

    @property
    def stored_tokens(self) -> int:
        """Tokens of the longest checkpoint this request wrote (0 when none)."""
        return max((e.tokens for e in self.store_events
                    if e.action == "stored" and e.kind in ("anchor", "waypoint", "hint")), default=0)


_SOURCE_NAMES = {
    worker_pb2.CACHE_SOURCE_NONE: "none",
    worker_pb2.CACHE_SOURCE_LIVE: "live",
    worker_pb2.CACHE_SOURCE_RAM: "ram",
    worker_pb2.CACHE_SOURCE_DISK: "disk",
}


def rates_from_proto(r: worker_pb2.Rates) -> Rates:
    return Rates(r.prefill_tokens_per_second, r.disk_load_bytes_per_second, r.ram_load_bytes_per_second,
                 r.decode_tokens_per_second)


def checkpoint_from_proto(c: worker_pb2.CheckpointChanged) -> Checkpoint:
    return Checkpoint(c.entry_id, c.namespace, c.model_identity, c.kind, tuple(c.token_ids), c.n_tokens,
                      c.payload_bytes)


def cache_update_from_proto(ev: worker_pb2.CacheEvent) -> CacheUpdate:
    if ev.HasField("live"):
        return CacheUpdate(ev.seq, "live", ev.live.namespace, tuple(ev.live.token_ids), live_id=ev.live.live_id,
                           removed=ev.live.removed)
    if ev.HasField("checkpoint"):
        c = ev.checkpoint
        return CacheUpdate(ev.seq, "checkpoint", entry_id=c.entry_id, added=c.added,
                           checkpoint=checkpoint_from_proto(c))
    return CacheUpdate(ev.seq, "ram", entry_id=ev.ram.entry_id, added=ev.ram.added)


class WorkerClient(Protocol):
    """name: the router's name for it ("w0", "r0"); local: a process `kvrouter serve`
    started on this host; healthy: follows grpc.health.v1 Watch; in_flight: requests
    the dispatcher sent and that have not ended."""

    name: str
    address: str
    local: bool
    healthy: bool
    in_flight: int

    async def wait_ready(self, timeout_s: float) -> None: ...
    async def watch_health(self) -> None: ...
    async def model_info(self) -> worker_pb2.ModelInfo: ...
    async def status(self) -> worker_pb2.WorkerStatus: ...
    def cache_events(self) -> AsyncIterator[CacheUpdate]: ...
    def list_checkpoints(self) -> AsyncIterator[Checkpoint]: ...
    def generate(self, request: worker_pb2.GenerateRequest) -> AsyncIterator[Delta | Completion]: ...
    async def close(self) -> None: ...


class GrpcWorkerClient:
    """A worker reached over gRPC. `healthy` follows the worker's grpc.health.v1
    Watch stream once `watch_health()` runs.

    token: the worker's `--worker-token` (sent as `authorization: Bearer`);
    tls_ca: PEM root certificate(s) to verify a TLS worker (None: plaintext).
    """

    def __init__(self, name: str, address: str, *, local: bool = True, token: str | None = None,
                 tls_ca: bytes | None = None):
        self.name = name
        self.address = address
        self.local = local
        self.healthy = False
        self.in_flight = 0
        options = [("grpc.max_receive_message_length", 64 * 2**20)]
        if tls_ca is not None:
            self._channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def wait_ready(self, timeout_s: float) -> None:
        """Waits until the worker reports SERVING. Raises WorkerUnavailable on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2,
                                               metadata=self._metadata)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    self.healthy = True
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise WorkerUnavailable(f"worker {self.name} at {self.address} not ready after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)

    async def watch_health(self) -> None:
        """Follows the worker's health stream forever, reconnecting with backoff."""
        backoff = 0.2
        while True:
            try:
                async for resp in self._health.Watch(health_pb2.HealthCheckRequest(service=""),
                                                    metadata=self._metadata):
                    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
                    if ok != self.healthy:
                        log.info("worker %s is %s", self.name, "healthy" if ok else "NOT serving")
                    self.healthy = ok
                    backoff = 0.2
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.healthy:
                    log.warning("worker %s unreachable: %s", self.name, exc.code().name)
                self.healthy = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def model_info(self) -> worker_pb2.ModelInfo:
        try:
            return await self._stub.GetModelInfo(worker_pb2.ModelInfoRequest(), timeout=30,
                                                     metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnavailable(f"worker {self.name}: {exc.details()}") from exc

    async def status(self) -> worker_pb2.WorkerStatus:
        try:
            return await self._stub.GetStatus(worker_pb2.StatusRequest(), timeout=5, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnavailable(f"worker {self.name}: {exc.details()}") from exc

    async def _stream(self, call, convert, what: str) -> AsyncIterator:
        """`convert`ed messages of a server stream; a failed call raises WorkerUnavailable."""
        try:
            async for msg in call:
                yield convert(msg)
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnavailable(f"worker {self.name} {what}: {exc.code().name}") from exc
        finally:
            call.cancel()

    def cache_events(self) -> AsyncIterator[CacheUpdate]:
        """The worker's cache events until the stream breaks (raises WorkerUnavailable)."""
        call = self._stub.SubscribeCacheEvents(worker_pb2.CacheEventsRequest(), metadata=self._metadata)
        return self._stream(call, cache_update_from_proto, "cache events")

    def list_checkpoints(self) -> AsyncIterator[Checkpoint]:
        """Every usable entry of the store the worker reads, with token ids. Raises
        WorkerUnavailable when the call fails (also from a worker without the rpc)."""
        call = self._stub.ListCheckpoints(worker_pb2.ListCheckpointsRequest(), metadata=self._metadata)
        return self._stream(call, checkpoint_from_proto, "checkpoint listing")

    async def generate(self, request: worker_pb2.GenerateRequest) -> AsyncIterator[Delta | Completion]:
        """Streams Delta items and ends with one Completion.

        Raises BadRequest (invalid request), WorkerUnavailable (nothing was
        generated: safe to retry elsewhere), WorkerError (failed mid-way).
        Closing the iterator early cancels the generation on the worker.
        """
        call = self._stub.Generate(request, metadata=self._metadata)
        started = False
        try:
            async for msg in call:
                if msg.HasField("delta"):
                    started = True
                    yield Delta(tuple(msg.delta.token_ids), msg.delta.text)
                else:
                    u = msg.final.usage
                    yield Completion(
                        finish_reason=msg.final.finish_reason,
                        prompt_tokens=u.prompt_tokens,
                        completion_tokens=u.completion_tokens,
                        cached_tokens=u.cached_tokens,
                        cache_source=_SOURCE_NAMES.get(u.cache_source, "none"),
                        prefill_seconds=u.prefill_seconds,
                        load_seconds=u.load_seconds,
                        store_events=tuple(
                            StoreEvent(e.action, e.kind, e.tokens, e.bytes, e.seconds, e.reason)
                            for e in msg.final.store_events
                        ),
                        loaded_bytes=u.loaded_bytes,
                        rates=rates_from_proto(msg.final.rates) if msg.final.HasField("rates") else None,
                        live_id=msg.final.live_id,
                    )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadRequest(exc.details()) from exc
            if not started and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise WorkerBusy(f"worker {self.name}: {exc.details()}") from exc
            if not started:  # nothing reached the client: another worker may take it
                raise WorkerUnavailable(f"worker {self.name}: {exc.details()}") from exc
            raise WorkerError(f"worker {self.name} failed: {exc.details()}") from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()


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
    event a worker sends; `list_checkpoints` lists it.
    """

    LIVE_ID = 1  # its one live state (one batch slot)

    def __init__(self, name: str, model_name: str = "fake", *, prefill_tps: float = 1000.0,
                 time_scale: float = 0.0, max_queue: int = 0, healthy: bool = True, local: bool = True,
                 store_id: str = "", stored: dict[str, Checkpoint] | None = None):
        self.name = name
        self.address = f"fake://{name}"
        self.local = local
        self.model_name = model_name
        self.healthy = healthy
        self.in_flight = 0
        self.prefill_tps = prefill_tps
        self.time_scale = time_scale
        self.max_queue = max_queue
        self.live: tuple[int, ...] = ()
        self.live_namespace = ""
        self.requests: list[worker_pb2.GenerateRequest] = []
        self.prefilled_tokens = 0
        self.fail_next: type[Exception] | None = None
        self.fail_mid_stream = False
        self.served = 0
        self._lock = asyncio.Lock()
        self._queued = 0
        self._events: asyncio.Queue | None = None
        self._seq = 0
        self.store_id = store_id
        self.stored: dict[str, Checkpoint] = stored if stored is not None else {}

    async def wait_ready(self, timeout_s: float) -> None:
        if not self.healthy:
            raise WorkerUnavailable(f"worker {self.name} not ready")

    async def watch_health(self) -> None:
        await asyncio.Event().wait()  # health is set directly by tests

    async def model_info(self) -> worker_pb2.ModelInfo:
        return worker_pb2.ModelInfo(model_name=self.model_name, identity=f"id-{self.model_name}",
                                    context_length=4096)

    async def status(self) -> worker_pb2.WorkerStatus:
        return worker_pb2.WorkerStatus(
            model_name=self.model_name, live_prefix_tokens=len(self.live), queue_depth=self._queued,
            requests_served=self.served, engine_alive=self.healthy, pid=0,
            rates=worker_pb2.Rates(prefill_tokens_per_second=self.prefill_tps),
            live_token_ids=self.live, live_namespace=self.live_namespace, max_queue=self.max_queue,
            event_seq=self._seq, worker_name=self.name, store_id=self.store_id, decode_concurrency=1,
            prompt_concurrency=1,
            live_states=[worker_pb2.LiveState(live_id=self.LIVE_ID, namespace=self.live_namespace,
                                              token_ids=self.live)] if self.live else [],
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
            self._emit(CacheUpdate(0, "checkpoint", entry_id=entry_id, added=False, checkpoint=gone))

    async def list_checkpoints(self) -> AsyncIterator[Checkpoint]:
        for cp in list(self.stored.values()):
            yield cp

    async def generate(self, request: worker_pb2.GenerateRequest) -> AsyncIterator[Delta | Completion]:
        self.requests.append(request)
        if self.fail_next is not None and not self.fail_mid_stream:
            exc, self.fail_next = self.fail_next, None
            raise exc(f"worker {self.name}: injected failure")
        if self.max_queue and self._queued >= self.max_queue:
            raise WorkerBusy(f"worker {self.name}: queue full")
        prompt = tuple(request.prompt_token_ids)
        self._queued += 1
        try:
            async with self._lock:
                cached = 0
                if request.namespace == self.live_namespace:
                    for a, b in zip(self.live, prompt[:-1]):
                        if a != b:
                            break
                        cached += 1
                prefilled = len(prompt) - cached
                self.prefilled_tokens += prefilled
                if self.time_scale:
                    await asyncio.sleep(prefilled / self.prefill_tps * self.time_scale)
                out = []
                for i in range(max(1, request.sampling.max_tokens)):
                    if i == 1 and self.fail_next is not None and self.fail_mid_stream:
                        exc, self.fail_next = self.fail_next, None
                        raise exc(f"worker {self.name}: injected failure mid-stream")
                    token = 1000 + i
                    out.append(token)
                    yield Delta((token,), f"t{i} ")
                    await asyncio.sleep(0)
                self.live, self.live_namespace = prompt + tuple(out), request.namespace
                self.served += 1
                self._emit_live()
                yield Completion("length", len(prompt), len(out), cached, "live" if cached else "none",
                                 prefilled / self.prefill_tps, 0.0,
                                 rates=Rates(prefill_tps=self.prefill_tps), live_id=self.LIVE_ID)
        finally:
            self._queued -= 1

    async def close(self) -> None:
        return None
