"""Token positions of character offsets in a rendered prompt, tokenizing only the
turn around each offset.

A client's checkpoint hint is a character offset in the rendered prompt (where a
marked block ends); the worker needs a token position. The prompt's token ids are
already known (`router.incremental` tokenizes only what a resent conversation
adds), so tokenizing the whole text again with offsets would undo that saving.
The `tokenizers` library splits its input on special added tokens before anything
else (the reason `router.incremental`'s cuts are exact), so the text between two
special tokens (one chat turn's content) tokenizes alone exactly as inside the
prompt. `TokenPositions` finds the turn holding an offset, tokenizes that turn
(remembering the last few: a system turn is the same in every request of a
session) and counts its tokens that end at or before the offset. Whenever the
turn's tokens do not match the prompt's, it falls back to the whole text (always
exact).

Units: character offsets (Python str indices), token counts.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

from tokenizers import Tokenizer

MAX_SEGMENTS = 32  # turns remembered with their token end offsets, least recently used dropped first


class TokenPositions:
    """Token positions of character offsets, for one `tokenizers.Tokenizer`. Thread-safe."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        added = tokenizer.get_added_tokens_decoder().items()
        self._specials = {i: t.content for i, t in added if t.special and not t.rstrip and not t.lstrip} \
            if tokenizer.normalizer is None else {}
        self._segments: OrderedDict[str, tuple[tuple[int, ...], list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def positions(self, text: str, ids, char_offsets) -> tuple[int, ...]:
        """For each offset c in `char_offsets`, the number of tokens of `text` (whose ids
        are `ids`) that end at or before c: a token straddling c is left out, so each
        position is an exact token prefix. Sorted, unique, each in (0, len(ids))."""
        ids = tuple(ids)
        cuts = self._cuts(text, ids)
        out = set()
        for c in char_offsets:
            pos = self._position(text, ids, cuts, c) if cuts is not None else None
            if pos is None:
                pos = self._whole(text, ids, c)
            if 0 < pos < len(ids):
                out.add(pos)
        return tuple(sorted(out))

    def _cuts(self, text: str, ids: tuple[int, ...]) -> list[tuple[int, int, int]] | None:
        """(start char, end char, token index) of every special token of `ids`, in order;
        None when they cannot be matched to `text`."""
        if not self._specials:
            return None
        out, cursor = [], 0
        for i, t in enumerate(ids):
            content = self._specials.get(t)
            if content is None:
                continue
            start = text.find(content, cursor)
            if start < 0:
                return None
            cursor = start + len(content)
            out.append((start, cursor, i))
        return out

    def _position(self, text: str, ids: tuple[int, ...], cuts, c: int) -> int | None:
        k = bisect.bisect_right([end for _, end, _ in cuts], c)  # specials ending at or before c
        seg_start, first = (cuts[k - 1][1], cuts[k - 1][2] + 1) if k else (0, 0)
        seg_end = cuts[k][0] if k < len(cuts) else len(text)
        if c > seg_end:
            return None  # inside a special token: not a block end
        seg_ids, ends = self._segment(text[seg_start:seg_end])
        if ids[first: first + len(seg_ids)] != seg_ids:
            return None
        return first + bisect.bisect_right(ends, c - seg_start)

    def _segment(self, segment: str) -> tuple[tuple[int, ...], list[int]]:
        with self._lock:
            hit = self._segments.get(segment)
            if hit is not None:
                self._segments.move_to_end(segment)
                return hit
        enc = self._tok.encode(segment, add_special_tokens=False)
        value = (tuple(enc.ids), [end for _, end in enc.offsets])
        with self._lock:
            self._segments[segment] = value
            while len(self._segments) > MAX_SEGMENTS:
                self._segments.popitem(last=False)
        return value

    def _whole(self, text: str, ids: tuple[int, ...], c: int) -> int:
        enc = self._tok.encode(text, add_special_tokens=False)
        if tuple(enc.ids) != ids:
            return 0  # not the text of these ids: place nothing
        return bisect.bisect_right([end for _, end in enc.offsets], c)
