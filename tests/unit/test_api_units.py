"""Unit tests of the client API's pure parts: stop strings, tool-call parsing
(mlx-lm's parsers), API keys and namespaces (case C9), error formats."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from kvrouter.router.app import error_middleware
from kvrouter.router.auth import ApiKeys, authorize, make_namespace
from kvrouter.router.errors import BadRequest, ContextTooLong, Overloaded, PayloadTooLarge, Unauthorized, UnexpectedRole
from kvrouter.router.keys import METRICS, ROUTER_CONFIG
from kvrouter.router.config import RouterConfig
from kvrouter.router.metrics import create_metrics
from kvrouter.router.views.generation import StopMatcher, parse_stop
from kvrouter.router.views.tools import ToolCallSplitter, split_text, tool_syntax

def feed_all(m: StopMatcher, pieces):
    out, hit = [], None
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            break
    else:
        out.append(m.flush())
    return "".join(out), hit


def test_stop_string_split_across_pieces_is_found_and_never_emitted():
    m = StopMatcher(("END",))
    assert m.feed("abc E") == ("abc ", None)  # "E" held back
    assert m.feed("N") == ("", None)
    assert m.feed("D tail") == ("", "END")


def test_held_back_text_is_released_when_the_stop_string_does_not_follow():
    m = StopMatcher(("END",))
    assert m.feed("xE") == ("x", None)
    assert m.feed("X") == ("EX", None)
    assert feed_all(StopMatcher(("END",)), ["a", "E", "N"]) == ("aEN", None)


def test_earliest_of_several_stop_strings_wins():
    assert feed_all(StopMatcher(("world", "o w")), ["hello world"]) == ("hell", "o w")


def test_parse_stop_validates_types():
    assert parse_stop("x", "stop") == ("x",)
    assert parse_stop(None, "stop") == ()
    for bad in (5, [1], ["a"] * 17, {"a": 1}):
        with pytest.raises(BadRequest):
            parse_stop(bad, "stop")


def test_tool_calls_are_split_from_content():
    syntax = tool_syntax("json_tools")
    text = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    content, calls = split_text(syntax, None, text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_streamed_tool_call_marker_split_across_pieces_is_held_back():
    splitter = ToolCallSplitter(tool_syntax("json_tools"), None)
    emitted = [splitter.feed(p) for p in ["Hi <tool", '_call>{"name": "f", ', '"arguments": {}}</tool_call>']]
    rest, calls = splitter.finish()
    assert "".join(emitted) + rest == "Hi "
    assert [c.name for c in calls] == ["f"]


def test_tool_parsers_are_mlx_lm_s_own_modules():
    syntax = tool_syntax("json_tools")
    assert (syntax.start, syntax.end) == ("<tool_call>", "</tool_call>")
    module = syntax.parse.__module__
    assert Path(sys.modules[module].__file__).parent.name == "tool_parsers"  # mlx-lm's file, not a copy
    assert Path(sys.modules[module].__file__).parent.parent.name == "mlx_lm"
    assert tool_syntax("") is None  # the worker found no tool-call syntax in the template
    assert tool_syntax("no_such_parser") is None  # a worker's mlx-lm knows a parser ours lacks


def test_unparsable_tool_call_text_stays_content():
    content, calls = split_text(tool_syntax("json_tools"), None, "<tool_call>not json</tool_call>")
    assert calls == []
    assert "not json" in content


def test_keys_file_format():
    keys = ApiKeys.parse("sk-a alice\n# comment\n\nsk-b   bob smith  # trailing\nsk-c\n")
    assert keys.name_of("sk-a") == "alice"
    assert keys.name_of("sk-b") == "bob smith"
    assert keys.name_of("sk-c").startswith("key-") and "sk-c" not in keys.name_of("sk-c")
    assert keys.name_of("sk-x") is None and keys.name_of(None) is None
    with pytest.raises(ValueError):
        ApiKeys.parse("# nothing\n")
    with pytest.raises(ValueError):
        ApiKeys.parse("k a\nk b\n")


def test_namespaces_never_collide_across_keys_or_client_values():
    """Case C9: a client-supplied namespace cannot name another key's namespace."""
    keys = ApiKeys.parse("sk-a alice\nsk-b bob\n")
    alice = authorize(keys, {"authorization": "Bearer sk-a"})
    bob = authorize(keys, {"x-api-key": "sk-b"})
    assert alice != bob
    forged = {authorize(keys, {"x-api-key": "sk-b", "x-kvrouter-namespace": v})
              for v in ["alice", alice, '"alice"', 'alice",""', "kvr1:" + alice]}
    assert alice not in forged
    assert authorize(keys, {"authorization": "Bearer sk-a"}) == alice  # same key: same namespace
    assert authorize(keys, {"authorization": "Bearer sk-a", "x-kvrouter-namespace": "t"}) != alice
    # Without keys: no header is the shared "" namespace; a header cannot produce a keyed namespace.
    assert authorize(None, {}) == ""
    assert authorize(None, {"x-kvrouter-namespace": "alice"}) not in (alice, bob, "")
    assert make_namespace(None, "a") != make_namespace("a", "")


def test_missing_or_wrong_key_is_unauthorized():
    keys = ApiKeys.parse("sk-a alice\n")
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic sk-a"}):
        with pytest.raises(Unauthorized):
            authorize(keys, headers)
    with pytest.raises(BadRequest):
        authorize(None, {"x-kvrouter-namespace": "x" * 500})


async def _render(path: str, exc: Exception) -> web.Response:
    app = web.Application()
    app[METRICS] = create_metrics()
    app[ROUTER_CONFIG] = RouterConfig()

    async def handler(request):
        raise exc

    return await error_middleware(make_mocked_request("POST", path, app=app), handler)


async def test_overload_is_openai_429_with_retry_after_and_anthropic_529():
    resp = await _render("/v1/chat/completions", Overloaded("queue full", retry_after_s=3))
    assert resp.status == 429 and resp.headers["Retry-After"] == "3"
    assert json.loads(resp.body)["error"]["type"] == "rate_limit_error"
    resp = await _render("/v1/messages", Overloaded("queue full"))
    assert resp.status == 529 and "Retry-After" in resp.headers
    # the Anthropic API's own body: clients match its type (and Claude Code its text)
    assert json.loads(resp.body) == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


async def test_context_and_role_errors_are_worded_as_each_api():
    resp = await _render("/v1/messages", ContextTooLong(9000, 8192))
    assert resp.status == 400
    err = json.loads(resp.body)["error"]
    assert err == {"type": "invalid_request_error", "message": "prompt is too long: 9000 tokens > 8191 maximum"}
    # the pattern Claude Code reads both numbers with, before it compacts its history
    m = re.search(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", err["message"], re.I)
    assert m and m.groups() == ("9000", "8191")
    resp = await _render("/v1/chat/completions", ContextTooLong(9000, 8192))
    assert resp.status == 400 and json.loads(resp.body)["error"]["code"] == "context_length_exceeded"
    resp = await _render("/v1/messages", UnexpectedRole(2, "tool"))
    message = json.loads(resp.body)["error"]["message"]
    assert resp.status == 400 and "Unexpected role" in message and "input message role" in message


async def test_anthropic_paths_get_anthropic_error_bodies():
    resp = await _render("/v1/messages/count_tokens", PayloadTooLarge("too big"))
    assert resp.status == 413
    assert json.loads(resp.body)["error"]["type"] == "request_too_large"
    resp = await _render("/v1/messages", BadRequest("bad", param="x"))
    assert json.loads(resp.body) == {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    resp = await _render("/v1/messagesX", BadRequest("bad", param="x"))
    assert json.loads(resp.body)["error"]["param"] == "x"  # not an Anthropic path: OpenAI format


async def test_unexpected_exception_is_a_500_in_the_protocol_format():
    resp = await _render("/v1/messages", KeyError("boom"))
    assert resp.status == 500
    assert json.loads(resp.body)["error"]["type"] == "api_error"


def test_odd_json_bodies_are_400_not_500():
    from kvrouter.router.views.common import decode_json

    assert decode_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a paired surrogate is fine
    for raw in (b"[" * 100_000, b'{"a": 1', b'{"a": "\\ud800"}', b"1" * 5000, b"\xff"):
        with pytest.raises(BadRequest):
            decode_json(raw)


async def test_event_streams_frame_data_named_events_keepalives_and_done(monkeypatch):
    """The SSE helpers every stream uses (aiohttp-sse underneath): `data:` lines,
    `event:` names, ": ping" comments while a stream waits, `[DONE]` last."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from kvrouter.router.views import common

    monkeypatch.setattr(common, "KEEPALIVE_S", 0.05)

    async def handler(request):
        resp = common.sse_response("w0:hit")
        await resp.prepare(request)
        await common.send_event(resp, {"a": "x\ny"})
        await asyncio.sleep(0.2)  # a slow token: keep-alive comments go out meanwhile
        await common.send_event(resp, {"type": "message_stop"}, "message_stop")
        await common.end_stream(resp, done_marker=True)
        return resp

    app = web.Application()
    app.router.add_post("/s", handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/s")
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["x-kvrouter-route"] == "w0:hit"
        body = (await resp.read()).decode()
    events = body.split("\n\n")
    assert ": ping" in events
    assert [e for e in events if e != ": ping"] == [
        'data: {"a": "x\\ny"}', 'event: message_stop\ndata: {"type": "message_stop"}', "data: [DONE]", ""]
