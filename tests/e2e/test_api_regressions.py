"""Regressions found by breaking the server on purpose: each test reproduces a
reported fault through the real server and default model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import anthropic
import openai
import pytest

from tests.support.prompts import long_system_prompt
from tests.support.server import openai_client as oa, SMALL_KV_FLAGS

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    return start_server("--kv-cache-dir", str(tmp_path_factory.mktemp("kv")), *SMALL_KV_FLAGS, name="regressions")




def test_a_client_that_drops_a_non_streaming_request_frees_the_worker(server):
    body = json.dumps({"model": MODEL, "max_tokens": 400, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        urllib.request.urlopen(req, timeout=1.5)
    time.sleep(1.5)  # the cancellation reaches the worker within a second
    log = server.log_path.read_text()
    assert "finish=cancelled" in log or "completion=400" not in log
    resp = oa(server).chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert resp.usage.completion_tokens == 2
    # 400 tokens at ~20 tokens/s would have taken ~20 s; the abandoned one was cancelled instead.
    assert "completion=400" not in server.log_path.read_text()


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
def test_any_int64_seed_is_accepted_and_deterministic(server, seed):
    ask = lambda: oa(server).chat.completions.create(  # noqa: E731
        model=MODEL, max_tokens=4, temperature=1.0, seed=seed, messages=[{"role": "user", "content": "Name a color."}])
    assert ask().choices[0].message.content == ask().choices[0].message.content


def test_anthropic_usage_counts_only_this_request(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    long = long_system_prompt(14, project="Mensa")
    client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": long}])
    short = client.messages.create(model=MODEL, max_tokens=2, system="Be brief.",
                                   messages=[{"role": "user", "content": "Yo"}])
    counted = client.messages.count_tokens(model=MODEL, system="Be brief.",
                                           messages=[{"role": "user", "content": "Yo"}]).input_tokens
    u = short.usage
    # The evict checkpoint of the previous conversation is not this request's creation.
    assert u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0) == counted


def test_a_stop_string_keeps_the_reported_reuse(server):
    msgs = [{"role": "user", "content": "Hi"}]
    oa(server).chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=msgs)
    plain = oa(server).chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=msgs)
    word = plain.choices[0].message.content.split()[1]
    stopped = oa(server).chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=msgs,
                                                 stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens_details.cached_tokens > 0


def test_unknown_paths_share_one_metrics_label(server):
    for i in range(5):
        try:
            urllib.request.urlopen(f"{server.url}/nope{i}", timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    assert "/nope" not in metrics
    assert 'endpoint="unmatched"' in metrics


def test_a_model_can_be_retrieved_by_id(server):
    assert oa(server).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oa(server).models.retrieve("no-such-model")


def test_completions_context_error_names_the_prompt_field(server):
    with pytest.raises(openai.BadRequestError) as err:
        oa(server).completions.create(model=MODEL, prompt=list(range(1, 9000)), max_tokens=1)
    assert err.value.body["param"] == "prompt"


def test_stream_null_means_not_streaming(server):
    body = json.dumps({"model": MODEL, "max_tokens": 2, "stream": None,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 2


def test_an_oversized_header_gets_a_protocol_error(server):
    big = {"x-kvrouter-namespace": "a" * 9000}
    with pytest.raises(openai.BadRequestError) as err:
        openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, default_headers=big
                      ).chat.completions.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["type"] == "invalid_request_error"
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, default_headers=big)
    with pytest.raises(anthropic.BadRequestError) as aerr:
        client.messages.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert aerr.value.body["type"] == "error" and aerr.value.body["error"]["type"] == "invalid_request_error"
