"""The one thread that owns MLX: serves generation requests together, by
continuous batching through mlx-lm's `BatchGenerator`.

Each request, on admission: restore the longest reusable prefix
(`CheckpointManager`: one of this worker's live states, the RAM tier or the
disk store), then enter the batch with that KV state. The batch prefills up
to `prompt_concurrency` prompts together, in segments that end at absolute
multiples of `prefill_chunk_tokens` and at every position where the store's
policy plans a checkpoint (`worker.segments`), and decodes up to
`decode_concurrency` sequences together. At each planned position the
engine reads the sequence's KV state out of the batch and writes the
checkpoint. A request that finishes (or is cancelled) leaves the batch with
its KV state, which stays as a live state (`worker.live_states`) until its
slot is needed: then its `evict` checkpoint is written and it is dropped.
A request that continues a live state's conversation takes that state into
the batch; one that shares only part of what its client sent (a common
system block) starts from a view of it and leaves the state in place.
Events go back through the request's `emit` callback, which must be
thread-safe.

The engine measures itself (prefill rate of the batch, checkpoint load
bandwidth from the RAM tier and from disk, decode rate per sequence) as
exponential moving averages in `rates`; the same figures decide
load-or-recompute on restore and travel to the router (GetStatus, each
request's Final) for its cost model. Cache changes (live states, RAM tier) go
to `on_cache_event` as they happen.

Outputs are not bit-exact across batch compositions (padding and batched
matmuls change the sums slightly); a request alone in the batch computes what
a single-sequence run computes.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from kvrouter.cachestore.costs import Rates
from kvrouter.cachestore.keys import common_prefix_length
from kvrouter.worker.checkpoints import CheckpointManager, LiveState, Restored
from kvrouter.worker.config import DEFAULT_DECODE_CONCURRENCY, DEFAULT_PROMPT_CONCURRENCY
from kvrouter.worker.events import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent, Usage
from kvrouter.worker.live_states import LiveStates
from kvrouter.worker.segments import prefill_segments
from kvrouter.worker import kv_state

log = logging.getLogger("kvrouter.worker.engine")



@dataclass(frozen=True)
class EngineConfig:
    """prefill_chunk_tokens: prefill chunk size in tokens (chunks end at its multiples).
    max_queue: requests waiting plus running accepted (0: no limit).
    decode_concurrency: sequences decoded together; also the number of batch
        slots that running requests and idle live states share.
    prompt_concurrency: sequences prefilled together.
    live_state_bytes: bound on idle live states' memory, bytes (0: none).
    """

    prefill_chunk_tokens: int = 256
    max_queue: int = 0
    decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY
    prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY
    live_state_bytes: int = 2048 * 2**20


class EngineDeadError(RuntimeError):
    """The engine thread is not running; the worker cannot serve."""


class EngineBusyError(RuntimeError):
    """The engine's queue is full (`max_queue`); the request should go elsewhere."""


# Fault injection for end-to-end tests of case C15 (a dead generation loop): when
# this environment variable names a file and that file appears, the engine thread
# removes it and dies at the next generated token, as an unexpected crash would.
FAILPOINT_ENV = "KVROUTER_TEST_ENGINE_FAILPOINT"


class EngineFailpoint(BaseException):
    """Raised on the engine thread by the test failpoint; nothing catches it."""


def _failpoint_hit() -> bool:
    path = os.environ.get(FAILPOINT_ENV)
    if not path:
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


# A request sharing at least this many more prompt tokens with a request in the batch
# than any live state or checkpoint offers waits for that request's prefill to pass them
# and starts from a copy of its KV state (prefill sharing inside one worker).
MIN_SHARED_GAIN = 32  # tokens

EWMA_WEIGHT = 0.3  # weight of the newest measurement
MIN_RATE_TOKENS = 64  # shorter prefills measure per-step overhead more than the rate
MIN_RATE_STEPS = 8  # decode steps per decode-rate measurement


def ewma(old: float, new: float) -> float:
    return new if old <= 0 else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


@dataclass
class Job:
    request: GenerationRequest
    emit: Callable[[Event], None]
    cancelled: threading.Event
    attempts: int = 0  # batch failures survived (the retry runs cold)


@dataclass
class Running:
    """A request inside the batch (engine thread only).

    restored: the state it started from. plan: checkpoints still to write
    (`cachestore.PlannedStore`). events: store events for its Final. pos:
    prompt tokens whose KV state the batch holds for it so far.
    """

    job: Job
    prompt: list[int]
    restored: Restored
    plan: list
    detok: BPEStreamingDetokenizer
    t_admit: float
    events: list = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    pos: int = 0


_STOP = object()


def replaces(live: LiveState, prompt: list[int], namespace: str) -> bool:
    """True when `prompt` does not continue the live state's client-sent tokens
    (another namespace, or it diverges inside them): it belongs to another
    conversation, which may only copy the prefix they share."""
    if live.namespace != namespace:
        return True
    return common_prefix_length(live.tokens[: live.prompt_tokens], prompt) < live.prompt_tokens


class Engine:
    """Owns the model, the batch and the live states; runs on its own thread.

    bundle: a `worker.models.ModelBundle`; hf_tokenizer: its Hugging Face
    tokenizer (for streaming detokenization); checkpoints: the reuse manager.
    """

    def __init__(self, bundle, hf_tokenizer, checkpoints: CheckpointManager, config: EngineConfig):
        self.bundle = bundle
        self.model = bundle.model
        self.checkpoints = checkpoints
        self.config = config
        self.eos_ids = set(bundle.eos_token_ids)
        self.tokenizer = hf_tokenizer  # chat template and vocabulary (GetModelInfo's tool parser choice)
        self._detokenizer = BPEStreamingDetokenizer(hf_tokenizer)  # copied per request
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlx-engine", daemon=True)
        self._pending = 0
        self._lock = threading.Lock()
        self.lives = LiveStates(config.decode_concurrency, config.live_state_bytes)
        self.requests_served = 0
        self._stopped = threading.Event()
        self.rates = Rates()
        # Called on the engine thread with ("live", (live_id, namespace, tokens, removed))
        # or ("ram", (entry_id, added)); must be thread-safe and must not raise.
        self.on_cache_event: Callable[[str, tuple], None] | None = None
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Running] = {}  # by BatchGenerator uid
        self._gen: BatchGenerator | None = None
        self._stopping: tuple | None = None  # (shutdown_checkpoint,) once stop() was called
        self._prompt_acc = [0, 0.0]  # prompt tokens, seconds since the last prefill-rate update
        self._decode_acc = [0, 0.0]  # decode steps, seconds since the last decode-rate update

    # -- control (any thread) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running."""
        return self._pending

    @property
    def live_states(self) -> tuple[LiveState, ...]:
        """The idle live states, least recently used first (a snapshot)."""
        return self.lives.snapshot

    @property
    def live(self) -> LiveState | None:
        """The newest live state, or None."""
        snap = self.lives.snapshot
        return snap[-1] if snap else None

    @property
    def live_prefix_tokens(self) -> int:
        live = self.live
        return len(live.tokens) if live else 0

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Job:
        """Queues a request. Raises EngineDeadError when the engine thread is gone,
        EngineBusyError when `max_queue` requests are already waiting or running."""
        if not self.alive or self._stopped.is_set():
            raise EngineDeadError("the generation thread is not running")
        job = Job(request, emit, threading.Event())
        with self._lock:
            if self.config.max_queue and self._pending >= self.config.max_queue:
                raise EngineBusyError(f"{self._pending} requests queued (--max-queue {self.config.max_queue})")
            self._pending += 1
        self._queue.put(job)
        return job

    def stop(self, timeout: float = 30.0, shutdown_checkpoint: bool = True) -> None:
        """Finishes queued and running work, writes a `shutdown` checkpoint of
        every live state, ends the thread."""
        self._stopped.set()
        self._queue.put((_STOP, shutdown_checkpoint))
        self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------
    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in sorted(self.eos_ids)],
            completion_batch_size=self.config.decode_concurrency,
            prefill_batch_size=self.config.prompt_concurrency,
            prefill_step_size=self.config.prefill_chunk_tokens,
            stream=self._stream,
        )

    def _loop(self) -> None:
        self._stream = mx.new_stream(mx.default_device())
        self._gen = self._new_generator()
        while True:
            self._take_jobs(block=not self._running and not self._waiting)
            if self._stopping is not None and not self._running and not self._waiting:
                self._shutdown(self._stopping[0])
                return
            ram_before = set(self.checkpoints.ram.ids())
            self._cancel_requested()
            self._admit_waiting()
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # one failure must not kill the thread
                    self._batch_failed(exc)
            self._publish_ram(ram_before)

    def _take_jobs(self, block: bool) -> None:
        try:
            item = self._queue.get(block=block)
            while True:
                if isinstance(item, tuple) and item[0] is _STOP:
                    self._stopping = (item[1],)
                else:
                    self._waiting.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass

    def _shutdown(self, shutdown_checkpoint: bool) -> None:
        stored = 0
        for live in self.lives.clear():
            if shutdown_checkpoint and self.checkpoints.save_live("shutdown", live) is not None:
                stored += 1
        self.checkpoints.take_events()
        if stored:
            log.info("stored %d shutdown checkpoint(s) of the live states", stored)

    def _done(self, job: Job, event: Event) -> None:
        """The request's last event; it stops counting against the queue."""
        try:
            job.emit(event)
        finally:
            with self._lock:
                self._pending -= 1
            self.requests_served += 1

    def _notify(self, kind: str, payload: tuple) -> None:
        if self.on_cache_event is not None:
            self.on_cache_event(kind, payload)

    def _publish_ram(self, before: set) -> None:
        if self.on_cache_event is None:
            return
        now = set(self.checkpoints.ram.ids())
        for entry_id in sorted(now - before):
            self._notify("ram", (entry_id, True))
        for entry_id in sorted(before - now):
            self._notify("ram", (entry_id, False))

    def _keep_live(self, live: LiveState) -> None:
        self.lives.add(live)
        self._notify("live", (live.live_id, live.namespace, tuple(live.tokens), False))

    def _forget_live(self, live: LiveState) -> None:
        self._notify("live", (live.live_id, live.namespace, (), True))

    def _drop_lives(self, running: int, events: list) -> None:
        """Frees slots: the least recently used live states beyond what `running`
        requests leave are dropped, each after its `evict` checkpoint (ds4's evict)."""
        for live in self.lives.to_drop(running):
            self.checkpoints.save_live("evict", live)
            self._forget_live(live)
        events += self.checkpoints.take_events()

    # -- admission --------------------------------------------------------------
    def _admit_waiting(self) -> None:
        """Admits waiting requests while slots are free (`_cancel_requested`, run just
        before, has answered the cancelled ones)."""
        deferred = []
        while self._waiting and len(self._running) < self.config.decode_concurrency:
            job = self._waiting.popleft()
            try:
                if not self._admit(job):
                    deferred.append(job)
            except Exception as exc:
                log.exception("request %s failed on admission", job.request.request_id)
                self._done(job, ErrorEvent(f"generation failed: {type(exc).__name__}: {exc}"))
        self._waiting.extendleft(reversed(deferred))

    def _sharer(self, prompt: list[int], namespace: str) -> tuple[int, Running | None, int]:
        """(uid, request, tokens) of the request in the batch whose prompt shares the
        longest prefix with `prompt` (at most len(prompt) - 1 tokens), or (0, None, 0)."""
        best: tuple[int, Running | None, int] = (0, None, 0)
        for uid, run in self._running.items():
            if run.job.request.namespace == namespace:
                n = min(common_prefix_length(run.prompt, prompt), len(prompt) - 1)
                if n > best[2]:
                    best = (uid, run, n)
        return best

    def _share_from_batch(self, prompt: list[int], namespace: str, live) -> Restored | bool | None:
        """Prefill sharing inside the worker: when a request in the batch shares at
        least MIN_SHARED_GAIN more prompt tokens than the best live state or stored
        checkpoint, returns a copy of its KV state for them (a Restored, source
        "live"), or False while its prefill has not reached them yet (the new
        request waits). None: nothing worth sharing."""
        uid, run, n = self._sharer(prompt, namespace)
        live_n = common_prefix_length(live.tokens, prompt) if live is not None else 0
        if run is None or n < live_n + MIN_SHARED_GAIN:
            return None
        stored_n = self.checkpoints.stored_prefix_tokens(prompt, namespace)  # the store is read only now
        if n < stored_n + MIN_SHARED_GAIN:
            return None
        if run.pos < n:
            return False
        caches, _ = self._gen.extract_cache([uid])[uid]
        log.info("sharing %d prompt tokens with a request in the batch", n)
        return Restored(kv_state.prefix_copy(caches, n), n, "live", stored_n)

    def _admit(self, job: Job) -> bool:
        """Restores the request's prefix and puts it in the batch. Returns False
        (nothing done) when it should wait for a request in the batch to prefill
        the prefix they share."""
        req = job.request
        prompt = list(req.prompt)
        self.checkpoints.take_events()  # drop events of earlier failed work
        live = self.lives.best(prompt, req.namespace)
        from_batch = None if job.attempts else self._share_from_batch(prompt, req.namespace, live)
        if from_batch is False:
            return False
        if job.attempts:
            restored = Restored(kv_state.new_state(self.model), 0, "none", 0)  # a retry after a failure runs cold
        elif from_batch is not None:
            restored = from_batch
        else:
            # A prompt that diverges inside what the live state's client sent is another
            # session: it starts from a copy of the shared prefix, and the live state stays
            # in its slot for its own next turn (an `evict` checkpoint when its slot is needed).
            other_session = live is not None and replaces(live, prompt, req.namespace)
            restored = self.checkpoints.restore(prompt, req.namespace, live, self.rates, recycle=not other_session)
            if restored.source == "live" and not other_session:
                self.lives.take(live)
                self._forget_live(live)
            self._measure_load(restored)
        events = list(self.checkpoints.take_events())
        self._drop_lives(len(self._running) + 1, events)
        plan = list(self.checkpoints.plan(len(prompt), restored.stored_prefix_tokens, req.anchor_tokens,
                                           req.hint_tokens))
        events += self.checkpoints.take_events()
        detok = copy.copy(self._detokenizer)
        detok.reset()
        run = Running(job, prompt, restored, plan, detok, time.perf_counter(), events, pos=restored.n_tokens)
        run.plan = self._store_reached(run, restored.caches, restored.n_tokens)  # e.g. an anchor inside a live state
        segments = prefill_segments(prompt, restored.n_tokens, self.config.prefill_chunk_tokens,
                                    [p.n_tokens for p in run.plan])
        sp = req.sampling
        if sp.seed is not None:
            mx.random.seed(sp.seed % 2**64)  # clients may send any int64; mlx takes uint64
        sampler = None if sp.temperature == 0 else make_sampler(
            temp=sp.temperature, top_p=sp.top_p if 0 < sp.top_p < 1 else 0.0)
        max_tokens = max(1, min(sp.max_tokens, self.bundle.context_length - len(prompt)))
        (uid,) = self._gen.insert_segments([segments], max_tokens=[max_tokens], caches=[restored.caches],
                                           all_tokens=[prompt[: restored.n_tokens]], samplers=[sampler])
        self._running[uid] = run
        return True

    def _measure_load(self, restored: Restored) -> None:
        if not (restored.loaded_bytes and restored.load_seconds > 0):
            return
        r, bps = self.rates, restored.loaded_bytes / restored.load_seconds
        if restored.source == "disk":
            self.rates = Rates(r.prefill_tps, ewma(r.disk_bps, bps), r.ram_bps, r.decode_tps)
        elif restored.source == "ram":
            self.rates = Rates(r.prefill_tps, r.disk_bps, ewma(r.ram_bps, bps), r.decode_tps)

    # -- one batch step -----------------------------------------------------------
    def _step(self) -> None:
        with self._gen.stats() as stats:
            prompt_out, gen_out = self._gen.next()
        self._measure_step(stats)
        for r in prompt_out:
            run = self._running.get(r.uid)
            if run is None or not r.end_of_segment:
                continue
            pos = run.pos = run.restored.n_tokens + r.progress[0]
            if r.end_of_prompt:
                run.prefill_s = time.perf_counter() - run.t_admit
            if any(p.n_tokens <= pos for p in run.plan):
                caches, _ = self._gen.extract_cache([r.uid])[r.uid]
                run.plan = self._store_reached(run, caches, pos)
        for r in gen_out:
            run = self._running.get(r.uid)
            if run is not None:
                self._generated(r, run)

    def _generated(self, r, run: Running) -> None:
        if not (r.finish_reason == "stop" and r.token in self.eos_ids):
            run.generated.append(r.token)
            run.detok.add_token(r.token)
            run.job.emit(TokenEvent((r.token,), run.detok.last_segment))
            if _failpoint_hit():
                log.error("test failpoint: the generation thread dies now")
                raise EngineFailpoint("test failpoint")
        if r.finish_reason is not None:
            self._finish(r.uid, run, r.finish_reason, r.prompt_cache, r.all_tokens)

    def _finish(self, uid: int, run: Running, reason: str, caches, tokens) -> None:
        """Ends a request that left the batch with `caches` holding `tokens`."""
        del self._running[uid]
        run.detok.finalize()
        if run.detok.last_segment and reason != "cancelled":
            run.job.emit(TokenEvent((), run.detok.last_segment))
        live_id = 0
        if tokens:
            live = LiveState(run.job.request.namespace, list(tokens), caches,
                             min(len(run.prompt), len(tokens)), run.job.request.text_preview)
            self._keep_live(live)
            live_id = live.live_id
        self._drop_lives(len(self._running), run.events)
        r = run.restored
        usage = Usage(
            prompt_tokens=len(run.prompt),
            completion_tokens=len(run.generated),
            cached_tokens=r.n_tokens,
            cache_source=r.source if r.n_tokens else "none",
            prefill_seconds=run.prefill_s,
            load_seconds=r.load_seconds,
            loaded_bytes=r.loaded_bytes,
        )
        self._done(run.job, FinishEvent(reason, usage, tuple(run.events), live_id))

    def _store_reached(self, run: Running, caches, pos: int) -> list:
        """Writes the planned checkpoints at or before `pos` from `caches` (which
        hold at least `pos` tokens of the prompt); returns the rest of the plan."""
        remaining = []
        req = run.job.request
        for p in run.plan:
            if p.n_tokens > pos:
                remaining.append(p)
                continue
            t0 = time.perf_counter()
            entry = self.checkpoints.save(p.kind, caches, run.prompt[: p.n_tokens], req.namespace, req.text_preview)
            if entry is not None:
                log.info("store kind=%s tokens=%d ms=%.0f MiB=%.1f",
                         p.kind, p.n_tokens, (time.perf_counter() - t0) * 1000, entry.payload_bytes / 2**20)
        run.events += self.checkpoints.take_events()
        return remaining

    def _cancel_requested(self) -> None:
        """Ends cancelled requests: waiting ones at once, running ones with their
        KV state kept as a live state (what they prefilled stays reusable)."""
        if any(job.cancelled.is_set() for job in self._waiting):
            for job in [j for j in self._waiting if j.cancelled.is_set()]:
                self._waiting.remove(job)
                self._done(job, FinishEvent("cancelled", Usage(len(job.request.prompt), 0, 0, "none")))
        for uid, run in list(self._running.items()):
            if run.job.cancelled.is_set():
                caches, tokens = self._gen.remove([uid], return_prompt_caches=True)[uid]
                self._finish(uid, run, "cancelled", caches, tokens)

    def _measure_step(self, stats) -> None:
        """Updates `rates` from one batch step (Rates is replaced, never mutated).

        prefill: prompt tokens the batch processed per second of prompt
        processing (what a new prompt shares); decode: steps per second, i.e.
        tokens per second of each decoding sequence."""
        p, d = self._prompt_acc, self._decode_acc
        p[0] += stats.prompt_tokens
        p[1] += stats.prompt_time
        d[0] += stats.generation_steps
        d[1] += stats.decode_time
        r = self.rates
        if p[0] >= MIN_RATE_TOKENS and p[1] > 0:
            self.rates = r = Rates(ewma(r.prefill_tps, p[0] / p[1]), r.disk_bps, r.ram_bps, r.decode_tps)
            p[0], p[1] = 0, 0.0
        if d[0] >= MIN_RATE_STEPS and d[1] > 0:
            self.rates = Rates(r.prefill_tps, r.disk_bps, r.ram_bps, ewma(r.decode_tps, d[0] / d[1]))
            d[0], d[1] = 0, 0.0

    def _batch_failed(self, exc: Exception) -> None:
        """A batch step raised: the batch is rebuilt empty. Requests that have sent
        no token are retried once, cold; a stored checkpoint they were restored
        from is quarantined (it may be the poison, case C11). The others end with
        an error event."""
        log.exception("batch step failed with %d request(s) in the batch", len(self._running))
        failed = list(self._running.values())
        self._running.clear()
        self._gen = self._new_generator()
        retry = []
        for run in failed:
            if not run.generated and run.job.attempts == 0:
                if run.restored.entry_id is not None:
                    self.checkpoints.quarantine(run.restored, f"prefill failed: {exc}")
                    log.warning("prefill from checkpoint %s failed (%s); retrying cold", run.restored.entry_id, exc)
                run.job.attempts += 1
                retry.append(run.job)
            else:
                self._done(run.job, ErrorEvent(f"generation failed: {type(exc).__name__}: {exc}"))
        self._waiting.extendleft(reversed(retry))
        self.checkpoints.take_events()
