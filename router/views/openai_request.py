"""Validation of OpenAI chat completion request bodies into a frozen dataclass.

Every field the product uses is checked and a `BadRequest` names the field
(`param`); fields real clients send and the product ignores (`user`,
`metadata`, `parallel_tool_calls`, ...) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kvrouter.router.errors import BadRequest
from kvrouter.router.views.generation import parse_stop

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...] = ()
    tools: list | None = None  # OpenAI chat tools, [{"type": "function", "function": {...}}]
    parse_tools: bool = False  # False with tool_choice "none"


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind}", param=name)
    if not (lo <= value <= hi):
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _content_text(content, index: int) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise BadRequest(
                    f"messages[{index}].content: only text parts are supported", param=f"messages[{index}].content"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"messages[{index}].content: a text part needs 'text'", param=f"messages[{index}].content")
            parts.append(text)
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of parts", param=f"messages[{index}].content")


def parse_arguments(value, param: str):
    """Tool-call arguments for a chat template: a dict (templates expect one);
    JSON text is decoded, other text is kept as it is."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, dict) else value
    if value is None:
        return {}
    raise BadRequest(f"{param} must be a JSON string or an object", param=param)


def _tool_calls(raw, i: int) -> list[dict]:
    param = f"messages[{i}].tool_calls"
    if not isinstance(raw, list):
        raise BadRequest(f"{param} must be an array", param=param)
    out = []
    for j, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"{param}[{j}] needs function.name", param=f"{param}[{j}]")
        cid = call.get("id")
        out.append({
            "id": cid if isinstance(cid, str) else "",
            "type": "function",
            "function": {"name": fn["name"], "arguments": parse_arguments(fn.get("arguments"), f"{param}[{j}].function.arguments")},
        })
    return out


def parse_tools(raw, param: str = "tools") -> list[dict] | None:
    """OpenAI chat tools, validated: [{"type": "function", "function": {"name", ...}}]."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest(f"'{param}' must be an array", param=param)
    out = []
    for j, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{param}[{j}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                             param=f"{param}[{j}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"{param}[{j}].function.parameters must be an object", param=f"{param}[{j}]")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise BadRequest(f"{param}[{j}].function.description must be a string", param=f"{param}[{j}]")
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out or None


def tool_choice_parses(raw, param: str = "tool_choice") -> bool:
    """Validates tool_choice; False when it is "none" (tools are then neither rendered nor parsed)."""
    if raw is None or raw in ("auto", "required"):
        return True
    if raw == "none":
        return False
    if isinstance(raw, dict) and isinstance(raw.get("type"), str):
        return True
    raise BadRequest(f"'{param}' must be 'none', 'auto', 'required' or an object naming a tool", param=param)


def parse_messages(raw) -> list[dict]:
    """Validated messages as [{"role": str, "content": str, ...}, ...]: assistant
    messages may carry `tool_calls`, tool messages `tool_call_id`; raises BadRequest."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        if "content" not in m and role != "assistant":
            raise BadRequest(f"messages[{i}] is missing 'content'", param=f"messages[{i}].content")
        msg = {"role": "system" if role == "developer" else role, "content": _content_text(m.get("content"), i)}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if role == "tool":
            tcid = m.get("tool_call_id")
            if tcid is not None and not isinstance(tcid, str):
                raise BadRequest(f"messages[{i}].tool_call_id must be a string", param=f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = tcid or ""
        name = m.get("name")
        if isinstance(name, str) and name:
            msg["name"] = name
        out.append(msg)
    return out


def parse_chat_request(body, default_max_tokens: int, max_tokens_limit: int | None = None) -> ChatRequest:
    """A validated ChatRequest from a decoded JSON body; raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    messages = parse_messages(body.get("messages"))
    n = _number(body, "n", 1, 1, 128, integer=True)
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    max_tokens = _number(body, "max_completion_tokens", None, 1, 2**31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", default_max_tokens, 1, 2**31, integer=True)
    stream = body.get("stream") or False  # null means the default
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    tools = parse_tools(body.get("tools"))
    parse = tool_choice_parses(body.get("tool_choice"))
    include_usage = opts.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=cap_max_tokens(max_tokens, max_tokens_limit),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
        seed=seed,
        stream=stream,
        include_usage=include_usage,
        stop=parse_stop(body.get("stop"), "stop"),
        tools=tools if parse else None,
        parse_tools=parse and tools is not None,
    )


def cap_max_tokens(n: int, limit: int | None) -> int:
    """`n` capped at the server's --max-tokens-limit."""
    return min(n, limit) if limit else n
