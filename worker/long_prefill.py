"""Long prompts prefilled outside mlx-lm's batch, at the rate of a plain
single-sequence loop (issue 15, item 4).

mlx-lm's `BatchGenerator` prefills through its batch caches (`BatchKVCache` and
kin), whose attention mask is always an explicit array (the batch's left
padding is part of it), so attention cannot take the fused causal path. Measured
on an H200 (8B shape, bf16, 2048-token chunks): 32K prompt tokens in 8.5 s
through the batch against 2.0-2.2 s for `model(chunk, cache=...)` on one
sequence's own caches, where mlx-lm builds the plain causal mask; no gap at 8K.
`mlx_lm.server` pays the same.

`LongPrefillGenerator` wraps a `BatchGenerator` behind the part of its interface
the engine uses (`insert_segments`, `next`, `extract_cache`, `remove`, `stats`).
A sequence whose prompt reaches `min_tokens` (and has more than its last token
to prefill) is prefilled here instead of in the batch: on its own caches (the
ones given to `insert_segments`, written in place, as `SequentialGenerator`
does), one chunk of at most `prefill_step_size` tokens per `next()` call, right
after the batch's own step, so sequences in the batch keep decoding while it
prefills. A step prefills at most `prefill_step_size` tokens here, one chunk per
sequence, whole segments only (chunks end where the segments end), the sequences
with the fewest prompt tokens left first (arrival order among equals): a hit with a
40-token suffix over a long stored prefix gets its first token in the next step
instead of waiting behind a cold 5K-token prefill (on the H200 such hits waited three
2048-token chunks, ~0.4 s, when they arrived together), and several such hits join
the batch in the same step. A sequence left out of a step for lack of budget goes
first in the next one, so a long prefill moves at least every other step however
many short ones arrive (before: first come first served; on the H200 four hits
arriving together got their first tokens 0.33, 0.47, 0.53 and 0.55 s after
arrival). When only the last prompt token is left, it goes through the model here
too and the sequence's first token is sampled from its logits (its sampler, else the
batch's; a token in `stop_tokens` ends it with "stop", max_tokens 1 with "length"),
reported among the generation responses of that same `next()` call; the sequence then
joins the batch with that token as its input (the batch merges its caches, as it merges
a restored state) and decodes its next tokens there. Before, the last prompt token went
to the batch, and the first token came two batch steps later (the merge step, then a
decode step: 60-100 ms for a hit on a 5K-token prefix on the H200, on top of its
prefill). Where the sequence's caches can be trimmed (attention layers: the engine can
cut the state back to any earlier position) that happens in the step that prefills its
last chunk; otherwise (recurrent layers, a wrapped sliding window) the end of the last
chunk is reported first, so the engine can read the state exactly there, and the last
token runs at the start of the next step's long prefills.

Same contract as `BatchGenerator`: the segments given are honoured exactly
(each chunk stays inside its segment, and `end_of_segment` is reported where a
segment ends), progress is counted in prompt tokens of the segments, and within
one `next()` call no sequence moves past a segment end it reports, so the
engine reads the state of exactly that position afterwards (`extract_cache`):
checkpoints at planned positions, including exact positions of recurrent and
sliding-window layers, work as they do in the batch. uids are this object's own
(the batch's are translated both ways). `stats()` counts the long prefills'
tokens and time (the last token's and the first token's sampling included) as prompt
processing, with the batch's.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import asdict, dataclass

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.generate_utils import BatchCounters, BatchCountersSnapshot, BatchStats
from mlx_lm.models.cache import make_prompt_cache

from kvrouter.worker.segments import advance_prefill, generator_inputs


@dataclass
class _Long:
    """A sequence prefilled outside the batch: its remaining segments (the last one
    is its last prompt token), caches, the tokens they hold, and what the batch
    needs when it joins."""

    uid: int
    segments: list[list[int]]
    caches: list
    tokens: list[int]
    max_tokens: int
    sampler: object
    total: int  # prompt tokens in its segments
    done: int = 0
    passed_over: bool = False  # left out of the last step for lack of budget: it goes first in the next


class LongPrefillGenerator:
    """`BatchGenerator` with long prompts prefilled outside the batch (see module docstring).

    model: the mlx-lm model; batch: the `BatchGenerator` that decodes (and
    prefills the shorter prompts); min_tokens: a sequence whose prompt (tokens its
    cache holds plus its segments) reaches this many tokens is prefilled here
    (must be at least 2); prefill_step_size: tokens per chunk (the batch's own);
    stop_tokens: token ids that end a sequence when sampled as its first token (the
    batch's single-token stop sequences; the batch checks the later tokens itself).
    Raises ValueError for min_tokens < 2 or prefill_step_size < 1.
    """

    def __init__(self, model, batch: BatchGenerator, *, min_tokens: int, prefill_step_size: int,
                 stop_tokens=()):
        if min_tokens < 2:
            raise ValueError("min_tokens must be at least 2")
        if prefill_step_size < 1:
            raise ValueError("prefill_step_size must be at least 1")
        self.model = model
        self.batch = batch
        self.min_tokens = min_tokens
        self.prefill_step_size = prefill_step_size
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self._long: deque[_Long] = deque()
        self._joined: set[int] = set()  # batch uids that joined with their first token (their prompt response is dropped)
        self._uid = 0
        self._to_inner: dict[int, int] = {}  # our uid -> the batch's
        self._to_outer: dict[int, tuple[int, int]] = {}  # the batch's uid -> (ours, progress prefilled here)
        self._counters = BatchCounters()
        # With `trace` a list, each `next()` appends what its parts took (`KVROUTER_TRACE_STEPS`):
        # ("batch", ms) and per long chunk ("long", tokens, tokens its caches held, ms); the
        # device is synchronized before each part, so queued work is not counted in the next.
        self.trace: list | None = None

    @property
    def stream(self):
        """The MLX stream the batch (and every long prefill) runs on."""
        return self.batch.stream

    @property
    def prefilling(self) -> tuple[int, ...]:
        """uids of the sequences waiting or being prefilled outside the batch, in order."""
        return tuple(s.uid for s in self._long)

    @contextlib.contextmanager
    def stats(self):
        """The work done while the block runs (`mlx_lm.generate_utils.BatchStats`): the
        batch's, plus the long prefills' tokens and time as prompt processing."""
        stats = BatchStats()
        start = BatchCountersSnapshot(**asdict(self._counters))
        with self.batch.stats() as inner:
            try:
                yield stats
            finally:
                own = BatchCountersSnapshot.between(start, BatchCountersSnapshot(**asdict(self._counters)))
        stats += inner
        stats.prompt_tokens += own.prompt_tokens
        stats.prompt_time += own.prompt_time

    def insert_segments(self, segments, max_tokens=None, caches=None, all_tokens=None, samplers=None) -> list[int]:
        """Queues sequences, as `BatchGenerator.insert_segments`: per sequence its prompt
        segments (token id lists, not all empty), max tokens to generate (default 128),
        caches (None: new ones), the tokens those caches hold already, and sampler
        (None: the batch's). Returns their uids. Raises ValueError for an empty prompt."""
        uids = []
        for seq, m, c, held, s in generator_inputs(segments, max_tokens, caches, all_tokens, samplers,
                                                   self.batch.max_tokens):
            total = sum(len(x) for x in seq)
            uid, self._uid = self._uid, self._uid + 1
            if total > 1 and len(held) + total >= self.min_tokens:
                self._long.append(_Long(uid, seq, c if c is not None else make_prompt_cache(self.model),
                                        list(held), m, s, total))
            else:
                (inner,) = self.batch.insert_segments([seq], max_tokens=[m], caches=[c], all_tokens=[list(held)],
                                                      samplers=[s])
                self._link(uid, inner, 0)
            uids.append(uid)
        return uids

    def next(self):
        """One step: the batch's (a decode step and a chunk of its prompts), then up to
        `prefill_step_size` tokens of the long prompts, one chunk per sequence in
        `_turn` order (the first may take part of a segment longer than the budget, the
        others only whole segments that fit what is left), with the first tokens of
        those that finish. Returns (prompt responses,
        generation responses) as `BatchGenerator.next` does, with this object's uids."""
        with mx.stream(self.batch.stream):
            tic = self._trace_start()
            prompt_out, gen_out = self.batch.next()
            self._trace_end(tic, "batch")
            prompt_out = [self._outer_prompt(r) for r in prompt_out if not self._joined_response(r)]
            gen_out = [self._outer_generated(r) for r in gen_out]
            budget = self.prefill_step_size  # tokens this step prefills here
            for seq in sorted(self._long, key=self._turn):
                if budget <= 0 or (budget < self.prefill_step_size and len(seq.segments[0]) > budget):
                    seq.passed_over = True
                    continue
                seq.passed_over = False
                tic, held = self._trace_start(), len(seq.tokens)
                response, n, first = self._prefill_chunk(seq, budget)
                self._trace_end(tic, "long", n, held)
                prompt_out.append(response)
                if first is not None:
                    gen_out.append(first)
                budget -= n
        return prompt_out, gen_out

    def extract_cache(self, uids) -> dict:
        """{uid: (caches, tokens they hold)}. For a sequence prefilling outside the batch
        its own cache objects (copy before writing into them); else the batch's answer."""
        want = set(uids)
        out = {s.uid: (s.caches, list(s.tokens)) for s in self._long if s.uid in want}
        inner = {self._to_inner[u]: u for u in want if u in self._to_inner}
        if inner:
            for iu, value in self.batch.extract_cache(list(inner)).items():
                out[inner[iu]] = value
        return out

    def remove(self, uids, return_prompt_caches: bool = False) -> dict:
        """Drops sequences wherever they are; returns `extract_cache(uids)` when asked."""
        out = self.extract_cache(uids) if return_prompt_caches else {}
        want = set(uids)
        self._long = deque(s for s in self._long if s.uid not in want)
        inner = [self._to_inner.pop(u) for u in want if u in self._to_inner]
        if inner:
            self.batch.remove(inner)
            for iu in inner:
                self._to_outer.pop(iu, None)
                self._joined.discard(iu)
        return out

    # -- inside -------------------------------------------------------------------
    def _trace_start(self) -> float:
        if self.trace is None:
            return 0.0
        mx.synchronize()
        return time.perf_counter()

    def _trace_end(self, tic: float, *what) -> None:
        if self.trace is not None:
            mx.synchronize()
            self.trace.append((*what, round((time.perf_counter() - tic) * 1000, 1)))

    @staticmethod
    def _turn(s: _Long) -> tuple:
        """Sort key of a step's order: those passed over last step, then the fewest
        prompt tokens left (the sort is stable: arrival order among equals)."""
        return (not s.passed_over, s.total - s.done)

    def _link(self, uid: int, inner: int, offset: int) -> None:
        self._to_inner[uid] = inner
        self._to_outer[inner] = (uid, offset)

    def _outer_prompt(self, r):
        uid, offset = self._to_outer[r.uid]
        return PromptProcessingBatch.Response(uid, (r.progress[0] + offset, r.progress[1] + offset),
                                              r.end_of_segment, r.end_of_prompt)

    def _joined_response(self, r) -> bool:
        """Whether `r` is the batch's prompt response for a sequence that joined it with
        its first token: its prompt was reported here already (it is dropped)."""
        if r.uid not in self._joined:
            return False
        if r.end_of_prompt:
            self._joined.discard(r.uid)
        return True

    def _outer_generated(self, r):
        uid, _ = self._to_outer[r.uid]
        if r.finish_reason is not None:  # it left the batch
            del self._to_outer[r.uid]
            del self._to_inner[uid]
            self._joined.discard(r.uid)
        r.uid = uid
        return r

    def _prefill_chunk(self, s: _Long, limit: int):
        """One chunk (at most `limit` tokens) of `s`'s current segment through the model on
        its own caches (mlx-lm's causal mask for one sequence), and its first token when
        only its last prompt token is left (`_first_token`; in the same call where its
        caches can be trimmed back, else in the next). Returns (its prompt response, tokens
        prefilled, its first token's generation response or None)."""
        tic = time.perf_counter()
        if len(s.segments) == 1:  # its last chunk's end was reported in the last step
            response, first = self._first_token(s, tic)
            return response, 1, first
        chunk = s.segments[0][:limit]
        self.model(mx.array(chunk, dtype=mx.int32)[None], cache=s.caches)
        mx.eval([c.state for c in s.caches])  # the logits are never evaluated: only the caches are computed
        s.tokens += chunk
        end = advance_prefill(s, len(chunk), self._counters, tic)
        if len(s.segments) == 1 and all(c.is_trimmable() for c in s.caches):
            response, first = self._first_token(s, time.perf_counter())
            return response, len(chunk) + 1, first
        return PromptProcessingBatch.Response(s.uid, (s.done, s.total), end, False), len(chunk), None

    def _first_token(self, s: _Long, tic: float):
        """`s`'s last prompt token through the model, its first token sampled from the
        logits; `s` leaves the queue, and joins the batch with that token as its input
        unless it is done (a stop token, or max_tokens 1). Returns (the end-of-prompt
        response, the first token's generation response)."""
        last = s.segments[0]
        logits = self.model(mx.array(last, dtype=mx.int32)[None], cache=s.caches)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = (s.sampler or self.batch.sampler)(logprobs)
        mx.eval(sampled, logprobs, [c.state for c in s.caches])
        s.tokens += last
        advance_prefill(s, len(last), self._counters, tic)
        self._long.remove(s)
        token = int(sampled.item())
        finish = "stop" if token in self.stop_tokens else "length" if s.max_tokens <= 1 else None
        if finish is None:
            (inner,) = self.batch.insert_segments([[[token]]], max_tokens=[s.max_tokens - 1], caches=[s.caches],
                                                  all_tokens=[s.tokens], samplers=[s.sampler])
            self._link(s.uid, inner, s.done)
            self._joined.add(inner)
        first = GenerationBatch.Response(s.uid, token, logprobs[0], finish, s.caches if finish else None,
                                         list(s.tokens) if finish else None)
        return PromptProcessingBatch.Response(s.uid, (s.total, s.total), True, True), first
