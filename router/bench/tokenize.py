"""The bench's view of the prompt: token ids of a chat as the router renders them."""

from __future__ import annotations

from pathlib import Path


def tokenizer_fields(model: str | None, cache_dir: Path) -> dict:
    """What a worker reports about its tokenizer (`ModelInfo`), read without MLX:
    tokenizer_json, chat_template, eos_token_ids, bos_token_id. `model`: None (the
    default model), a GGUF file, or an mlx-lm model directory (its tokenizer files,
    as the worker's loader reads them)."""
    from kvrouter.worker.models import default_model_path

    path = default_model_path(cache_dir) if model is None else Path(model).expanduser()
    if path.is_dir():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
        file = path / "tokenizer.json"
        return {
            "tokenizer_json": file.read_text(encoding="utf-8") if file.is_file() else hf.backend_tokenizer.to_str(),
            "chat_template": hf.chat_template,
            "eos_token_ids": () if hf.eos_token_id is None else (hf.eos_token_id,),
            "bos_token_id": hf.bos_token_id,
        }
    from kvrouter.worker.models.gguf import read_gguf
    from kvrouter.worker.models.tokenizer import gguf_tokenizer_fields

    return gguf_tokenizer_fields(read_gguf(path)[1])


def chat_tokenizer(model: str | None, cache_dir: Path):
    """A callable messages -> token ids rendering the chat template as the router does
    (the default model's, a GGUF's or an mlx-lm directory's tokenizer)."""
    from kvrouter.worker.models import build_hf_tokenizer

    fields = tokenizer_fields(model, cache_dir)
    tok = build_hf_tokenizer(fields["tokenizer_json"], fields["chat_template"], fields["eos_token_ids"],
                             fields["bos_token_id"])

    def encode(messages) -> list[int]:
        text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    return encode


def model_tokenizer(model: str | None, cache_dir: Path):
    """The router's own `ModelTokenizer` (chat template, incremental tokenization) for the
    default model, a GGUF file or an mlx-lm directory, built without a worker."""
    from kvrouter.router.prompting import ModelTokenizer
    from kvrouter.router.worker_client import ModelInfo

    f = tokenizer_fields(model, cache_dir)
    name = "default" if model is None else Path(model).stem
    return ModelTokenizer(ModelInfo(name, "", 1 << 20, f["tokenizer_json"], f["chat_template"] or "",
                                    tuple(f["eos_token_ids"]), f["bos_token_id"]))
