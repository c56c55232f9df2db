"""The wire between the router and one worker: the only router module that speaks
protobuf (`kvrouter.worker.v1.Worker` and `grpc.health.v1`).

`WorkerClient` is the small interface the rest of the router uses; everything it
takes and returns is a dataclass of this module. `GrpcWorkerClient` implements it
over gRPC; `tests/support/fake_worker.py` implements it in memory. gRPC errors are
translated here, in one place (`translate_error`), at the process boundary:

    RuntimeError
    ├── WorkerUnavailable   nothing was generated: safe to retry elsewhere
    │   └── WorkerBusy      the worker's queue is full (--max-queue)
    └── WorkerError         the worker failed the request after it started

and invalid requests become `router.errors.BadRequest` (a client error: it
never counts against the worker's health, case C14).

Load (requests in flight) is not counted here: `router.leases` owns it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrouter_proto import worker_pb2, worker_pb2_grpc
from kvrouter.cachestore.costs import CUT_ANY, Rates, ReuseRules
from kvrouter.router.errors import BadRequest
from kvrouter.router.remote_stores import Checkpoint

log = logging.getLogger("kvrouter.router.worker_client")

STATUS_TIMEOUT_S = 5.0
MODEL_INFO_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 2**20  # a ModelInfo carries the tokenizer JSON; a status, every live state's tokens

KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
"""HTTP/2 keepalive on every router-worker channel: a PING every KEEPALIVE_TIME_MS, even
without calls; a worker that does not answer one in KEEPALIVE_TIMEOUT_MS (a frozen or
vanished process: the kernel still holds its socket open) has its connection closed, so
its streams fail instead of hanging. The worker side allows pings this often
(`worker.grpc_security.KEEPALIVE_SERVER_OPTIONS`)."""

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging a worker that sends nothing (a long prefill)
)


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached or is not serving."""


class WorkerBusy(WorkerUnavailable):
    """The worker's queue is full."""


class WorkerError(RuntimeError):
    """The worker accepted the request and then failed it."""


# -- what crosses the wire, as the router sees it -------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """The model a worker serves (GetModelInfo).

    identity: weights + tokenizer + KV layout digest (part of every store key).
    tokenizer_json: a `tokenizers` Tokenizer as JSON; chat_template: Jinja text ("" none);
    eos_token_ids / bos_token_id: special token ids; context_length: tokens;
    tool_parser: mlx-lm's tool parser for the chat template the router renders with
    (`mlx_lm.tool_parsers.<name>`; "" none); reuse: how far back its states can be cut
    (`ModelInfo.reuse`), so routing counts only on the reuse the worker can deliver.
    """

    model_name: str
    identity: str
    context_length: int
    tokenizer_json: str = ""
    chat_template: str = ""
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    tool_parser: str = ""
    reuse: ReuseRules = CUT_ANY


@dataclass(frozen=True)
class LiveStateInfo:
    """A live state a worker holds: its id, namespace and the token ids of its KV state."""

    live_id: int
    namespace: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class WorkerStatus:
    """A worker's counters and cache summary (GetStatus).

    queue_depth: requests waiting plus running in its engine. store_id: "host:directory"
    of the store it reads ("" none). ram_entry_ids / ram_bytes: its RAM tier. event_seq:
    number of its last cache event. live_states: every live state, only when asked for.
    max_queue: requests it accepts (0: no limit). slots / prompt_slots: its
    --decode-concurrency / --prompt-concurrency. progress: steps of work it has done
    (admissions, batch steps, checkpoints written): a worker holding requests whose
    progress stands still is stalled. store_budget_bytes: its store's disk budget, bytes,
    as the worker applies it (`--kv-cache-disk-mb`, or sized from the model and the free
    disk; 0: no store).
    """

    model_name: str
    queue_depth: int = 0
    pid: int = 0
    rates: Rates = Rates()
    ram_entry_ids: tuple[str, ...] = ()
    ram_bytes: int = 0
    store_id: str = ""
    max_queue: int = 0
    event_seq: int = 0
    live_states: tuple[LiveStateInfo, ...] = ()
    slots: int = 1
    prompt_slots: int = 1
    progress: int = 0
    store_budget_bytes: int = 0


@dataclass(frozen=True)
class GenerateRequest:
    """One generation for a worker. prompt: token ids; namespace: the tenant (part of every
    checkpoint key); anchor_tokens: length of the stable chat prefix (0: none);
    text_preview: the prompt's first characters, kept with stored checkpoints.
    hint_tokens: positions (tokens) the client marked as ends of stable prefixes
    (candidate checkpoint positions, `cachestore.plan_stores`).
    Sampling: temperature (0 greedy), top_p (1 off), max_tokens, seed (None: unseeded)."""

    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    namespace: str = ""
    anchor_tokens: int = 0
    text_preview: str = ""
    hint_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Delta:
    """Generated tokens and their text. reuse: on the first delta of a generation, the
    (prompt tokens reused, source) that really happened; None on the others."""

    token_ids: tuple[int, ...]
    text: str
    reuse: tuple[int, str] | None = None


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint store action a worker took for the request (worker.proto `StoreEvent`;
    the worker side is `cachestore.StoreEvent`).
    tokens: checkpoint length; bytes: payload size; seconds: time it took."""

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
    ids only when added; `reason` says why it was removed)."""

    seq: int
    kind: str
    namespace: str = ""
    tokens: tuple[int, ...] = ()
    entry_id: str = ""
    added: bool = False
    live_id: int = 0
    removed: bool = False
    checkpoint: Checkpoint | None = None
    reason: str = ""


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
    store_events: tuple[CheckpointEvent, ...] = ()
    loaded_bytes: int = 0
    rates: Rates | None = None  # the worker's measurements after this request
    live_id: int = 0  # the live state the request left on the worker (0: none)
    load_stages: tuple[float, float, float] = (0.0, 0.0, 0.0)  # a disk load's read, device, build seconds

    @property
    def stored_tokens(self) -> int:
        """Tokens of the longest checkpoint this request wrote (0 when none)."""
        return max((e.tokens for e in self.store_events
                    if e.action == "stored" and e.kind in ("anchor", "waypoint", "hint")), default=0)


# -- protobuf <-> dataclasses -----------------------------------------------------------------

_SOURCE_NAMES = {
    worker_pb2.CACHE_SOURCE_NONE: "none",
    worker_pb2.CACHE_SOURCE_LIVE: "live",
    worker_pb2.CACHE_SOURCE_RAM: "ram",
    worker_pb2.CACHE_SOURCE_DISK: "disk",
}


def rates_from_proto(r: worker_pb2.Rates) -> Rates:
    return Rates(r.prefill_tokens_per_second, r.disk_load_bytes_per_second, r.ram_load_bytes_per_second,
                 r.decode_tokens_per_second, r.prefill_fixed_seconds, r.prefill_linear_seconds_per_token,
                 r.prefill_quadratic_seconds_per_token2, r.disk_cold_bytes_per_second,
                 r.disk_warm_bytes_per_second)


def reuse_rules_from_proto(info: worker_pb2.ModelInfo) -> ReuseRules:
    """A worker's reuse rules (`ModelInfo.reuse`; unset: states cut back anywhere)."""
    r = info.reuse
    if r.whole_only:
        return ReuseRules(cut_any=False, window_tokens=0)
    if r.cut_below_tokens:
        return ReuseRules(cut_any=False, window_tokens=r.cut_below_tokens)
    return ReuseRules()


def model_info_from_proto(m: worker_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(m.model_name, m.identity, m.context_length, m.tokenizer_json, m.chat_template,
                     tuple(m.eos_token_ids), m.bos_token_id if m.HasField("bos_token_id") else None,
                     m.tool_parser, reuse_rules_from_proto(m))


def status_from_proto(st: worker_pb2.WorkerStatus) -> WorkerStatus:
    return WorkerStatus(
        model_name=st.model_name, queue_depth=st.queue_depth, pid=st.pid,
        rates=rates_from_proto(st.rates), ram_entry_ids=tuple(st.ram_entry_ids), ram_bytes=st.ram_bytes,
        store_id=st.store_id, max_queue=st.max_queue, event_seq=st.event_seq,
        live_states=tuple(LiveStateInfo(s.live_id, s.namespace, tuple(s.token_ids)) for s in st.live_states),
        slots=max(1, st.decode_concurrency), prompt_slots=max(1, st.prompt_concurrency), progress=st.progress,
        store_budget_bytes=st.store_budget_bytes,
    )


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
                           checkpoint=checkpoint_from_proto(c), reason=c.reason)
    return CacheUpdate(ev.seq, "ram", entry_id=ev.ram.entry_id, added=ev.ram.added)


def request_to_proto(r: GenerateRequest) -> worker_pb2.GenerateRequest:
    msg = worker_pb2.GenerateRequest(
        request_id=r.request_id, prompt_token_ids=r.prompt,
        sampling=worker_pb2.SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens),
        namespace=r.namespace, anchor_tokens=r.anchor_tokens, text_preview=r.text_preview,
        hint_tokens=r.hint_tokens,
    )
    if r.seed is not None:
        msg.sampling.seed = r.seed
    return msg


def completion_from_proto(final: worker_pb2.Final) -> Completion:
    u = final.usage
    return Completion(
        finish_reason=final.finish_reason,
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_tokens=u.cached_tokens,
        cache_source=_SOURCE_NAMES.get(u.cache_source, "none"),
        prefill_seconds=u.prefill_seconds,
        load_seconds=u.load_seconds,
        store_events=tuple(CheckpointEvent(e.action, e.kind, e.tokens, e.bytes, e.seconds, e.reason)
                           for e in final.store_events),
        loaded_bytes=u.loaded_bytes,
        load_stages=(u.load_read_seconds, u.load_device_seconds, u.load_build_seconds),
        rates=rates_from_proto(final.rates) if final.HasField("rates") else None,
        live_id=final.live_id,
    )


def translate_error(exc: grpc.aio.AioRpcError, worker: str, what: str, started: bool = False) -> Exception:
    """The router's exception for a failed call `what` to `worker`: BadRequest for
    INVALID_ARGUMENT; before any token, WorkerBusy (RESOURCE_EXHAUSTED) or
    WorkerUnavailable; after one, WorkerError."""
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest(exc.details() or "invalid request")
    if started:
        return WorkerError(f"worker {worker} failed: {exc.details()}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerBusy(f"worker {worker}: {exc.details()}")
    return WorkerUnavailable(f"worker {worker} {what}: {code.name}: {exc.details()}")


# -- the interface and its gRPC implementation -----------------------------------------------

class WorkerClient(Protocol):
    """name: the router's name for it ("w0", "r0"); address: where it listens; local: a
    process `kvrouter serve` started on this host; healthy: follows grpc.health.v1 Watch."""

    name: str
    address: str
    local: bool
    healthy: bool

    async def wait_ready(self, timeout_s: float) -> None: ...
    async def watch_health(self) -> None: ...
    async def model_info(self, chat_template: str | None = None) -> ModelInfo: ...
    async def status(self, live_states: bool = False, timeout_s: float = STATUS_TIMEOUT_S) -> WorkerStatus: ...
    def cache_events(self) -> AsyncIterator[CacheUpdate]: ...
    def list_checkpoints(self) -> AsyncIterator[Checkpoint]: ...
    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta | Completion]: ...
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
        options = list(CHANNEL_OPTIONS)
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

    async def model_info(self, chat_template: str | None = None) -> ModelInfo:
        """The worker's model. `chat_template`: the template the router renders with in
        place of the model's own (the tool parser is chosen for it). Raises
        WorkerUnavailable when the call fails."""
        try:
            msg = await self._stub.GetModelInfo(worker_pb2.ModelInfoRequest(chat_template=chat_template or ""),
                                                timeout=MODEL_INFO_TIMEOUT_S, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, self.name, "model info") from exc
        return model_info_from_proto(msg)

    async def status(self, live_states: bool = False, timeout_s: float = STATUS_TIMEOUT_S) -> WorkerStatus:
        """The worker's status; `live_states`: with every live state's token ids.
        Raises WorkerUnavailable when the call fails or takes over `timeout_s` seconds."""
        try:
            msg = await self._stub.GetStatus(worker_pb2.StatusRequest(include_live_states=live_states),
                                             timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, self.name, "status") from exc
        return status_from_proto(msg)

    async def _stream(self, call, convert, what: str) -> AsyncIterator:
        """`convert`ed messages of a server stream; a failed call raises WorkerUnavailable."""
        try:
            async for msg in call:
                yield convert(msg)
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, self.name, what) from exc
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

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta | Completion]:
        """Streams Delta items and ends with one Completion.

        Raises BadRequest (invalid request), WorkerUnavailable (nothing was
        generated: safe to retry elsewhere), WorkerError (failed mid-way).
        Closing the iterator early cancels the generation on the worker.
        """
        call = self._stub.Generate(request_to_proto(request), metadata=self._metadata)
        started = False
        try:
            async for msg in call:
                if msg.HasField("delta"):
                    started = True
                    d = msg.delta
                    reuse = ((d.cached_tokens, _SOURCE_NAMES.get(d.cache_source, "none"))
                             if d.HasField("cached_tokens") else None)
                    yield Delta(tuple(d.token_ids), d.text, reuse)
                else:
                    yield completion_from_proto(msg.final)
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, self.name, "generate", started) from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()
