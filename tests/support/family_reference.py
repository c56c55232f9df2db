"""Reference runs of a small model family for tests/e2e/test_model_families.py, in a
child interpreter (`Helper`) with the worker's optimized BLAS preloaded (the test
process runs on mlx's bundled reference BLAS, about 5-10x slower on these models),
so they run while a server starts.

`scenario` builds the prompts of the test's sequence and computes, for each, the
uncached greedy run (tests/support/tiny_models.greedy_reference) and the text a
worker streams for it; `stored_state_errors` loads every checkpoint of a store and
compares it with a fresh prefill of its own tokens.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys

MAX_TOKENS = 4
SHARED = 200  # tokens of the shared prefix S


def tokens_of(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(100, 40000) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def _load(model_dir: str, kv_bits: int | None):
    from kvrouter.worker.config import KvQuantization
    from kvrouter.worker.models import build_hf_tokenizer, load_model
    from tests.support.server import model_cache_dir

    quant = KvQuantization(kv_bits) if kv_bits else None
    bundle = load_model(model_dir, model_cache_dir(), kv_quant=quant)
    tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids, bundle.bos_token_id)
    return bundle, quant, tok


def _text(tok, tokens) -> str:
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    detok = BPEStreamingDetokenizer(tok)  # what the worker streams with
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def scenario(model_dir: str, kv_bits: int | None) -> list[dict]:
    """The test's prompts in order, each with its reference run: {"prompt", "tokens",
    "margins", "text", "prefix_texts" (the text of its first i tokens, by i)}. The second prompt continues the first with the first's
    generated tokens (the next turn of its conversation)."""
    from tests.support.tiny_models import greedy_reference

    bundle, quant, tok = _load(model_dir, kv_bits)
    shared = tokens_of(SHARED, 10)
    out: list[dict] = []

    def add(prompt):
        run = greedy_reference(bundle.model, prompt, MAX_TOKENS, quant, eos=bundle.eos_token_ids)
        out.append({"prompt": prompt, "tokens": list(run.tokens), "margins": list(run.margins),
                    "text": _text(tok, run.tokens),
                    "prefix_texts": [_text(tok, run.tokens[:i]) for i in range(len(run.tokens) + 1)]})
        return list(run.tokens)

    first = shared + tokens_of(40, 11)
    generated = add(first)
    add(first + generated + tokens_of(20, 12))  # the next turn
    add(tokens_of(20, 13))  # unrelated
    add(shared + tokens_of(40, 14))
    add(shared + tokens_of(40, 15))  # after the restart
    add(shared[:100] + tokens_of(40, 16))  # diverges inside the live state
    add(shared[:196] + tokens_of(40, 17))  # diverges just past the stored checkpoint
    return out


def stored_state_errors(model_dir: str, kv_bits: int | None, kv_dir: str) -> list[dict]:
    """Every usable entry of the store at `kv_dir`: loaded (its layers' token counts
    must equal its length: `checkpoint_load.load_payload` checks them), then fed two probe
    tokens, as is a fresh prefill of the entry's own tokens. Returns {"kind",
    "n_tokens", "error"}: the largest logit difference over the largest logit."""
    import mlx.core as mx

    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.worker import cache_state
    from kvrouter.worker.checkpoint_load import load_payload

    bundle, _, _ = _load(model_dir, kv_bits)
    model, spec = bundle.model, bundle.state
    probe = mx.array([[123, 456]])
    out = []
    with CheckpointStore(StoreConfig(directory=kv_dir)) as store:
        for e in store.entries():
            loaded = load_payload(store.payload_dir / e.payload_name, e.model_id, e.n_tokens, spec.layout)
            fresh = spec.new()
            model(mx.array(store.tokens_of(e.id))[None], cache=fresh)
            got, want = model(probe, cache=loaded)[0, -1], model(probe, cache=fresh)[0, -1]
            error = float(mx.abs(got - want).max()) / max(1.0, float(mx.abs(want).max()))
            out.append({"kind": e.kind, "n_tokens": e.n_tokens, "error": error})
    return out


class Helper:
    """One child interpreter with the optimized BLAS preloaded and the family's model
    loaded once: it computes `scenario` at once (while the test starts its server),
    then `stored_state_errors` when asked (after the server stopped)."""

    def __init__(self, model_dir, kv_bits: int | None):
        from kvrouter.worker.blas import preload_env

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.family_reference", json.dumps([str(model_dir), kv_bits])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=preload_env(dict(os.environ)))

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=60)
            raise RuntimeError(f"reference helper failed ({self.proc.returncode}):\n{err[-3000:]}")
        return json.loads(line)

    def scenario(self) -> list[dict]:
        """`scenario(model_dir, kv_bits)`, computed since the helper started."""
        return self._answer()

    def stored_state_errors(self, kv_dir) -> list[dict]:
        """`stored_state_errors` of the store at `kv_dir`; the helper then exits."""
        self.proc.stdin.write(json.dumps(str(kv_dir)) + "\n")
        self.proc.stdin.flush()
        out = self._answer()
        self.close()
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


if __name__ == "__main__":
    model_dir, kv_bits = json.loads(sys.argv[1])
    print(json.dumps(scenario(model_dir, kv_bits)), flush=True)
    kv_dir = sys.stdin.readline()
    if kv_dir.strip():
        print(json.dumps(stored_state_errors(model_dir, kv_bits, json.loads(kv_dir))), flush=True)
