"""router.views.streaming: keep-alives while a stream waits, and a client that leaves
while its stream waits (the work behind it is cancelled)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kvrouter.router.views.streaming import KEEPALIVE, ClientGone, paced


class Transport:
    def __init__(self):
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


async def slow_items(events: list, first_after_s: float):
    try:
        await asyncio.sleep(first_after_s)  # a long prefill
        yield "token"
        yield "more"
    finally:
        events.append("closed")  # the generation was ended (a worker call would be cancelled here)


async def test_keepalives_until_the_first_item_then_items():
    request = SimpleNamespace(transport=Transport())
    events: list = []
    got = [item async for item in paced(slow_items(events, 0.35), request, 0.1)]
    assert got.count(KEEPALIVE) >= 2 and got[-2:] == ["token", "more"]
    assert got.index("token") == len(got) - 2  # keep-alives only while nothing came


async def test_a_client_gone_while_waiting_ends_the_stream_and_cancels_the_work():
    transport = Transport()
    request = SimpleNamespace(transport=transport)
    events: list = []
    items = slow_items(events, 60)
    got = []

    async def consume():
        async for item in paced(items, request, 0.05):
            got.append(item)
            if len(got) == 2:
                transport.closing = True  # the client closed its connection

    with pytest.raises(ClientGone):
        await asyncio.wait_for(consume(), 5)
    assert got == [KEEPALIVE, KEEPALIVE] and events == ["closed"]  # not 60 s later: cancelled at once
    request.transport = None  # aiohttp drops the transport once the connection is lost
    with pytest.raises(ClientGone):
        await asyncio.wait_for(anext(paced(slow_items([], 60), request, 5)), 5)
