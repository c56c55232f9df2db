"""Helpers every protocol view shares: the JSON body, the request's namespace,
building a Job, and SSE writing that stops cleanly when the client is gone."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from kvrouter.router.dispatch import Job
from kvrouter.router.errors import BadRequest
from kvrouter.router.keys import METRICS, ROUTER_CONFIG

log = logging.getLogger("kvrouter.router.views")

PREVIEW_CHARS = 80
# perf_counter() at arrival, set by router.app.error_middleware (a typed key where aiohttp has them)
ARRIVED_KEY = web.RequestKey("kvrouter_arrived", float) if hasattr(web, "RequestKey") else "kvrouter_arrived"
NAMESPACE_KEY = "kvrouter_namespace"  # set on the request by router.app.auth_middleware


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
             namespace: str, preview: str, prompt_param: str = "messages", arrived_s: float | None = None,
             hint_tokens: tuple[int, ...] = (), affinity_key: str = "") -> Job:
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
        hint_tokens=tuple(hint_tokens),
        affinity_key=affinity_key,
    )


async def render_prompt(request: web.Request, model, messages: list[dict], tools, marks=None):
    """`model.tokenizer.chat_prompt` off the event loop, with the server's tool order
    (--tools-before-system) and the client's breakpoints `marks`
    (router.client_hints.PromptMarks); what the client hinted is logged and counted
    in `kvrouter_client_hints`. Returns a router.prompting.Prompt; raises BadRequest."""
    config = request.app[ROUTER_CONFIG]
    prompt = await asyncio.to_thread(model.tokenizer.chat_prompt, messages, tools, marks,
                                     config.tools_before_system)
    hints = request.app[METRICS].client_hints
    counts = {"cache_control": len(prompt.hint_tokens), "cache_control_unplaced": prompt.hints_unplaced,
              "system_folded": prompt.systems_folded, "tools_first": int(prompt.tools_first)}
    for name, n in counts.items():
        if n:
            hints.labels(model.name, name).inc(n)
    if marks:
        log.info("cache_control breakpoints=%d at tokens %s (prompt %d, anchor %d), unplaced=%d", marks.count,
                 list(prompt.hint_tokens), len(prompt.tokens), prompt.anchor_tokens, prompt.hints_unplaced)
    return prompt


def route_header(route, notes: tuple[str, ...] = ()) -> str:
    """`x-kvrouter-route`: the route (router.dispatch.Route.header) and what the router
    changed in the prompt (`normalised=billing-header`)."""
    header = route.header()
    if notes:
        header += "; normalised=" + ",".join(notes)
    return header


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
