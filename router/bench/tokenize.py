"""The bench's view of the prompt: token ids of a chat as the router renders them."""

from __future__ import annotations

from pathlib import Path


def chat_tokenizer(model: str | None, cache_dir: Path):
    """A callable messages -> token ids rendering the chat template as the router does
    (the default model's or a GGUF's tokenizer)."""
    from kvrouter.worker.models import build_hf_tokenizer, default_model_path
    from kvrouter.worker.models.gguf import read_gguf
    from kvrouter.worker.models.tokenizer import gguf_tokenizer_fields

    path = default_model_path(cache_dir) if model is None else Path(model)
    fields = gguf_tokenizer_fields(read_gguf(path)[1])
    tok = build_hf_tokenizer(fields["tokenizer_json"], fields["chat_template"], fields["eos_token_ids"],
                             fields["bos_token_id"])

    def encode(messages) -> list[int]:
        text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    return encode


def model_tokenizer(model: str | None, cache_dir: Path):
    """The router's own `ModelTokenizer` (chat template, incremental tokenization) for the
    default model or a GGUF file, built without a worker."""
    from kvrouter.router.prompting import ModelTokenizer
    from kvrouter.router.worker_client import ModelInfo
    from kvrouter.worker.models import default_model_path
    from kvrouter.worker.models.gguf import read_gguf
    from kvrouter.worker.models.tokenizer import gguf_tokenizer_fields

    path = default_model_path(cache_dir) if model is None else Path(model)
    f = gguf_tokenizer_fields(read_gguf(path)[1])
    return ModelTokenizer(ModelInfo(path.stem, "", 1 << 20, f["tokenizer_json"], f["chat_template"] or "",
                                    tuple(f["eos_token_ids"]), f["bos_token_id"]))
