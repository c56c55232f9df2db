"""Back-pressure over HTTP: one real worker with `kvrouter serve --max-queue 1`.

While one slow streaming request holds the only slot, the OpenAI routes answer
429 with Retry-After and an OpenAI error body, and the Anthropic route answers
529 `overloaded_error`; once it ends, the server serves again. A request that
arrives right after a client dropped its stream (the router's slot is free, the
worker may still be winding the cancelled generation down and answer
RESOURCE_EXHAUSTED) is retried, never refused.

Prompts are short: the machine has 2 shared CPU cores.
"""

from __future__ import annotations

import json
import time
import urllib.request

import anthropic
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]
LONG_ANSWER = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--workers", "1", "--max-queue", "1", "--no-kv-cache", name="backpressure")


def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def ant(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", timeout=120, max_retries=0)


def open_stream(server, max_tokens: int):
    """A streaming chat request, read up to its first generated text (so it runs on the worker)."""
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                       "messages": LONG_ANSWER}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=120)
    while True:
        line = resp.readline().decode()
        assert line, "the stream ended before any text"
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return resp


def in_flight(server) -> int:
    with urllib.request.urlopen(server.url + "/v1/router/state", timeout=30) as resp:
        return sum(w["load"]["in_flight"] for w in json.loads(resp.read())["workers"])


def test_a_full_queue_is_429_openai_and_529_anthropic_then_serving_resumes(server):
    t0 = time.monotonic()
    slow = open_stream(server, max_tokens=200)
    try:
        with pytest.raises(openai.RateLimitError) as err:
            oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
        assert err.value.status_code == 429
        assert int(err.value.response.headers["Retry-After"]) >= 1
        error = err.value.response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["message"] and set(error) == {
            "message", "type", "param", "code"}

        with pytest.raises(openai.RateLimitError):  # the legacy completions route too
            oai(server).completions.create(model=MODEL, prompt="Hi", max_tokens=1)

        with pytest.raises(anthropic.APIStatusError) as aerr:
            ant(server).messages.create(model=MODEL, max_tokens=1, messages=HI)
        assert aerr.value.status_code == 529
        assert int(aerr.value.response.headers["Retry-After"]) >= 1
        body = aerr.value.response.json()
        assert body["type"] == "error" and body["error"]["type"] == "overloaded_error" and body["error"]["message"]
        assert in_flight(server) == 1  # refused requests took no slot
    finally:
        rest = slow.read().decode()
        slow.close()
    # the slow one was never disturbed: it ends normally
    events = [json.loads(ln[6:]) for ln in rest.splitlines() if ln.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop"), events[-1]
    assert rest.rstrip().endswith("data: [DONE]")
    # nothing was lost: the slot came back, the next requests succeed at once
    assert in_flight(server) == 0
    done = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert done.choices[0].finish_reason in ("length", "stop")
    msg = ant(server).messages.create(model=MODEL, max_tokens=2, messages=HI)
    assert msg.stop_reason in ("max_tokens", "end_turn")
    assert time.monotonic() - t0 < 45


def test_a_request_right_after_a_dropped_stream_is_served(server):
    """The router frees the slot as soon as the client goes; the worker needs a moment
    to stop the cancelled generation and may answer RESOURCE_EXHAUSTED meanwhile
    (its own --max-queue): the router retries instead of refusing."""
    for _ in range(3):
        slow = open_stream(server, max_tokens=200)
        slow.close()  # the client goes away mid-generation
        deadline = time.monotonic() + 10
        while in_flight(server) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert in_flight(server) == 0
        done = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
        assert done.choices[0].finish_reason in ("length", "stop")
