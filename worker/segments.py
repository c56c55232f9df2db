"""Where a request's prefill stops: the segments handed to mlx-lm's `BatchGenerator`.

`BatchGenerator.insert_segments` prefills each segment of a sequence in its
own step and reports the end of every segment, so segment ends are the points
where the engine can read the KV state. They are placed at

- absolute multiples of the prefill chunk size, so a run that resumed from a
  checkpoint on a chunk boundary computes the same sums as one that did not
  (measured: identical fp32 logits on the CPU; ~3e-5 apart mid-chunk), and
- every position where the store's policy plans a checkpoint.

The last prompt token is always a segment of its own: mlx-lm feeds it in the
first decode step, which produces the first token's logits.
"""

from __future__ import annotations

import time


def prefill_segments(prompt: list[int], start: int, chunk: int, store_points=()) -> list[list[int]]:
    """Splits `prompt[start:]` into segments for `BatchGenerator.insert_segments`.

    prompt: token ids of the whole prompt (at least one token).
    start: tokens already in the KV state (0 <= start < len(prompt)).
    chunk: prefill chunk size in tokens; no segment is longer, and every cut
        that is not a store point sits at a multiple of it.
    store_points: prompt positions (tokens) where a checkpoint is planned;
        those inside `(start, len(prompt) - 1)` become cuts too.
    Returns non-empty segments; their concatenation is `prompt[start:]`, and
    the last one is `[prompt[-1]]`.
    Raises ValueError when `start` is out of range or `chunk` < 1.
    """
    end = len(prompt) - 1
    if not 0 <= start <= end:
        raise ValueError(f"start {start} outside the prompt of {len(prompt)} tokens")
    if chunk < 1:
        raise ValueError("chunk must be at least 1 token")
    cuts = set(range((start // chunk + 1) * chunk, end, chunk))
    cuts.update(p for p in store_points if start < p < end)
    points = [start, *sorted(cuts), end]
    segments = [prompt[a:b] for a, b in zip(points, points[1:]) if b > a]
    return segments + [prompt[end:]]


def generator_inputs(segments, max_tokens, caches, all_tokens, samplers, default_max_tokens: int):
    """The per-sequence arguments of a generator's `insert_segments` (mlx-lm's
    `BatchGenerator.insert_segments` and the engine's own generators), defaults filled
    in: yields (segments, max_tokens, cache, tokens the cache holds, sampler) per
    sequence. Empty segments are dropped and the last prompt token becomes a segment of
    its own (as the batch prefills it: its logits start decoding). Raises ValueError
    for a sequence with an empty prompt."""
    n = len(segments)
    max_tokens = max_tokens or [default_max_tokens] * n
    caches = caches or [None] * n
    all_tokens = all_tokens or [[] for _ in range(n)]
    samplers = samplers or [None] * n
    for seq, m, c, held, s in zip(segments, max_tokens, caches, all_tokens, samplers):
        seq = [list(x) for x in seq if x]
        if not seq:
            raise ValueError("a sequence has an empty prompt")
        if len(seq[-1]) != 1:
            seq.append(seq[-1][-1:])
            seq[-2] = seq[-2][:-1]
        yield seq, m, c, held, s


def advance_prefill(seq, chunk_len: int, counters, tic: float) -> bool:
    """Bookkeeping after `chunk_len` tokens of `seq`'s first segment went through the
    model (`seq`: a sequence prefilled one chunk at a time, with `segments` (token id
    lists) and `done` (prompt tokens processed)): the chunk leaves the segment, an
    emptied segment is dropped, and `counters` (mlx-lm `BatchCounters`) count the tokens
    and the seconds since `tic` (perf_counter). Returns True when the segment ended."""
    segment = seq.segments[0]
    del segment[:chunk_len]
    end = not segment
    if end:
        seq.segments.pop(0)
    seq.done += chunk_len
    counters.prompt_tokens += chunk_len
    counters.prompt_time += time.perf_counter() - tic
    return end
