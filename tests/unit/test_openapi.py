"""/openapi.json is generated from the request body models: every endpoint's
schema is there, filled in with the served models and the vocabulary, and the
schema and the validation agree on what is a valid body."""

from __future__ import annotations

import jsonschema_rs
import pytest

from kvrouter.router.errors import BadRequest
from kvrouter.router.views.openapi import ENDPOINTS, build_spec
from kvrouter.router.views.validation import validate

HI = [{"role": "user", "content": "Hi"}]
BODIES = {  # path: (valid bodies, invalid bodies)
    "/v1/chat/completions": (
        [{"model": "a", "messages": HI},
         {"model": "b", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                                           "function": {"name": "f", "arguments": "{}"}}]},
                                     {"role": "tool", "content": "1", "tool_call_id": "c"}],
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
          "stop": ["x"], "n": 1, "temperature": 2, "user": "u"}],
        [{"model": "a", "messages": []}, {"model": "a", "messages": HI, "n": 2},
         {"model": "a", "messages": HI, "temperature": 2.5}, {"model": "a", "messages": HI, "stop": ["x"] * 17}]),
    "/v1/completions": (
        [{"model": "a", "prompt": "Hi"}, {"model": "a", "prompt": [0, 99], "max_tokens": 1}],
        [{"model": "a", "prompt": ""}, {"model": "a", "prompt": [1.5]}, {"model": "a", "prompt": "Hi", "echo": True}]),
    "/v1/responses": (
        [{"model": "a", "input": "Hi"},
         {"model": "a", "input": [{"role": "user", "content": "Hi"}, {"type": "reasoning", "summary": []},
                                  {"type": "function_call", "name": "f", "call_id": "c", "arguments": "{}"},
                                  {"type": "function_call_output", "call_id": "c", "output": "1"}],
          "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}], "store": False}],
        [{"model": "a", "input": []}, {"model": "a", "input": "Hi", "previous_response_id": "r"},
         {"model": "a", "input": [{"role": "tool", "content": "x"}]}]),
    "/v1/messages": (
        [{"model": "a", "max_tokens": 1, "messages": HI},
         {"model": "a", "max_tokens": 1, "system": [{"type": "text", "text": "S", "cache_control": {}}],
          "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                       {"role": "assistant", "content": [{"type": "thinking", "thinking": "", "signature": ""},
                                                         {"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}]}],
          "tools": [{"name": "f", "input_schema": {}}, {"type": "bash_20250124", "name": "bash"}],
          "tool_choice": {"type": "any"}, "metadata": {"user_id": "u"}}],
        [{"model": "a", "messages": HI}, {"model": "a", "max_tokens": 1, "messages": [{"role": "tool", "content": "x"}]},
         {"model": "a", "max_tokens": 1, "messages": HI, "temperature": 1.5},
         {"model": "a", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "image"}]}]}]),
    "/v1/messages/count_tokens": (
        [{"model": "a", "messages": HI}],
        [{"model": "a", "messages": "Hi"}]),
}


def schema_validator(spec: dict, path: str):
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**ref, "components": spec["components"]})


def test_every_endpoint_has_its_generated_body_schema_with_served_models_and_vocabulary():
    spec = build_spec(["a", "b"], vocab=100)
    assert spec["openapi"].startswith("3.1")
    for path, _, model, anthropic in ENDPOINTS:
        op = spec["paths"][path]["post"]
        name = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
        assert name == model.__name__ and schema["additionalProperties"] is True
        assert schema["properties"]["model"]["enum"] == ["a", "b"]
        assert ("529" in op["responses"]) == anthropic
    prompt = spec["components"]["schemas"]["CompletionBody"]["properties"]["prompt"]
    [ids] = [s for s in prompt["anyOf"] if s["type"] == "array"]
    assert ids["items"] == {"type": "integer", "minimum": 0, "maximum": 99}
    assert "enum" not in build_spec([])["components"]["schemas"]["ChatCompletionBody"]["properties"]["model"]


@pytest.mark.parametrize("path", list(BODIES))
def test_schema_and_validation_agree(path):
    """A body valid by the document is accepted by the model; the invalid ones are
    refused by both (the model with a BadRequest)."""
    spec = build_spec(["a", "b"], vocab=100)
    check = schema_validator(spec, path)
    model = next(m for p, _, m, _ in ENDPOINTS if p == path)
    valid, invalid = BODIES[path]
    for body in valid:
        assert check.is_valid(body), (path, body)
        validate(model, body)
    for body in invalid:
        assert not check.is_valid(body), (path, body)
        with pytest.raises(BadRequest):
            validate(model, body)


def test_what_only_the_document_knows_served_models_and_vocabulary():
    """The view refuses an unknown model (404) and an id outside the vocabulary (400)
    after validation; the document already excludes them."""
    spec = build_spec(["a", "b"], vocab=100)
    assert not schema_validator(spec, "/v1/chat/completions").is_valid({"model": "c", "messages": HI})
    assert not schema_validator(spec, "/v1/completions").is_valid({"model": "a", "prompt": [100]})
    assert not schema_validator(spec, "/v1/completions").is_valid({"model": "a", "prompt": [-1]})
