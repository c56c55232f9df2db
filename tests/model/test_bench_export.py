"""`kvrouter export-mlx`: the exported directory is an mlx-lm model that computes the
same logits, renders the same chat prompt tokens and stops on the same tokens as
the model a kvrouter worker imports (what `kvrouter bench --compare` relies on)."""

from __future__ import annotations

import json

import pytest

from tests.support.server import model_cache_dir


def test_export_mlx_matches_the_imported_model(tmp_path):
    import mlx.core as mx
    import mlx_lm

    from kvrouter.router.cli import main
    from kvrouter.worker.models import build_hf_tokenizer, load_model

    out = tmp_path / "mlx-model"
    assert main(["export-mlx", str(out), "--cache-dir", str(model_cache_dir())]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    with pytest.raises(SystemExit):  # refuses to overwrite a model directory
        main(["export-mlx", str(out), "--cache-dir", str(model_cache_dir())])

    bundle = load_model(None, model_cache_dir())
    model, wrapper = mlx_lm.load(str(out))
    assert model.model.embed_tokens.weight.dtype == mx.float32
    ids = mx.array([[1, 9690, 198, 2683, 359, 9239, 30, 2, 198, 4093]], dtype=mx.int32)
    assert mx.abs(model(ids) - bundle.model(ids)).max().item() == 0.0

    messages = [{"role": "system", "content": "You are a coding agent. def f(x): return 12345"},
                {"role": "user", "content": 'List the files. {"tool": "ls"}'}]
    ours = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids,
                              bundle.bos_token_id)
    text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert list(wrapper.apply_chat_template(messages, add_generation_prompt=True)) == \
        ours.encode(text, add_special_tokens=False)
    assert set(wrapper.eos_token_ids) == set(bundle.eos_token_ids)

    # The exported directory also loads through kvrouter's own loader (an mlx-lm model
    # directory, as Mac users have them): named after the directory, same logits.
    as_dir = load_model(str(out), model_cache_dir(), dequantize=True)
    assert as_dir.name == out.name
    assert as_dir.context_length == bundle.context_length
    assert mx.abs(as_dir.model(ids) - bundle.model(ids)).max().item() == 0.0
    assert as_dir.identity != bundle.identity  # another weights file: checkpoints never cross
