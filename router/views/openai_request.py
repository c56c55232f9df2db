"""Validation of OpenAI chat completion request bodies into a frozen dataclass.

Every field the product uses is checked and a `BadRequest` names the field
(`param`); fields real clients send and the product ignores (`user`,
`metadata`, `parallel_tool_calls`, ...) are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.errors import BadRequest

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


def parse_messages(raw) -> list[dict]:
    """Validated messages as [{"role": str, "content": str}, ...]; raises BadRequest."""
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
        out.append(msg)
    return out


def parse_chat_request(body, default_max_tokens: int) -> ChatRequest:
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
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
        seed=seed,
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
    )
