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
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from aiohttp import web
from pydantic import Field

from kvrouter.router.client_hints import PromptMarks, anthropic_marks, remove_billing_header
from kvrouter.router.errors import ApiError, BadRequest, UnexpectedRole, WorkerFailed
from kvrouter.router.keys import CLUSTER, DISPATCHER, METRICS, ROUTER_CONFIG
from kvrouter.router.views.common import (ARRIVED_KEY, end_stream, make_job, namespace_of, prepare_sse, read_json,
                                          render_prompt, route_header, send_event, sse_response)
from kvrouter.router.views.streaming import KEEPALIVE, paced
from kvrouter.router.views.generation import Outcome, StopStrings, collect, generate
from kvrouter.router.views.openai_request import MaxTokens, ModelName, UnitNumber, cap_max_tokens
from kvrouter.router.views.tools import ToolCallSplitter, split_text, tool_syntax
from kvrouter.router.views.validation import Body, integer, tagged, validate

log = logging.getLogger("kvrouter.router.views.anthropic")


@dataclass(frozen=True)
class MessagesRequest:
    """A validated Messages (or count_tokens) request: system and messages as
    chat-template messages (tool_use as tool_calls, tool_result as tool messages), custom
    tools to render and parse, max_tokens capped (1 for count_tokens), stop sequences."""

    model: str
    messages: list[dict]  # chat-template messages
    tools: list | None  # OpenAI chat tool format, for the template and the parser
    parse_tools: bool
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool


# -- the body ----------------------------------------------------------------------------------

class TextBlock(Body):
    """A text block."""

    type: Literal["text"]
    text: str


class IgnoredBlock(Body):
    """Thinking blocks of earlier turns: accepted, not rendered."""

    type: Literal["thinking", "redacted_thinking"]


TextOnly = tagged("type", {"text": TextBlock, "thinking": IgnoredBlock, "redacted_thinking": IgnoredBlock})
TEXT_TEXT = "{param} must be a string or an array of text blocks"


class ToolUseBlock(Body):
    """A tool call of an earlier assistant turn."""

    type: Literal["tool_use"]
    id: str | None = None
    name: str
    input: dict = Field(default_factory=dict)


class ToolResultBlock(Body):
    """A tool's result (in a user message) for the tool_use `tool_use_id`."""

    field_texts = {"content": TEXT_TEXT}
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextOnly] | None = None


UserBlock = tagged("type", {"text": TextBlock, "tool_result": ToolResultBlock,
                            "thinking": IgnoredBlock, "redacted_thinking": IgnoredBlock})
AssistantBlock = tagged("type", {"text": TextBlock, "tool_use": ToolUseBlock,
                                 "thinking": IgnoredBlock, "redacted_thinking": IgnoredBlock})


class UserMessage(Body):
    """A user turn: text, tool results, or both."""

    field_texts = {"content": "{param} must be a string or an array of content blocks"}
    role: Literal["user"]
    content: str | list[UserBlock]


class AssistantMessage(Body):
    """An earlier assistant turn: text, tool calls, or both."""

    field_texts = {"content": "{param} must be a string or an array of content blocks"}
    role: Literal["assistant"]
    content: str | list[AssistantBlock]


class SystemMessage(Body):
    """A system message inside `messages` (Claude Code sends one after the user turn): a
    system turn where the chat template renders one there, else folded into the user
    turn before it (router.prompting)."""

    field_texts = {"content": TEXT_TEXT}
    role: Literal["system"]
    content: str | list[TextOnly]


Message = tagged("role", {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage})
ROLE_PARAM = re.compile(r"messages\[(\d+)\]\.role")


class CustomTool(Body):
    """A tool the client runs: name, description and a JSON schema of its input."""

    field_texts = {"name": "{param} must be a non-empty string"}
    type: Literal["custom"] = "custom"
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    input_schema: dict | None = None  # a JSON schema


class ServerTool(Body):
    """An Anthropic-hosted tool (web search, bash, ...): nothing to render."""

    type: Annotated[str, Field(json_schema_extra={"not": {"const": "custom"}})]


Tool = tagged("type", {"custom": CustomTool}, default="custom", other=ServerTool)


class ToolChoice(Body):
    """tool_choice: auto, any, tool (with `name`), none (tools rendered, calls not parsed)."""

    field_texts = {"type": "tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'}"}
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class CountTokensBody(Body):
    """POST /v1/messages/count_tokens (and the fields /v1/messages shares with it)."""

    field_texts = {"model": "model: field required (a string)", "messages": "messages: must be a non-empty array",
                   "system": TEXT_TEXT, "tool_choice": "tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'}"}
    model: ModelName
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextOnly] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesBody(CountTokensBody):
    """POST /v1/messages."""

    field_texts = {**CountTokensBody.field_texts, "max_tokens": {"missing": "max_tokens: field required"},
                   "stream": "stream must be a boolean"}
    max_tokens: MaxTokens
    temperature: UnitNumber | None = None
    top_p: UnitNumber | None = None
    top_k: integer(0, 2**31) | None = None
    stop_sequences: StopStrings = ()
    stream: bool | None = None


# -- from the body to the request --------------------------------------------------------------

def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "".join(b.text for b in value if isinstance(b, TextBlock))


def _convert_message(m: UserMessage | AssistantMessage | SystemMessage) -> list[dict]:
    if isinstance(m, SystemMessage):
        return [{"role": "system", "content": _text(m.content)}]
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    out: list[dict] = []
    text: list[str] = []
    calls: list[dict] = []
    for b in m.content:
        if isinstance(b, TextBlock):
            text.append(b.text)
        elif isinstance(b, ToolUseBlock):
            calls.append({"id": b.id or "", "type": "function", "function": {"name": b.name, "arguments": b.input}})
        elif isinstance(b, ToolResultBlock):
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content)})
    if m.role == "assistant":
        msg = {"role": "assistant", "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    elif text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _tools(tools) -> list | None:
    out = []
    for t in tools or ():
        if isinstance(t, CustomTool):
            fn = {"name": t.name, "parameters": t.input_schema if t.input_schema is not None else {}}
            if t.description:
                fn["description"] = t.description
            out.append({"type": "function", "function": fn})
    return out or None


def parse_messages_request(body, limit: int | None, count_only: bool = False) -> MessagesRequest:
    """A validated MessagesRequest from a decoded JSON body (`count_only`: a
    count_tokens body, without max_tokens); raises BadRequest."""
    try:
        b = validate(CountTokensBody if count_only else MessagesBody, body)
    except BadRequest as exc:
        role = ROLE_PARAM.fullmatch(exc.param or "")
        if role is None:
            raise
        # worded as the Anthropic API words it: Claude Code matches that text to fall back
        raise UnexpectedRole(int(role.group(1)), body["messages"][int(role.group(1))].get("role")) from exc
    messages: list[dict] = []
    system = _text(b.system)
    if system:
        messages.append({"role": "system", "content": system})
    for m in b.messages:
        messages.extend(_convert_message(m))
    parse = not (b.tool_choice is not None and b.tool_choice.type == "none")
    tools = _tools(b.tools)
    full = b if isinstance(b, MessagesBody) else None
    return MessagesRequest(
        model=b.model,
        messages=messages,
        tools=tools if parse else None,
        parse_tools=parse and tools is not None,
        max_tokens=cap_max_tokens(full.max_tokens, limit) if full else 1,
        temperature=1.0 if full is None or full.temperature is None else float(full.temperature),
        top_p=1.0 if full is None or full.top_p is None else float(full.top_p),
        stop=full.stop_sequences if full else (),
        stream=bool(full and full.stream),
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
    syntax = tool_syntax(model.tool_parser) if req.parse_tools else None
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
    sent (and aiohttp-sse's keep-alive comments), and an empty text delta when only
    pings went out for --stream-idle-delta-s (Claude Code's stream watchdog counts every
    event but `ping`, and aborts after 300 s); an error after that is an `error` event."""
    config = request.app[ROUTER_CONFIG]
    resp = sse_response(header, config.stream_keepalive_s)
    loop = asyncio.get_running_loop()
    last_event = loop.time()

    async def send(event: str, obj: dict) -> None:
        nonlocal last_event
        await send_event(resp, {"type": event, **obj}, event)
        if event != "ping":
            last_event = loop.time()

    await prepare_sse(resp, request, header)
    cached = min(route.cached, len(job.tokens))
    await send("message_start", {"message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": job.model.name,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": len(job.tokens) - cached, "output_tokens": 0,
                  "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}}})
    await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    await send("ping", {})
    splitter = ToolCallSplitter(syntax, req.tools)
    async with contextlib.aclosing(generate(dispatcher, job, route, req.stop)) as items:
        try:
            async for item in paced(items, request, config.stream_keepalive_s):
                if item is KEEPALIVE:
                    await send("ping", {})
                    if loop.time() - last_event >= config.stream_idle_delta_s:
                        await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": ""}})
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
            await send_event(resp, exc.anthropic_body(), "error")
    await end_stream(resp)
    return resp
