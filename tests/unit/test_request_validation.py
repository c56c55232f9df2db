"""Request bodies (pydantic models) and the one translation of their errors into
BadRequest: a bad field of each kind gives the documented text and `param`, in
the protocol's own error format; fields real clients send and we ignore pass."""

from __future__ import annotations

import json

import pytest

from kvrouter.router.errors import BadRequest
from kvrouter.router.views.anthropic import parse_messages_request
from kvrouter.router.views.completions import parse_completion_request
from kvrouter.router.views.openai_request import parse_chat_request, parse_messages
from kvrouter.router.views.responses import parse_responses_request

HI = [{"role": "user", "content": "Hi"}]
CHAT = {"model": "m", "messages": HI}
COMPLETION = {"model": "m", "prompt": "Hi"}
RESPONSES = {"model": "m", "input": "Hi"}
MESSAGES = {"model": "m", "max_tokens": 5, "messages": HI}


def chat(body):
    return parse_chat_request(body, 16)


def completion(body):
    return parse_completion_request(body, 16, None)


def responses(body):
    return parse_responses_request(body, 16, None)


def messages(body):
    return parse_messages_request(body, None)


def count_tokens(body):
    return parse_messages_request(body, None, count_only=True)


CASES = [
    # (parse, body, text, param)
    (chat, [1], "the request body must be a JSON object", None),
    (chat, {"messages": HI}, "'model' is required and must be a string", "model"),
    (chat, {"model": "", "messages": HI}, "'model' is required and must be a string", "model"),
    (chat, {"model": "m", "messages": []}, "'messages' must be a non-empty array", "messages"),
    (chat, {"model": "m"}, "'messages' must be a non-empty array", "messages"),
    (chat, {"model": "m", "messages": ["Hi"]}, "messages[0] must be an object", "messages[0]"),
    (chat, {"model": "m", "messages": [{"role": "bot", "content": "x"}]},
     "messages[0].role: 'bot' is not supported here (expected one of 'system', 'developer', 'user', 'assistant', "
     "'tool')", "messages[0].role"),
    (chat, {"model": "m", "messages": [{"role": "user"}]}, "messages[0].content is required", "messages[0].content"),
    (chat, {"model": "m", "messages": [{"role": "user", "content": 5}]},
     "messages[0].content must be a string or a list of parts", "messages[0].content"),
    (chat, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type: only text parts are supported", "messages[0].content[0].type"),
    (chat, {"model": "m", "messages": [{"role": "assistant", "tool_calls": {}}]},
     "messages[0].tool_calls must be an array", "messages[0].tool_calls"),
    (chat, {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 1}}]}]},
     "messages[0].tool_calls[0].function.arguments must be a JSON string or an object",
     "messages[0].tool_calls[0].function.arguments"),
    (chat, {"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]},
     "messages[0].tool_call_id must be a string", "messages[0].tool_call_id"),
    (chat, {**CHAT, "n": 2}, "only n=1 is supported", "n"),
    (chat, {**CHAT, "n": 0}, "'n' must be between 1 and 128, got 0", "n"),
    (chat, {**CHAT, "max_tokens": 1.5}, "'max_tokens' must be an integer", "max_tokens"),
    (chat, {**CHAT, "max_tokens": True}, "'max_tokens' must be an integer", "max_tokens"),
    (chat, {**CHAT, "max_completion_tokens": 0}, "'max_completion_tokens' must be between 1 and 2147483648, got 0",
     "max_completion_tokens"),
    (chat, {**CHAT, "temperature": "0"}, "'temperature' must be a number", "temperature"),
    (chat, {**CHAT, "temperature": 3}, "'temperature' must be between 0 and 2, got 3", "temperature"),
    (chat, {**CHAT, "top_p": 1.5}, "'top_p' must be between 0 and 1, got 1.5", "top_p"),
    (chat, {**CHAT, "seed": 2**63}, f"'seed' must be between {-(2**63)} and {2**63 - 1}, got {2**63}", "seed"),
    (chat, {**CHAT, "stream": "yes"}, "'stream' must be a boolean", "stream"),
    (chat, {**CHAT, "stream_options": []}, "'stream_options' must be an object", "stream_options"),
    (chat, {**CHAT, "stream_options": {"include_usage": 1}}, "'stream_options.include_usage' must be a boolean",
     "stream_options.include_usage"),
    (chat, {**CHAT, "stop": 5}, "'stop' must be a string or an array of strings", "stop"),
    (chat, {**CHAT, "stop": ["a"] * 17}, "'stop' takes at most 16 strings", "stop"),
    (chat, {**CHAT, "stop": ["a" * 257]}, "each 'stop' string must be at most 256 characters", "stop"),
    (chat, {**CHAT, "tools": {}}, "'tools' must be an array", "tools"),
    (chat, {**CHAT, "tools": [{"type": "function", "function": {"name": ""}}]},
     "tools[0].function.name must not be empty", "tools[0].function.name"),
    (chat, {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools[0].function.parameters must be an object", "tools[0].function.parameters"),
    (chat, {**CHAT, "tool_choice": "any"}, "'tool_choice' must be 'none', 'auto', 'required' or an object naming a tool",
     "tool_choice"),
    (completion, {"model": "m"}, "'prompt' must be a non-empty string or a non-empty array of token ids", "prompt"),
    (completion, {"model": "m", "prompt": ""}, "'prompt' must be a non-empty string or a non-empty array of token ids",
     "prompt"),
    (completion, {"model": "m", "prompt": ["a", "b"]}, "only one prompt per request is supported", "prompt"),
    (completion, {"model": "m", "prompt": [1, "a"]}, "prompt[1] must be an integer", "prompt[1]"),
    (completion, {**COMPLETION, "best_of": 3}, "only best_of=1 is supported", "best_of"),
    (completion, {**COMPLETION, "echo": True}, "'echo' is not supported", "echo"),
    (completion, {**COMPLETION, "logprobs": 2}, "'logprobs' is not supported", "logprobs"),
    (responses, {**RESPONSES, "previous_response_id": "resp_1"},
     "previous_response_id is not supported: responses are not stored; send the whole conversation in 'input'",
     "previous_response_id"),
    (responses, {"model": "m", "input": []}, "'input' must be a string or a non-empty array of items", "input"),
    (responses, {**RESPONSES, "instructions": ["x"]}, "'instructions' must be a string", "instructions"),
    (responses, {"model": "m", "input": [{"role": "tool", "content": "x"}]},
     "input[0].role must be one of user, system, developer, assistant", "input[0].role"),
    (responses, {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0].type: only text parts (input_text, output_text) are supported", "input[0].content[0].type"),
    (responses, {"model": "m", "input": [{"type": "function_call", "name": "f"}]},
     "input[0].call_id is required", "input[0].call_id"),
    (responses, {"model": "m", "input": [{"type": "computer_call"}]},
     "input[0].type: 'computer_call' is not supported here (expected one of 'message', 'function_call', "
     "'function_call_output', 'reasoning')", "input[0].type"),
    (responses, {**RESPONSES, "tools": [{"type": "function", "name": ""}]}, "tools[0].name must be a non-empty string",
     "tools[0].name"),
    (responses, {**RESPONSES, "max_output_tokens": 0}, "'max_output_tokens' must be between 1 and 2147483648, got 0",
     "max_output_tokens"),
    (messages, {"max_tokens": 5, "messages": HI}, "model: field required (a string)", "model"),
    (messages, {"model": "m", "max_tokens": 5, "messages": []}, "messages: must be a non-empty array", "messages"),
    (messages, {"model": "m", "messages": HI}, "max_tokens: field required", "max_tokens"),
    (messages, {**MESSAGES, "max_tokens": "5"}, "'max_tokens' must be an integer", "max_tokens"),
    (messages, {**MESSAGES, "messages": [{"role": "tool", "content": "x"}]},
     # the Anthropic API's wording: Claude Code matches "Unexpected role" ... "input message role"
     'messages.0: Unexpected role "tool". The Messages API accepts "user" and "assistant" (and "system" '
     'mid-conversation) as an input message role.', "messages[0].role"),
    (messages, {**MESSAGES, "messages": [{"role": "user", "content": 5}]},
     "messages[0].content must be a string or an array of content blocks", "messages[0].content"),
    (messages, {**MESSAGES, "messages": [{"role": "user", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
     "messages[0].content[0].type: 'tool_use' is not supported here (expected one of 'text', 'tool_result', "
     "'thinking', 'redacted_thinking')", "messages[0].content[0].type"),
    (messages, {**MESSAGES, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages[0].content[0].type is required", "messages[0].content[0].type"),
    (messages, {**MESSAGES, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages[0].content[0].tool_use_id is required", "messages[0].content[0].tool_use_id"),
    (messages, {**MESSAGES, "system": 5}, "system must be a string or an array of text blocks", "system"),
    (messages, {**MESSAGES, "stream": "true"}, "stream must be a boolean", "stream"),
    (messages, {**MESSAGES, "temperature": 1.5}, "'temperature' must be between 0 and 1, got 1.5", "temperature"),
    (messages, {**MESSAGES, "top_k": -1}, "'top_k' must be between 0 and 2147483648, got -1", "top_k"),
    (messages, {**MESSAGES, "stop_sequences": [1]}, "'stop_sequences' must be a string or an array of strings",
     "stop_sequences"),
    (messages, {**MESSAGES, "tool_choice": {"type": "some"}},
     "tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'}", "tool_choice.type"),
    (messages, {**MESSAGES, "tools": [{"name": "f", "input_schema": []}]}, "tools[0].input_schema must be an object",
     "tools[0].input_schema"),
    (count_tokens, {"model": "m", "messages": "Hi"}, "messages: must be a non-empty array", "messages"),
]


@pytest.mark.parametrize("parse,body,text,param", CASES,
                         ids=[f"{c[0].__name__}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_a_bad_field_gives_its_documented_text_and_param(parse, body, text, param):
    with pytest.raises(BadRequest) as err:
        parse(body)
    assert (err.value.message, err.value.param) == (text, param)


def test_fields_real_clients_send_and_we_ignore_are_accepted():
    """What Claude Code, Codex CLI and the official SDKs send beside the fields we use."""
    req = chat({**CHAT, "user": "u", "metadata": {"a": "b"}, "parallel_tool_calls": False, "store": False,
                "service_tier": "auto", "prompt_cache_key": "k", "reasoning_effort": "low", "stream": None,
                "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief.",
                                                                "cache_control": {"type": "ephemeral"}}]},
                             {"role": "user", "content": "Hi", "name": "ann"}]})
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"}]
    assert req.stream is False and req.max_tokens == 16
    req = messages({**MESSAGES, "metadata": {"user_id": "u"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
                    "context_management": {"edits": []}, "service_tier": "auto", "container": None,
                    "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                    "tools": [{"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
                              {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
                    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "citations": None}]},
                                 {"role": "assistant", "content": [
                                     {"type": "thinking", "thinking": "hm", "signature": "sig"},
                                     {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
                                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                               "content": [{"type": "text", "text": "ok"}],
                                                               "is_error": False}]}]})
    assert req.messages[0] == {"role": "system", "content": "S"}
    assert req.messages[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert req.messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "ok"}
    assert [t["function"]["name"] for t in req.tools] == ["f"]  # the hosted web search is not rendered
    req = responses({**RESPONSES, "store": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k",
                     "reasoning": {"effort": "low"}, "parallel_tool_calls": True, "text": {"verbosity": "low"},
                     "tools": [{"type": "web_search"}, {"type": "function", "name": "f", "strict": False}],
                     "input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"},
                               {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                               {"type": "function_call", "name": "f", "call_id": "c1", "arguments": "{\"a\": 1}"},
                               {"type": "function_call_output", "call_id": "c1", "output": "42"}]})
    assert req.messages == [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
                            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert [t["function"]["name"] for t in req.tools] == ["f"]
    assert completion({**COMPLETION, "suffix": None, "user": "u", "echo": False, "logprobs": None}).prompt == "Hi"
    assert completion({"model": "m", "prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]  # one prompt in a list


def test_tool_choice_none_turns_tool_parsing_off():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat({**CHAT, "tools": tools}).parse_tools is True
    assert chat({**CHAT, "tools": tools, "tool_choice": "none"}).tools is None
    assert messages({**MESSAGES, "tools": [{"name": "f"}], "tool_choice": {"type": "none"}}).parse_tools is False


def test_grpc_api_messages_use_the_chat_message_model():
    assert parse_messages([{"role": "developer", "content": "x"}]) == [{"role": "system", "content": "x"}]
    with pytest.raises(BadRequest) as err:
        parse_messages([{"role": "robot", "content": "x"}])
    assert err.value.param == "messages[0].role"


async def test_validation_errors_reach_clients_in_each_protocols_format():
    """Through a real router app: OpenAI paths answer {"error": {..., "param"}},
    Anthropic paths {"type": "error", "error": {...}}; no worker is needed."""
    from aiohttp.test_utils import TestClient, TestServer

    from kvrouter.router.app import create_app
    from kvrouter.router.cluster import Cluster
    from kvrouter.router.config import RouterConfig

    app = create_app(RouterConfig(), cluster=Cluster([], None))
    async with TestClient(TestServer(app)) as client:
        for path, body, param in [("/v1/chat/completions", {**CHAT, "n": 3}, "n"),
                                  ("/v1/completions", {**COMPLETION, "echo": True}, "echo"),
                                  ("/v1/responses", {**RESPONSES, "previous_response_id": "r"}, "previous_response_id")]:
            resp = await client.post(path, data=json.dumps(body))
            assert resp.status == 400, path
            error = (await resp.json())["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, (path, error)
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            resp = await client.post(path, data=json.dumps({"model": "m", "messages": []}))
            assert resp.status == 400
            assert await resp.json() == {"type": "error", "error": {
                "type": "invalid_request_error", "message": "messages: must be a non-empty array"}}
