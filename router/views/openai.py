"""OpenAI-compatible endpoints: /v1/chat/completions (plain and SSE) and /v1/models."""

from __future__ import annotations


import contextlib
import time
import uuid

from aiohttp import web

from kvrouter.router.errors import ApiError, WorkerFailed
from kvrouter.router.keys import CLUSTER, DISPATCHER, ROUTER_CONFIG
from kvrouter.router.client_hints import prompt_cache_key
from kvrouter.router.views.common import (ARRIVED_KEY, end_stream, make_job, namespace_of, prepare_sse, read_json,
                                          render_prompt, send_event, sse_response)
from kvrouter.router.views.streaming import paced
from kvrouter.router.views.generation import Outcome, collect, generate
from kvrouter.router.views.openai_request import parse_chat_request
from kvrouter.router.views.tools import ToolCallSplitter, split_text, tool_syntax

__all__ = ["chat_completions", "list_models", "read_json", "usage_body"]


def usage_body(o: Outcome) -> dict:
    """OpenAI usage with the real reuse in prompt_tokens_details.cached_tokens."""
    return {
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
    }


def tool_calls_body(calls, streaming: bool = False) -> list[dict]:
    out = []
    for i, c in enumerate(calls):
        d = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        if streaming:
            d["index"] = i
        out.append(d)
    return out


def _model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "kvrouter"}


async def list_models(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    return web.json_response({"object": "list", "data": [_model_object(n) for n in sorted(cluster.models)]})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: one model object, or 404 (openai's `models.retrieve`)."""
    model = request.app[CLUSTER].model(request.match_info["model"])
    return web.json_response(_model_object(model.name))


def _require(outcome: Outcome | None) -> Outcome:
    if outcome is None:
        raise WorkerFailed("the worker ended the stream without a final report")
    return outcome


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[ROUTER_CONFIG]
    body = await read_json(request)
    req = parse_chat_request(body, config.default_max_tokens, config.max_tokens_limit)
    model = request.app[CLUSTER].model(req.model)
    prompt = await render_prompt(request, model, req.messages, req.tools)
    syntax = tool_syntax(model.tool_parser) if req.parse_tools else None
    job = make_job(model, prompt.tokens, prompt.anchor_tokens, req.max_tokens, req.temperature, req.top_p,
                   req.seed, namespace_of(request), prompt.text, arrived_s=request.get(ARRIVED_KEY),
                   affinity_key=prompt_cache_key(body))
    dispatcher = request.app[DISPATCHER]
    async with dispatcher.route(job) as route:
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            return await _stream_chat(request, dispatcher, job, route, req, syntax, completion_id, created)
        text, outcome = await collect(dispatcher, job, route, req.stop)
        outcome = _require(outcome)
        content, calls = split_text(syntax, req.tools, text)
        message = {"role": "assistant", "content": content if (content or not calls) else None}
        if calls:
            message["tool_calls"] = tool_calls_body(calls)
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model.name,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if calls else outcome.finish_reason}],
            "usage": usage_body(outcome),
        }
        return web.json_response(body, headers={"x-kvrouter-route": route.header()})


async def _stream_chat(request, dispatcher, job, route, req, syntax, completion_id, created) -> web.StreamResponse:
    """The chunk sequence. Headers and the role chunk go out at once (keep-alive comments
    follow); an error after that is an error chunk, then [DONE]."""
    resp = sse_response(route.header(), request.app[ROUTER_CONFIG].stream_keepalive_s)
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": job.model.name}

    async def send(obj) -> None:
        await send_event(resp, obj)

    def chunk(delta: dict, finish=None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    await prepare_sse(resp, request, route.header())
    await send(chunk({"role": "assistant", "content": ""}))
    splitter = ToolCallSplitter(syntax, req.tools)
    async with contextlib.aclosing(generate(dispatcher, job, route, req.stop)) as items:
        try:
            async for item in paced(items, request):
                if isinstance(item, str):
                    text = splitter.feed(item)
                    if text:
                        await send(chunk({"content": text}))
                    continue
                rest, calls = splitter.finish()
                if rest:
                    await send(chunk({"content": rest}))
                if calls:
                    await send(chunk({"tool_calls": tool_calls_body(calls, streaming=True)}))
                await send(chunk({}, "tool_calls" if calls else item.finish_reason))
                if req.include_usage:
                    await send({**base, "choices": [], "usage": usage_body(item)})
        except ApiError as exc:
            await send(exc.openai_body())  # after the start: an error event, never a normal stop
    await end_stream(resp, done_marker=True)
    return resp
