"""worker.models with the real default model (SmolLM2-135M-Instruct GGUF).

The model is fetched at most once per machine into ``$KVROUTER_TEST_CACHE``
(default ``~/.cache/kvrouter``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from kvrouter.worker.models import (
    CHECKPOINT_FORMAT,
    ModelBundle,
    build_hf_tokenizer,
    default_model_path,
    load_model,
    model_identity,
)
from kvrouter.worker.models.tool_parser import tool_parser_for

CACHE_DIR = Path(os.environ.get("KVROUTER_TEST_CACHE", Path.home() / ".cache" / "kvrouter"))
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return load_model(None, CACHE_DIR)


@pytest.fixture(scope="module")
def backend(bundle: ModelBundle) -> Tokenizer:
    return Tokenizer.from_str(bundle.tokenizer_json)


def greedy(bundle: ModelBundle, ids: list[int], max_tokens: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(bundle.model)
    logits = bundle.model(mx.array([ids], dtype=mx.int32), cache=cache)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(mx.argmax(logits[0, -1]).item())
        if token in bundle.eos_token_ids:
            break
        out.append(token)
        logits = bundle.model(mx.array([[token]], dtype=mx.int32), cache=cache)
    return out


def test_default_model_metadata(bundle: ModelBundle) -> None:
    assert bundle.name == "SmolLM2-135M-Instruct"
    assert bundle.kv_layout.startswith("layers=30;kv_heads=3;head_dim=64;dtype=")
    assert bundle.context_length == 8192
    assert bundle.bos_token_id == 1
    assert 2 in bundle.eos_token_ids  # <|im_end|>, also the GGUF eos id
    assert len(bundle.identity) == 32 and int(bundle.identity, 16) >= 0
    assert default_model_path(CACHE_DIR).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_greedy_answer(bundle: ModelBundle, backend: Tokenizer) -> None:
    tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids, bundle.bos_token_id)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = backend.encode(prompt, add_special_tokens=False).ids
    text = backend.decode(greedy(bundle, ids, 20))
    assert text.startswith("The capital of France is Paris."), text


def test_tokenizer_round_trip(backend: Tokenizer) -> None:
    text = "Line 1: 12345 apples\n\n  indented  text\twith tab, émoji 🙂 and 3.14\n"
    ids = backend.encode(text, add_special_tokens=False).ids
    assert backend.decode(ids) == text
    digits = backend.encode("2024", add_special_tokens=False).ids
    assert len(digits) == 4  # digits are split one per token
    assert len(backend.encode("<|im_start|>", add_special_tokens=False).ids) == 1
    assert backend.encode("<|im_start|>", add_special_tokens=False).ids == [backend.token_to_id("<|im_start|>")]


def test_hf_tokenizer_chat_template(bundle: ModelBundle) -> None:
    tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids, bundle.bos_token_id)
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Now", "parameters": {"type": "object", "properties": {}}}}]
    with_tools = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False, tools=tools)
    assert with_tools.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    ids = tok(EXPECTED_PROMPT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == EXPECTED_PROMPT


def test_tokenizer_module_does_not_import_mlx() -> None:
    code = "import sys, kvrouter.worker.models.tokenizer, kvrouter.worker.models; assert 'mlx' not in sys.modules, 'mlx imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_router_loads_mlx_lm_tool_parsers_without_mlx() -> None:
    """The router uses mlx-lm's own parser modules (laguna imports glm47 relatively)
    and never imports mlx or mlx_lm's package (whose __init__ imports mlx)."""
    code = ("import sys, kvrouter.router.app; from kvrouter.router.views.tools import tool_syntax; "
            "assert [tool_syntax(n).start for n in ('json_tools', 'qwen3_coder', 'laguna')] == "
            "['<tool_call>', '<tool_call>', '<tool_call>']; "
            "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, 'mlx imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_worker_chooses_tool_parsers_by_mlx_lm_rules(bundle: ModelBundle) -> None:
    """mlx-lm's own choice: the default model's template has no tool syntax; a
    Hermes-style template gets json_tools; a model directory's declared parser wins
    unless the router replaces the template."""
    tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids, bundle.bos_token_id)
    template = (Path(__file__).resolve().parents[1] / "support" / "chatml_tools.jinja").read_text()
    assert tool_parser_for(tok) == ""
    assert tool_parser_for(tok, template) == "json_tools"
    assert tool_parser_for(tok, declared="qwen3_coder") == "qwen3_coder"
    assert tool_parser_for(tok, template, declared="qwen3_coder") == "json_tools"


def test_identity_stable_across_loads(bundle: ModelBundle) -> None:
    again = load_model(None, CACHE_DIR)
    assert again.identity == bundle.identity
    digests = json.loads((CACHE_DIR / "models" / "digests.json").read_text())
    gguf = default_model_path(CACHE_DIR).resolve()
    assert any(key.startswith(f"{gguf}:") for key in digests)


def test_identity_function() -> None:
    args = dict(mlx_version="0.32.4", mlx_lm_version="0.32.2")
    base = model_identity("ab" * 16, '{"t": 1}', "layers=30;kv_heads=3;head_dim=64;dtype=float32", **args)
    assert base == model_identity("ab" * 16, '{"t": 1}', "layers=30;kv_heads=3;head_dim=64;dtype=float32", **args)
    assert base != model_identity("ab" * 16, '{"t": 1}', "layers=30;kv_heads=3;head_dim=64;dtype=float16", **args)
    assert base != model_identity("cd" * 16, '{"t": 1}', "layers=30;kv_heads=3;head_dim=64;dtype=float32", **args)
    assert base != model_identity("ab" * 16, '{"t": 2}', "layers=30;kv_heads=3;head_dim=64;dtype=float32", **args)
    assert base != model_identity(
        "ab" * 16, '{"t": 1}', "layers=30;kv_heads=3;head_dim=64;dtype=float32", checkpoint_format=CHECKPOINT_FORMAT + 1, **args
    )
    patch = dict(mlx_version="0.32.9", mlx_lm_version="0.32.7")  # patch releases do not count
    assert base == model_identity("ab" * 16, '{"t": 1}', "layers=30;kv_heads=3;head_dim=64;dtype=float32", **patch)
    minor = dict(mlx_version="0.33.0", mlx_lm_version="0.32.2")
    assert base != model_identity("ab" * 16, '{"t": 1}', "layers=30;kv_heads=3;head_dim=64;dtype=float32", **minor)
