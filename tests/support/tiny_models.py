"""Small random-weight mlx-lm model directories of several families, built inside
the tests (nothing is downloaded): the model class made from a small config, its
parameters written with `mx.save_safetensors`, and the default model's tokenizer
files (`kvrouter export-mlx`'s, via `router.export_mlx.export_tokenizer`).

Families and the mlx-lm cache each builds (`make_cache`):

| family | layers | caches |
|---|---|---|
| `llama` | 2 | KVCache (QuantizedKVCache with `--kv-bits`: head_dim 64, a multiple of the group size) |
| `gpt_oss` | 2 | RotatingKVCache (window 32), KVCache |
| `gemma3_text` | 2 | RotatingKVCache (window 32), KVCache |
| `qwen3_next` | 4 | ArraysCache (gated-delta recurrent) x3, KVCache |
| `mamba2` | 2 | ArraysCache (recurrent) only |

The random lm_head is scaled (`LM_HEAD_SCALE`) so that greedy decoding has clear
top-2 margins: with the default init the logits of a random 64-wide model differ
by ~1e-3, so a reuse error of 1e-5 could flip a token; scaled, top-2 margins
are mostly well above 1e-3 (tests still measure them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

VOCAB = 49152  # the default model's tokenizer
WINDOW = 32  # sliding window of the windowed families, tokens: short test prompts wrap it
LM_HEAD_SCALE = 30.0
CONTEXT = 4096

_COMMON = {"vocab_size": VOCAB, "max_position_embeddings": CONTEXT, "eos_token_id": [2], "bos_token_id": 1}

CONFIGS: dict[str, dict] = {
    "llama": {
        "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "gpt_oss": {
        "model_type": "gpt_oss", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "sliding_window": WINDOW, "rope_theta": 150000, "rms_norm_eps": 1e-5,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma3_text": {
        "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "head_dim": 16, "num_key_value_heads": 1, "query_pre_attn_scalar": 16,
        "sliding_window": WINDOW, "sliding_window_pattern": 2, "rms_norm_eps": 1e-6,
    },
    "qwen3_next": {
        "model_type": "qwen3_next", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "shared_expert_intermediate_size": 64, "mlp_only_layers": [],
        "moe_intermediate_size": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25, "full_attention_interval": 4, "tie_word_embeddings": False,
    },
    "mamba2": {
        "model_type": "mamba2", "num_heads": 8, "head_dim": 16, "hidden_size": 64, "intermediate_size": 128,
        "state_size": 16, "num_hidden_layers": 2, "layer_norm_epsilon": 1e-5, "conv_kernel": 4, "n_groups": 1,
        "use_bias": False, "use_conv_bias": True, "tie_word_embeddings": False,
        "time_step_limit": [0.0, 1e9], "time_step_rank": "auto",
    },
}
FAMILIES = tuple(CONFIGS)


def build_model_dir(family: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Writes a random-weight `family` model to `out_dir` (config.json, model.safetensors,
    the tokenizer files copied from `tokenizer_dir`). Returns `out_dir`.

    The weights are float32, drawn with `mx.random.seed(seed)`; the lm_head is
    multiplied by LM_HEAD_SCALE. Raises KeyError for an unknown family."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = {**_COMMON, **CONFIGS[family]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    weights = dict(tree_flatten(model.parameters()))
    head = "lm_head.weight"
    if head not in weights:  # mamba2 keeps it inside the backbone
        head = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[head] = weights[head] * LM_HEAD_SCALE
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


def tokenizer_dir(out_dir: Path) -> Path:
    """The default model's tokenizer files in `out_dir` (written once)."""
    from kvrouter.router.export_mlx import export_tokenizer
    from tests.support.server import model_cache_dir

    out_dir = Path(out_dir)
    if not (out_dir / "tokenizer.json").exists():
        export_tokenizer(None, model_cache_dir(), out_dir)
    return out_dir


@dataclass(frozen=True)
class GreedyRun:
    """An uncached greedy run: generated token ids (EOS excluded), the top-1 minus
    top-2 logit margin of every step, and the logits of the first generated token
    (shape (vocab,), float32)."""

    tokens: tuple[int, ...]
    margins: tuple[float, ...]
    first_logits: object

    @property
    def min_margin(self) -> float:
        return min(self.margins)


def greedy_reference(model, prompt, max_tokens: int, quant=None, eos=(2,), chunk: int = 256) -> GreedyRun:
    """What a worker computes for `prompt` without any reuse, one sequence alone:
    prefill in chunks ending at absolute multiples of `chunk` (the worker's
    `--prefill-chunk-tokens`), then greedy decoding until an `eos` id or `max_tokens`.
    quant: the worker's `--kv-bits` (`worker.config.KvQuantization`) or None."""
    import mlx.core as mx

    from kvrouter.worker.cache_state import new_state

    cache = new_state(model, quant)
    prompt = list(prompt)
    pos = 0
    while pos < len(prompt):
        end = min(len(prompt), (pos // chunk + 1) * chunk)
        logits = model(mx.array(prompt[pos:end])[None], cache=cache)[0, -1]
        pos = end
    first = logits
    out, margins = [], []
    for _ in range(max_tokens):
        top2 = mx.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        token = int(mx.argmax(logits).item())
        if token in eos:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return GreedyRun(tuple(out), tuple(margins), first)


if __name__ == "__main__":
    # python -m tests.support.tiny_models DIR: every family's model directory under DIR.
    import sys

    root = Path(sys.argv[1])
    tok = tokenizer_dir(root / "tokenizer")
    for family in FAMILIES:
        print(build_model_dir(family, root / family, tok))
