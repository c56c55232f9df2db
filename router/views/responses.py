"""POST /v1/responses (the OpenAI Responses API, as Codex CLI speaks it): text
or message-item input, `instructions`, function tools and their calls and
outputs, plain and streaming (the response.* event sequence). Responses are
not stored: `previous_response_id` gets a clear 400."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from kvrouter.router.client_hints import prompt_cache_key
from kvrouter.router.dispatch import check_context
from kvrouter.router.errors import ApiError, BadRequest, ContextTooLong, WorkerFailed
from kvrouter.router.keys import CLUSTER, DISPATCHER, ROUTER_CONFIG
from kvrouter.router.views.common import (ARRIVED_KEY, make_job, namespace_of, read_json, render_prompt, sse_data,
                                          sse_response)
from kvrouter.router.views.streaming import KEEPALIVE, OPENAI_KEEPALIVE, paced
from kvrouter.router.views.generation import Outcome, collect, generate
from kvrouter.router.views.openai_request import _number, cap_max_tokens, parse_arguments, tool_choice_parses
from kvrouter.router.views.tools import ToolCallSplitter, flat_function_tools, split_text, syntax_for

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


@dataclass(frozen=True)
class ResponsesRequest:
    model: str
    messages: list[dict]
    tools: list | None
    parse_tools: bool
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    instructions: str | None


def _content(value, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, p in enumerate(value):
            if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text") \
                    or not isinstance(p.get("text"), str):
                raise BadRequest(f"{param}[{i}]: only text parts (input_text, output_text) are supported",
                                 param=param)
            parts.append(p["text"])
        return "".join(parts)
    raise BadRequest(f"{param} must be a string or an array of text parts", param=param)


def _messages(raw) -> list[dict]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'input' must be a string or a non-empty array of items", param="input")
    out: list[dict] = []
    for i, item in enumerate(raw):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{p} must be an object", param=p)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise BadRequest(f"{p}.role must be one of user, system, developer, assistant", param=f"{p}.role")
            out.append({"role": ROLES[role], "content": _content(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise BadRequest(f"{p}: function_call needs name and call_id strings", param=p)
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": parse_arguments(item.get("arguments"), f"{p}.arguments")}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise BadRequest(f"{p}.call_id must be a string", param=p)
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": output if isinstance(output, str) else _content(output, f"{p}.output")})
        elif kind == "reasoning":
            continue
        else:
            raise BadRequest(f"{p}: input items of type '{kind}' are not supported", param=p)
    return out


def _tools(raw) -> list | None:
    # Hosted tools (web_search, file_search, ...) run at the provider: nothing to render.
    return flat_function_tools(raw, "parameters", {"type": "object", "properties": {}},
                               lambda t: t.get("type") == "function")


def parse_responses_request(body, default_max_tokens: int, limit: int | None) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("previous_response_id") is not None:
        raise BadRequest("previous_response_id is not supported: responses are not stored; send the whole "
                         "conversation in 'input'", param="previous_response_id")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string", param="instructions")
    messages = _messages(body.get("input"))
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    stream = body.get("stream") or False  # null means the default
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    parse = tool_choice_parses(choice if not isinstance(choice, dict) else {"type": str(choice.get("type"))})
    return ResponsesRequest(
        model=model,
        messages=messages,
        tools=tools if parse else None,
        parse_tools=parse and tools is not None,
        max_tokens=cap_max_tokens(_number(body, "max_output_tokens", default_max_tokens, 1, 2**31, integer=True),
                                  limit),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
        stream=stream,
        instructions=instructions,
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
    syntax = syntax_for(model.tokenizer) if req.parse_tools else None
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
    resp = sse_response("")
    await resp.prepare(request)
    shell = response_body(resp_id, created, job.model.name, req, [], None, "in_progress")
    await resp.write(sse_data({"type": "response.created", "sequence_number": 0, "response": shell},
                              "response.created"))
    await resp.write(sse_data({"type": "response.failed", "sequence_number": 1,
                               "response": failed_body(resp_id, created, job.model.name, req, exc)},
                              "response.failed"))
    await resp.write_eof()
    return resp


async def _stream(request, dispatcher, job, route, req, syntax, resp_id, created, msg_id) -> web.StreamResponse:
    """The response.* event sequence. Headers, response.created and response.in_progress
    (and the message item's start) go out at once; SSE comments while nothing else is
    sent; an error after that is `response.failed` with the error's code."""
    resp = sse_response(route.header())
    seq = 0

    async def send(event: str, obj: dict) -> None:
        nonlocal seq
        await resp.write(sse_data({"type": event, "sequence_number": seq, **obj}, event))
        seq += 1

    splitter = ToolCallSplitter(syntax, req.tools)
    text_parts: list[str] = []
    part = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    await resp.prepare(request)
    shell = response_body(resp_id, created, job.model.name, req, [], None, "in_progress")
    await send("response.created", {"response": shell})
    await send("response.in_progress", {"response": shell})
    await send("response.output_item.added", {"output_index": 0, "item": message_item(msg_id, "", "in_progress")})
    await send("response.content_part.added", {**part, "part": {"type": "output_text", "text": "", "annotations": []}})
    interval = request.app[ROUTER_CONFIG].stream_keepalive_s
    async with contextlib.aclosing(generate(dispatcher, job, route)) as items:
        try:
            async for item in paced(items, request, interval):
                if item is KEEPALIVE:
                    await resp.write(OPENAI_KEEPALIVE)
                    continue
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
                    await send("response.output_item.added", {"output_index": i, "item": call_item(call, "in_progress")})
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
    await resp.write_eof()
    return resp
