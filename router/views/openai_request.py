"""OpenAI chat completion request bodies: the pydantic model of the body
(`ChatCompletionBody`, which also gives /openapi.json its schema) and the
frozen `ChatRequest` the view runs.

Every field the product uses is checked and a `BadRequest` names the field
(`param`); fields real clients send and the product ignores (`user`,
`metadata`, `parallel_tool_calls`, `store`, ...) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from kvrouter.router.views.generation import StopStrings
from kvrouter.router.views.validation import Between, Body, Only, integer, number, tagged, validate

MODEL_TEXT = "'{param}' is required and must be a string"
ARGUMENTS_TEXT = "{param} must be a JSON string or an object"
TOOL_CHOICE_TEXT = "'{param}' must be 'none', 'auto', 'required' or an object naming a tool"

MaxTokens = integer(1, 2**31)
Seed = integer(-(2**63), 2**63 - 1)
Temperature = number(0, 2)
UnitNumber = number(0, 1)  # top_p; Anthropic's temperature
ModelName = Annotated[str, Field(min_length=1, description="a served model's id (GET /v1/models)")]


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request, as the view runs it: `messages` in the chat
    template's form (`template_message`), max_tokens already capped (--max-tokens-limit),
    temperature/top_p with OpenAI's defaults (1.0), stop strings, and tools to render
    and parse (None with tool_choice "none")."""

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


# -- the body ----------------------------------------------------------------------------------

class TextPart(Body):
    """A content part; only text is supported ("input_text" as the Responses API names it)."""

    field_texts = {"type": "{param}: only text parts are supported"}
    type: Literal["text", "input_text"]
    text: str


class FunctionCall(Body):
    """The function of an earlier tool call: its name and arguments."""

    field_texts = {"arguments": ARGUMENTS_TEXT}
    name: str
    arguments: str | dict | None = None  # JSON text (OpenAI) or an object


class ToolCall(Body):
    """A tool call of an earlier assistant turn."""

    id: str | None = None
    type: str | None = None
    function: FunctionCall


class _Message(Body):
    field_texts = {"content": {"missing": "{name} is required", "*": "{param} must be a string or a list of parts"}}
    content: str | list[TextPart] | None
    name: str | None = None


class SystemMessage(_Message):
    """A system message ("developer" as newer OpenAI models name it)."""

    role: Literal["system", "developer"]


class UserMessage(_Message):
    """A user message."""

    role: Literal["user"]


class AssistantMessage(_Message):
    """An earlier assistant turn: text, tool calls, or both (`content` may be left out)."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message):
    """A tool's result; `tool_call_id` names the call it answers."""

    role: Literal["tool"]
    tool_call_id: str | None = None


ChatMessage = tagged("role", {"system": SystemMessage, "developer": SystemMessage, "user": UserMessage,
                              "assistant": AssistantMessage, "tool": ToolMessage})


class FunctionDef(Body):
    """A function tool: name, description and a JSON schema of its parameters."""

    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema


class ChatTool(Body):
    """`{"type": "function", "function": {"name", "description", "parameters"}}`."""

    type: str | None = "function"
    function: FunctionDef


class NamedToolChoice(Body):
    """tool_choice as an object (`{"type": "function", "function": {"name": ...}}`)."""

    type: str


class StreamOptions(Body):
    """stream_options: `include_usage` adds a last chunk with the usage."""

    include_usage: bool | None = None


class ChatCompletionBody(Body):
    """POST /v1/chat/completions."""

    field_texts = {"model": MODEL_TEXT, "messages": "'{param}' must be a non-empty array",
                   "tool_choice": TOOL_CHOICE_TEXT}
    model: ModelName
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: UnitNumber | None = None
    seed: Seed | None = None
    n: Annotated[int, Between(1, 128), Only(1, "only n=1 is supported")] | None = None
    stop: StopStrings = ()
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class ChatMessages(Body):
    """Messages alone (the gRPC API's chat requests)."""

    field_texts = {"messages": "'{param}' must be a non-empty array"}
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


# -- from the body to the request --------------------------------------------------------------

def parse_arguments(value):
    """Tool-call arguments for a chat template: a dict (templates expect one);
    JSON text is decoded, other text is kept as it is; None is {}."""
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, dict) else value
    return {} if value is None else value


def _content_text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def template_message(m: _Message) -> dict:
    """A chat message as the chat template takes it: {"role", "content"} (developer
    becomes system), with `tool_calls` (assistant), `tool_call_id` (tool), `name`."""
    msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
    if isinstance(m, AssistantMessage) and m.tool_calls is not None:
        msg["tool_calls"] = [{"id": c.id or "", "type": "function",
                              "function": {"name": c.function.name, "arguments": parse_arguments(c.function.arguments)}}
                             for c in m.tool_calls]
    if isinstance(m, ToolMessage):
        msg["tool_call_id"] = m.tool_call_id or ""
    if m.name:
        msg["name"] = m.name
    return msg


def chat_tools(tools: list[ChatTool] | None) -> list[dict] | None:
    """Tools as the chat template takes them, or None when there are none."""
    out = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools or ()]
    return out or None


def parse_messages(raw) -> list[dict]:
    """Validated messages as [{"role": str, "content": str, ...}, ...]: assistant
    messages may carry `tool_calls`, tool messages `tool_call_id`; raises BadRequest."""
    return [template_message(m) for m in validate(ChatMessages, {"messages": raw}).messages]


def parse_chat_request(body, default_max_tokens: int, max_tokens_limit: int | None = None) -> ChatRequest:
    """A validated ChatRequest from a decoded JSON body; raises BadRequest."""
    b = validate(ChatCompletionBody, body)
    max_tokens = b.max_completion_tokens or b.max_tokens or default_max_tokens
    parse = b.tool_choice != "none"
    tools = chat_tools(b.tools)
    return ChatRequest(
        model=b.model,
        messages=[template_message(m) for m in b.messages],
        max_tokens=cap_max_tokens(max_tokens, max_tokens_limit),
        temperature=1.0 if b.temperature is None else float(b.temperature),
        top_p=1.0 if b.top_p is None else float(b.top_p),
        seed=b.seed,
        stream=bool(b.stream),
        include_usage=bool(b.stream_options and b.stream_options.include_usage),
        stop=b.stop,
        tools=tools if parse else None,
        parse_tools=parse and tools is not None,
    )


def cap_max_tokens(n: int, limit: int | None) -> int:
    """`n` capped at the server's --max-tokens-limit."""
    return min(n, limit) if limit else n

