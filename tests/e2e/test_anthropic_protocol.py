"""The Anthropic Messages protocol as Claude Code relies on it, with the official
`anthropic` client against a real `kvrouter serve` (default model):

- a system message in the middle of `messages` (Claude Code sends one after the
  user turn) is rendered as a system turn;
- error texts worded as the Anthropic API's: an unexpected role, a prompt that is
  too long, overload;
- a stream starts at once: `message_start` and keep-alive `ping`s arrive while
  the worker is still prefilling, before the first token, and an empty text delta
  when only pings went out for a while (Claude Code's watchdog ignores pings);
- a client that disconnects before the first token frees the worker's slot.

The server takes one request at a time (`--max-queue 1`) so overload is easy to
cause, sends a keep-alive every second and an empty text delta after 2 s of pings.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import anthropic
import grpc
import pytest

from kvrouter_proto import worker_pb2, worker_pb2_grpc
from tests.support.server import KvrouterServer

MODEL = "SmolLM2-135M-Instruct"
SLOT_FREED_WITHIN_S = 10


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> KvrouterServer:
    return start_server("--max-queue", "1", "--stream-keepalive-s", "1", "--stream-idle-delta-s", "2",
                        "--kv-cache-dir", str(tmp_path_factory.mktemp("kv")), name="anthropic-protocol")


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=600)


def long_text(seed: str, lines: int) -> str:
    """Text of about 19 tokens a line that no other test sends (so nothing is reused)."""
    return "\n".join(f"{seed} record {i}: the value is {i * 7919 % 10007} units" for i in range(lines))


def router_state(server) -> dict:
    with urllib.request.urlopen(server.url + "/v1/router/state", timeout=10) as resp:
        return json.load(resp)


def worker_queue_depth(server) -> int:
    address = router_state(server)["workers"][0]["address"]
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetStatus(worker_pb2.StatusRequest(), timeout=10).queue_depth


def test_mid_conversation_system_message_is_a_system_turn(client, server):
    from tests.support.agent_clients import served_tokenizer

    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Answer in one word."}]
    m = client.messages.create(model=MODEL, max_tokens=4, messages=messages)
    assert m.role == "assistant" and m.content
    # the default template has no system message of its own here: it adds its default one
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>system\nAnswer in one word.<|im_end|>\n"
                "<|im_start|>assistant\n")
    n = len(served_tokenizer(server.url).encode(expected))
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == n
    counted = client.messages.count_tokens(model=MODEL, messages=messages)
    assert counted.input_tokens == n


def test_error_texts_are_the_anthropic_apis(client):
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}])
    text = err.value.body["error"]["message"]
    assert "Unexpected role" in text and "input message role" in text  # what Claude Code's fallback matches
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": long_text("overflow", 500)}])
    text = err.value.body["error"]["message"]
    m = re.search(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", text, re.I)  # Claude Code's pattern
    assert m is not None, text
    assert int(m.group(1)) > int(m.group(2)) == 8191


def stream_events(client, messages, max_tokens: int = 4, stop_after=None):
    """[(seconds since the request, event name, data)] of a raw stream; `stop_after(events)`
    returning True closes the connection there."""
    events = []
    t0 = time.perf_counter()
    with client.messages.with_streaming_response.create(model=MODEL, max_tokens=max_tokens, messages=messages,
                                                        stream=True) as resp:
        name = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((time.perf_counter() - t0, name, json.loads(line[6:])))
                if stop_after is not None and stop_after(events):
                    break
    return events


def is_token(event) -> bool:
    _, name, data = event
    return name == "content_block_delta" and data["delta"].get("text") != ""


def test_message_start_and_pings_arrive_before_the_first_token(client):
    events = stream_events(client, [{"role": "user", "content": long_text("slow", 80)}])
    names = [e[1] for e in events]
    first = next(i for i, e in enumerate(events) if is_token(e))
    assert names[0] == "message_start"
    waiting = events[:first]
    assert sum(1 for _, n, _ in waiting if n == "ping") >= 2, names[:first]  # at the start, then every second
    # only pings for 2 s: an empty text delta too (an event Claude Code's watchdog counts), which adds no text
    empty = [t for t, n, d in waiting if n == "content_block_delta"]
    assert empty and all(d["delta"] == {"type": "text_delta", "text": ""} for _, n, d in waiting
                         if n == "content_block_delta")
    assert events[0][0] < events[first][0] - 1.0
    assert events[-1][1] == "message_stop"


def test_disconnect_before_the_first_token_frees_the_worker_slot(client, server):
    prompt = [{"role": "user", "content": long_text("abandoned", 350)}]  # about 6,600 tokens: a long prefill

    def stop(events):
        if [n for _, n, _ in events].count("ping") < 2:
            return False
        # the request holds the only slot: another one is refused as the Anthropic API refuses it
        assert router_state(server)["workers"][0]["load"]["in_flight"] == 1
        assert worker_queue_depth(server) == 1
        with pytest.raises(anthropic.APIStatusError) as err:
            client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert err.value.status_code == 529
        assert err.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return True

    events = stream_events(client, prompt, stop_after=stop)
    assert "content_block_delta" not in [n for _, n, _ in events]
    deadline = time.monotonic() + SLOT_FREED_WITHIN_S
    while time.monotonic() < deadline:
        if worker_queue_depth(server) == 0 and router_state(server)["workers"][0]["load"]["in_flight"] == 0:
            break
        time.sleep(0.25)
    assert worker_queue_depth(server) == 0, "the abandoned prefill still holds the worker"
    assert router_state(server)["workers"][0]["load"]["in_flight"] == 0
    m = client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert m.content  # served at once: nothing left running
