"""The protocol views as agent clients meet them, through a real router app over
in-memory fake workers (the router-worker process boundary) that serve a real
byte-level tokenizer: streams that start at acceptance, keep-alives, errors after
the start, Codex's context overflow as `response.failed`, Claude Code's request
(billing line, breakpoints on the wire, mid-conversation system message) and
`prompt_cache_key` routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvrouter.router.app import create_app
from kvrouter.router.cluster import Cluster
from kvrouter.router.config import RouterConfig
from kvrouter.router.prompting import ModelTokenizer
from kvrouter.router.worker_client import WorkerError
from tests.support.fake_worker import FakeWorkerClient
from tests.support.recorder import parse_sse
from tests.support.tiny_tokenizer import SMOLLM2_TEMPLATE, model_info

CAPTURES = Path(__file__).parent.parent / "support" / "captures"


class TokenizingFake(FakeWorkerClient):
    """A fake worker that reports the tiny byte-level tokenizer (one token per byte)."""

    def __init__(self, name: str, context_length: int = 65536, **kw):
        super().__init__(name, "tiny", **kw)
        self.context_length = context_length

    async def model_info(self, chat_template: str | None = None):
        from dataclasses import replace

        return replace(model_info(SMOLLM2_TEMPLATE, self.context_length), model_name="tiny", identity="id-tiny")


async def client_for(*workers, **config) -> TestClient:
    config = {"stream_keepalive_s": 0.05, "stream_idle_delta_s": 0.15, **config}
    app = create_app(RouterConfig(**config), cluster=Cluster(list(workers), None))
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def events_of(text: str) -> list[tuple[str | None, dict]]:
    """(event name, data) of an SSE body."""
    out = []
    for block in text.split("\n\n"):
        name = next((line[7:] for line in block.splitlines() if line.startswith("event: ")), None)
        data = parse_sse(block + "\n\n")
        if data:
            out.append((name, data[0]))
    return out


async def test_anthropic_stream_starts_at_once_with_pings_then_an_empty_delta_while_prefilling():
    slow = TokenizingFake("w0", prefill_tps=100, time_scale=1.0)  # about 0.5 s of "prefill" for this prompt
    client = await client_for(slow)
    try:
        resp = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 2, "stream": True,
                                                       "messages": [{"role": "user", "content": "x" * 40}]})
        assert resp.status == 200
        events = events_of(await resp.text())
    finally:
        await client.close()
    names = [n for n, _ in events]
    first = next(i for i, (n, d) in enumerate(events) if n == "content_block_delta" and d["delta"]["text"])
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    waiting = events[3:first]
    assert [n for n, _ in waiting].count("ping") >= 3
    empty = [d for n, d in waiting if n == "content_block_delta"]
    assert empty and all(d["delta"] == {"type": "text_delta", "text": ""} for d in empty)
    assert names[-1] == "message_stop"


@pytest.mark.parametrize("path,body,last", [
    ("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}, "error"),
    ("/v1/chat/completions", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}, None),
    ("/v1/responses", {"max_output_tokens": 3, "input": "hi"}, "response.failed"),
])
async def test_a_worker_failure_after_the_start_is_an_error_event(path, body, last):
    worker = TokenizingFake("w0")
    worker.fail_next, worker.fail_mid_stream = WorkerError, True
    client = await client_for(worker)
    try:
        resp = await client.post(path, json={"model": "tiny", "stream": True, **body})
        assert resp.status == 200  # the stream had started
        events = events_of(await resp.text())
    finally:
        await client.close()
    name, data = events[-1]
    if last == "error":
        assert name == "error" and data["error"]["type"] == "api_error"
    elif last == "response.failed":
        assert name == "response.failed" and data["response"]["status"] == "failed"
        assert data["response"]["error"]["message"]
    else:
        assert "error" in data and data["error"]["type"] == "api_error"
    assert not any(n in ("message_stop", "response.completed", "response.incomplete") for n, _ in events)


async def test_a_prompt_over_the_context_is_response_failed_for_a_codex_stream():
    client = await client_for(TokenizingFake("w0", context_length=64))
    try:
        body = {"model": "tiny", "input": "y" * 200, "max_output_tokens": 3}
        resp = await client.post("/v1/responses", json={**body, "stream": True})
        assert resp.status == 200
        events = events_of(await resp.text())
        assert [n for n, _ in events] == ["response.created", "response.failed"]
        assert events[1][1]["response"]["error"]["code"] == "context_length_exceeded"  # what Codex matches
        resp = await client.post("/v1/responses", json=body)  # not streaming: a plain 400
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "context_length_exceeded"
        resp = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "y" * 200}]})
        assert resp.status == 400
        assert (await resp.json())["error"]["message"].startswith("prompt is too long: ")
    finally:
        await client.close()


async def test_claude_codes_request_reaches_the_worker_normalised_with_its_hints():
    worker = TokenizingFake("w0")
    client = await client_for(worker)
    body = json.loads((CAPTURES / "claude_code_2.1.197.json").read_text())["body"]
    try:
        resp = await client.post("/v1/messages", json={**body, "model": "tiny", "max_tokens": 2})
        assert resp.status == 200
        assert resp.headers["x-kvrouter-route"].endswith("; normalised=billing-header")
        await resp.read()
        metrics = await (await client.get("/metrics")).text()
    finally:
        await client.close()
    sent = worker.requests[-1]
    tok = ModelTokenizer(model_info(SMOLLM2_TEMPLATE))
    assert "x-anthropic-billing-header" not in tok.decode(sent.prompt)
    assert tok.decode(sent.prompt[: sent.hint_tokens[0]]).endswith("Claude Agent SDK.")
    assert len(sent.hint_tokens) == 3 and sent.hint_tokens == tuple(sorted(sent.hint_tokens))
    assert 0 < sent.anchor_tokens < len(sent.prompt)
    assert sent.hint_tokens[1] < sent.anchor_tokens < sent.hint_tokens[2]  # system end, anchor, last user message
    assert 'hint="billing_header_removed"' in metrics and 'hint="cache_control"' in metrics


async def test_prompt_cache_key_brings_a_session_back_to_its_worker():
    from kvrouter.router.keys import DISPATCHER

    a, b = TokenizingFake("w0"), TokenizingFake("w1")
    client = await client_for(a, b)
    try:
        for turn in range(3):
            for key in ("session-1", "session-2"):
                resp = await client.post("/v1/responses", json={
                    "model": "tiny", "input": f"turn {turn} of {key}", "max_output_tokens": 1,
                    "prompt_cache_key": key})
                assert resp.status == 200
        metrics = await (await client.get("/metrics")).text()
        affinity = client.server.app[DISPATCHER].affinity
        tok = ModelTokenizer(model_info(SMOLLM2_TEMPLATE))
        for key in ("session-1", "session-2"):
            where = {w.name for w in (a, b) for r in w.requests if key in tok.decode(r.prompt)}
            assert where == {affinity.worker_for("tiny", "", key)}, (key, where)  # every turn on one worker
    finally:
        await client.close()
    assert 'hint="prompt_cache_key"' in metrics and 'hint="prompt_cache_key_routed"' in metrics
