"""Tokenizers for loaded models, built without MLX.

Two jobs:

* ``tokenizer_json_from_gguf`` turns the ``tokenizer.ggml.*`` metadata of a
  GGUF file (GPT-2 style byte-level BPE) into the JSON of a ``tokenizers``
  ``Tokenizer``.
* ``build_hf_tokenizer`` wraps such a JSON in a ``transformers`` fast tokenizer
  so callers can render chat templates.

The router imports this module, so it must never import ``mlx``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CONTROL_TOKEN_TYPE = 3
"""``tokenizer.ggml.token_type`` value of a control (special) token."""

TURN_END_TOKEN = "<|im_end|>"
"""ChatML end-of-turn token; treated as an extra end-of-sequence id when present."""


def tokenizer_json_from_gguf(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None,
) -> str:
    """Build a byte-level BPE tokenizer from GGUF tokenizer metadata.

    Args:
        tokens: ``tokenizer.ggml.tokens``; the index of each string is its id.
        merges: ``tokenizer.ggml.merges``, strings ``"left right"`` in rank order.
        token_types: ``tokenizer.ggml.token_type`` (same length as ``tokens``) or
            None; ids whose type is 3 (control) become special added tokens.

    Returns:
        The JSON text of a ``tokenizers.Tokenizer`` (``Tokenizer.to_str()``).

    Raises:
        ValueError: a merge string has no space, or ``token_types`` has the wrong length.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merge_pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"GGUF merge without a space: {merge!r}")
        merge_pairs.append((left, right))
    bpe = models.BPE(vocab, merge_pairs, unk_token=None, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if token_types is not None:
        if len(token_types) != len(tokens):
            raise ValueError(f"{len(token_types)} token types for {len(tokens)} tokens")
        specials = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(token_types)
            if int(kind) == CONTROL_TOKEN_TYPE
        ]
        tokenizer.add_special_tokens(specials)
    return tokenizer.to_str()


def eos_token_ids_for(tokenizer_json: str, eos_token_id: int | None) -> tuple[int, ...]:
    """End-of-sequence ids: the model's own eos id plus ``<|im_end|>`` when the vocab has it.

    Args:
        tokenizer_json: JSON of a ``tokenizers`` Tokenizer.
        eos_token_id: the model's declared eos id, or None.

    Returns:
        Distinct ids, the declared one first.
    """
    ids: list[int] = [] if eos_token_id is None else [int(eos_token_id)]
    turn_end = Tokenizer.from_str(tokenizer_json).token_to_id(TURN_END_TOKEN)
    if turn_end is not None and turn_end not in ids:
        ids.append(turn_end)
    return tuple(ids)


def build_hf_tokenizer(
    tokenizer_json: str,
    chat_template: str | None,
    eos_token_ids: Iterable[int],
    bos_token_id: int | None,
) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers`` JSON in a ``transformers.PreTrainedTokenizerFast``.

    Args:
        tokenizer_json: JSON of a ``tokenizers`` Tokenizer (``ModelBundle.tokenizer_json``).
        chat_template: Jinja chat template, or None (``apply_chat_template`` then raises).
        eos_token_ids: end-of-sequence ids; the first becomes ``eos_token``.
        bos_token_id: beginning-of-sequence id, or None.

    Returns:
        A fast tokenizer whose ``apply_chat_template(messages, add_generation_prompt=True,
        tokenize=False)`` renders prompt text (``tools=[...]`` is passed to the template).

    Raises:
        ValueError: an id is outside the vocabulary.
    """
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer_json)
    special: dict[str, Any] = {}
    eos_ids = list(eos_token_ids)
    if eos_ids:
        special["eos_token"] = _token_of(backend, eos_ids[0])
    if bos_token_id is not None:
        special["bos_token"] = _token_of(backend, bos_token_id)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.chat_template = chat_template
    return tokenizer


def _token_of(backend: Tokenizer, token_id: int) -> str:
    token = backend.id_to_token(int(token_id))
    if token is None:
        raise ValueError(f"token id {token_id} is not in the vocabulary")
    return token


def gguf_tokenizer_fields(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Pick tokenizer fields out of GGUF metadata already converted to Python values.

    Args:
        metadata: GGUF key/value metadata with scalars as ints/floats and arrays as lists.

    Returns:
        dict with ``tokenizer_json`` (str), ``chat_template`` (str | None),
        ``eos_token_ids`` (tuple[int, ...]) and ``bos_token_id`` (int | None).

    Raises:
        ValueError: the tokenizer is not a GPT-2 style BPE (``tokenizer.ggml.model != "gpt2"``)
            or tokens/merges are missing.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; only 'gpt2' (byte-level BPE)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
    tokenizer_json = tokenizer_json_from_gguf(tokens, merges, metadata.get("tokenizer.ggml.token_type"))
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    return {
        "tokenizer_json": tokenizer_json,
        "chat_template": metadata.get("tokenizer.chat_template"),
        "eos_token_ids": eos_token_ids_for(tokenizer_json, None if eos is None else int(eos)),
        "bos_token_id": None if bos is None else int(bos),
    }
