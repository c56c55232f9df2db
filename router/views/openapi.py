"""GET /openapi.json: an OpenAPI 3.0 description of the HTTP API (the fields the
product uses; other fields real clients send are accepted and ignored)."""

from __future__ import annotations

from aiohttp import web

from kvrouter.router import __version__
from kvrouter.router.keys import CLUSTER


def _obj(props: dict, required: list[str] | None = None) -> dict:
    out = {"type": "object", "properties": props, "additionalProperties": True}
    if required:
        out["required"] = required
    return out


STR = {"type": "string"}
INT1 = {"type": "integer", "minimum": 1}
BOOL = {"type": "boolean"}
STOP = {"oneOf": [STR, {"type": "array", "items": STR, "maxItems": 16}], "nullable": True}
TEMP2 = {"type": "number", "minimum": 0, "maximum": 2}
UNIT = {"type": "number", "minimum": 0, "maximum": 1}
TEXT_PARTS = {"type": "array", "items": _obj({"type": {"type": "string", "enum": ["text"]}, "text": STR},
                                              ["type", "text"])}
ERROR = {"description": "error", "content": {"application/json": {"schema": _obj({"error": _obj({
    "message": STR, "type": STR, "param": {"type": "string", "nullable": True},
    "code": {"type": "string", "nullable": True}})}, ["error"])}}}
ANTHROPIC_ERROR = {"description": "error", "content": {"application/json": {"schema": _obj({
    "type": {"type": "string", "enum": ["error"]}, "error": _obj({"type": STR, "message": STR})})}}}


def _op(summary: str, body: dict, anthropic: bool = False) -> dict:
    err = ANTHROPIC_ERROR if anthropic else ERROR
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {"description": "the result (JSON, or text/event-stream with stream: true)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": STR}}},
            **{str(s): err for s in (400, 401, 404, 413, 429, 502, 503)},
            **({"529": err} if anthropic else {}),
        },
    }


def build_spec(models: list[str]) -> dict:
    model = {"type": "string", "enum": models} if models else STR
    tools = {"type": "array", "items": _obj({
        "type": {"type": "string", "enum": ["function"]},
        "function": _obj({"name": {"type": "string", "minLength": 1}, "description": STR,
                          "parameters": {"type": "object"}}, ["name"])}, ["type", "function"])}
    chat_message = _obj({
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [STR, TEXT_PARTS], "nullable": True},
        "tool_call_id": STR,
        "tool_calls": {"type": "array", "items": _obj({"id": STR, "type": STR, "function": _obj(
            {"name": STR, "arguments": STR}, ["name"])}, ["function"])},
    }, ["role", "content"])
    chat = _obj({
        "model": model, "messages": {"type": "array", "items": chat_message, "minItems": 1},
        "max_tokens": INT1, "max_completion_tokens": INT1, "temperature": TEMP2, "top_p": UNIT,
        "seed": {"type": "integer"}, "n": {"type": "integer", "enum": [1]}, "stop": STOP, "stream": BOOL,
        "stream_options": _obj({"include_usage": BOOL}), "tools": tools,
        "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}]},
    }, ["model", "messages"])
    completion = _obj({
        "model": model,
        "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                              "minItems": 1}]},
        "max_tokens": INT1, "temperature": TEMP2, "top_p": UNIT, "seed": {"type": "integer"}, "stop": STOP,
        "stream": BOOL, "stream_options": _obj({"include_usage": BOOL}),
    }, ["model", "prompt"])
    responses = _obj({
        "model": model,
        "input": {"oneOf": [STR, {"type": "array", "minItems": 1, "items": _obj({
            "type": {"type": "string", "enum": ["message"]},
            "role": {"type": "string", "enum": ["user", "system", "developer", "assistant"]},
            "content": STR}, ["role", "content"])}]},
        "instructions": STR, "max_output_tokens": INT1, "temperature": TEMP2, "top_p": UNIT, "stream": BOOL,
        "tools": {"type": "array", "items": _obj({"type": {"type": "string", "enum": ["function"]},
                                                  "name": {"type": "string", "minLength": 1},
                                                  "parameters": {"type": "object"}}, ["type", "name"])},
    }, ["model", "input"])
    block = {"oneOf": [
        _obj({"type": {"type": "string", "enum": ["text"]}, "text": STR}, ["type", "text"]),
        _obj({"type": {"type": "string", "enum": ["tool_use"]}, "id": STR, "name": STR, "input": {"type": "object"}},
             ["type", "id", "name", "input"]),
        _obj({"type": {"type": "string", "enum": ["tool_result"]}, "tool_use_id": STR, "content": STR},
             ["type", "tool_use_id"]),
    ]}
    a_message = _obj({"role": {"type": "string", "enum": ["user", "assistant", "system"]},
                      "content": {"oneOf": [STR, {"type": "array", "items": block}]}}, ["role", "content"])
    a_tools = {"type": "array", "items": _obj({"name": {"type": "string", "minLength": 1}, "description": STR,
                                               "input_schema": {"type": "object"}}, ["name", "input_schema"])}
    a_base = {"model": model, "messages": {"type": "array", "items": a_message, "minItems": 1},
              "system": {"oneOf": [STR, TEXT_PARTS]}, "tools": a_tools}
    messages = _obj({**a_base, "max_tokens": INT1, "temperature": UNIT, "top_p": UNIT, "top_k": {"type": "integer",
                     "minimum": 0}, "stop_sequences": {"type": "array", "items": STR, "maxItems": 16},
                     "stream": BOOL}, ["model", "messages", "max_tokens"])
    count = _obj(a_base, ["model", "messages"])
    return {
        "openapi": "3.0.3",
        "info": {"title": "kvrouter", "version": __version__,
                 "description": "OpenAI- and Anthropic-compatible gateway with KV checkpoint reuse. With "
                                "--api-keys-file, send 'Authorization: Bearer KEY' or 'x-api-key: KEY'; "
                                "'x-kvrouter-namespace' selects a cache namespace within the key's."},
        "paths": {
            "/v1/chat/completions": {"post": _op("OpenAI chat completion", chat)},
            "/v1/completions": {"post": _op("OpenAI text completion", completion)},
            "/v1/responses": {"post": _op("OpenAI Responses API", responses)},
            "/v1/messages": {"post": _op("Anthropic Messages", messages, anthropic=True)},
            "/v1/messages/count_tokens": {"post": _op("Anthropic token count", count, anthropic=True)},
            "/v1/models": {"get": {"summary": "served models", "responses": {"200": {
                "description": "model list", "content": {"application/json": {"schema": {"type": "object"}}}},
                "401": ERROR}}},
            "/health": {"get": {"summary": "worker health", "responses": {
                "200": {"description": "a worker is serving"}, "503": {"description": "no worker is serving"}}}},
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(build_spec(sorted(request.app[CLUSTER].models)))
