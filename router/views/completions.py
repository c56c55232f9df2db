"""POST /v1/completions (OpenAI legacy completions): a prompt string or a list
of token ids, plain and streaming."""

from __future__ import annotations

import asyncio

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from aiohttp import web
from pydantic import BeforeValidator, Field

from kvrouter.router.errors import ApiError, BadRequest, WorkerFailed
from kvrouter.router.keys import CLUSTER, DISPATCHER, ROUTER_CONFIG
from kvrouter.router.views.common import (ARRIVED_KEY, end_stream, make_job, namespace_of, prepare_sse, read_json,
                                          send_event, sse_response)
from kvrouter.router.views.generation import StopStrings, collect, generate
from kvrouter.router.views.openai import usage_body
from kvrouter.router.views.openai_request import (MODEL_TEXT, MaxTokens, ModelName, Seed, StreamOptions, Temperature,
                                                   UnitNumber,
                                                   cap_max_tokens)
from kvrouter.router.views.validation import Between, Body, Only, text_error, validate

_vocab_sizes: dict[int, int] = {}


def vocab_size(tokenizer) -> int:
    key = id(tokenizer)
    if key not in _vocab_sizes:
        _vocab_sizes[key] = max(tokenizer.vocab().values(), default=-1) + 1
    return _vocab_sizes[key]


@dataclass(frozen=True)
class CompletionRequest:
    """A validated completion request: one prompt (text, or token ids checked against
    the vocabulary by the view), max_tokens capped, sampling defaults applied."""

    model: str
    prompt: str | list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def _one_prompt(value):
    """One prompt: a one-element list of a string or of token ids is unwrapped; a
    list of several prompts is refused."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        return value[0]
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise text_error("only one prompt per request is supported")
    return value


TOKEN_ID_MARK = "x-kvrouter-token-id"
TokenId = Annotated[int, Field(json_schema_extra={"minimum": 0, TOKEN_ID_MARK: True})]
"""A token id; the view checks it against the model's vocabulary (/openapi.json: 0..vocabulary size - 1)."""


class CompletionBody(Body):
    """POST /v1/completions."""

    field_texts = {"model": MODEL_TEXT,
                   "prompt": "'{param}' must be a non-empty string or a non-empty array of token ids",
                   "echo": "'{param}' is not supported", "logprobs": "'{param}' is not supported"}
    model: ModelName
    prompt: Annotated[Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)],
                      BeforeValidator(_one_prompt)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: UnitNumber | None = None
    seed: Seed | None = None
    n: Annotated[int, Between(1, 128), Only(1, "only n=1 is supported")] | None = None
    best_of: Annotated[int, Between(1, 128), Only(1, "only best_of=1 is supported")] | None = None
    echo: Literal[False] | None = None
    logprobs: Literal[0] | None = None
    stop: StopStrings = ()
    stream: bool | None = None
    stream_options: StreamOptions | None = None


def parse_completion_request(body, default_max_tokens: int, limit: int | None) -> CompletionRequest:
    """A validated CompletionRequest from a decoded JSON body; raises BadRequest.
    max_tokens defaults to 16 (OpenAI's default for this endpoint)."""
    b = validate(CompletionBody, body)
    return CompletionRequest(
        model=b.model,
        prompt=b.prompt,
        max_tokens=cap_max_tokens(b.max_tokens or 16, limit),
        temperature=1.0 if b.temperature is None else float(b.temperature),
        top_p=1.0 if b.top_p is None else float(b.top_p),
        seed=b.seed,
        stream=bool(b.stream),
        include_usage=bool(b.stream_options and b.stream_options.include_usage),
        stop=b.stop,
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
                        await prepare_sse(resp, request, route.header())
                        started = True
                    if isinstance(item, str):
                        await send_event(resp, choice(item))
                    else:
                        await send_event(resp, choice("", item.finish_reason))
                        if req.include_usage:
                            await send_event(resp, {**base, "choices": [], "usage": usage_body(item)})
            except ApiError as exc:
                if not started:
                    raise
                await send_event(resp, exc.openai_body())
        await end_stream(resp, done_marker=True)
        return resp
