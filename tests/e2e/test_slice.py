"""The end-to-end slice through the official `openai` client against a real
`kvrouter serve` on the default model: chat (plain and streaming), reuse of a
shared system prompt, reuse from disk after a restart, and bad input.

Output-equality case: the second request reuses a prefix that ends mid-chunk
(the shared prefix is ~950 tokens, chunks are 256), so its logits may differ
from an uncached run by ~3e-5; the test asserts the reference greedy run has a
top-2 logit margin above 1e-3 at every step, so no token can flip.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.support.prompts import long_system_prompt
from tests.support.reference import greedy_in_subprocess
from tests.support.server import openai_client as client, SMALL_KV_FLAGS, pid_alive

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
SYSTEM = long_system_prompt()
SESSION_A = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does rule 3 say?"}]
SESSION_B = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"}]
SESSION_C = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which rule is about the parser?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def servers(start_server, kv_dir):
    """A mutable holder: servers["cached"] is restarted by one test."""
    return {"cached": start_server("--kv-cache-dir", str(kv_dir), *SMALL_KV_FLAGS, name="cached")}




def chat(server, messages, **kw):
    return client(server).chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw
    )


def raw_post(server, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_lists_the_default_model(servers):
    models = client(servers["cached"]).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_returns_text_and_usage(servers):
    ref = greedy_in_subprocess(FRANCE, 20)
    resp = chat(servers["cached"], FRANCE, max_tokens=20)
    assert resp.choices[0].message.content == ref.text == "The capital of France is Paris."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == ref.prompt_tokens
    assert resp.usage.completion_tokens == len(ref.tokens)
    assert resp.usage.total_tokens == ref.prompt_tokens + len(ref.tokens)


def test_streaming_chat_completion_matches_and_reports_usage(servers):
    plain = chat(servers["cached"], FRANCE, max_tokens=5)
    stream = chat(servers["cached"], FRANCE, max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert text == plain.choices[0].message.content
    assert finishes == ["length"]
    assert len(usage) == 1
    assert usage[0].completion_tokens == 5 == plain.usage.completion_tokens
    assert usage[0].prompt_tokens == plain.usage.prompt_tokens


def test_shared_system_prompt_is_reused_with_identical_output(servers, start_server):
    server = servers["cached"]
    first = chat(server, SESSION_A)
    assert first.usage.prompt_tokens >= 700
    second = chat(server, SESSION_B)
    assert second.usage.prompt_tokens_details.cached_tokens >= 512

    ref = greedy_in_subprocess(SESSION_B, MAX_TOKENS)
    assert ref.min_margin > 1e-3, "pick a prompt without near-ties: a mid-chunk checkpoint could flip a token"
    uncached = start_server("--no-kv-cache", name="uncached")
    try:
        expected = chat(uncached, SESSION_B)
    finally:
        uncached.stop()
    assert expected.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == expected.choices[0].message.content == ref.text


def test_restart_reuses_the_checkpoint_from_disk(servers, start_server, kv_dir):
    old = servers["cached"]
    workers = list(old.worker_pids)
    assert workers, "serve should have started a worker process"
    assert old.stop() == 0
    assert not any(pid_alive(p) for p in workers), "a worker outlived kvrouter serve"
    servers["cached"] = start_server("--kv-cache-dir", str(kv_dir), *SMALL_KV_FLAGS, name="restarted")
    third = chat(servers["cached"], SESSION_C)
    # A fresh process has no live state: the reuse can only come from a disk checkpoint.
    assert third.usage.prompt_tokens_details.cached_tokens >= 512
    ref = greedy_in_subprocess(SESSION_C, MAX_TOKENS)
    assert ref.min_margin > 1e-3
    assert third.choices[0].message.content == ref.text


def test_malformed_json_is_a_400_error_object(servers):
    status, body = raw_post(servers["cached"], "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "JSON" in body["error"]["message"]


def test_missing_messages_is_a_400_naming_the_field(servers):
    with pytest.raises(openai.BadRequestError) as err:
        client(servers["cached"]).chat.completions.create(model=MODEL, messages=[])
    assert err.value.status_code == 400
    assert err.value.body["param"] == "messages"


def test_unknown_model_is_a_404(servers):
    with pytest.raises(openai.NotFoundError) as err:
        client(servers["cached"]).chat.completions.create(model="no-such-model", messages=FRANCE)
    assert "no-such-model" in err.value.body["message"]


def test_prompt_longer_than_context_is_a_400_with_both_lengths(servers):
    huge = "alpha beta gamma delta " * 2500  # ~10,000 tokens; the context is 8,192
    with pytest.raises(openai.BadRequestError) as err:
        chat(servers["cached"], [{"role": "user", "content": huge}])
    message = err.value.body["message"]
    assert "8192" in message
    prompt_len = int(message.split("the prompt is ")[1].split()[0])
    assert prompt_len > 8192
    assert err.value.body["code"] == "context_length_exceeded"


def test_server_still_answers_after_bad_input(servers):
    resp = chat(servers["cached"], FRANCE, max_tokens=3)
    assert resp.usage.completion_tokens == 3


def test_no_healthy_worker_is_a_503_then_the_worker_is_restarted(servers):
    server = servers["cached"]
    for pid in server.worker_pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    with pytest.raises(openai.InternalServerError) as err:
        while time.monotonic() < deadline:
            chat(server, FRANCE, max_tokens=2)
            time.sleep(0.2)
    assert err.value.status_code == 503
    assert err.value.body["type"] == "service_unavailable"
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    # The supervisor restarts the worker; the same router serves again.
    deadline = time.monotonic() + 120
    while True:
        try:
            resp = chat(server, FRANCE, max_tokens=2)
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
    assert resp.usage.completion_tokens == 2
    assert "restarted" in server.log_path.read_text()
