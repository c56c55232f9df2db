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
