"""One request at a time, behind the part of mlx-lm's `BatchGenerator` interface
the engine uses, for models whose caches mlx-lm cannot batch (a layer without
`merge`: `QuantizedKVCache` with `--kv-bits`, `ChunkedKVCache`). mlx_lm.server
serves such models one request at a time too.

Same contract as `BatchGenerator`: `insert_segments` queues sequences (a
segment list each, the last segment one token); each `next()` call does one
step of the sequence at the head of the queue (one prefill chunk of at most
`prefill_step_size` tokens of the current segment, or one decode step) and
returns (prompt responses, generation responses) with the same fields;
every reported token has been fed, so a sequence's `tokens` are always what its
cache holds; `extract_cache`, `remove` and `stats` behave as there.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch, StopSequences
from mlx_lm.generate_utils import BatchCounters, BatchCountersSnapshot, BatchStats
from mlx_lm.sample_utils import greedy_sampler

from kvrouter.worker.segments import advance_prefill, generator_inputs


@dataclass
class _Sequence:
    uid: int
    segments: list[list[int]]
    max_tokens: int
    cache: list
    tokens: list[int]
    sampler: object
    matcher: object
    total: int
    done: int = 0
    generated: int = 0
    next_token: mx.array | None = field(default=None, repr=False)  # sampled, not fed yet


class SequentialGenerator:
    """Runs queued sequences one after another (see module docstring).

    model: the mlx-lm model; stop_tokens: sequences of token ids that end a
    generation (finish reason "stop"); prefill_step_size: tokens per prefill step;
    stream: the MLX stream to run on (None: the default one).
    """

    def __init__(self, model, *, stop_tokens=None, prefill_step_size: int = 2048, stream=None):
        self.model = model
        self.prefill_step_size = prefill_step_size
        self._stop = StopSequences(stop_tokens)
        self._stream = stream
        self._queue: deque[_Sequence] = deque()
        self._uid = 0
        self._counters = BatchCounters()

    @contextlib.contextmanager
    def stats(self):
        """The work done while the block runs (`mlx_lm.generate_utils.BatchStats`)."""
        stats = BatchStats()
        start = BatchCountersSnapshot(**asdict(self._counters))
        try:
            yield stats
        finally:
            stats += BatchCountersSnapshot.between(start, BatchCountersSnapshot(**asdict(self._counters)))

    def insert_segments(self, segments, max_tokens=None, caches=None, all_tokens=None, samplers=None) -> list[int]:
        """Queues sequences: per sequence its prompt segments (token id lists), max
        tokens to generate, cache (None: an empty one is not made here, pass one),
        tokens its cache holds already, and sampler (None: greedy). Returns their uids."""
        uids = []
        for seq, m, c, at, s in generator_inputs(segments, max_tokens, caches, all_tokens, samplers, 128):
            if c is None:
                raise ValueError("SequentialGenerator needs a cache per sequence")
            uids.append(self._uid)
            self._queue.append(_Sequence(self._uid, seq, m, c, list(at), s or greedy_sampler, self._stop.matcher(),
                                         sum(len(x) for x in seq)))
            self._uid += 1
        return uids

    def next(self):
        """One step of the sequence at the head of the queue: (prompt responses, generation responses)."""
        if not self._queue:
            return [], []
        with mx.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            s = self._queue[0]
            if s.next_token is None:
                return self._prefill(s), []
            return [], self._decode(s)

    def _forward(self, s: _Sequence, tokens: list[int]) -> mx.array:
        logits = self.model(mx.array(tokens, dtype=mx.int32)[None], cache=s.cache)
        s.tokens += tokens
        return logits[:, -1, :]

    def _sample(self, s: _Sequence, logits: mx.array) -> None:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        s.next_token = s.sampler(logprobs)
        mx.eval(s.next_token)

    def _prefill(self, s: _Sequence) -> list:
        tic = time.perf_counter()
        segment = s.segments[0]
        if len(s.segments) == 1:  # the last prompt token: its logits give the first token
            self._sample(s, self._forward(s, segment))
            advance_prefill(s, len(segment), self._counters, tic)
            return [PromptProcessingBatch.Response(s.uid, (s.total, s.total), True, True)]
        chunk = segment[: self.prefill_step_size]
        self._forward(s, chunk)
        mx.eval([c.state for c in s.cache])
        end = advance_prefill(s, len(chunk), self._counters, tic)
        return [PromptProcessingBatch.Response(s.uid, (s.done, s.total), end, False)]

    def _decode(self, s: _Sequence) -> list:
        tic = time.perf_counter()
        token = int(s.next_token.item())
        logits = self._forward(s, [token])
        s.generated += 1
        reason = "length" if s.generated >= s.max_tokens else None
        if s.matcher.advance(token):
            reason = "stop"
        if reason is None:
            self._sample(s, logits)
        else:
            self._queue.popleft()
        self._counters.decode_time += time.perf_counter() - tic
        self._counters.generation_tokens += 1
        self._counters.generation_steps += 1
        done = reason is not None
        return [GenerationBatch.Response(s.uid, token, None, reason, s.cache if done else None,
                                         s.tokens if done else None)]

    def extract_cache(self, uids) -> dict:
        """{uid: (cache, tokens it holds)} of queued sequences (their own objects: copy before writing)."""
        return {s.uid: (s.cache, s.tokens) for s in self._queue if s.uid in set(uids)}

    def remove(self, uids, return_prompt_caches: bool = False) -> dict:
        """Drops sequences; returns `extract_cache(uids)` when asked."""
        out = self.extract_cache(uids) if return_prompt_caches else {}
        self._queue = deque(s for s in self._queue if s.uid not in set(uids))
        return out
