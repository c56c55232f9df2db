"""Incremental tokenization: agent clients resend the whole conversation with a
little appended, so the router tokenizes only what it has not seen.

`IncrementalEncoder` keeps the token ids of recently rendered prompts. A new
text that starts with one of them is tokenized from the last *safe cut* inside
that shared part, and the ids before the cut are reused.

A safe cut is the end of a special added token (`<|im_end|>`, `<|im_start|>`,
...). The `tokenizers` library splits its input on added tokens before
normalizing, pre-tokenizing and running the model on each piece, so the ids of
`text[:cut] + rest` are exactly the ids of `text[:cut]` followed by the ids of
`rest` whenever `cut` ends an added token that strips no whitespace after it
(`rstrip=False`). Chat templates put such tokens at every turn boundary, so the
cut lands at most one turn back. A tokenizer with a normalizer, or a text
without such a token, is tokenized in full (the fallback is always exact).
`tests/unit/test_incremental.py` checks token-for-token equality with full
tokenization on generated conversations and edits.

Units: character offsets in the text (Python str indices), token counts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from tokenizers import Tokenizer

KEY_CHARS = 256  # texts are grouped by their first KEY_CHARS characters (the system block's start)
MAX_ENTRIES = 256  # prompts remembered, least recently used dropped first
MAX_PER_KEY = 8  # prompts remembered per group
MIN_CACHED_CHARS = 4096  # shorter texts are tokenized in full: nothing to gain


@dataclass(frozen=True)
class _Seen:
    """A tokenized text and its safe cuts: (character offset, tokens before it), ascending."""

    text: str
    ids: tuple[int, ...]
    cuts: tuple[tuple[int, int], ...]


class IncrementalEncoder:
    """Token ids of texts, reusing the ids of earlier texts they start with.

    tokenizer: a `tokenizers.Tokenizer`; ids are those of
    `tokenizer.encode(text, add_special_tokens=False)`. Thread-safe (the router
    tokenizes in worker threads). `hits` / `misses` / `reused_tokens` count its work.
    """

    def __init__(self, tokenizer: Tokenizer, max_entries: int = MAX_ENTRIES):
        self._tok = tokenizer
        self._max = max_entries
        self._groups: OrderedDict[str, list[_Seen]] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused_tokens = 0
        # Special added tokens after which a cut is safe (see the module docstring).
        self._cut_tokens = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()
                            if t.special and not t.rstrip} if tokenizer.normalizer is None else {}
        self._cut_ids = frozenset(self._cut_tokens)

    @property
    def enabled(self) -> bool:
        """False when this tokenizer offers no safe cut (every text is tokenized in full)."""
        return bool(self._cut_ids)

    def encode(self, text: str) -> tuple[int, ...]:
        """The token ids of `text`, exactly as a full tokenization gives them."""
        if not self._cut_ids or len(text) < MIN_CACHED_CHARS:
            return tuple(self._tok.encode(text, add_special_tokens=False).ids)
        key = text[:KEY_CHARS]
        base, cut_chars, cut_tokens = self._longest_cut(key, text)
        if base is None:
            self.misses += 1
            enc = self._tok.encode(text, add_special_tokens=False)
            ids, cuts = tuple(enc.ids), self._cuts(text, enc, 0, 0)
        else:
            self.hits += 1
            self.reused_tokens += cut_tokens
            enc = self._tok.encode(text[cut_chars:], add_special_tokens=False)
            ids = base.ids[:cut_tokens] + tuple(enc.ids)
            cuts = tuple(c for c in base.cuts if c[0] <= cut_chars) + self._cuts(text, enc, cut_chars, cut_tokens)
        self._remember(key, _Seen(text, ids, cuts))
        return ids

    def _cuts(self, text: str, enc, char_base: int, token_base: int) -> tuple[tuple[int, int], ...]:
        """The safe cuts of `enc` (the encoding of text[char_base:], after `token_base` tokens),
        as offsets into `text`; a cut whose offset does not end its token's text is dropped."""
        ids = enc.ids
        found = [i for i, t in enumerate(ids) if t in self._cut_ids]
        if not found:
            return ()
        offsets = enc.offsets  # built anew on every access: read once
        out = []
        for i in found:
            end = char_base + offsets[i][1]
            if text.endswith(self._cut_tokens[ids[i]], 0, end):
                out.append((end, token_base + i + 1))
        return tuple(out)

    def _longest_cut(self, key: str, text: str) -> tuple[_Seen | None, int, int]:
        """(entry, cut offset, tokens before it) for the furthest safe cut of a remembered
        text inside the part it shares with `text`; (None, 0, 0) when there is none."""
        with self._lock:
            group = list(self._groups.get(key, ()))
        best: tuple[_Seen | None, int, int] = (None, 0, 0)
        for seen in group:
            cuts = seen.cuts
            lo, hi = 0, len(cuts)  # cuts[:lo] are shared with `text`; binary search for the last one
            while lo < hi:
                mid = (lo + hi) // 2
                if text.startswith(seen.text[: cuts[mid][0]]):
                    lo = mid + 1
                else:
                    hi = mid
            if lo and cuts[lo - 1][0] > best[1]:
                best = (seen, *cuts[lo - 1])
        return best

    def _remember(self, key: str, seen: _Seen) -> None:
        with self._lock:
            group = self._groups.pop(key, [])
            kept = [s for s in group if not seen.text.startswith(s.text)]  # superseded by the longer text
            self._count += 1 + len(kept) - len(group)
            kept.insert(0, seen)
            if len(kept) > MAX_PER_KEY:
                self._count -= len(kept) - MAX_PER_KEY
                del kept[MAX_PER_KEY:]
            self._groups[key] = kept
            while self._count > self._max and self._groups:
                _, dropped = self._groups.popitem(last=False)
                self._count -= len(dropped)
