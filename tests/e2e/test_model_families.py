"""Model families beyond plain KV caches, through the HTTP API of a real
`kvrouter serve` with the official `openai` client: sliding-window (`gpt_oss`,
`gemma3_text`), recurrent + full attention (`qwen3_next`), recurrent only
(`mamba2`), and a plain `llama` with `--kv-bits 8`, each a small random-weight
model directory built by the test (tests/support/tiny_models.py). One server at a
time, stopped before the next family starts.

Per family, prompts as token ids (`/v1/completions`), one decode slot, small store
policy values (cold stores aligned down to 64 tokens):
  1. a cold prompt S+A stores a 192-token checkpoint (S is 200 tokens);
  2. its next turn (S+A, its 4 generated tokens, more) reuses the live state by extension;
  3. after an unrelated request took the slot, S+C reuses the checkpoint from the RAM tier;
  4. after a restart, S+D loads it from disk;
  5. a prompt diverging at token 100, inside the live state, reuses those 100 tokens only
     where every layer can be cut back there (not past a 32-token window that has
     wrapped, never recurrent state);
  6. a prompt diverging at token 196 reuses the 192-token checkpoint below the divergence.
Every output equals an uncached single-sequence run of the same model
(tests/support/family_reference.py: what an uncached `--decode-concurrency 1` worker
computes; with `--kv-bits`, with the same quantization), compared where the top-2
margin exceeds 1e-3. Then `kvrouter cache verify` passes, and every stored entry's
state is what prefilling its own tokens gives: its layers' counts equal its length
(checked on load) and it continues to the same logits as a fresh prefill of those
tokens, within 1e-5 of the largest logit (1e-3 with `--kv-bits 8`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvrouter.router import cache_cli
from tests.support import family_reference
from tests.support.family_reference import MAX_TOKENS
from tests.support.server import KvrouterServer, openai_client

MARGIN = 1e-3  # top-2 logit margin below which a greedy token is not compared
STATE_ERROR = 1e-5  # stored state vs a fresh prefill: largest logit difference / largest logit
# With --kv-bits 8 a last-bit difference before quantizing (a prefill chunked otherwise) can move a
# key one quantization step: measured up to 1.2e-4 of the largest logit.
QUANTIZED_STATE_ERROR = 1e-3
FLAGS = ["--decode-concurrency", "1", "--kv-cache-min-tokens", "64", "--kv-cache-boundary-align-tokens", "64",
         "--kv-cache-boundary-trim-tokens", "8", "--kv-cache-continued-interval-tokens", "4096",
         "--kv-cache-warm-mb", "0"]  # after the restart the hit must come from disk (no RAM-tier warm-up)
# family: (--kv-bits, tokens reused by a prompt diverging at 100 inside the live state)
FAMILIES = {
    "gpt_oss": (None, 0),  # its 32-token window has wrapped: no cutting back
    "gemma3_text": (None, 0),
    "qwen3_next": (None, 0),  # recurrent layers: never cut back
    "mamba2": (None, 0),
    "llama": (8, 100),  # quantized full KV caches: cut back anywhere
}


def check(server, step: dict, cached: int, source: str) -> None:
    """Sends the step's prompt; asserts its reuse (usage, and the route header, which
    holds the real figure in a non-streamed response) and that its output is the
    reference run's, where margins allow a comparison."""
    prompt = step["prompt"]
    raw = openai_client(server).completions.with_raw_response.create(
        model=server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    body = raw.parse()
    route = dict(part.split("=", 1) for part in raw.headers["x-kvrouter-route"].split("; "))
    assert (body.usage.prompt_tokens_details.cached_tokens, route["source"], int(route["cached"])) == \
        (cached, source, cached), f"prompt of {len(prompt)} tokens"
    margins = step["margins"]
    assert margins[0] > MARGIN
    if all(m > MARGIN for m in margins):
        assert body.choices[0].text == step["text"]
        assert body.usage.completion_tokens == len(step["tokens"])
    else:  # a near-tie later on: only the text before it is compared
        k = next(i for i, m in enumerate(margins) if m <= MARGIN)
        assert body.choices[0].text.startswith(step["prefix_texts"][k])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reuse_live_ram_disk_and_divergence_per_family(family, tiny_model, tmp_path):
    kv_bits, at_divergence = FAMILIES[family]
    model_dir = tiny_model(family)
    helper = family_reference.Helper(model_dir, kv_bits)  # computes the references while the server starts
    kv_dir = tmp_path / "kv"
    args = ["--model", str(model_dir), "--kv-cache-dir", str(kv_dir), *FLAGS]
    if kv_bits:
        args += ["--kv-bits", str(kv_bits)]
    server = KvrouterServer(args, tmp_path / "serve.log")
    server.model = model_dir.name
    try:
        server.start()
        steps = helper.scenario()
        assert len(steps[0]["tokens"]) == MAX_TOKENS, "the next turn must extend the live state exactly"
        first, turn, unrelated, ram, disk, inside, past = steps
        check(server, first, 0, "none")
        check(server, turn, len(first["prompt"]) + MAX_TOKENS, "live")
        check(server, unrelated, 0, "none")  # takes the only slot: the live state is evicted
        check(server, ram, 192, "ram")
        assert server.stop() == 0
        server = KvrouterServer(args, tmp_path / "serve.log")
        server.model = model_dir.name
        server.start()
        check(server, disk, 192, "disk")
        check(server, inside, at_divergence, "live" if at_divergence else "none")
        check(server, past, 192, "ram")
        assert server.stop() == 0  # writes the shutdown checkpoint
        assert cache_cli.run(SimpleNamespace(cache_command="verify"), kv_dir) == 0  # `kvrouter cache verify`
        entries = helper.stored_state_errors(kv_dir)
    finally:
        server.stop()
        helper.close()
    assert {e["kind"] for e in entries} >= {"anchor", "evict", "shutdown"}
    tolerance = QUANTIZED_STATE_ERROR if kv_bits else STATE_ERROR
    assert all(e["error"] <= tolerance for e in entries), entries
