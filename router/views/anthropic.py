"""Anthropic Messages API: POST /v1/messages (plain and the full SSE event
sequence) and POST /v1/messages/count_tokens.

Messages are converted to the chat-template convention (system, user,
assistant with `tool_calls`, tool with `tool_call_id`) and rendered by the
model's template, so tools work wherever the template defines them. Usage
reports the cache as it really behaved: `cache_read_input_tokens` is the
prompt tokens reused (live state, RAM or disk checkpoint),
`cache_creation_input_tokens` the tokens of the longest checkpoint written
for this request (0 when none).
"""

from __future__ import annotations

import asyncio

import contextlib
import json
import logging
import uuid
from dataclasses import dataclass

from aiohttp import web

from kvrouter.router.client_hints import PromptMarks, anthropic_marks, remove_billing_header
from kvrouter.router.errors import ApiError, BadRequest, UnexpectedRole, WorkerFailed
from kvrouter.router.keys import CLUSTER, DISPATCHER, METRICS, ROUTER_CONFIG
from kvrouter.router.views.common import (ARRIVED_KEY, make_job, namespace_of, read_json, render_prompt, route_header,
                                          sse_data, sse_response)
from kvrouter.router.views.streaming import KEEPALIVE, paced
from kvrouter.router.views.generation import Outcome, collect, generate, parse_stop
from kvrouter.router.views.openai_request import _number, cap_max_tokens
from kvrouter.router.views.tools import ToolCallSplitter, flat_function_tools, split_text, syntax_for

log = logging.getLogger("kvrouter.router.views.anthropic")

IGNORED_BLOCKS = ("thinking", "redacted_thinking")


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    messages: list[dict]  # chat-template messages
    tools: list | None  # OpenAI chat tool format, for the template and the parser
    parse_tools: bool
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool


def _text_of(value, param: str) -> str:
    """A string, or a list of text blocks, as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, b in enumerate(value):
            if not isinstance(b, dict):
                raise BadRequest(f"{param}[{i}] must be a content block", param=param)
            if b.get("type") in IGNORED_BLOCKS:
                continue
            if b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise BadRequest(f"{param}[{i}]: only text blocks are supported here", param=param)
            parts.append(b["text"])
        return "".join(parts)
    if value is None:
        return ""
    raise BadRequest(f"{param} must be a string or an array of text blocks", param=param)


def _convert_message(m, i: int) -> list[dict]:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"{param} must be an object", param=param)
    role = m.get("role")
    if role not in ("user", "assistant", "system"):
        raise UnexpectedRole(i, role)
    content = m.get("content")
    if role == "system":  # mid-conversation system message (Claude Code sends one after the user turn)
        return [{"role": "system", "content": _text_of(content, f"{param}.content")}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{param}.content must be a string or an array of content blocks", param=f"{param}.content")
    out: list[dict] = []
    text: list[str] = []
    calls: list[dict] = []
    for j, b in enumerate(content):
        bp = f"{param}.content[{j}]"
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise BadRequest(f"{bp} must be a content block with a type", param=bp)
        kind = b["type"]
        if kind == "text":
            if not isinstance(b.get("text"), str):
                raise BadRequest(f"{bp}.text must be a string", param=bp)
            text.append(b["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                raise BadRequest(f"{bp}: tool_use needs a name and an object input", param=bp)
            tid = b.get("id")
            calls.append({"id": tid if isinstance(tid, str) else "", "type": "function",
                          "function": {"name": b["name"], "arguments": b.get("input") or {}}})
        elif kind == "tool_result" and role == "user":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str):
                raise BadRequest(f"{bp}.tool_use_id must be a string", param=bp)
            out.append({"role": "tool", "tool_call_id": tid, "content": _text_of(b.get("content"), f"{bp}.content")})
        elif kind in IGNORED_BLOCKS:
            continue
        else:
            raise BadRequest(f"{bp}: content blocks of type '{kind}' are not supported in {role} messages", param=bp)
    if role == "assistant":
        msg = {"role": "assistant", "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    elif text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _tools(raw) -> list | None:
    # Server tools (web search, bash, ...) are Anthropic-hosted: nothing to render.
    return flat_function_tools(raw, "input_schema", {}, lambda t: t.get("type") in (None, "custom"))


def parse_messages_request(body, limit: int | None, count_only: bool = False) -> MessagesRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: field required (a string)", param="model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: must be a non-empty array", param="messages")
    messages: list[dict] = []
    system = body.get("system")
    if system is not None:
        s = _text_of(system, "system")
        if s:
            messages.append({"role": "system", "content": s})
    for i, m in enumerate(raw):
        messages.extend(_convert_message(m, i))
    if count_only:
        max_tokens = 1
    else:
        if body.get("max_tokens") is None:
            raise BadRequest("max_tokens: field required", param="max_tokens")
        max_tokens = _number(body, "max_tokens", None, 1, 2**31, integer=True)
    choice = body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none")):
        raise BadRequest("tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'}", param="tool_choice")
    parse = not (isinstance(choice, dict) and choice.get("type") == "none")
    tools = _tools(body.get("tools"))
    stream = body.get("stream") or False  # null means the default
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    _number(body, "top_k", None, 0, 2**31, integer=True)
    return MessagesRequest(
        model=model,
        messages=messages,
        tools=tools if parse else None,
        parse_tools=parse and tools is not None,
        max_tokens=cap_max_tokens(max_tokens, limit),
        temperature=float(_number(body, "temperature", 1.0, 0, 1)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
        stop=parse_stop(body.get("stop_sequences"), "stop_sequences"),
        stream=stream,
    )


def usage_body(o: Outcome) -> dict:
    """Anthropic usage. input_tokens: prompt tokens neither read from the cache nor
    covered by the checkpoint written for this request."""
    return {
        "input_tokens": max(0, o.prompt_tokens - max(o.cached_tokens, o.stored_tokens)),
        "output_tokens": o.completion_tokens,
        "cache_read_input_tokens": o.cached_tokens,
        "cache_creation_input_tokens": o.stored_tokens,
    }


def stop_reason(o: Outcome, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_use"
    if o.stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if o.finish_reason == "length" else "end_turn"


def tool_use_block(call) -> dict:
    try:
        args = json.loads(call.arguments)
    except ValueError:
        args = None
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": args if isinstance(args, dict) else {}}


def _client_view(request: web.Request, body) -> tuple[dict, tuple[str, ...], PromptMarks]:
    """The body as the model should see it (Claude Code's billing line removed unless
    --keep-billing-header), what was changed (for `x-kvrouter-route`), and the
    client's cache_control breakpoints."""
    if not isinstance(body, dict):
        return body, (), PromptMarks()
    notes: tuple[str, ...] = ()
    system = body.get("system")
    if not request.app[ROUTER_CONFIG].keep_billing_header:
        system, removed = remove_billing_header(system)
        if removed:
            body = {**body, "system": system}
            notes = ("billing-header",)
    return body, notes, anthropic_marks(system, body.get("messages"), body.get("tools"))


async def count_tokens(request: web.Request) -> web.Response:
    body, _, _ = _client_view(request, await read_json(request))
    req = parse_messages_request(body, None, count_only=True)
    model = request.app[CLUSTER].model(req.model)
    prompt = await asyncio.to_thread(model.tokenizer.chat_prompt, req.messages, req.tools, None,
                                     request.app[ROUTER_CONFIG].tools_before_system)
    return web.json_response({"input_tokens": len(prompt.tokens)})


async def messages(request: web.Request) -> web.StreamResponse:
    config = request.app[ROUTER_CONFIG]
    body, notes, marks = _client_view(request, await read_json(request))
    req = parse_messages_request(body, config.max_tokens_limit)
    model = request.app[CLUSTER].model(req.model)
    if notes:
        request.app[METRICS].client_hints.labels(model.name, "billing_header_removed").inc()
    prompt = await render_prompt(request, model, req.messages, req.tools, marks)
    syntax = syntax_for(model.tokenizer) if req.parse_tools else None
    job = make_job(model, prompt.tokens, prompt.anchor_tokens, req.max_tokens, req.temperature, req.top_p, None,
                   namespace_of(request), prompt.text, arrived_s=request.get(ARRIVED_KEY),
                   hint_tokens=prompt.hint_tokens)
    dispatcher = request.app[DISPATCHER]
    async with dispatcher.route(job) as route:
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        header = route_header(route, notes)
        if req.stream:
            return await _stream(request, dispatcher, job, route, req, syntax, msg_id, header)
        text, outcome = await collect(dispatcher, job, route, req.stop)
        if outcome is None:
            raise WorkerFailed("the worker ended the stream without a final report")
        content, calls = split_text(syntax, req.tools, text)
        blocks = ([{"type": "text", "text": content}] if content or not calls else []) + \
            [tool_use_block(c) for c in calls]
        body = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model.name,
            "content": blocks,
            "stop_reason": stop_reason(outcome, bool(calls)),
            "stop_sequence": outcome.stop_sequence,
            "usage": usage_body(outcome),
        }
        return web.json_response(body, headers={"x-kvrouter-route": header})


async def _stream(request, dispatcher, job, route, req, syntax, msg_id, header) -> web.StreamResponse:
    """The SSE event sequence. Headers, `message_start` (usage: the predicted reuse)
    and the text block's start go out at once; `ping` events while nothing else is
    sent; an error after that is an `error` event."""
    resp = sse_response(header)

    async def send(event: str, obj: dict) -> None:
        await resp.write(sse_data({"type": event, **obj}, event))

    await resp.prepare(request)
    cached = min(route.cached, len(job.tokens))
    await send("message_start", {"message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": job.model.name,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": len(job.tokens) - cached, "output_tokens": 0,
                  "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}}})
    await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    await send("ping", {})
    splitter = ToolCallSplitter(syntax, req.tools)
    interval = request.app[ROUTER_CONFIG].stream_keepalive_s
    async with contextlib.aclosing(generate(dispatcher, job, route, req.stop)) as items:
        try:
            async for item in paced(items, request, interval):
                if item is KEEPALIVE:
                    await send("ping", {})
                    continue
                if isinstance(item, str):
                    text = splitter.feed(item)
                    if text:
                        await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})
                    continue
                rest, calls = splitter.finish()
                if rest:
                    await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": rest}})
                await send("content_block_stop", {"index": 0})
                for i, call in enumerate(calls, 1):
                    block = tool_use_block(call)
                    await send("content_block_start", {"index": i, "content_block": {**block, "input": {}}})
                    await send("content_block_delta", {"index": i, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
                    await send("content_block_stop", {"index": i})
                await send("message_delta", {
                    "delta": {"stop_reason": stop_reason(item, bool(calls)), "stop_sequence": item.stop_sequence},
                    "usage": usage_body(item)})
                await send("message_stop", {})
        except ApiError as exc:
            log.info("stream %s ends with an error event: %s", msg_id, exc.message)
            await resp.write(sse_data(exc.anthropic_body(), "error"))
    await resp.write_eof()
    return resp
