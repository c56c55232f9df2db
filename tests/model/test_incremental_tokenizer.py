"""The router's incremental tokenization with the default model's real tokenizer and
chat template: a growing agent conversation tokenizes exactly as a full tokenization
through transformers does, and the shared part is not tokenized again."""

from __future__ import annotations

import random

from kvrouter.router.bench.workload import WORDS
from kvrouter.router.prompting import ModelTokenizer
from kvrouter.router.worker_client import ModelInfo
from kvrouter.worker.models import default_model_path
from kvrouter.worker.models.gguf import read_gguf
from kvrouter.worker.models.tokenizer import gguf_tokenizer_fields
from tests.support.server import model_cache_dir


def default_tokenizer() -> ModelTokenizer:
    f = gguf_tokenizer_fields(read_gguf(default_model_path(model_cache_dir()))[1])
    return ModelTokenizer(ModelInfo("m", "id", 8192, f["tokenizer_json"], f["chat_template"],
                                    tuple(f["eos_token_ids"]), f["bos_token_id"]))


def test_a_growing_conversation_tokenizes_exactly_and_incrementally():
    tok = default_tokenizer()
    full = tok._tok  # transformers' PreTrainedTokenizerFast: the reference
    rng = random.Random(3)
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice(["", "\n", "  "])  # noqa: E731
    messages = [{"role": "system", "content": say(1500)}, {"role": "user", "content": say(30)}]
    for _ in range(6):
        prompt = tok.chat_prompt(messages)
        assert list(prompt.tokens) == full.encode(prompt.text, add_special_tokens=False)
        messages += [{"role": "assistant", "content": say(40)}, {"role": "user", "content": say(20)}]
    assert tok.incremental.hits >= 5
    assert tok.incremental.reused_tokens > 5 * 1500
