"""Helpers every protocol view shares: the JSON body, the request's namespace,
building a Job, and SSE writing that stops cleanly when the client is gone."""

from __future__ import annotations

import json

from aiohttp import web

from kvrouter.router.dispatch import Job
from kvrouter.router.errors import BadRequest

PREVIEW_CHARS = 80
# perf_counter() at arrival, set by router.app.error_middleware (a typed key where aiohttp has them)
ARRIVED_KEY = web.RequestKey("kvrouter_arrived", float) if hasattr(web, "RequestKey") else "kvrouter_arrived"
# set on the request by router.app.auth_middleware
NAMESPACE_KEY = web.RequestKey("kvrouter_namespace", str) if hasattr(web, "RequestKey") else "kvrouter_namespace"
# the API key's name (None without --api-keys-file), set by the same middleware
KEY_NAME_KEY = web.RequestKey("kvrouter_key_name", object) if hasattr(web, "RequestKey") else "kvrouter_key_name"


async def read_json(request: web.Request):
    """The decoded JSON body; raises BadRequest on malformed JSON (and on JSON too
    deeply nested or with numbers too long to decode)."""
    return decode_json(await request.read())


def decode_json(raw: bytes):
    """`raw` decoded as JSON; raises BadRequest (see read_json)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    try:  # lone surrogates (e.g. "\ud800") decode as JSON but are not text a tokenizer takes
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest("the request body contains an unpaired surrogate (invalid Unicode text)") from exc
    return body


def namespace_of(request: web.Request) -> str:
    return request.get(NAMESPACE_KEY, "")


def make_job(model, tokens, anchor_tokens: int, max_tokens: int, temperature: float, top_p: float, seed,
             namespace: str, preview: str, prompt_param: str = "messages", arrived_s: float | None = None) -> Job:
    return Job(
        model=model,
        tokens=tuple(tokens),
        anchor_tokens=anchor_tokens,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        namespace=namespace,
        text_preview=preview[:PREVIEW_CHARS],
        prompt_param=prompt_param,
        arrived_s=arrived_s,
    )


async def prepare_sse(resp: web.StreamResponse, request: web.Request, route) -> None:
    """Sends a stream's headers at its first token, with `x-kvrouter-route` as the route
    stands then: after any retry, with the reuse the worker really made."""
    resp.headers["x-kvrouter-route"] = route.header()
    await resp.prepare(request)


def sse_response(route_header: str) -> web.StreamResponse:
    return web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-kvrouter-route": route_header,
        }
    )


def sse_data(obj, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n".encode()
