"""GET /openapi.json: an OpenAPI 3.1 description of the HTTP API, its request
bodies generated from the pydantic models that validate them (so the document
and the validation cannot drift apart). Fields other than the ones described
are accepted and ignored (`additionalProperties: true`).

Two facts of the running router complete the generated schemas: `model` lists
the served models, and token ids (`/v1/completions` prompts) run up to the
smallest vocabulary among them.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from kvrouter.router import __version__
from kvrouter.router.keys import CLUSTER
from kvrouter.router.views.anthropic import CountTokensBody, MessagesBody
from kvrouter.router.views.completions import TOKEN_ID_MARK, CompletionBody, vocab_size
from kvrouter.router.views.openai_request import ChatCompletionBody
from kvrouter.router.views.responses import ResponsesBody

# (path, summary, body model, Anthropic error format)
ENDPOINTS = (
    ("/v1/chat/completions", "OpenAI chat completion", ChatCompletionBody, False),
    ("/v1/completions", "OpenAI text completion", CompletionBody, False),
    ("/v1/responses", "OpenAI Responses API", ResponsesBody, False),
    ("/v1/messages", "Anthropic Messages", MessagesBody, True),
    ("/v1/messages/count_tokens", "Anthropic token count", CountTokensBody, True),
)
REF = "#/components/schemas/{model}"

STR = {"type": "string"}
OPENAI_ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
        "message": STR, "type": STR, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}
ANTHROPIC_ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"type": {"const": "error"}, "error": {"type": "object", "properties": {
        "type": STR, "message": STR}}}}}}}


def _operation(summary: str, ref: dict, anthropic: bool) -> dict:
    err = ANTHROPIC_ERROR if anthropic else OPENAI_ERROR
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
        "responses": {
            "200": {"description": "the result (JSON, or text/event-stream with stream: true)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": STR}}},
            **{str(s): err for s in (400, 401, 404, 413, 429, 502, 503)},
            **({"529": err} if anthropic else {}),
        },
    }


def _mark_token_ids(node: Any, vocab: int | None) -> None:
    """Token id schemas (marked TOKEN_ID_MARK) get `maximum` vocab - 1; the mark goes."""
    if isinstance(node, dict):
        if node.pop(TOKEN_ID_MARK, False) and vocab:
            node["maximum"] = vocab - 1
        for value in node.values():
            _mark_token_ids(value, vocab)
    elif isinstance(node, list):
        for value in node:
            _mark_token_ids(value, vocab)


@lru_cache(maxsize=1)
def _generated() -> tuple[dict, dict]:
    """(JSON schema reference of each body model, every schema by name), generated once."""
    refs, defs = models_json_schema([(m, "validation") for _, _, m, _ in ENDPOINTS], ref_template=REF)
    return {model: refs[(model, "validation")] for _, _, model, _ in ENDPOINTS}, defs["$defs"]


def build_spec(models: list[str], vocab: int | None = None) -> dict:
    """The OpenAPI document. `models`: the served model ids (the `model` enum; any
    string when empty); `vocab`: the smallest vocabulary size among them (token
    ids run below it), None when unknown."""
    refs, schemas = _generated()
    schemas = copy.deepcopy(schemas)
    _mark_token_ids(schemas, vocab)
    for _, _, model, _ in ENDPOINTS:
        field = schemas[model.__name__]["properties"]["model"]
        if models:
            field["enum"] = list(models)
    paths: dict = {path: {"post": _operation(summary, refs[model], anthropic)}
                   for path, summary, model, anthropic in ENDPOINTS}
    paths["/v1/models"] = {"get": {"summary": "served models", "responses": {
        "200": {"description": "model list", "content": {"application/json": {"schema": {"type": "object"}}}},
        "401": OPENAI_ERROR}}}
    paths["/health"] = {"get": {"summary": "worker health", "responses": {
        "200": {"description": "a worker is serving"}, "503": {"description": "no worker is serving"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvrouter", "version": __version__,
                 "description": "OpenAI- and Anthropic-compatible gateway with KV checkpoint reuse. With "
                                "--api-keys-file, send 'Authorization: Bearer KEY' or 'x-api-key: KEY'; "
                                "'x-kvrouter-namespace' selects a cache namespace within the key's."},
        "paths": paths,
        "components": {"schemas": schemas},
    }


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: `build_spec` for the served models and their smallest vocabulary."""
    cluster = request.app[CLUSTER]
    vocabs = [vocab_size(m.tokenizer) for m in cluster.models.values() if m.tokenizer is not None]
    return web.json_response(build_spec(sorted(cluster.models), min(vocabs) if vocabs else None))
