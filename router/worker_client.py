"""The router's view of one worker: a small interface and its gRPC implementation.

`WorkerClient` is what routing and the HTTP views use; `GrpcWorkerClient`
speaks `kvrouter.worker.v1.Worker` and `grpc.health.v1` to a worker process.
gRPC errors are translated here, at the process boundary, into
`WorkerUnavailable` (the worker cannot take the request) and `WorkerError`
(it failed the request); invalid requests become `router.errors.BadRequest`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrouter_proto import worker_pb2, worker_pb2_grpc
from router.errors import BadRequest

log = logging.getLogger("kvrouter.router.worker_client")


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached or is not serving."""


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

    @property
    def stored_tokens(self) -> int:
        """Tokens of the longest checkpoint this request wrote (0 when none)."""
        return max((e.tokens for e in self.store_events if e.action == "stored"), default=0)


_SOURCE_NAMES = {
    worker_pb2.CACHE_SOURCE_NONE: "none",
    worker_pb2.CACHE_SOURCE_LIVE: "live",
    worker_pb2.CACHE_SOURCE_RAM: "ram",
    worker_pb2.CACHE_SOURCE_DISK: "disk",
}


class WorkerClient(Protocol):
    name: str
    address: str
    healthy: bool
    in_flight: int

    async def model_info(self) -> worker_pb2.ModelInfo: ...
    async def status(self) -> worker_pb2.WorkerStatus: ...
    def generate(self, request: worker_pb2.GenerateRequest) -> AsyncIterator[Delta | Completion]: ...
    async def close(self) -> None: ...


class GrpcWorkerClient:
    """A worker reached over gRPC. `healthy` follows the worker's grpc.health.v1
    Watch stream once `watch_health()` runs."""

    def __init__(self, name: str, address: str):
        self.name = name
        self.address = address
        self.healthy = False
        self.in_flight = 0
        self.live_prefix_tokens = 0
        self._channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
        )
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def wait_ready(self, timeout_s: float) -> None:
        """Waits until the worker reports SERVING. Raises WorkerUnavailable on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
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
                async for resp in self._health.Watch(health_pb2.HealthCheckRequest(service="")):
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
            backoff = min(backoff * 2, 5.0)

    async def model_info(self) -> worker_pb2.ModelInfo:
        try:
            return await self._stub.GetModelInfo(worker_pb2.ModelInfoRequest(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnavailable(f"worker {self.name}: {exc.details()}") from exc

    async def status(self) -> worker_pb2.WorkerStatus:
        try:
            return await self._stub.GetStatus(worker_pb2.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnavailable(f"worker {self.name}: {exc.details()}") from exc

    async def generate(self, request: worker_pb2.GenerateRequest) -> AsyncIterator[Delta | Completion]:
        """Streams Delta items and ends with one Completion.

        Raises BadRequest (invalid request), WorkerUnavailable (nothing was
        generated: safe to retry elsewhere), WorkerError (failed mid-way).
        Closing the iterator early cancels the generation on the worker.
        """
        self.in_flight += 1
        call = self._stub.Generate(request)
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
                    )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadRequest(exc.details()) from exc
            if not started and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise WorkerUnavailable(f"worker {self.name}: {exc.details()}") from exc
            raise WorkerError(f"worker {self.name} failed: {exc.details()}") from exc
        finally:
            call.cancel()
            self.in_flight -= 1

    async def close(self) -> None:
        await self._channel.close()
