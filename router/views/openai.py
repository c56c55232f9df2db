"""OpenAI-compatible endpoints: /v1/chat/completions (plain and SSE) and /v1/models."""

from __future__ import annotations

import json
import time
import uuid

from aiohttp import web

from router.dispatch import Job
from router.errors import ApiError, BadRequest
from router.keys import DISPATCHER, POOL, ROUTER_CONFIG
from router.views.openai_request import parse_chat_request
from router.worker_client import Completion, Delta

PREVIEW_CHARS = 80


async def read_json(request: web.Request):
    """The decoded JSON body; raises BadRequest on malformed JSON."""
    try:
        raw = await request.read()
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc


def usage_body(c: Completion) -> dict:
    """OpenAI usage with the real reuse in prompt_tokens_details.cached_tokens."""
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    }


def finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


async def list_models(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "kvrouter"} for name in sorted(pool.models)
    ]
    return web.json_response({"object": "list", "data": data})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[ROUTER_CONFIG]
    req = parse_chat_request(await read_json(request), config.default_max_tokens)
    pool = request.app[POOL]
    model = pool.model(req.model)
    prompt = model.tokenizer.chat_prompt(req.messages)
    job = Job(
        model=model,
        tokens=prompt.tokens,
        anchor_tokens=prompt.anchor_tokens,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        text_preview=prompt.text[:PREVIEW_CHARS],
    )
    dispatcher = request.app[DISPATCHER]
    route = dispatcher.prepare(job)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if req.stream:
        return await _stream_chat(request, dispatcher, job, route, req, completion_id, created)
    text = []
    final = None
    async for item in dispatcher.run(job, route):
        if isinstance(item, Delta):
            text.append(item.text)
        else:
            final = item
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": finish_reason(final),
            }
        ],
        "usage": usage_body(final),
    }
    return web.json_response(body, headers={"x-kvrouter-route": route.header()})


async def _stream_chat(request, dispatcher, job, route, req, completion_id, created) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-kvrouter-route": route.header(),
        }
    )
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": job.model.name}

    async def send(obj) -> None:
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

    started = False
    try:
        async for item in dispatcher.run(job, route):
            if not started:
                await resp.prepare(request)
                await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "finish_reason": None}]})
                started = True
            if isinstance(item, Delta):
                if item.text:
                    await send({**base, "choices": [{"index": 0, "delta": {"content": item.text},
                                                       "finish_reason": None}]})
            else:
                await send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason(item)}]})
                if req.include_usage:
                    await send({**base, "choices": [], "usage": usage_body(item)})
    except ApiError as exc:
        if not started:
            raise  # nothing sent yet: the error middleware answers with a status code
        await send(exc.openai_body())  # mid-stream: an error event, never a normal stop
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
