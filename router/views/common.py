"""Helpers every protocol view shares: the JSON body, the request's namespace,
building a Job, and server-sent events (aiohttp-sse)."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from kvrouter.router.dispatch import Job
from kvrouter.router.errors import BadRequest
from kvrouter.router.keys import METRICS, ROUTER_CONFIG

log = logging.getLogger("kvrouter.router.views")

PREVIEW_CHARS = 80
KEEPALIVE_S = 10.0  # seconds between SSE keep-alives on an open stream (--stream-keepalive-s's default)
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


async def prepare_sse(resp: web.StreamResponse, request: web.Request, header: str) -> None:
    """Sends a stream's headers with `x-kvrouter-route` = `header` (`route_header`): a
    stream starts as soon as its request is accepted, so the header carries the route's
    prediction (the final usage carries the real reuse)."""
    resp.headers["x-kvrouter-route"] = header
    await resp.prepare(request)


def sse_response(route_header: str, keepalive_s: float | None = None) -> EventSourceResponse:
    """An event stream (aiohttp-sse), not yet prepared: a view prepares it as soon as
    the request is accepted (validated, within the context, routed), so an error
    before that still gets a status code.

    Once prepared it sends an SSE comment (": ping") every `keepalive_s` seconds
    (`--stream-keepalive-s`; None: KEEPALIVE_S) so that proxies and clients do not take a slow stream for
    a dead one, and aborts a client that leaves data unread for
    EventSourceResponse.DEFAULT_SEND_TIMEOUT (120 s); writes to a client that is gone
    raise ConnectionResetError (an OSError), which ends the generation. Lines end with "\n".
    """
    return EventSourceResponse(headers={"x-kvrouter-route": route_header}, sep="\n", allow_all_methods=True,
                               ping_interval=keepalive_s or KEEPALIVE_S)


async def send_event(resp: EventSourceResponse, obj, event: str | None = None) -> None:
    """`obj` as one event: `event: NAME` (Anthropic, Responses) when given, `data: JSON`."""
    await resp.send(json.dumps(obj), event=event)


async def end_stream(resp: EventSourceResponse, done_marker: bool = False) -> None:
    """Ends a prepared stream: `data: [DONE]` first with `done_marker` (OpenAI's
    chat and completions streams), then no more keep-alives, then the end of the body."""
    if done_marker:
        await resp.send("[DONE]")
    resp.stop_streaming()
    await resp.wait()
    await resp.write_eof()
