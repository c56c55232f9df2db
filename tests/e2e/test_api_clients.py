"""The client API through the official `openai` and `anthropic` packages and a
raw gRPC client, against one real `kvrouter serve` (default model) with API
keys, a ChatML chat template with Hermes-style tool calls, and the gRPC API.

Prompts are tiny and max_tokens small: the machine has 2 shared CPU cores.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import grpc
import openai
import pytest

from kvrouter_proto import router_pb2, router_pb2_grpc
from tests.support.server import free_port

MODEL = "SmolLM2-135M-Instruct"
TEMPLATE = Path(__file__).resolve().parents[1] / "support" / "chatml_tools.jinja"
HI = [{"role": "user", "content": "Hi"}]
KEYS = "sk-alice alice\nsk-bob bob\n"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEYS)
    grpc_port = free_port()
    s = start_server("--no-kv-cache", "--api-keys-file", str(keys), "--chat-template", str(TEMPLATE),
                     "--grpc-port", str(grpc_port), "--max-body-mb", "0.05", name="api")
    s.grpc_port = grpc_port
    return s


def oai(server, key="sk-alice", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=120, max_retries=0, **kw)


def ant(server, key="sk-bob", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, timeout=120, max_retries=0, **kw)


def post(server, path, body, headers=None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


# --- OpenAI chat ---------------------------------------------------------------------------------


def test_chat_plain_and_streaming_agree(server):
    plain = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0)
    chunks = list(oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.content and text == plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "length"
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [6]


def test_chat_stop_string_cuts_the_text_and_finishes_with_stop(server):
    full = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    stop = text.split()[1]  # the second word
    cut = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0,
                                                        stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]


def test_n_other_than_one_is_a_clear_400(server):
    with pytest.raises(openai.BadRequestError) as err:
        oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=2, n=2)
    assert err.value.body["param"] == "n"


def test_ignored_fields_real_clients_send_are_accepted(server):
    r = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=1, user="u", metadata={"a": "b"},
                                            parallel_tool_calls=True, store=False)
    assert r.usage.completion_tokens == 1


# --- tools -------------------------------------------------------------------------------------

def _call(city: str, i: int) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


# Few-shot: the 135M model copies the call pattern (greedy: 28 tokens, then end of turn).
FEW_SHOT = [
    {"role": "system", "content": "Call get_weather for every weather question."},
    {"role": "user", "content": "Weather in Rome?"},
    _call("Rome", 1),
    {"role": "user", "content": "Weather in Oslo?"},
    _call("Oslo", 2),
    {"role": "user", "content": "Weather in Paris?"},
]


def test_tool_call_is_parsed_from_the_template_syntax_openai(server):
    r = oai(server).chat.completions.create(model=MODEL, messages=FEW_SHOT, tools=[WEATHER], max_tokens=32,
                                            temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "<tool_call>" not in (choice.message.content or "")
    # Round trip: the call and its result go back through the template.
    follow = FEW_SHOT + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "21C"}]
    again = oai(server).chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=4,
                                                temperature=0)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens


def test_tool_call_streamed_as_tool_calls_delta(server):
    chunks = list(oai(server).chat.completions.create(model=MODEL, messages=FEW_SHOT, tools=[WEATHER],
                                                      max_tokens=32, temperature=0, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert "<tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def anthropic_few_shot():
    """FEW_SHOT in Anthropic's shape (system, tool_use and tool_result blocks)."""
    msgs = []
    for m in FEW_SHOT[1:]:
        if m["role"] == "assistant" and "tool_calls" in m:
            c = m["tool_calls"][0]
            msgs.append({"role": "assistant", "content": [{"type": "tool_use", "id": c["id"], "name": "get_weather",
                                                           "input": json.loads(c["function"]["arguments"])}]})
        elif m["role"] == "tool":
            msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": m["tool_call_id"],
                                                      "content": m["content"], "cache_control": {"type": "ephemeral"}}]})
        else:
            msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


ANT_TOOL = {"name": "get_weather", "description": "Current weather of a city",
            "input_schema": WEATHER["function"]["parameters"]}


def test_anthropic_tools_render_like_openai_and_tool_use_comes_back(server):
    system = FEW_SHOT[0]["content"]
    count = ant(server).messages.count_tokens(model=MODEL, system=system, messages=anthropic_few_shot(),
                                              tools=[ANT_TOOL])
    openai_prompt = oai(server).chat.completions.create(model=MODEL, messages=FEW_SHOT, tools=[WEATHER],
                                                       max_tokens=1).usage.prompt_tokens
    assert count.input_tokens == openai_prompt  # the same conversation renders to the same tokens
    m = ant(server).messages.create(model=MODEL, system=system, messages=anthropic_few_shot(), tools=[ANT_TOOL],
                                    max_tokens=32, extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}


# --- completions and responses ----------------------------------------------------------------------


def test_completions_text_and_token_ids_and_streaming(server):
    c = oai(server)
    text = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert text.choices[0].text and text.usage.completion_tokens == 4
    ids = c.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 5
    chunks = list(c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == text.choices[0].text
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)


def test_responses_plain_and_streaming(server):
    c = oai(server)
    r = c.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=5, temperature=0)
    assert r.output_text and r.usage.output_tokens == 5 and r.status == "incomplete"
    events = list(c.responses.create(model=MODEL, input=[{"role": "user", "content": "Hi"}],
                                     instructions="Be brief.", max_output_tokens=5, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert types[-1] == "response.incomplete" and events[-1].response.usage.output_tokens == 5
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_previous_response_id_is_a_clear_400(server):
    with pytest.raises(openai.BadRequestError) as err:
        oai(server).responses.create(model=MODEL, input="Hi", previous_response_id="resp_x")
    assert err.value.body["param"] == "previous_response_id"


# --- Anthropic messages ---------------------------------------------------------------------------


def test_messages_plain_and_stream_event_sequence(server):
    plain = ant(server).messages.create(model=MODEL, max_tokens=5, system=[{"type": "text", "text": "Be brief."}],
                                        messages=HI, metadata={"user_id": "u"}, extra_body={"temperature": 0},
                                        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert plain.stop_reason == "max_tokens" and plain.usage.output_tokens == 5
    assert plain.usage.cache_read_input_tokens is not None and plain.usage.cache_creation_input_tokens == 0
    with ant(server).messages.stream(model=MODEL, max_tokens=5, system="Be brief.", messages=HI,
                                     extra_body={"temperature": 0}) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == plain.content[0].text
    for needed in ("message_start", "content_block_start", "content_block_delta", "content_block_stop",
                   "message_delta", "message_stop"):
        assert needed in events
    assert events[0] == "message_start" and events[-1] == "message_stop"


def test_messages_usage_reports_cache_reads(server):
    first = ant(server).messages.create(model=MODEL, max_tokens=1, system="Be brief.", messages=HI)
    second = ant(server).messages.create(model=MODEL, max_tokens=1, system="Be brief.", messages=HI)
    # The worker's live state holds the same prompt: the second request reads it.
    assert second.usage.cache_read_input_tokens > 0
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == \
        first.usage.input_tokens + first.usage.cache_read_input_tokens


def test_messages_stop_sequences(server):
    full = ant(server).messages.create(model=MODEL, max_tokens=8, messages=HI, extra_body={"temperature": 0})
    text = full.content[0].text
    stop = text.split()[1]
    cut = ant(server).messages.create(model=MODEL, max_tokens=8, messages=HI, stop_sequences=[stop],
                                      extra_body={"temperature": 0})
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_anthropic_errors_use_anthropic_format(server):
    with pytest.raises(anthropic.NotFoundError) as err:
        ant(server).messages.create(model="nope", max_tokens=2, messages=HI)
    assert err.value.body["error"]["type"] == "not_found_error"
    status, _, body = post(server, "/v1/messages", {"model": MODEL, "messages": HI}, {"x-api-key": "sk-bob"})
    assert status == 400 and body["type"] == "error" and "max_tokens" in body["error"]["message"]
    status, _, body = post(server, "/v1/messages", b"x" * 100_000, {"x-api-key": "sk-bob"})
    assert status == 413 and body["error"]["type"] == "request_too_large"
    status, _, body = post(server, "/v1/chat/completions", b"x" * 100_000, {"authorization": "Bearer sk-bob"})
    assert status == 413 and body["error"]["type"] == "request_too_large"


# --- keys and namespaces --------------------------------------------------------------------------


def test_missing_key_is_401_in_each_format(server):
    with pytest.raises(openai.AuthenticationError):
        oai(server, key="wrong").models.list()
    with pytest.raises(anthropic.AuthenticationError) as err:
        ant(server, key="wrong").messages.create(model=MODEL, max_tokens=1, messages=HI)
    assert err.value.body["error"]["type"] == "authentication_error"


def test_each_key_has_its_own_cache_namespace(server):
    """Case C9 through the API: same prompt, other key: no reuse, whatever namespace header it sends."""
    msgs = [{"role": "user", "content": "Name a color."}]

    def cached(key, ns=None):
        headers = {"x-kvrouter-namespace": ns} if ns else None
        r = oai(server, key=key).chat.completions.create(model=MODEL, messages=msgs, max_tokens=1,
                                                         extra_headers=headers)
        return r.usage.prompt_tokens_details.cached_tokens

    cached("sk-alice")
    alice = cached("sk-alice")
    assert alice > 0  # positive control: same key, same namespace reuses the live state
    # Bob may reuse his own earlier requests' shared chat-template prefix, never Alice's state.
    assert cached("sk-bob") < alice
    assert cached("sk-bob", ns="alice") < alice
    assert cached("sk-alice", ns="team") == 0
    assert cached("sk-alice", ns="team") > 0


# --- gRPC ---------------------------------------------------------------------------------------


def test_grpc_client_streams_a_completion(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        md = [("authorization", "Bearer sk-alice")]
        models = stub.ListModels(router_pb2.ListModelsRequest(), metadata=md, timeout=30)
        assert [m.id for m in models.models] == [MODEL]
        req = router_pb2.GenerateRequest(model=MODEL, max_tokens=5, temperature=0, messages=router_pb2.Messages(
            messages=[router_pb2.ChatMessage(role="user", content="Hi")]))
        replies = list(stub.Generate(req, metadata=md, timeout=60))
        text = "".join(r.delta.text for r in replies if r.HasField("delta"))
        final = replies[-1].final
        assert final.finish_reason == "length" and final.usage.completion_tokens == 5
        plain = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0)
        assert text == plain.choices[0].message.content
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(router_pb2.GenerateRequest(model="nope", prompt="x"), metadata=md, timeout=30))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- disconnect ---------------------------------------------------------------------------------


def test_client_that_closes_a_stream_frees_the_worker(server):
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2000, "stream": True,
                       "temperature": 0}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                         "Authorization": "Bearer sk-alice"})
    resp = conn.getresponse()
    events = 0
    while events < 3:
        if resp.readline().startswith(b"data:"):
            events += 1
    conn.sock.close()  # abandon 2000 tokens (~100 s of decoding) after 3 events
    conn.close()
    t0 = time.monotonic()
    # Greedy, as the abandoned stream: sampled at temperature 1 the model may end after one token.
    r = oai(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    # Waiting for the abandoned generation would take ~100 s (2000 tokens); 40 s leaves room
    # for a busy machine (15 s failed once with the whole suite on two cores).
    assert time.monotonic() - t0 < 40, "the next request waited for the abandoned generation"
