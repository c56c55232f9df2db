"""A real byte-level BPE tokenizer without a model, for unit tests: one token per byte
plus the ChatML control tokens (built the way a GGUF tokenizer is, through
`kvrouter.worker.models.tokenizer.tokenizer_json_from_gguf`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import pre_tokenizers

from kvrouter.router.worker_client import ModelInfo
from kvrouter.worker.models.tokenizer import tokenizer_json_from_gguf

CHATML_TOOLS = (Path(__file__).parent / "chatml_tools.jinja").read_text()

# SmolLM2's template (what the default model ships): any role renders as a turn of its own.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# A template that refuses a system message anywhere but first (as many do).
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be at the beginning.') }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def model_info(chat_template: str = SMOLLM2_TEMPLATE, context_length: int = 65536) -> ModelInfo:
    """A ModelInfo (the router's) whose tokenizer maps every byte to one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["<|im_start|>", "<|im_end|>"]
    types = [1] * len(alphabet) + [3, 3]
    eos = len(tokens) - 1
    return ModelInfo("tiny", "tiny", context_length, tokenizer_json_from_gguf(tokens, [], types), chat_template,
                     (eos,))


def trained_model_info(corpus: list[str], chat_template: str = SMOLLM2_TEMPLATE,
                       vocab_size: int = 2000) -> ModelInfo:
    """A ModelInfo whose tokenizer is a byte-level BPE trained on `corpus` (merges make
    tokens span several characters, as real ones do), with the ChatML control tokens."""
    from tokenizers import Tokenizer, decoders, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return ModelInfo("tiny-bpe", "tiny-bpe", 65536, tok.to_str(), chat_template, (tok.token_to_id("<|im_end|>"),))
