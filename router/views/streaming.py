"""What every SSE view shares once a request is accepted: keep-alives while the
generation has nothing to send, and noticing a client that went away.

A stream starts as soon as its request is accepted (validated, within the
context, routed): headers and the protocol's first event go out at once, so an
agent client's idle watchdog (Claude Code aborts a stream after 300 s without
bytes) never fires during a long prefill. aiohttp-sse then sends an SSE comment
every `--stream-keepalive-s` (`views.common.sse_response`); Anthropic clients
also get `ping` events: while nothing else is sent, `paced` yields KEEPALIVE
every `interval_s`. `paced` checks every POLL_S that the client is still
connected: when it is gone, `ClientGone` ends the view, and closing the
generation cancels the work on the worker (before the first token included).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from aiohttp import web

POLL_S = 0.5
"""How often a waiting stream checks that its client is still connected, seconds."""

KEEPALIVE = object()
"""Yielded by `paced` when nothing came for the keep-alive interval."""


class ClientGone(ConnectionResetError):
    """The client closed its connection while its stream was waiting."""


def client_gone(request: web.Request) -> bool:
    """True when the request's connection is closed or closing."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def paced(items: AsyncIterator, request: web.Request, interval_s: float | None = None) -> AsyncIterator:
    """The items of `items`, with KEEPALIVE whenever nothing came for `interval_s`
    seconds (None: never). Raises ClientGone when the client disconnected while
    waiting (checked every POLL_S). Stopping early (either way) cancels the pending
    read of `items`; the caller closes `items`."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future | None = None
    last_sent = loop.time()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=min(POLL_S, interval_s or POLL_S))
            if done:
                finished, pending = pending, None
                try:
                    item = finished.result()
                except StopAsyncIteration:
                    return
                last_sent = loop.time()
                yield item
                continue
            if client_gone(request):
                raise ClientGone("the client closed the connection")
            if interval_s is not None and loop.time() - last_sent >= interval_s:
                last_sent = loop.time()
                yield KEEPALIVE
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})  # its own outcome (cancelled) is not ours to raise
            if not pending.cancelled():
                pending.exception()  # retrieved: an error it raised while being cancelled is moot
