"""POST /v1/completions (OpenAI legacy completions): a prompt string or a list
of token ids, plain and streaming."""

from __future__ import annotations

import asyncio

import contextlib
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from kvrouter.router.errors import ApiError, BadRequest, WorkerFailed
from kvrouter.router.keys import CLUSTER, DISPATCHER, ROUTER_CONFIG
from kvrouter.router.views.common import ARRIVED_KEY, make_job, namespace_of, read_json, sse_data, sse_response
from kvrouter.router.views.generation import collect, generate, parse_stop
from kvrouter.router.views.openai import usage_body
from kvrouter.router.views.openai_request import _number, cap_max_tokens

_vocab_sizes: dict[int, int] = {}


def vocab_size(tokenizer) -> int:
    key = id(tokenizer)
    if key not in _vocab_sizes:
        _vocab_sizes[key] = max(tokenizer.vocab().values(), default=-1) + 1
    return _vocab_sizes[key]


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def _prompt(raw):
    """A string or a list of token ids; a one-element list of either is unwrapped."""
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
        raw = raw[0]
    if isinstance(raw, str):
        if not raw:
            raise BadRequest("'prompt' must not be empty", param="prompt")
        return raw
    if isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        return raw
    if isinstance(raw, list) and len(raw) > 1 and all(isinstance(p, (str, list)) for p in raw):
        raise BadRequest("only one prompt per request is supported", param="prompt")
    raise BadRequest("'prompt' must be a non-empty string or a non-empty array of token ids", param="prompt")


def parse_completion_request(body, default_max_tokens: int, limit: int | None) -> CompletionRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    prompt = _prompt(body.get("prompt"))
    for name, ok in (("n", 1), ("best_of", 1)):
        if _number(body, name, 1, 1, 128, integer=True) != ok:
            raise BadRequest(f"only {name}=1 is supported", param=name)
    if body.get("echo") not in (None, False):
        raise BadRequest("'echo' is not supported", param="echo")
    if body.get("logprobs") not in (None, 0):
        raise BadRequest("'logprobs' is not supported", param="logprobs")
    stream = body.get("stream") or False  # null means the default
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object with a boolean include_usage", param="stream_options")
    return CompletionRequest(
        model=model,
        prompt=prompt,
        max_tokens=cap_max_tokens(_number(body, "max_tokens", 16, 1, 2**31, integer=True), limit),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stream=stream,
        include_usage=opts.get("include_usage", False),
        stop=parse_stop(body.get("stop"), "stop"),
    )


async def completions(request: web.Request) -> web.StreamResponse:
    config = request.app[ROUTER_CONFIG]
    req = parse_completion_request(await read_json(request), config.default_max_tokens, config.max_tokens_limit)
    model = request.app[CLUSTER].model(req.model)
    if isinstance(req.prompt, str):
        tokens, text = await asyncio.to_thread(model.tokenizer.encode, req.prompt), req.prompt
    else:
        n = vocab_size(model.tokenizer)
        bad = next((t for t in req.prompt if not 0 <= t < n), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary (0..{n - 1})", param="prompt")
        tokens, text = tuple(req.prompt), ""
    if not tokens:
        raise BadRequest("the prompt encodes to no tokens", param="prompt")
    job = make_job(model, tokens, 0, req.max_tokens, req.temperature, req.top_p, req.seed,
                   namespace_of(request), text, prompt_param="prompt", arrived_s=request.get(ARRIVED_KEY))
    dispatcher = request.app[DISPATCHER]
    async with dispatcher.route(job) as route:
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        if not req.stream:
            out, outcome = await collect(dispatcher, job, route, req.stop)
            if outcome is None:
                raise WorkerFailed("the worker ended the stream without a final report")
            body = {**base, "choices": [{"index": 0, "text": out, "logprobs": None,
                                         "finish_reason": outcome.finish_reason}],
                    "usage": usage_body(outcome)}
            return web.json_response(body, headers={"x-kvrouter-route": route.header()})

        resp = sse_response(route.header())
        started = False

        def choice(text: str, finish=None) -> dict:
            return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        async with contextlib.aclosing(generate(dispatcher, job, route, req.stop)) as items:
            try:
                async for item in items:
                    if not started:
                        await resp.prepare(request)
                        started = True
                    if isinstance(item, str):
                        await resp.write(sse_data(choice(item)))
                    else:
                        await resp.write(sse_data(choice("", item.finish_reason)))
                        if req.include_usage:
                            await resp.write(sse_data({**base, "choices": [], "usage": usage_body(item)}))
            except ApiError as exc:
                if not started:
                    raise
                await resp.write(sse_data(exc.openai_body()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
