"""Incremental tokenization (router.incremental) gives exactly the ids of a full
tokenization: conversations that grow, edits inside an earlier turn, whitespace
and special tokens at every boundary. Uses a small byte-level BPE tokenizer
built here with the `tokenizers` library (no model file)."""

from __future__ import annotations

import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from kvrouter.router import incremental
from kvrouter.router.incremental import IncrementalEncoder

WORDS = ("alpha beta gamma delta tool call result file path line error test run build merge commit "
         "the of and to in is that for it with as on be at by this").split()
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def byte_level_bpe() -> Tokenizer:
    """A byte-level BPE (the GPT-2 / SmolLM family) trained on the words above, with
    ChatML's special tokens as added tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(random.Random(i).choices(WORDS, k=50)) + "\n\n  x" for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIAL])
    return tok


def chatml(turns: list[tuple[str, str]], generation_prompt: bool = True) -> str:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def words(rng: random.Random, n: int) -> str:
    seps = [" ", " ", " ", "\n", "\n\n", "  ", "\t"]
    return "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(n))


def test_growing_conversations_and_edits_match_full_tokenization(monkeypatch):
    monkeypatch.setattr(incremental, "MIN_CACHED_CHARS", 0)
    tok = byte_level_bpe()
    enc = IncrementalEncoder(tok)
    assert enc.enabled
    rng = random.Random(7)
    system = ("system", words(rng, 300))
    for session in range(6):
        turns = [system, ("user", words(rng, 20))]
        for _ in range(5):
            text = chatml(turns)
            assert list(enc.encode(text)) == tok.encode(text, add_special_tokens=False).ids
            # the client sends the generated reply back (maybe with a different trailing space)
            turns += [("assistant", words(rng, 15) + rng.choice(["", " ", "\n"])), ("user", words(rng, 10))]
        # an edit inside an earlier turn (a rewritten environment block)
        edited = turns[:1] + [("user", words(rng, 20))] + turns[2:]
        text = chatml(edited)
        assert list(enc.encode(text)) == tok.encode(text, add_special_tokens=False).ids
    assert enc.hits > 20 and enc.reused_tokens > 0


def test_a_cut_never_lands_inside_text_that_changed():
    tok = byte_level_bpe()
    enc = IncrementalEncoder(tok)
    base = chatml([("system", "alpha " * 2000), ("user", "beta gamma")])
    enc.encode(base)
    # same start, then text glued to the last special token: the boundary moves
    for tail in ("assistant", " assistant\n", "\n\n", "<|im_end|>"):
        text = base + tail
        assert list(enc.encode(text)) == tok.encode(text, add_special_tokens=False).ids
    hits = enc.hits
    assert hits >= 4
    # a text sharing only part of the system block, cut inside a word
    other = base[:3001] + "x" + base[3001:]
    assert list(enc.encode(other)) == tok.encode(other, add_special_tokens=False).ids


def test_a_tokenizer_with_a_normalizer_is_tokenized_in_full():
    from tokenizers import normalizers

    tok = byte_level_bpe()
    tok.normalizer = normalizers.Lowercase()
    enc = IncrementalEncoder(tok)
    text = chatml([("system", "Alpha " * 2000)])
    assert not enc.enabled
    assert list(enc.encode(text)) == tok.encode(text, add_special_tokens=False).ids
    assert list(enc.encode(text + "x")) == tok.encode(text + "x", add_special_tokens=False).ids
    assert enc.hits == 0
