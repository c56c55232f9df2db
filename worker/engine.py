"""The one thread that owns MLX: serves generation requests together, by
continuous batching through mlx-lm's `BatchGenerator`.

Each request, on admission: one store lookup, then `worker.reuse.plan_restore`
decides where its reused prefix comes from (one of this worker's live states, a
request in the batch, the RAM tier or the disk store) and `_restore` carries
the plan out; the request enters the batch with that state. The batch prefills
up to `prompt_concurrency` prompts together, in segments that end at absolute
multiples of `prefill_chunk_tokens` and at every position where the store's
policy plans a checkpoint (`worker.segments`), and decodes up to
`decode_concurrency` sequences together, as many as their KV fits
`running_kv_bytes` (a burst queues instead of over-committing memory). At each
planned position the engine reads the sequence's state out of the batch and
hands the checkpoint to the checkpoint writer (`worker.checkpoint_writer`: one
thread, a bounded queue), exactly there, so states that cannot be cut back
(recurrent layers, wrapped sliding windows) are stored too; no write delays a
first token or the next chunk, and a request's Final waits for its own stores
so it still reports them (not for the evict checkpoints its admission caused).
A request that finishes (or is cancelled) leaves the batch with its state,
which stays as a live state (`worker.live_states`) until
its slot is needed: then its `evict` checkpoint goes to the writer and it is
dropped. A seeded sampling request runs alone (MLX's random state is global).
When the engine goes idle, memory nothing holds goes back to the system.

A prompt of at least `long_prefill_tokens` tokens is prefilled outside the
batch, one chunk per engine step, by a plain per-sequence loop
(`worker.long_prefill`: the batch's array mask made a 32K prefill 4x slower on a
GPU), with the same segments; its first token is sampled there too, and it joins
the batch to decode the rest.

A model whose caches mlx-lm cannot batch (a layer without `merge`, e.g.
`QuantizedKVCache` with `--kv-bits`) runs its requests one at a time through
`worker.sequential.SequentialGenerator`, which has the same interface.

Each loop turn is one engine step: take new requests, answer cancellations,
admit what fits, run one batch step, then `_end_step`: the store's events of
the step (collected by `on_store_event`, each with the request it was done
for) go to their requests, the requests that ended get their Final, and RAM
tier changes are published. Events go back through the request's `emit`
callback, which must be thread-safe.

The engine measures itself (prefill rate of the batch, checkpoint load
bandwidth from the RAM tier and from disk, cold and warm, decode rate per
sequence) as exponential moving averages in `rates`, and fits prefill time by
prompt position on the prefills that ran alone (`cachestore.costs.PrefillFit`);
the same figures decide load-or-recompute on restore (logged with both
predictions) and travel to the router (GetStatus, each request's Final) for its
cost model. A request that arrives while the batch is busy has its checkpoint's
read started while it waits (`worker.prefetch`). Cache changes (live states, RAM tier) go
to `on_cache_event` as typed events (`worker.cache_events`) as they happen.

Outputs are not bit-exact across batch compositions (padding and batched
matmuls change the sums slightly); a request alone in the batch computes what
a single-sequence run computes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from kvrouter.cachestore import StoreEvent
from kvrouter.cachestore.costs import PrefillFit, Rates, ewma, learn_disk_load
from kvrouter.worker import cache_state
from kvrouter.worker.cache_events import CacheEvent, LiveChanged, RamChanged
from kvrouter.worker.checkpoint_writer import DEFAULT_MAX_ITEMS, CheckpointWriter, Completion, WriteJob
from kvrouter.worker.checkpoints import CheckpointManager, Restored
from kvrouter.worker.config import DEFAULT_DECODE_CONCURRENCY, DEFAULT_LONG_PREFILL_TOKENS, DEFAULT_PROMPT_CONCURRENCY
from kvrouter.worker.events import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent, Usage
from kvrouter.worker.live_states import LiveState, LiveStates
from kvrouter.worker.long_prefill import LongPrefillGenerator
from kvrouter.worker.reuse import InBatch, RestorePlan, plan_restore
from kvrouter.worker.segments import prefill_segments
from kvrouter.worker.sequential import SequentialGenerator
from kvrouter.worker.sizing import batch_bytes, return_free_memory

log = logging.getLogger("kvrouter.worker.engine")


@dataclass(frozen=True)
class EngineConfig:
    """prefill_chunk_tokens: prefill chunk size in tokens (chunks end at its multiples).
    max_queue: requests waiting plus running accepted (0: no limit).
    decode_concurrency: sequences decoded together; also the number of batch
        slots that running requests and idle live states share.
    prompt_concurrency: sequences prefilled together.
    live_state_bytes: bound on idle live states' memory, bytes (0: none).
    writer_max_items / writer_max_bytes: the checkpoint writer's queue bounds
        (`worker.checkpoint_writer`; snapshots waiting to be written hold memory).
    shutdown_timeout_s: time a stop gives the shutdown checkpoints, seconds.
    running_kv_bytes: KV the sequences in the batch may hold together (0: no
        bound); a request waits for admission while adding it would pass this
        (`worker.sizing.batch_bytes` with kv_bytes_per_token: mlx-lm pads the
        batch to its longest sequence). A request alone is always admitted.
    kv_bytes_per_token: the model's KV state per token, bytes (0: unknown, no bound).
    long_prefill_tokens: prompts at least this long (tokens) are prefilled outside
        the batch by a plain per-sequence loop, then join it to decode
        (`worker.long_prefill`); 0: every prompt is prefilled in the batch.
    ram_warmup_bytes: stored checkpoints loaded into the RAM tier while idle after
        the start (`_plan_warmup`), bytes in all; 0: none.
    """

    prefill_chunk_tokens: int = 256
    max_queue: int = 0
    decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY
    prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY
    live_state_bytes: int = 2048 * 2**20
    writer_max_items: int = DEFAULT_MAX_ITEMS
    writer_max_bytes: int = 1024 * 2**20
    shutdown_timeout_s: float = 20.0
    running_kv_bytes: int = 0
    kv_bytes_per_token: int = 0
    long_prefill_tokens: int = DEFAULT_LONG_PREFILL_TOKENS
    ram_warmup_bytes: int = 0


class EngineDeadError(RuntimeError):
    """The engine thread is not running; the worker cannot serve."""


class EngineBusyError(RuntimeError):
    """The engine's queue is full (`max_queue`); the request should go elsewhere."""


# Fault injection for end-to-end tests of case C15 (a dead generation loop): when
# this environment variable (read once, when the engine is made) names a file and
# that file appears, the engine thread removes it and dies at the end of the next
# step that generated a token, as an unexpected crash would.
FAILPOINT_ENV = "KVROUTER_TEST_ENGINE_FAILPOINT"
TRACE_STEPS_ENV = "KVROUTER_TRACE_STEPS"
"""Set to 1 in a worker's environment: one log line per batch step (its prompt tokens and
time, tokens decoded and time, the step's time in mlx-lm's `next` and in the engine's own
bookkeeping after it), to see where a request's time to first token goes."""


class EngineFailpoint(BaseException):
    """Raised on the engine thread by the test failpoint; nothing catches it."""


MIN_RATE_TOKENS = 64  # shorter prefills measure per-step overhead more than the rate
MIN_RATE_STEPS = 8  # decode steps per decode-rate measurement
IDLE_RETURN_S = 2.0
"""Seconds the engine stays idle before it hands free memory back (MLX's buffer cache,
the C heap: `sizing.return_free_memory`). Not at once: clients send the next request
within milliseconds (the bench's next group, an agent's next tool call), and each then
found MLX's buffer cache emptied and allocated its batch's KV afresh."""


@dataclass
class EngineJob:
    """A submitted request: `emit` gets its events; `cancelled` is set when its
    client goes away. store_events: what the store did for it (its Final's)."""

    request: GenerationRequest
    emit: Callable[[Event], None]
    cancelled: threading.Event
    attempts: int = 0  # batch failures survived (the retry runs cold)
    store_events: list = field(default_factory=list)
    pending_stores: int = 0  # its checkpoints the writer has not finished (its Final waits for them)
    t_submit: float = field(default_factory=time.perf_counter)  # when it was queued (perf_counter seconds)


@dataclass
class Running:
    """A request inside the batch (engine thread only).

    restored: the state it started from. plan: checkpoints still to write
    (`cachestore.PlannedStore`). pos: prompt tokens its state holds so far.
    """

    job: EngineJob
    prompt: list[int]
    restored: Restored
    plan: list
    detok: BPEStreamingDetokenizer
    t_admit: float
    restore_s: float = 0.0  # its admission: lookup, restore plan and restore, seconds
    generated: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    pos: int = 0
    prompt_state: list | None = None  # the state holding exactly the prompt (LiveState.prompt_state)
    kv_tokens: int = 0  # tokens its KV state reaches (prompt + max_tokens), for admission
    crowded: bool = False  # shared a batch step with another request (its prefill time is not its own)


_STOP = object()
_WAKE = object()  # put on the queue by the checkpoint writer: a write finished
_NO_OWNER = object()


def _waits_for(job: WriteJob) -> bool:
    """Whether the Final of the store's owner waits for it: for the request's own
    checkpoints, not for the `evict` checkpoint of another session's live state that
    its admission displaced (its skip is still reported to the request; its write,
    ~0.6 GiB for an 8B model at 5K tokens, must not hold the request's end)."""
    return job.owner is not None and job.kind != "evict"


def seeded(req: GenerationRequest) -> bool:
    """A sampling request with a seed: it must run alone to be reproducible."""
    return req.sampling.seed is not None and req.sampling.temperature > 0


class Engine:
    """Owns the model, the batch and the live states; runs on its own thread.

    bundle: a `worker.models.ModelBundle` (its `state` says how the model's
    caches behave); hf_tokenizer: its Hugging Face tokenizer (for streaming
    detokenization); checkpoints: the store side.
    """

    def __init__(self, bundle, hf_tokenizer, checkpoints: CheckpointManager, config: EngineConfig):
        self.bundle = bundle
        self.model = bundle.model
        self.spec = bundle.state
        self.checkpoints = checkpoints
        self.config = config
        self.eos_ids = set(bundle.eos_token_ids)
        # Sequences run together: every slot where mlx-lm can batch the caches, else one.
        self.batch_width = config.decode_concurrency if self.spec.batchable else 1
        self.tokenizer = hf_tokenizer  # chat template and vocabulary (GetModelInfo's tool parser choice)
        self._detokenizer = BPEStreamingDetokenizer(hf_tokenizer)  # copied per request
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlx-engine", daemon=True)
        self._pending = 0
        self._lock = threading.Lock()
        self.lives = LiveStates(config.decode_concurrency, config.live_state_bytes)
        self._stopped = threading.Event()
        self.rates = Rates()
        self._prefill_fit = PrefillFit()  # prefill time by position, from prefills that ran alone
        self._warmup: deque = deque()  # stored checkpoints still to load into the RAM tier (`_plan_warmup`)
        self._warmup_tries: dict[str, int] = {}
        self._warmup_done = [0, 0, 0.0]
        self._warm_order: tuple[str, ...] = ()  # warm-up candidates' ids, most valuable first (`_plan_warmup`)
        self._disk_probes_left = 2  # cold-read probes that may still seed the disk rates (`_seed_disk_rate`)
        # Called on the engine thread with a LiveChanged or RamChanged; must be
        # thread-safe and must not raise.
        self.on_cache_event: Callable[[CacheEvent], None] | None = None
        self._waiting: deque[EngineJob] = deque()
        self._running: dict[int, Running] = {}  # by generator uid
        self._gen = None
        self._stopping: tuple | None = None  # (shutdown_checkpoint,) once stop() was called
        self._prompt_acc = [0, 0.0]  # prompt tokens, seconds since the last prefill-rate update
        self._decode_acc = [0, 0.0]  # decode steps, seconds since the last decode-rate update
        self._owner: EngineJob | None = None  # the request the engine thread is working for
        self._store_events: list[tuple[EngineJob | None, StoreEvent]] = []  # this step's, with their request
        self._finals: list[tuple[EngineJob, FinishEvent]] = []  # requests that ended this step
        self._tokens_this_step = 0
        self._failpoint = os.environ.get(FAILPOINT_ENV) or None
        self._trace_steps = os.environ.get(TRACE_STEPS_ENV, "") not in ("", "0")
        self._trace_last = 0.0  # when the last traced step ended (perf_counter)
        self._trace_ms = [0.0, 0.0]  # this loop turn's admissions, write collection (ms)
        self._events_lock = threading.Lock()  # _store_events: appended by the writer thread too
        self._writer_owner = threading.local()  # on a writer thread: the request of the store it runs
        self.writer = CheckpointWriter(config.writer_max_items, config.writer_max_bytes,
                                       on_complete=lambda: self._queue.put(_WAKE))
        checkpoints.write_pauser = self.writer.pauser  # writes step aside for first tokens
        self.shutdown_report: tuple[int, int] | None = None  # (stored, skipped) shutdown checkpoints
        # Steps of work done: admissions, batch steps (a prefill chunk or a decoded token),
        # checkpoints written. Read from other threads (GetStatus) to tell a stall.
        self.progress = 0
        self.admitted_kv_bytes = 0  # the batch's KV bound now (`_batch_bytes`), bytes
        self.peak_admitted_kv_bytes = 0  # the most it has been, bytes

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

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> EngineJob:
        """Queues a request. Raises EngineDeadError when the engine thread is gone,
        EngineBusyError when `max_queue` requests are already waiting or running."""
        if not self.alive or self._stopped.is_set():
            raise EngineDeadError("the generation thread is not running")
        job = EngineJob(request, emit, threading.Event())
        with self._lock:
            if self.config.max_queue and self._pending >= self.config.max_queue:
                raise EngineBusyError(f"{self._pending} requests queued (--max-queue {self.config.max_queue})")
            self._pending += 1
        self._queue.put(job)
        return job

    def stop(self, timeout: float | None = None, shutdown_checkpoint: bool = True) -> None:
        """Finishes queued and running work, writes a `shutdown` checkpoint of every
        live state (in parallel, within `config.shutdown_timeout_s`; `shutdown_report`
        says how many were stored and skipped), ends the thread. `timeout`: how long
        to wait for all that (default: the shutdown timeout + 30 s)."""
        self._stopped.set()
        self._queue.put((_STOP, shutdown_checkpoint))
        self._thread.join(self.config.shutdown_timeout_s + 30 if timeout is None else timeout)

    def on_store_event(self, event: StoreEvent) -> None:
        """A `CheckpointStore.on_event` listener (any thread): keeps the event, with the
        request it was done for (the one the engine thread works for, or on a writer
        thread the one whose checkpoint it writes), until the end of the step."""
        owner = getattr(self._writer_owner, "job", _NO_OWNER)
        with self._events_lock:
            self._store_events.append((self._owner if owner is _NO_OWNER else owner, event))

    # -- the engine thread ----------------------------------------------------
    def _new_generator(self):
        stop_tokens = [[t] for t in sorted(self.eos_ids)]
        if not self.spec.batchable:
            return SequentialGenerator(self.model, stop_tokens=stop_tokens,
                                       prefill_step_size=self.config.prefill_chunk_tokens, stream=self._stream)
        batch = BatchGenerator(
            self.model,
            stop_tokens=stop_tokens,
            completion_batch_size=self.config.decode_concurrency,
            prefill_batch_size=self.config.prompt_concurrency,
            prefill_step_size=self.config.prefill_chunk_tokens,
            stream=self._stream,
        )
        if self.config.long_prefill_tokens <= 0:
            return batch
        gen = LongPrefillGenerator(self.model, batch, min_tokens=max(2, self.config.long_prefill_tokens),
                                   prefill_step_size=self.config.prefill_chunk_tokens, stop_tokens=self.eos_ids)
        if self._trace_steps:
            gen.trace = []
        return gen

    def _loop(self) -> None:
        self._stream = mx.new_stream(mx.default_device())
        self._gen = self._new_generator()
        self._seed_disk_rate(None)
        self._plan_warmup()
        busy, memory_due = False, None
        while True:
            idle = not self._running and not self._waiting
            if idle and busy:  # a burst ended: memory nothing holds goes back if no work comes soon
                memory_due = time.monotonic() + IDLE_RETURN_S
            if idle and memory_due is not None and time.monotonic() >= memory_due:
                return_free_memory()
                memory_due = None
            busy = not idle
            warming = idle and bool(self._warmup) and self._stopping is None
            # Before the writes are collected: a stored checkpoint joins the RAM tier there,
            # and `_end_step` publishes what changed since this snapshot.
            ram_before = set(self.checkpoints.ram.ids())
            self._take_jobs(block=idle and not warming, timeout=max(0.0, memory_due - time.monotonic())
                            if idle and memory_due is not None else None)
            t_collect = time.perf_counter()
            self._collect_writes()
            if self._stopping is not None and not self._running and not self._waiting:
                self._shutdown(self._stopping[0], ram_before)
                return
            self._cancel_requested()
            t_admit = time.perf_counter()
            self._admit_waiting()
            self._trace_ms = [(time.perf_counter() - t_admit) * 1000, (t_admit - t_collect) * 1000]
            self._publish_first_tokens_pending()
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # one failure must not kill the thread
                    self._batch_failed(exc)
                self._account()
                self._publish_first_tokens_pending()
            elif warming and not self._waiting and self._stopping is None:
                self._warm_one()
            self._end_step(ram_before)

    def _plan_warmup(self) -> None:
        """After a start: the stored checkpoints to load into the RAM tier while idle
        (`CheckpointManager.warm_candidates`, up to `config.ram_warmup_bytes` and the
        RAM tier's own bound)."""
        budget = min(self.config.ram_warmup_bytes, self.checkpoints.ram.max_bytes)
        self._warmup = deque(self.checkpoints.warm_candidates(budget))
        self._warm_order = tuple(e.id for e in self._warmup)
        self._warmup_done = [0, 0, time.perf_counter()]  # loaded, bytes, start
        if self._warmup:
            log.info("RAM tier warm-up: %d stored checkpoints (%.0f MiB) to load while idle", len(self._warmup),
                     sum(e.payload_bytes for e in self._warmup) / 2**20)

    def _warm_one(self) -> None:
        """Loads the next warm-up checkpoint into the RAM tier; a request arriving gives
        it up between tensors (it is tried again at the next idle moment, twice at most).
        The loaded ones are kept in the RAM tier's recency order by value (the most
        valuable most recent), so new checkpoints push out the least valuable first, not
        the ones loaded first."""
        entry = self._warmup.popleft()
        stages = self.checkpoints.warm(entry, should_stop=lambda: not self._queue.empty())
        if stages is not None:
            self._warmup_done[0] += 1
            self._warmup_done[1] += entry.payload_bytes
            self.rates = learn_disk_load(self.rates, stages.bytes, stages.total_s, stages.resident)
            self.checkpoints.ram.touch(reversed(self._warm_order))  # the held ones; the most valuable ends last
        elif entry.id not in self.checkpoints.ram and not self._queue.empty():  # given up for a request
            tries = self._warmup_tries.get(entry.id, 0) + 1
            self._warmup_tries[entry.id] = tries
            if tries < 2:
                self._warmup.append(entry)
        if not self._warmup:
            loaded, nbytes, t0 = self._warmup_done
            log.info("RAM tier warm-up done: %d checkpoints (%.0f MiB) in the RAM tier after %.1f s", loaded,
                     nbytes / 2**20, time.perf_counter() - t0)

    def _publish_first_tokens_pending(self) -> None:
        """Tells the checkpoint writer how many requests wait for their first token
        (queued, or in the batch without one): its writes hold between tensors meanwhile."""
        self.writer.first_tokens_pending = len(self._waiting) + sum(
            1 for r in self._running.values() if not r.generated)

    def _take_jobs(self, block: bool, timeout: float | None = None) -> None:
        try:
            item = self._queue.get(block=block, timeout=timeout)
            while True:
                if isinstance(item, tuple) and item[0] is _STOP:
                    self._stopping = (item[1],)
                elif item is not _WAKE:
                    self._waiting.append(item)
                    if self._running and not item.attempts:  # it will wait: start reading its checkpoint
                        self.checkpoints.prefetch_for(item.request.prompt, item.request.namespace, item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass

    @contextlib.contextmanager
    def _working_for(self, job: EngineJob | None):
        """Store events while the block runs belong to `job` (its Final reports them)."""
        before, self._owner = self._owner, job
        try:
            yield
        finally:
            self._owner = before

    def _end_step(self, ram_before: set) -> None:
        """Once per step: store events to their requests, Finals of the requests that
        ended, RAM tier changes to `on_cache_event`; then the test failpoint."""
        with self._events_lock:
            events, self._store_events = self._store_events, []
        for job, event in events:
            if job is not None:
                job.store_events.append(event)
        finals, self._finals = self._finals, []
        for job, final in finals:
            if job.pending_stores > 0:  # its checkpoints are still being written: it waits
                self._finals.append((job, final))
                continue
            self._done(job, FinishEvent(final.finish_reason, final.usage, tuple(job.store_events), final.live_id))
        if self.on_cache_event is not None:
            now = set(self.checkpoints.ram.ids())
            for entry_id in sorted(now - ram_before):
                self.on_cache_event(RamChanged(entry_id, True))
            for entry_id in sorted(ram_before - now):
                self.on_cache_event(RamChanged(entry_id, False))
        if self._failpoint is not None and self._tokens_this_step and self._failpoint_hit():
            log.error("test failpoint: the generation thread dies now")
            raise EngineFailpoint("test failpoint")
        self._tokens_this_step = 0

    def _failpoint_hit(self) -> bool:
        try:
            os.unlink(self._failpoint)
        except OSError:
            return False
        return True

    def _shutdown(self, shutdown_checkpoint: bool, ram_before: set) -> None:
        """Writes a `shutdown` checkpoint of every live state, in parallel with what the
        writer still holds, within the shutdown timeout (the writer's queue bounds do not
        apply); logs what was stored and skipped; sends the Finals that waited for their
        stores."""
        t0 = time.monotonic()
        jobs = []
        for live in self.lives.clear():
            job = self.checkpoints.prepare_live("shutdown", live) if shutdown_checkpoint else None
            if job is not None:
                jobs.append(job)
                # Past the queue's bounds: the snapshot exists, and the bounds are for a
                # running worker's memory (a CPU run skipped 6 of 15 shutdown checkpoints).
                self._submit_store(job, None, bounded=False)
        not_written = self.writer.drain(self.config.shutdown_timeout_s)
        for job in not_written:
            self._writer_skipped(job, "shutdown_timeout")
        done = self._collect_writes()
        self._end_step(ram_before)
        stored = sum(1 for c in done if c.job.kind == "shutdown" and c.entry is not None)
        self.shutdown_report = (stored, len(jobs) - stored)
        if jobs:
            late = sum(1 for j in not_written if j.kind == "shutdown")
            log.info("shutdown checkpoints: %d stored, %d skipped (%s) in %.1f s", stored, len(jobs) - stored,
                     f"{late} past --shutdown-timeout {self.config.shutdown_timeout_s:g} s" if late
                     else "duplicates or store skips", time.monotonic() - t0)

    # -- the checkpoint writer -----------------------------------------------------
    def _submit_store(self, job: WriteJob | None, owner: EngineJob | None, bounded: bool = True) -> None:
        """Hands a checkpoint to the writer (engine thread). `owner`: the request whose
        Final reports the store (it waits for it); None for none. bounded: whether the
        writer's queue bounds apply (`CheckpointWriter.submit`)."""
        if job is None:
            return
        job.owner = owner
        write = job.write

        def write_for_owner():
            self._writer_owner.job = owner
            try:
                return write()
            finally:
                self._writer_owner.job = _NO_OWNER

        job.write = write_for_owner
        if _waits_for(job):
            owner.pending_stores += 1
        for skipped in self.writer.submit(job, bounded):
            self._writer_skipped(skipped, "writer_behind")

    def _writer_skipped(self, job: WriteJob, reason: str) -> None:
        """A store the writer did not take (it was behind) or could not start in time."""
        log.info("store skipped kind=%s tokens=%d mib=%.1f reason=%s queued_mib=%.1f",
                 job.kind, job.n_tokens, job.n_bytes / 2**20, reason, self.writer.queued_bytes / 2**20)
        with self._events_lock:
            self._store_events.append((job.owner, StoreEvent("skipped", job.kind, job.n_tokens, job.n_bytes, 0.0,
                                                             reason)))
        if _waits_for(job):
            job.owner.pending_stores -= 1

    def _collect_writes(self) -> list[Completion]:
        """Takes the writer's finished stores (their events came through `on_store_event`):
        the RAM tier keeps them, and their requests stop waiting for them (engine thread)."""
        done = self.writer.take_completed()
        self.progress += len(done)
        if self._disk_probes_left and self.rates.disk_bps == 0:  # no payload to probe at start: the first one
            entry = next((c.entry for c in done if c.entry is not None), None)
            if entry is not None:
                self._seed_disk_rate(entry)
        for c in done:
            self.checkpoints.stored(c.job, c.entry)
            if _waits_for(c.job):
                c.job.owner.pending_stores -= 1
        return done

    def _done(self, job: EngineJob, event: Event) -> None:
        """The request's last event; it stops counting against the queue."""
        try:
            job.emit(event)
        finally:
            with self._lock:
                self._pending -= 1

    def _keep_live(self, live: LiveState) -> None:
        self.lives.add(live)
        if self.on_cache_event is not None:
            self.on_cache_event(LiveChanged(live.live_id, live.namespace, tuple(live.tokens)))

    def _forget_live(self, live: LiveState) -> None:
        if self.on_cache_event is not None:
            self.on_cache_event(LiveChanged(live.live_id, live.namespace, (), True))

    def _drop_lives(self, running: int) -> None:
        """Frees slots: the least recently used live states beyond what `running`
        requests leave are dropped, each after handing its `evict` checkpoint (ds4's
        evict) to the writer, reported by the request the engine works for."""
        for live in self.lives.to_drop(running):
            self._submit_store(self.checkpoints.prepare_live("evict", live), self._owner)
            self._forget_live(live)

    # -- admission --------------------------------------------------------------
    def _admit_waiting(self) -> None:
        """Admits waiting requests, first come first served, while slots are free and
        their KV fits `running_kv_bytes` (`_cancel_requested`, run just before, has
        answered the cancelled ones). A seeded sampling request runs alone, as
        mlx_lm.server runs it: MLX's random state is global, so a shared batch would
        change its draws and theirs."""
        deferred = []
        while self._waiting and len(self._running) < self.batch_width:
            job = self._waiting[0]
            if self._running and (seeded(job.request) or any(seeded(r.job.request) for r in self._running.values())):
                break
            kv_tokens = self._kv_tokens(job.request)
            if self._running and self._batch_bytes(kv_tokens) > self.config.running_kv_bytes > 0:
                break  # the burst queues here instead of over-committing memory
            self._waiting.popleft()
            try:
                with self._working_for(job):
                    admitted = self._admit(job, kv_tokens)
                if not admitted:
                    deferred.append(job)
            except Exception as exc:
                log.exception("request %s failed on admission", job.request.request_id)
                self._done(job, ErrorEvent(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                self.checkpoints.release(job)
        self._waiting.extendleft(reversed(deferred))
        self.checkpoints.end_admission_round()
        self._account()

    def _kv_tokens(self, req: GenerationRequest) -> int:
        """Tokens a request's KV state reaches: its prompt plus what it may generate."""
        return min(self.bundle.context_length, len(req.prompt) + max(1, req.sampling.max_tokens))

    def _batch_bytes(self, extra_tokens: int | None = None) -> int:
        """KV bytes the batch holds at most with its running requests (and one more of
        `extra_tokens`), padded to the longest as mlx-lm's batch cache pads."""
        lengths = [r.kv_tokens for r in self._running.values()]
        if extra_tokens is not None:
            lengths.append(extra_tokens)
        return batch_bytes(lengths, self.config.kv_bytes_per_token)

    def _account(self) -> None:
        """Publishes the batch's KV bound (after admissions and after each step)."""
        self.admitted_kv_bytes = self._batch_bytes()
        self.peak_admitted_kv_bytes = max(self.peak_admitted_kv_bytes, self.admitted_kv_bytes)

    def _plan(self, job: EngineJob, prompt: list[int]) -> RestorePlan:
        """The restore plan of a request (one store lookup). Snapshots the checkpoint
        writer has not written yet count as copy-only live states."""
        req = job.request
        hit = None if job.attempts else self.checkpoints.lookup(prompt, req.namespace)
        batch = [InBatch(uid, r.job.request.namespace, r.prompt, r.pos) for uid, r in self._running.items()]
        resident = None
        if hit is not None and hit.entry.id not in self.checkpoints.ram:
            resident = self.checkpoints.resident(hit.entry)
        lives = [*self.lives, *(j.reuse for j in self.writer.unwritten() if j.reuse is not None)]
        return plan_restore(prompt, req.namespace, lives, batch, hit, self.checkpoints.ram, self.rates,
                            self.spec.rules, cold=bool(job.attempts), resident=resident)

    def _restore(self, plan: RestorePlan) -> Restored:
        """Carries a restore plan out: the state the request starts from. A copy of a
        snapshot the writer has not written yet is reported as a RAM-tier restore (it is
        a checkpoint held in memory)."""
        d = plan.decision
        if d is not None:
            e = plan.entry or plan.declined
            log.info("load-or-recompute id=%s tokens=%d mib=%.1f chose=%s predicted_load_s=%.4f "
                     "predicted_recompute_s=%.4f", e.id, e.n_tokens, e.payload_bytes / 2**20,
                     "load" if d.load else "recompute", d.load_s, d.recompute_s)
        if plan.source in ("ram", "disk"):
            restored = self.checkpoints.load(plan.entry, plan.n_tokens)
            if restored is not None:
                self._measure_load(restored)
                return restored
            plan = plan.fallback
        if plan.source == "batch":
            caches, tokens = self._gen.extract_cache([plan.uid])[plan.uid]
            log.info("sharing %d prompt tokens with a request in the batch", plan.n_tokens)
            return Restored(cache_state.cut(caches, len(tokens), plan.n_tokens), plan.n_tokens, "live",
                            plan.stored_tokens)
        if plan.source == "live":
            live = plan.live
            caches, held = (live.prompt_state, live.prompt_tokens) if plan.from_prompt_state else \
                (live.caches, live.held)
            if plan.take:  # the request continues this conversation: its state moves into the batch
                self.lives.take(live)
                self._forget_live(live)
                cache_state.trim(caches, held, plan.n_tokens)
                return Restored(caches, plan.n_tokens, "live", plan.stored_tokens)
            if live.writing is not None:  # a snapshot not written yet: copied while its write cannot move it
                with live.writing.guard:
                    state = cache_state.cut(caches, held, plan.n_tokens)
                    mx.eval([c.state for c in state])
                return Restored(state, plan.n_tokens, "ram", plan.stored_tokens)
            # Another session sharing a prefix: a copy; the live state stays in its slot for
            # its own next turn (an `evict` checkpoint when its slot is needed).
            return Restored(cache_state.cut(caches, held, plan.n_tokens), plan.n_tokens, "live", plan.stored_tokens)
        return Restored(self.spec.new(), 0, "none", plan.stored_tokens)

    def _admit(self, job: EngineJob, kv_tokens: int = 0) -> bool:
        """Restores the request's prefix and puts it in the batch. Returns False
        (nothing done) when it should wait for a request in the batch to prefill
        the prefix they share."""
        req = job.request
        prompt = list(req.prompt)
        t0 = time.perf_counter()
        plan = self._plan(job, prompt)
        if plan.source == "batch" and plan.wait:
            return False
        restored = self._restore(plan)
        self._drop_lives(len(self._running) + 1)
        stores, skips = self.checkpoints.plan(len(prompt), restored.stored_prefix_tokens, req.anchor_tokens,
                                              req.hint_tokens)
        self._store_events += [(job, s) for s in skips]
        detok = copy.copy(self._detokenizer)
        detok.reset()
        t_admit = time.perf_counter()
        run = Running(job, prompt, restored, list(stores), detok, t_admit, restore_s=t_admit - t0,
                      pos=restored.n_tokens, kv_tokens=kv_tokens)
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
        # The generator owns the caches now (it prefills into them, or merges a copy into the
        # batch); the request keeps no reference, so they are freed when it is done with them.
        run.restored = replace(restored, caches=[])
        self._running[uid] = run
        self.progress += 1
        return True

    def _seed_disk_rate(self, entry) -> None:
        """Before the first real load: the disk rates start from probes of a payload
        (`entry`, or the store's largest) instead of the 1 GB/s prior: a cold read
        (`CheckpointManager.probe_disk`) for payloads out of the page cache, a warm load
        (`probe_warm_load`: read and copy to the device) for payloads in it. A prior too
        slow for the machine made every load look slower than recomputing on the H200, so
        the worker never loaded and never learnt."""
        if self.rates.disk_bps > 0 or self.checkpoints.store is None:
            return
        bps = self.checkpoints.probe_disk(entry)
        if bps is None:
            if entry is not None:
                self._disk_probes_left -= 1
            return
        self._disk_probes_left = 0
        warm = self.checkpoints.probe_warm_load(entry)
        cold = min(bps, warm) if warm else bps  # a cold load reads and copies too: never faster than a warm one
        self.rates = replace(self.rates, disk_bps=cold, disk_cold_bps=cold, disk_warm_bps=warm or 0.0)
        log.info("disk probes: cold read (page cache bypassed) %.2f GB/s, warm load (page cache, copy to the "
                 "device) %s; load-or-recompute starts from %.2f GB/s cold", bps / 1e9,
                 f"{warm / 1e9:.2f} GB/s" if warm else "not measured", cold / 1e9)

    def _measure_load(self, restored: Restored) -> None:
        if not (restored.loaded_bytes and restored.load_seconds > 0):
            return
        r, bps = self.rates, restored.loaded_bytes / restored.load_seconds
        if restored.source == "disk":
            st = restored.stages  # what the request waited, by how much of the payload the page cache held
            self.rates = learn_disk_load(r, restored.loaded_bytes, restored.load_seconds,
                                         st.resident if st is not None else None)
        elif restored.source == "ram":
            self.rates = replace(r, ram_bps=ewma(r.ram_bps, bps))

    # -- one batch step -----------------------------------------------------------
    def _step(self) -> None:
        t0 = time.perf_counter()
        with self._gen.stats() as stats:
            prompt_out, gen_out = self._gen.next()
        t1 = time.perf_counter()
        self.progress += 1
        try:
            self._after_step(stats, prompt_out, gen_out)
        finally:
            if self._trace_steps:
                self._log_step(stats, t0, t1)

    def _log_step(self, stats, t0: float, t1: float) -> None:
        """With KVROUTER_TRACE_STEPS: one line per step (milliseconds): mlx-lm's prompt and
        decode time, the whole `next` call and the bookkeeping after it, the time since the
        last step, this turn's admissions and write collection, the writer's queue, and the
        generator's own parts (`LongPrefillGenerator.trace`: the batch's step, each long
        chunk as (tokens, tokens its caches held, ms))."""
        parts = getattr(self._gen, "trace", None)
        log.info("step %d running=%d waiting=%d prompt_tokens=%d prompt_ms=%.1f decoded=%d decode_ms=%.1f "
                 "next_ms=%.1f after_ms=%.1f since_last_ms=%.1f admit_ms=%.1f collect_ms=%.1f writer_mib=%.0f "
                 "parts=%s", self.progress, len(self._running), len(self._waiting), stats.prompt_tokens,
                 stats.prompt_time * 1000, stats.generation_tokens, stats.decode_time * 1000, (t1 - t0) * 1000,
                 (time.perf_counter() - t1) * 1000, (t0 - self._trace_last) * 1000 if self._trace_last else 0.0,
                 self._trace_ms[0], self._trace_ms[1], self.writer.queued_bytes / 2**20, parts)
        if parts is not None:
            parts.clear()
        self._trace_last = time.perf_counter()

    def _after_step(self, stats, prompt_out, gen_out) -> None:
        """A step's outcome: rates, planned checkpoints at segment ends, tokens out."""
        self._measure_step(stats)
        if len(self._running) > 1:
            for run in self._running.values():
                run.crowded = True
        for r in prompt_out:
            run = self._running.get(r.uid)
            if run is None or not r.end_of_segment:
                continue
            pos = run.pos = run.restored.n_tokens + r.progress[0]
            if r.end_of_prompt:
                run.prefill_s = time.perf_counter() - run.t_admit
                if not run.crowded:  # it prefilled alone: a clean sample of prefill time by position
                    self._prefill_fit.add(run.restored.n_tokens, len(run.prompt), run.prefill_s)
                    self.rates = self._prefill_fit.apply(self.rates)
            keep_prompt_state = r.end_of_prompt and not self.spec.rules.cut_any
            if keep_prompt_state or any(p.n_tokens <= pos for p in run.plan):
                caches, _ = self._gen.extract_cache([r.uid])[r.uid]
                if keep_prompt_state:  # where the client-sent part ends: see LiveState.prompt_state
                    run.prompt_state = cache_state.cut(caches, pos, pos)
                with self._working_for(run.job):
                    run.plan = self._store_reached(run, caches, pos)
        for r in gen_out:
            run = self._running.get(r.uid)
            if run is not None:
                self._generated(r, run)

    def _generated(self, r, run: Running) -> None:
        if not (r.finish_reason == "stop" and r.token in self.eos_ids):
            first = not run.generated
            run.generated.append(r.token)
            run.detok.add_token(r.token)
            rs = run.restored
            reuse = (rs.n_tokens, rs.source if rs.n_tokens else "none") if first else None
            if first:
                self._log_first_token(run)
            run.job.emit(TokenEvent((r.token,), run.detok.last_segment, reuse))
            self._tokens_this_step += 1
        if r.finish_reason is not None:
            self._finish(r.uid, run, r.finish_reason, r.prompt_cache, r.all_tokens)

    def _log_first_token(self, run: Running) -> None:
        """One line per request at its first token: where its time to first token went,
        as the engine saw it (milliseconds): queued (submit to admission), restore
        (lookup + load or copy), prefill (admission to the end of its prompt) and the
        whole; the batch size it shared."""
        now, rs, job = time.perf_counter(), run.restored, run.job
        t_start = run.t_admit - run.restore_s
        log.info("first token request=%s prompt=%d reused=%d source=%s queued_ms=%.0f restore_ms=%.0f "
                 "prefill_ms=%.0f ttft_ms=%.0f batch=%d", job.request.request_id, len(run.prompt), rs.n_tokens,
                 rs.source if rs.n_tokens else "none", (t_start - job.t_submit) * 1000, run.restore_s * 1000,
                 (now - run.t_admit) * 1000, (now - job.t_submit) * 1000, len(self._running))

    def _finish(self, uid: int, run: Running, reason: str, caches, tokens) -> None:
        """Ends a request that left the batch with `caches` holding `tokens`; its Final
        goes out at the end of the step."""
        del self._running[uid]
        run.detok.finalize()
        if run.detok.last_segment and reason != "cancelled":
            run.job.emit(TokenEvent((), run.detok.last_segment))
        live_id = 0
        if tokens:
            # mlx-lm extracts a sequence's cache lazily (mx.contiguous of a slice of the batch
            # cache): evaluated now, the live state owns just its own KV instead of holding the
            # whole batch buffer of the moment it left (hundreds of MiB after a burst).
            sent = min(len(run.prompt), len(tokens))
            prompt_state = run.prompt_state if len(tokens) > sent else None
            mx.eval([c.state for c in caches] + [c.state for c in prompt_state or ()])
            live = LiveState(run.job.request.namespace, list(tokens), caches, sent, run.job.request.text_preview,
                             prompt_state=prompt_state)
            self._keep_live(live)
            live_id = live.live_id
        with self._working_for(run.job):
            self._drop_lives(len(self._running))
        r = run.restored
        usage = Usage(
            prompt_tokens=len(run.prompt),
            completion_tokens=len(run.generated),
            cached_tokens=r.n_tokens,
            cache_source=r.source if r.n_tokens else "none",
            prefill_seconds=run.prefill_s,
            load_seconds=r.load_seconds,
            loaded_bytes=r.loaded_bytes,
            load_stages=(r.stages.read_s, r.stages.device_s, r.stages.build_s) if r.stages is not None else None,
        )
        self._finals.append((run.job, FinishEvent(reason, usage, (), live_id)))

    def _store_reached(self, run: Running, caches, pos: int) -> list:
        """Hands the planned checkpoints at or before `pos`, cut from `caches` (which hold
        the first `pos` prompt tokens), to the writer; returns the rest of the plan. A planned position
        before `pos` that the state cannot be cut back to is skipped (reason
        "exact_position")."""
        remaining = []
        req = run.job.request
        for p in run.plan:
            if p.n_tokens > pos:
                remaining.append(p)
                continue
            if not self.checkpoints.can_store(pos, p.n_tokens):
                log.info("store skipped kind=%s tokens=%d reason=exact_position (state holds %d)",
                         p.kind, p.n_tokens, pos)
                self._store_events.append((run.job, StoreEvent("skipped", p.kind, p.n_tokens,
                                                               reason="exact_position")))
                continue
            self._submit_store(self.checkpoints.prepare(p.kind, caches, pos, run.prompt[: p.n_tokens],
                                                        req.namespace, req.text_preview), run.job)
        return remaining

    def _cancel_requested(self) -> None:
        """Ends cancelled requests: waiting ones at once, running ones with their
        state kept as a live state (what they prefilled stays reusable)."""
        if any(job.cancelled.is_set() for job in self._waiting):
            for job in [j for j in self._waiting if j.cancelled.is_set()]:
                self._waiting.remove(job)
                self.checkpoints.release(job)
                self._finals.append((job, FinishEvent("cancelled", Usage(len(job.request.prompt), 0, 0, "none"))))
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
            self.rates = r = replace(r, prefill_tps=ewma(r.prefill_tps, p[0] / p[1]))
            p[0], p[1] = 0, 0.0
        if d[0] >= MIN_RATE_STEPS and d[1] > 0:
            self.rates = replace(r, decode_tps=ewma(r.decode_tps, d[0] / d[1]))
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
                    with self._working_for(run.job):
                        self.checkpoints.quarantine(run.restored.entry_id, f"prefill failed: {exc}")
                    log.warning("prefill from checkpoint %s failed (%s); retrying cold", run.restored.entry_id, exc)
                run.job.attempts += 1
                retry.append(run.job)
            else:
                self._done(run.job, ErrorEvent(f"generation failed: {type(exc).__name__}: {exc}"))
        self._waiting.extendleft(reversed(retry))
