"""The one thread that owns MLX: runs generation requests from a queue.

Each request: restore the longest reusable prefix (`CheckpointManager`),
prefill the rest in chunks whose boundaries sit at absolute positions
(multiples of `prefill_chunk_tokens`), write the checkpoints the policy plans
as the prefill crosses them, then decode token by token. Events go back
through the request's `emit` callback, which must be thread-safe.

The engine measures itself (prefill rate, checkpoint load bandwidth from the
RAM tier and from disk, decode rate) as exponential moving averages in
`rates`; the same figures decide load-or-recompute on restore and travel to the
router (GetStatus, each request's Final) for its cost model. Cache changes
(live state, RAM tier) go to `on_cache_event` after each request.

Chunk boundaries at absolute positions make a run that resumes from a
checkpoint on a chunk boundary compute exactly the same sums as one that did
not (measured: identical fp32 logits on the CPU; ~3e-5 apart when the
checkpoint ends mid-chunk).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from router.routing import Rates
from cachestore.keys import common_prefix_length
from worker.checkpoints import CheckpointManager, LiveState, Restored
from worker.events import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent, Usage
from worker import kv_state

log = logging.getLogger("kvrouter.worker.engine")


@dataclass(frozen=True)
class EngineConfig:
    """prefill_chunk_tokens: prefill chunk size in tokens (chunks end at its multiples)."""

    prefill_chunk_tokens: int = 256
    max_queue: int = 0  # requests waiting plus running accepted; 0 = no limit


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


EWMA_WEIGHT = 0.3  # weight of the newest measurement
MIN_RATE_TOKENS = 64  # shorter prefills measure per-request overhead more than the rate


def ewma(old: float, new: float) -> float:
    return new if old <= 0 else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


@dataclass
class Job:
    request: GenerationRequest
    emit: Callable[[Event], None]
    cancelled: threading.Event


_STOP = object()


def replaces(live: LiveState, prompt: list[int], namespace: str) -> bool:
    """True when `prompt` does not continue the live state's client-sent tokens
    (another namespace, or it diverges inside them): serving it drops that state."""
    if live.namespace != namespace:
        return True
    return common_prefix_length(live.tokens[: live.prompt_tokens], prompt) < live.prompt_tokens


class Engine:
    """Owns the model and its live KV state; serves one request at a time on its thread.

    bundle: a `worker.models.ModelBundle`; checkpoints: the reuse manager.
    """

    def __init__(self, bundle, hf_tokenizer, checkpoints: CheckpointManager, config: EngineConfig):
        self.bundle = bundle
        self.model = bundle.model
        self.checkpoints = checkpoints
        self.config = config
        self.eos_ids = set(bundle.eos_token_ids)
        self._detokenizer = BPEStreamingDetokenizer(hf_tokenizer)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlx-engine", daemon=True)
        self._pending = 0
        self._lock = threading.Lock()
        self.live: LiveState | None = None
        self.requests_served = 0
        self._stopped = threading.Event()
        self.rates = Rates()
        # Called on the engine thread with ("live", (namespace, tokens)) or
        # ("ram", (entry_id, added)); must be thread-safe and must not raise.
        self.on_cache_event: Callable[[str, tuple], None] | None = None
        self._store_s = 0.0  # checkpoint store time inside the current prefill

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
        """Finishes queued work, writes the `shutdown` checkpoint, ends the thread."""
        self._stopped.set()
        self._queue.put((_STOP, shutdown_checkpoint))
        self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if isinstance(job, tuple) and job[0] is _STOP:
                if job[1] and self.checkpoints.save_live("shutdown", self.live) is not None:
                    log.info("stored the shutdown checkpoint of the live state")
                return
            self.checkpoints.take_events()  # drop events of earlier failed work
            before = (self._live_key(), set(self.checkpoints.ram.ids()))
            try:
                if job.cancelled.is_set():
                    job.emit(FinishEvent("cancelled", Usage(len(job.request.prompt), 0, 0, "none")))
                else:
                    self._run(job)
            except Exception as exc:  # one request's failure must not kill the thread
                log.exception("request %s failed", job.request.request_id)
                self.live = None
                job.emit(ErrorEvent(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                with self._lock:
                    self._pending -= 1
                self.requests_served += 1
                self._publish_changes(*before)

    def _live_key(self):
        live = self.live
        return (live.namespace, tuple(live.tokens)) if live is not None else ("", ())

    def _publish_changes(self, live_before, ram_before: set) -> None:
        """Reports what this request changed in the live state and the RAM tier."""
        notify = self.on_cache_event
        if notify is None:
            return
        live_now = self._live_key()
        if live_now != live_before:
            notify("live", live_now)
        ram_now = set(self.checkpoints.ram.ids())
        for entry_id in sorted(ram_now - ram_before):
            notify("ram", (entry_id, True))
        for entry_id in sorted(ram_before - ram_now):
            notify("ram", (entry_id, False))

    def _measure(self, prompt, restored: Restored, prefill_s: float, generated: int, decode_s: float) -> None:
        """Updates `rates` from one request (engine thread; Rates is replaced, never mutated)."""
        r = self.rates
        prefilled = len(prompt) - restored.n_tokens
        compute_s = prefill_s - self._store_s
        prefill_tps, disk_bps, ram_bps, decode_tps = r.prefill_tps, r.disk_bps, r.ram_bps, r.decode_tps
        if prefilled >= MIN_RATE_TOKENS and compute_s > 0:
            prefill_tps = ewma(prefill_tps, prefilled / compute_s)
        if restored.loaded_bytes and restored.load_seconds > 0:
            bps = restored.loaded_bytes / restored.load_seconds
            if restored.source == "disk":
                disk_bps = ewma(disk_bps, bps)
            elif restored.source == "ram":
                ram_bps = ewma(ram_bps, bps)
        if generated >= 2 and decode_s > 0:
            decode_tps = ewma(decode_tps, generated / decode_s)
        self.rates = Rates(prefill_tps, disk_bps, ram_bps, decode_tps)

    def _run(self, job: Job) -> None:
        req = job.request
        prompt = list(req.prompt)
        live, self.live = self.live, None  # the live state is consumed by this request
        if live is not None and replaces(live, prompt, req.namespace):
            # Before an unrelated request replaces the live state, keep it (ds4's evict).
            self.checkpoints.save_live("evict", live)
        restored = self.checkpoints.restore(prompt, req.namespace, live, self.rates)
        try:
            logits, prefill_s = self._prefill(prompt, restored, req, job)
        except Exception as exc:
            if restored.entry_id is None:  # not restored from a stored checkpoint (RAM tier or disk)
                raise
            # A restored checkpoint that makes prefill fail is poison (case C11):
            # quarantine it and serve the request cold.
            self.checkpoints.quarantine(restored, f"prefill failed: {exc}")
            log.warning("prefill from checkpoint failed (%s); retrying cold", exc)
            restored = Restored(kv_state.new_state(self.model), 0, "none", 0)
            logits, prefill_s = self._prefill(prompt, restored, req, job)
        if logits is None:  # cancelled during prefill
            n = kv_state.state_length(restored.caches)
            self.live = LiveState(req.namespace, prompt[:n], restored.caches, n, req.text_preview)
            job.emit(FinishEvent("cancelled", self._usage(prompt, restored, 0, prefill_s),
                                 self.checkpoints.take_events()))
            return
        self._decode(job, prompt, restored, logits, prefill_s)

    def _prefill(self, prompt: list[int], restored: Restored, req: GenerationRequest, job: Job):
        caches = restored.caches
        start = restored.n_tokens
        chunk = self.config.prefill_chunk_tokens
        plan = list(self.checkpoints.plan(len(prompt), restored.stored_prefix_tokens, req.anchor_tokens))
        t0 = time.perf_counter()
        self._store_s = 0.0
        # Stores already covered by the restored state (e.g. an anchor inside the live state).
        plan = self._store_reached(plan, caches, prompt, start, req)
        pos = start
        logits = None
        while pos < len(prompt):
            if job.cancelled.is_set():
                return None, time.perf_counter() - t0
            end = min(len(prompt), (pos // chunk + 1) * chunk)
            out = self.model(mx.array(prompt[pos:end])[None], cache=caches)
            logits = out[:, -1, :]
            mx.eval(logits, [c.keys for c in caches])
            pos = end
            plan = self._store_reached(plan, caches, prompt, pos, req)
        return logits, time.perf_counter() - t0

    def _store_reached(self, plan, caches, prompt, pos, req):
        remaining = []
        for p in plan:
            if p.n_tokens <= pos:
                t0 = time.perf_counter()
                entry = self.checkpoints.save(p.kind, caches, prompt[: p.n_tokens], req.namespace, req.text_preview)
                self._store_s += time.perf_counter() - t0
                if entry is not None:
                    log.info(
                        "store kind=%s tokens=%d ms=%.0f MiB=%.1f",
                        p.kind, p.n_tokens, (time.perf_counter() - t0) * 1000, entry.payload_bytes / 2**20,
                    )
            else:
                remaining.append(p)
        return remaining

    def _decode(self, job: Job, prompt, restored: Restored, logits, prefill_s: float) -> None:
        req = job.request
        sp = req.sampling
        caches = restored.caches
        if sp.seed is not None:
            mx.random.seed(sp.seed % 2**64)  # clients may send any int64; mlx takes uint64
        sampler = make_sampler(temp=sp.temperature, top_p=sp.top_p if 0 < sp.top_p < 1 else 0.0)
        max_tokens = max(0, min(sp.max_tokens, self.bundle.context_length - len(prompt)))
        detok = self._detokenizer
        detok.reset()
        generated: list[int] = []
        finish = "length"
        t_decode = time.perf_counter()
        while len(generated) < max_tokens:
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            token = int(sampler(logits).item())
            if token in self.eos_ids:
                finish = "stop"
                break
            generated.append(token)
            detok.add_token(token)
            job.emit(TokenEvent((token,), detok.last_segment))
            if _failpoint_hit():
                log.error("test failpoint: the generation thread dies now")
                raise EngineFailpoint("test failpoint")
            if len(generated) >= max_tokens:
                break
            out = self.model(mx.array([[token]]), cache=caches)
            logits = out[:, -1, :]
            mx.eval(logits)
        decode_s = time.perf_counter() - t_decode
        detok.finalize()
        tail = detok.last_segment
        if tail:
            job.emit(TokenEvent((), tail))
        history = prompt + generated
        self.live = LiveState(req.namespace, history[: kv_state.state_length(caches)], caches, len(prompt),
                              req.text_preview)
        self._measure(prompt, restored, prefill_s, len(generated), decode_s)
        job.emit(FinishEvent(finish, self._usage(prompt, restored, len(generated), prefill_s),
                             self.checkpoints.take_events()))

    @staticmethod
    def _usage(prompt, restored: Restored, completion: int, prefill_s: float) -> Usage:
        return Usage(
            prompt_tokens=len(prompt),
            completion_tokens=completion,
            cached_tokens=restored.n_tokens,
            cache_source=restored.source if restored.n_tokens else "none",
            prefill_seconds=prefill_s,
            load_seconds=restored.load_seconds,
            loaded_bytes=restored.loaded_bytes,
        )
