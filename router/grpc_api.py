"""The public gRPC API (`kvrouter.router.v1.Router`, proto/kvrouter_proto/router.proto),
served from the router process next to the HTTP API with the same cluster,
dispatcher, keys and namespaces. Started by `kvrouter serve --grpc-port`.

Rendering and tokenizing a prompt runs in a thread, as on the HTTP paths: a prompt
of megabytes must not hold the event loop (every other request and /health wait on
it). Bytes that are not a valid request get INVALID_ARGUMENT (`worker.grpc_strict`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import grpc
from aiohttp import web

from kvrouter_proto import router_pb2, router_pb2_grpc
from kvrouter.router.auth import authorize
from kvrouter.router.errors import ApiError, BadRequest
from kvrouter.router.keys import CLUSTER, DISPATCHER, ROUTER_CONFIG
from kvrouter.router.views.common import make_job
from kvrouter.router.views.generation import Outcome, generate, parse_stop
from kvrouter.router.views.openai_request import cap_max_tokens, parse_messages
from kvrouter.worker.grpc_strict import add_servicer

log = logging.getLogger("kvrouter.router.grpc")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_code(err: ApiError) -> grpc.StatusCode:
    """The gRPC status for an API error."""
    return _CODES.get(err.status, grpc.StatusCode.INTERNAL)


def _sampling(value: float, name: str, hi: float) -> float:
    if math.isnan(value) or not 0 <= value <= hi:
        raise BadRequest(f"{name} must be between 0 and {hi}", param=name)
    return value


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, app: web.Application):
        self.app = app

    def _namespace(self, context) -> str:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        return authorize(self.app[ROUTER_CONFIG].api_keys, md)

    async def ListModels(self, request, context):
        try:
            self._namespace(context)
        except ApiError as exc:
            await context.abort(status_code(exc), exc.message)
        cluster = self.app[CLUSTER]
        return router_pb2.ListModelsResponse(models=[
            router_pb2.Model(id=name, context_length=cluster.models[name].context_length) for name in sorted(cluster.models)
        ])

    def _job(self, request, namespace: str):
        """The Job of a GenerateRequest: renders and tokenizes (slow for long prompts:
        call it in a thread). Raises ApiError."""
        config = self.app[ROUTER_CONFIG]
        model = self.app[CLUSTER].model(request.model)
        which = request.WhichOneof("input")
        anchor, preview = 0, ""
        if which == "messages":
            msgs = parse_messages([{"role": m.role, "content": m.content} for m in request.messages.messages])
            prompt = model.tokenizer.chat_prompt(msgs)
            tokens, anchor, preview = prompt.tokens, prompt.anchor_tokens, prompt.text
        elif which == "prompt_token_ids":
            tokens = tuple(request.prompt_token_ids.ids)
            n = len(model.tokenizer.vocab())
            if any(t >= n for t in tokens):
                raise BadRequest(f"a token id is outside the vocabulary (0..{n - 1})", param="prompt_token_ids")
        elif which == "prompt":
            tokens, preview = model.tokenizer.encode(request.prompt), request.prompt
        else:
            raise BadRequest("one of messages, prompt_token_ids or prompt is required", param="input")
        if not tokens:
            raise BadRequest("the prompt is empty", param="input")
        max_tokens = cap_max_tokens(request.max_tokens or config.default_max_tokens, config.max_tokens_limit)
        temperature = _sampling(request.temperature, "temperature", 2) if request.HasField("temperature") else 1.0
        top_p = _sampling(request.top_p, "top_p", 1) if request.HasField("top_p") else 1.0
        seed = request.seed if request.HasField("seed") else None
        return make_job(model, tokens, anchor, max_tokens, temperature, top_p, seed, namespace, preview)

    async def Generate(self, request, context):
        try:
            job = await asyncio.to_thread(self._job, request, self._namespace(context))
            stops = parse_stop(list(request.stop), "stop")
            dispatcher = self.app[DISPATCHER]
            async with dispatcher.route(job) as route:
                async with contextlib.aclosing(generate(dispatcher, job, route, stops)) as items:
                    async for item in items:
                        if isinstance(item, Outcome):
                            yield router_pb2.GenerateResponse(final=router_pb2.Final(
                                finish_reason=item.finish_reason,
                                stop_sequence=item.stop_sequence or "",
                                worker=route.worker,
                                usage=router_pb2.Usage(
                                    prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                                    cached_tokens=item.cached_tokens, stored_tokens=item.stored_tokens),
                            ))
                        elif item:
                            yield router_pb2.GenerateResponse(delta=router_pb2.Delta(text=item))
        except ApiError as exc:
            await context.abort(status_code(exc), exc.message)


async def grpc_ctx(app: web.Application):
    """Cleanup context: serves the gRPC API while the app runs (after the cluster connected)."""
    config = app[ROUTER_CONFIG]
    server = grpc.aio.server()
    add_servicer(router_pb2_grpc.add_RouterServicer_to_server, RouterServicer(app), server)
    port = server.add_insecure_port(f"{config.grpc_host}:{config.grpc_port}")
    if port == 0:
        raise RuntimeError(f"cannot listen for gRPC on {config.grpc_host}:{config.grpc_port}")
    await server.start()
    log.info("kvrouter gRPC API on %s:%d (kvrouter.router.v1.Router)", config.grpc_host, port)
    yield
    await server.stop(5)
