"""An uncached in-process reference run of the default model, used to check
that a prompt's greedy continuation has no near-ties (top-2 logit margin), so
that the ~3e-5 difference of a mid-chunk checkpoint cannot flip a token."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tests.support.server import model_cache_dir


@dataclass(frozen=True)
class GreedyRun:
    prompt_tokens: int
    tokens: tuple[int, ...]
    text: str
    min_margin: float  # smallest top-1 minus top-2 logit over all steps


@lru_cache(maxsize=1)
def reference_model():
    from kvrouter.worker.models import build_hf_tokenizer, load_model

    bundle = load_model(None, model_cache_dir())
    tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids, bundle.bos_token_id)
    return bundle, tok


def chat_tokens(messages: list[dict]) -> list[int]:
    _, tok = reference_model()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def greedy(messages: list[dict], max_tokens: int, chunk: int = 256) -> GreedyRun:
    """Greedy decode without any cache reuse, chunks at absolute multiples of `chunk`."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    bundle, tok = reference_model()
    prompt = chat_tokens(messages)
    cache = make_prompt_cache(bundle.model)
    pos = 0
    while pos < len(prompt):
        end = min(len(prompt), (pos // chunk + 1) * chunk)
        logits = bundle.model(mx.array(prompt[pos:end])[None], cache=cache)[0, -1]
        pos = end
    out: list[int] = []
    margins = []
    for _ in range(max_tokens):
        top2 = mx.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        token = int(mx.argmax(logits).item())
        if token in bundle.eos_token_ids:
            break
        out.append(token)
        logits = bundle.model(mx.array([[token]]), cache=cache)[0, -1]
    return GreedyRun(len(prompt), tuple(out), tok.decode(out), min(margins))


def greedy_in_subprocess(messages: list[dict], max_tokens: int) -> GreedyRun:
    """`greedy` in a fresh interpreter with the worker's optimized BLAS preloaded
    (the test process itself runs on mlx's bundled reference BLAS, ~25x slower)."""
    import json
    import os
    import subprocess
    import sys

    from kvrouter.worker.blas import preload_env

    out = subprocess.run(
        [sys.executable, "-m", "tests.support.reference"],
        input=json.dumps({"messages": messages, "max_tokens": max_tokens}),
        capture_output=True, text=True, check=True, env=preload_env(dict(os.environ)),
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return GreedyRun(data["prompt_tokens"], tuple(data["tokens"]), data["text"], data["min_margin"])


if __name__ == "__main__":
    import json
    import sys

    args = json.loads(sys.stdin.read())
    run = greedy(args["messages"], args["max_tokens"])
    print(json.dumps({"prompt_tokens": run.prompt_tokens, "tokens": list(run.tokens), "text": run.text, "min_margin": run.min_margin}))
