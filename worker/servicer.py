"""The gRPC `kvrouter.worker.v1.Worker` service: translates protobuf messages
to engine requests and engine events back to protobuf, and engine failures to
gRPC status codes."""

from __future__ import annotations

import asyncio
import logging
import os

import grpc

from kvrouter_proto import worker_pb2, worker_pb2_grpc
from worker.engine import Engine, EngineDeadError
from worker.events import ErrorEvent, FinishEvent, GenerationRequest, SamplingConfig, TokenEvent

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
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one engine. `model_info` is the prebuilt ModelInfo message."""

    def __init__(self, engine: Engine, model_info: worker_pb2.ModelInfo):
        self.engine = engine
        self.model_info = model_info

    async def Generate(self, request, context):
        try:
            gen = request_from_proto(request, self.model_info.context_length)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = self.engine.submit(gen, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except EngineDeadError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, TokenEvent):
                    yield worker_pb2.GenerateResponse(
                        delta=worker_pb2.TokenDelta(token_ids=ev.token_ids, text=ev.text)
                    )
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
                                prefilled_tokens=u.prefilled_tokens,
                                prefill_seconds=u.prefill_seconds,
                                load_seconds=u.load_seconds,
                            ),
                            store_events=[
                                worker_pb2.StoreEvent(action=e.action, kind=e.kind, tokens=e.n_tokens,
                                                      bytes=e.n_bytes, seconds=e.seconds, reason=e.reason)
                                for e in ev.store_events
                            ],
                        )
                    )
                    return
                elif isinstance(ev, ErrorEvent):
                    await context.abort(grpc.StatusCode.INTERNAL, ev.message)
        finally:
            # Client went away (or we finished): stop the engine work for this request.
            job.cancelled.set()

    async def GetModelInfo(self, request, context):
        return self.model_info

    async def GetStatus(self, request, context):
        return worker_pb2.WorkerStatus(
            model_name=self.model_info.model_name,
            live_prefix_tokens=self.engine.live_prefix_tokens,
            queue_depth=self.engine.queue_depth,
            requests_served=self.engine.requests_served,
            engine_alive=self.engine.alive,
            pid=os.getpid(),
        )
