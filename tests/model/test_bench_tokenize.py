"""The benchmark's workload tokenized with the default model's real tokenizer."""

from __future__ import annotations

from kvrouter.router.bench.tokenize import chat_tokenizer
from kvrouter.router.bench.workload import WorkloadSpec, distinct_prefixes, make_workload, system_block
from tests.support.server import model_cache_dir


def test_workload_oracle_with_the_real_tokenizer():
    encode = chat_tokenizer(None, model_cache_dir())
    spec = WorkloadSpec(sessions=8, turns=2)
    prompts = [encode(r.messages) for s in make_workload(spec) for r in s]
    oracle = distinct_prefixes(prompts)
    shared = len(encode([{"role": "system", "content": system_block(spec)}]))
    assert shared > 512  # the shared block clears kvrouter's default --kv-cache-min-tokens
    # the shared block is counted once: far fewer than all prompt tokens, more than one session
    assert max(map(len, prompts)) < oracle < sum(map(len, prompts)) - 6 * shared


def test_the_bench_tokenizes_an_mlx_lm_directory_as_its_workers_do(tiny_model):
    """`kvrouter bench --model DIR` with an mlx-lm directory: the tokenizer files there
    (here the default model's, as `kvrouter export-mlx` writes them) give the same
    token ids as the GGUF they came from."""
    messages = [{"role": "system", "content": system_block(WorkloadSpec())}, {"role": "user", "content": "Hi."}]
    from_dir = chat_tokenizer(str(tiny_model("qwen3_next")), model_cache_dir())(messages)
    assert from_dir == chat_tokenizer(None, model_cache_dir())(messages) and len(from_dir) > 512


def test_the_routing_bench_reports_full_and_incremental_tokenization(tiny_model):
    """`kvrouter bench --routing`'s tokenization figures: the router's own tokenizer
    (`model_tokenizer`) renders an agent conversation in full, then again with a turn
    appended (the incremental path reuses the first one's ids), for the default model
    and for an mlx-lm directory. (Its import was broken for a while, unnoticed.)"""
    from kvrouter.router.bench.routing import _tokenize_ms
    from kvrouter.router.bench.tokenize import model_tokenizer

    for model in (None, str(tiny_model("llama"))):
        out = _tokenize_ms(2000, model_cache_dir(), model)
        assert 1500 < out["tokenize_tokens"] < 3000 and out["tokenize_ms"] > 0 and out["tokenize_incremental_ms"] > 0
        tok = model_tokenizer(model, model_cache_dir())
        messages = [{"role": "system", "content": system_block(WorkloadSpec())}, {"role": "user", "content": "Hi."}]
        assert list(tok.chat_prompt(messages).tokens) == chat_tokenizer(model, model_cache_dir())(messages)
