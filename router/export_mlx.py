"""`kvrouter export-mlx DIR`: write the imported model as an mlx-lm model directory.

The default model is a GGUF file that kvrouter imports itself (worker.models.gguf).
Other programs, `mlx_lm.server` first, need the mlx-lm layout instead:

    DIR/config.json            llama ModelArgs (rope_traditional, as GGUF stores Q/K rows)
    DIR/model.safetensors      the weights, dequantized to float32 (what a CPU worker runs)
    DIR/tokenizer.json, tokenizer_config.json, chat_template.jinja, special_tokens_map.json

so `mlx_lm.server --model DIR` serves exactly the weights, tokenizer, chat template
and stop tokens a kvrouter worker serves (`kvrouter bench --compare` relies on it).
Only GGUF sources are exported: an mlx-lm directory already is one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger("kvrouter.export")


def export_mlx_model(spec: str | None, cache_dir: Path, out_dir: Path) -> Path:
    """Writes the model `spec` (None: the default model; else a .gguf path) to `out_dir`
    as an mlx-lm directory with float32 weights. Returns `out_dir`.

    Raises ValueError for a non-GGUF spec, FileExistsError when out_dir holds a config.json.
    """
    import mlx.core as mx

    from kvrouter.worker.models import default_model_path
    from kvrouter.worker.models.gguf import dequantize_weights, model_args_from_metadata, read_gguf, rename_tensors
    from kvrouter.worker.models.tokenizer import gguf_tokenizer_fields

    if spec is not None and not spec.endswith(".gguf"):
        raise ValueError(f"--model {spec!r}: only GGUF models need exporting (an mlx-lm directory already is one)")
    path = default_model_path(cache_dir) if spec is None else Path(spec).expanduser()
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise FileExistsError(f"{out_dir} already holds a model (config.json); choose an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    tensors, metadata = read_gguf(path)
    weights = dequantize_weights(rename_tensors(tensors))
    tied = "lm_head.weight" not in weights
    args = model_args_from_metadata(metadata, tie_word_embeddings=tied)
    fields = gguf_tokenizer_fields(metadata)

    config = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    config.update(
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
        eos_token_id=list(fields["eos_token_ids"]),
        bos_token_id=fields["bos_token_id"],
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    _save_tokenizer(fields, out_dir)
    size = (out_dir / "model.safetensors").stat().st_size
    log.info("exported %s to %s (%d tensors, %.0f MB float32)", path.name, out_dir, len(weights), size / 1e6)
    return out_dir


def export_tokenizer(spec: str | None, cache_dir: Path, out_dir: Path) -> Path:
    """Writes only the tokenizer files of the GGUF model `spec` (None: the default
    model) to `out_dir` (tokenizer.json, tokenizer_config.json with the chat template,
    special_tokens_map.json): what `export_mlx_model` writes beside the weights, for a
    model directory whose weights come from elsewhere (tests build small random-weight
    models of other families this way). Returns `out_dir`."""
    from kvrouter.worker.models import default_model_path
    from kvrouter.worker.models.gguf import read_gguf
    from kvrouter.worker.models.tokenizer import gguf_tokenizer_fields

    path = default_model_path(cache_dir) if spec is None else Path(spec).expanduser()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(gguf_tokenizer_fields(read_gguf(path)[1]), out_dir)
    return out_dir


def _save_tokenizer(fields: dict, out_dir: Path) -> None:
    from kvrouter.worker.models import build_hf_tokenizer

    tokenizer = build_hf_tokenizer(
        fields["tokenizer_json"], fields["chat_template"], fields["eos_token_ids"], fields["bos_token_id"]
    )
    tokenizer.save_pretrained(str(out_dir))
