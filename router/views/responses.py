"""POST /v1/responses (the OpenAI Responses API, as Codex CLI speaks it): text
or message-item input, `instructions`, function tools and their calls and
outputs, plain and streaming (the response.* event sequence). Responses are
not stored: `previous_response_id` gets a clear 400."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from aiohttp import web
from pydantic import Field

from kvrouter.router.client_hints import prompt_cache_key
from kvrouter.router.dispatch import check_context
from kvrouter.router.errors import ApiError, ContextTooLong, WorkerFailed
from kvrouter.router.keys import CLUSTER, DISPATCHER, ROUTER_CONFIG
from kvrouter.router.views.common import (ARRIVED_KEY, end_stream, make_job, namespace_of, prepare_sse, read_json,
                                          render_prompt, send_event, sse_response)
from kvrouter.router.views.streaming import paced
from kvrouter.router.views.generation import Outcome, collect, generate
from kvrouter.router.views.openai_request import (ARGUMENTS_TEXT, MODEL_TEXT, TOOL_CHOICE_TEXT, MaxTokens, ModelName,
                                                   Temperature, UnitNumber,
                                                   cap_max_tokens, parse_arguments)
from kvrouter.router.views.tools import ToolCallSplitter, split_text, tool_syntax
from kvrouter.router.views.validation import Body, tagged, validate

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
PREVIOUS_RESPONSE_TEXT = ("previous_response_id is not supported: responses are not stored; send the whole "
                          "conversation in 'input'")


@dataclass(frozen=True)
class ResponsesRequest:
    """A validated Responses request: `input` and `instructions` as chat-template
    messages, function tools to render and parse, max_output_tokens capped."""

    model: str
    messages: list[dict]
    tools: list | None
    parse_tools: bool
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    instructions: str | None


# -- the body ----------------------------------------------------------------------------------

class InputText(Body):
    """A text part of a message item (input_text, output_text)."""

    field_texts = {"type": "{param}: only text parts (input_text, output_text) are supported"}
    type: Literal["input_text", "output_text", "text"]
    text: str


Content = str | list[InputText]


class MessageItem(Body):
    """A message (the `type` may be left out); developer is rendered as system."""

    field_texts = {"role": "{param} must be one of user, system, developer, assistant",
                   "content": "{param} must be a string or an array of text parts"}
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content


class FunctionCallItem(Body):
    """A tool call the model made earlier (`call_id` links its output)."""

    field_texts = {"arguments": ARGUMENTS_TEXT}
    type: Literal["function_call"]
    name: str
    call_id: str
    arguments: str | dict | None = None


class FunctionCallOutputItem(Body):
    """A tool's output for the call `call_id`."""

    field_texts = {"output": "{param} must be a string or an array of text parts"}
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class ReasoningItem(Body):
    """Reasoning the client keeps between turns; not rendered."""

    type: Literal["reasoning"]


InputItem = tagged("type", {"message": MessageItem, "function_call": FunctionCallItem,
                            "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem},
                   default="message")


class FunctionTool(Body):
    """A function tool: name, description and a JSON schema of its parameters."""

    field_texts = {"name": "{param} must be a non-empty string"}
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema


class HostedTool(Body):
    """A tool the provider runs (web_search, file_search, ...): nothing to render."""

    type: Annotated[str, Field(json_schema_extra={"not": {"const": "function"}})]


Tool = tagged("type", {"function": FunctionTool}, other=HostedTool)


class ResponsesBody(Body):
    """POST /v1/responses. Responses are not stored: `previous_response_id` is refused."""

    field_texts = {"model": MODEL_TEXT, "input": "'{param}' must be a string or a non-empty array of items",
                   "tool_choice": TOOL_CHOICE_TEXT, "previous_response_id": PREVIOUS_RESPONSE_TEXT}
    model: ModelName
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    previous_response_id: None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: UnitNumber | None = None
    stream: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None


# -- from the body to the request --------------------------------------------------------------

def _text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _messages(items) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": ROLES[item.role], "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": parse_arguments(item.arguments)}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return out


def _tools(tools) -> list | None:
    out = []
    for t in tools or ():
        if isinstance(t, FunctionTool):
            fn = {"name": t.name, "parameters": t.parameters if t.parameters is not None
                  else {"type": "object", "properties": {}}}
            if t.description:
                fn["description"] = t.description
            out.append({"type": "function", "function": fn})
    return out or None


def parse_responses_request(body, default_max_tokens: int, limit: int | None) -> ResponsesRequest:
    """A validated ResponsesRequest from a decoded JSON body; raises BadRequest."""
    b = validate(ResponsesBody, body)
    messages = _messages(b.input)
    if b.instructions:
        messages.insert(0, {"role": "system", "content": b.instructions})
    tools = _tools(b.tools)
    parse = b.tool_choice != "none"
    return ResponsesRequest(
        model=b.model,
        messages=messages,
        tools=tools if parse else None,
        parse_tools=parse and tools is not None,
        max_tokens=cap_max_tokens(b.max_output_tokens or default_max_tokens, limit),
        temperature=1.0 if b.temperature is None else float(b.temperature),
        top_p=1.0 if b.top_p is None else float(b.top_p),
        stream=bool(b.stream),
        instructions=b.instructions,
    )


def usage_body(o: Outcome) -> dict:
    return {
        "input_tokens": o.prompt_tokens,
        "input_tokens_details": {"cached_tokens": o.cached_tokens},
        "output_tokens": o.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": o.prompt_tokens + o.completion_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def call_item(call, status: str = "completed") -> dict:
    return {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": status,
            "call_id": call.id, "name": call.name, "arguments": call.arguments if status == "completed" else ""}


def response_body(resp_id, created, model, req, output, outcome: Outcome | None, status) -> dict:
    return {
        "id": resp_id, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_tokens, "parallel_tool_calls": True,
        "previous_response_id": None, "temperature": req.temperature, "top_p": req.top_p,
        "tool_choice": "auto", "tools": [{"type": "function", **t["function"]} for t in req.tools or []],
        "text": {"format": {"type": "text"}}, "metadata": {}, "store": False,
        "usage": usage_body(outcome) if outcome else None,
    }


async def create_response(request: web.Request) -> web.StreamResponse:
    config = request.app[ROUTER_CONFIG]
    body = await read_json(request)
    req = parse_responses_request(body, config.default_max_tokens, config.max_tokens_limit)
    model = request.app[CLUSTER].model(req.model)
    prompt = await render_prompt(request, model, req.messages, req.tools)
    syntax = tool_syntax(model.tool_parser) if req.parse_tools else None
    job = make_job(model, prompt.tokens, prompt.anchor_tokens, req.max_tokens, req.temperature, req.top_p, None,
                   namespace_of(request), prompt.text, prompt_param="input", arrived_s=request.get(ARRIVED_KEY),
                   affinity_key=prompt_cache_key(body))
    dispatcher = request.app[DISPATCHER]
    resp_id, created, msg_id = f"resp_{uuid.uuid4().hex[:24]}", int(time.time()), f"msg_{uuid.uuid4().hex[:24]}"
    if req.stream:
        try:
            check_context(job)
        except ContextTooLong as exc:
            # Codex CLI recognises a context overflow only as `response.failed` with code
            # context_length_exceeded inside the stream (an HTTP 400 is a plain error to it).
            return await _failed_stream(request, job, req, resp_id, created, exc)
    async with dispatcher.route(job) as route:
        if req.stream:
            return await _stream(request, dispatcher, job, route, req, syntax, resp_id, created, msg_id)
        text, outcome = await collect(dispatcher, job, route)
        if outcome is None:
            raise WorkerFailed("the worker ended the stream without a final report")
        content, calls = split_text(syntax, req.tools, text)
        output = ([message_item(msg_id, content)] if content or not calls else []) + [call_item(c) for c in calls]
        status = "incomplete" if outcome.finish_reason == "length" and not calls else "completed"
        body = response_body(resp_id, created, model.name, req, output, outcome, status)
        return web.json_response(body, headers={"x-kvrouter-route": route.header()})


def failed_body(resp_id, created, model, req, exc: ApiError) -> dict:
    """A response with status "failed" and the error as OpenAI's Responses API reports it."""
    return {**response_body(resp_id, created, model, req, [], None, "failed"),
            "error": {"code": exc.code or exc.type, "message": exc.message}}


async def _failed_stream(request, job, req, resp_id, created, exc: ApiError) -> web.StreamResponse:
    """A stream that fails at once: response.created, then response.failed."""
    resp = sse_response("", request.app[ROUTER_CONFIG].stream_keepalive_s)
    await prepare_sse(resp, request, "")
    shell = response_body(resp_id, created, job.model.name, req, [], None, "in_progress")
    await send_event(resp, {"type": "response.created", "sequence_number": 0, "response": shell}, "response.created")
    await send_event(resp, {"type": "response.failed", "sequence_number": 1,
                            "response": failed_body(resp_id, created, job.model.name, req, exc)}, "response.failed")
    await end_stream(resp)
    return resp


async def _stream(request, dispatcher, job, route, req, syntax, resp_id, created, msg_id) -> web.StreamResponse:
    """The response.* event sequence. Headers, response.created and response.in_progress
    (and the message item's start) go out at once, keep-alive comments follow; an error
    after that is `response.failed` with the error's code."""
    resp = sse_response(route.header(), request.app[ROUTER_CONFIG].stream_keepalive_s)
    seq = 0

    async def send(event: str, obj: dict) -> None:
        nonlocal seq
        await send_event(resp, {"type": event, "sequence_number": seq, **obj}, event)
        seq += 1

    splitter = ToolCallSplitter(syntax, req.tools)
    text_parts: list[str] = []
    part = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    await prepare_sse(resp, request, route.header())
    shell = response_body(resp_id, created, job.model.name, req, [], None, "in_progress")
    await send("response.created", {"response": shell})
    await send("response.in_progress", {"response": shell})
    await send("response.output_item.added", {"output_index": 0, "item": message_item(msg_id, "", "in_progress")})
    await send("response.content_part.added", {**part, "part": {"type": "output_text", "text": "", "annotations": []}})
    async with contextlib.aclosing(generate(dispatcher, job, route)) as items:
        try:
            async for item in paced(items, request):
                if isinstance(item, str):
                    text = splitter.feed(item)
                    if text:
                        text_parts.append(text)
                        await send("response.output_text.delta", {**part, "delta": text, "logprobs": []})
                    continue
                rest, calls = splitter.finish()
                if rest:
                    text_parts.append(rest)
                    await send("response.output_text.delta", {**part, "delta": rest, "logprobs": []})
                full = "".join(text_parts)
                await send("response.output_text.done", {**part, "text": full, "logprobs": []})
                await send("response.content_part.done",
                           {**part, "part": {"type": "output_text", "text": full, "annotations": []}})
                output = [message_item(msg_id, full)]
                await send("response.output_item.done", {"output_index": 0, "item": output[0]})
                for i, call in enumerate(calls, 1):
                    done = call_item(call)
                    await send("response.output_item.added",
                               {"output_index": i, "item": call_item(call, "in_progress")})
                    await send("response.function_call_arguments.delta",
                               {"item_id": done["id"], "output_index": i, "delta": call.arguments})
                    await send("response.function_call_arguments.done",
                               {"item_id": done["id"], "output_index": i, "arguments": call.arguments})
                    await send("response.output_item.done", {"output_index": i, "item": done})
                    output.append(done)
                status = "incomplete" if item.finish_reason == "length" and not calls else "completed"
                final = response_body(resp_id, created, job.model.name, req, output, item, status)
                await send("response.completed" if status == "completed" else "response.incomplete",
                           {"response": final})
        except ApiError as exc:
            await send("response.failed", {"response": failed_body(resp_id, created, job.model.name, req, exc)})
    await end_stream(resp)
    return resp
