"""Sending one tokenized request to a worker: decide the route, hold a slot on
the worker from that moment (case C13), coalesce prefills of a new shared
prefix, dispatch, retry before the first token, record metrics. Shared by every
protocol view.

Failures: a worker that fails before any token reached the client (unreachable,
queue full, engine gone) is replaced by another (at most MAX_ATTEMPTS attempts,
with backoff; a worker whose queue was full is tried again when no other can
take the request, since the router's count said it had room); a failure after the first token raises WorkerFailed, which the
views turn into an error event (never a normal stop). Client errors
(BadRequest) pass through and never count against a worker (case C14).

Coalescing: when a request's stable chat prefix (its cold anchor, long enough
to be stored) is held by nobody (not in the store, not in any worker's live
state) and another request is already prefilling it, the request waits for that
one (bounded) and is routed afterwards, when the prefix can be reused. The
first becomes the "leader" in `prepare`, which runs without awaiting, so the
order is exactly arrival order.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator

from kvrouter_proto import worker_pb2
from kvrouter.router.affinity import AffinityMap
from kvrouter.router.errors import ContextTooLong, Overloaded, Unavailable, WorkerFailed
from kvrouter.router.worker_client import Completion, Delta, WorkerBusy, WorkerError, WorkerUnavailable

log = logging.getLogger("kvrouter.router.dispatch")

MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.1  # doubled per attempt
COALESCE_MAX_WAIT_S = 60.0


@dataclass(frozen=True)
class Job:
    """A tokenized request ready for a worker. Token counts in tokens."""

    model: object  # router.pool.ServedModel
    tokens: tuple[int, ...]
    anchor_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    namespace: str = ""
    text_preview: str = ""
    prompt_param: str = "messages"  # the request field holding the prompt, named in context errors
    arrived_s: float | None = None  # perf_counter() when the HTTP request arrived; TTFT counts from here
    hint_tokens: tuple[int, ...] = ()  # the client's checkpoint positions (router.client_hints), tokens
    affinity_key: str = ""  # OpenAI prompt_cache_key: routed back to the worker that served it (router.affinity)


@dataclass
class Route:
    """Where a request went and why (for `x-kvrouter-route`).

    worker: its name; source: where the reused prefix comes from ("live", "ram",
    "disk", "none"); cached: prompt tokens predicted reused; predicted_ttft_s:
    the cost model's time to first token; reason: the routing reason
    ("live_prefix", "least_loaded", "retry", ...); predicted_cached: the longest
    stored checkpoint of the prompt (the store's view, whatever worker wins);
    coalesced: it waited for another request's prefill of its prefix.
    """

    worker: str = ""
    reason: str = ""
    predicted_cached: int = 0
    started: float = 0.0  # perf_counter() when the decision was made; TTFT counts from here
    source: str = "none"
    cached: int = 0
    predicted_ttft_s: float = 0.0
    coalesced: bool = False
    attempts: int = 0
    _lease: object = field(default=None, repr=False)
    _follow: object = field(default=None, repr=False)  # the leader's asyncio.Event to wait for
    _lead: object = field(default=None, repr=False)  # the key this request leads

    def header(self) -> str:
        return (f"worker={self.worker}; source={self.source}; cached={self.cached}; "
                f"predicted_ttft_ms={round(self.predicted_ttft_s * 1000)}")


def check_context(job: Job) -> None:
    """Raises ContextTooLong when the prompt does not leave room for one token."""
    if len(job.tokens) >= job.model.context_length:
        raise ContextTooLong(len(job.tokens), job.model.context_length, job.prompt_param)


def prefix_key(job: Job) -> tuple:
    digest = hashlib.blake2b(repr(job.tokens[: job.anchor_tokens]).encode(), digest_size=16).hexdigest()
    return (job.model.name, job.namespace, job.anchor_tokens, digest)


class Dispatcher:
    """Routes jobs over a WorkerPool and records RouterMetrics.

    coalesce: wait for another request's prefill of a new shared prefix (see module doc).
    """

    def __init__(self, pool, metrics, *, coalesce: bool = True):
        self.pool = pool
        self.metrics = metrics
        self.coalesce = coalesce
        self._leaders: dict[tuple, asyncio.Event] = {}
        self.affinity = AffinityMap()

    def prepare(self, job: Job) -> Route:
        """Validates the job, decides the route and takes a slot on the worker.
        Raises ContextTooLong, Unavailable or Overloaded."""
        check_context(job)
        started = time.perf_counter()
        pool = self.pool
        hit = pool.stored_hit(job.model, job.namespace, job.tokens)
        prefer = self.affinity.worker_for(job.model.name, job.namespace, job.affinity_key)
        decision = pool.decide(job.model, job.tokens, job.namespace, hit=hit, prefer=prefer)
        if job.affinity_key:
            self._count_affinity(job, prefer, decision)
        stored = min(hit.n_tokens, len(job.tokens) - 1) if hit is not None else 0
        route = Route(decision.worker, decision.reason, stored, started, decision.source, decision.cached_tokens,
                      decision.predicted_ttft_s)
        follow = self._coalesce(job, route, hit)
        if follow is None:
            self._take(route, job, decision)
        self.metrics.routing_seconds.labels(job.model.name).observe(time.perf_counter() - started)
        self.metrics.routing_decisions.labels(job.model.name, route.reason).inc()
        return route

    def _count_affinity(self, job: Job, prefer: str, decision) -> None:
        hints = self.metrics.client_hints
        hints.labels(job.model.name, "prompt_cache_key").inc()
        if decision.affinity:
            hints.labels(job.model.name, "prompt_cache_key_routed").inc()
        log.info("prompt_cache_key=%s last_worker=%s chosen=%s", job.affinity_key[:40], prefer or "-",
                 decision.worker)

    def _coalesce(self, job: Job, route: Route, hit):
        """Makes `route` the leader of its new prefix, or a follower of the request
        that leads it (returns the event to wait for), or neither (None)."""
        store = self.pool.store
        if not self.coalesce or store is None or job.anchor_tokens < store.config.min_tokens:
            return None
        if job.anchor_tokens >= len(job.tokens):
            return None
        if hit is not None and hit.n_tokens >= job.anchor_tokens:
            return None  # stored already
        for c in self.pool.candidates(job.model, job.tokens, job.namespace):
            if c.healthy and any(r.source == "live" and r.tokens >= job.anchor_tokens for r in c.reuse):
                return None  # a worker holds it live
        key = prefix_key(job)
        leader = self._leaders.get(key)
        if leader is None:
            event = self._leaders[key] = asyncio.Event()
            route._lead = key
            weakref.finalize(route, self._drop_leader, key, event)  # a route dropped unused frees its followers
            return None
        route._follow = leader
        route.reason = "coalesced"
        route.coalesced = True
        return leader

    def _take(self, route: Route, job: Job, decision) -> None:
        """Holds a slot on the decided worker until the request ends (released by
        `run`, or when the route is dropped unused)."""
        worker = self.pool.worker(job.model, decision.worker)
        lease = self.pool.acquire(worker, decision, len(job.tokens), job.max_tokens)
        self.affinity.remember(job.model.name, job.namespace, job.affinity_key, worker.name)
        gauge = self.metrics.in_flight.labels(worker.name)
        gauge.inc()
        route._lease = lease
        weakref.finalize(route, _release, lease, gauge)

    def _drop_leader(self, key: tuple, event: asyncio.Event) -> None:
        if self._leaders.get(key) is event:
            del self._leaders[key]
        event.set()

    def _end_lead(self, route: Route) -> None:
        if route._lead is not None:
            key, route._lead = route._lead, None
            event = self._leaders.get(key)
            if event is not None:
                self._drop_leader(key, event)

    def _release(self, route: Route) -> None:
        lease, route._lease = route._lease, None
        if lease is not None and not lease.released:
            _release(lease, self.metrics.in_flight.labels(lease.worker.name))

    async def _wait_for_leader(self, job: Job, route: Route) -> None:
        """Waits (bounded) for the leader's prefill, then routes afresh (maybe as a new leader)."""
        while route._follow is not None:
            event, route._follow = route._follow, None
            bound = min(COALESCE_MAX_WAIT_S, 5.0 + 3 * route.predicted_ttft_s)
            try:
                await asyncio.wait_for(event.wait(), bound)
            except asyncio.TimeoutError:
                log.info("waited %.0f s for another request's prefill of a shared prefix; going ahead", bound)
            hit = self.pool.stored_hit(job.model, job.namespace, job.tokens)
            decision = self.pool.decide(job.model, job.tokens, job.namespace, hit=hit)
            route.worker, route.source, route.cached = decision.worker, decision.source, decision.cached_tokens
            route.predicted_ttft_s = decision.predicted_ttft_s
            follow = self._coalesce(job, route, hit)
            route.reason = "coalesced"
            if follow is None:
                self._take(route, job, decision)

    async def run(self, job: Job, route: Route) -> AsyncIterator[Delta | Completion]:
        """Streams the job's output; retries on another worker while nothing was generated.

        Raises BadRequest, Unavailable / Overloaded (no worker could take it) or WorkerFailed.
        """
        try:
            if route._follow is not None:
                await self._wait_for_leader(job, route)
            async for item in self._run(job, route):
                yield item
        finally:
            self._release(route)
            self._end_lead(route)

    async def _run(self, job: Job, route: Route) -> AsyncIterator[Delta | Completion]:
        request = worker_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=job.tokens,
            sampling=worker_pb2.SamplingParams(
                temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens
            ),
            namespace=job.namespace,
            anchor_tokens=job.anchor_tokens,
            text_preview=job.text_preview,
            hint_tokens=job.hint_tokens,
        )
        if job.seed is not None:
            request.sampling.seed = job.seed
        model_name = job.model.name
        t0 = job.arrived_s or route.started or time.perf_counter()
        first = True
        last_token_at = 0.0
        tried: set[str] = set()
        full: set[str] = set()  # tried workers that answered "queue full"
        busy = False
        while True:
            worker = self.pool.worker(job.model, route.worker)
            tried.add(worker.name)
            route.attempts += 1
            generated: list[int] = []
            try:
                async for item in worker.generate(request):
                    if isinstance(item, Delta):
                        generated.extend(item.token_ids)
                        now = time.perf_counter()
                        if first:
                            self.metrics.ttft.labels(model_name).observe(now - t0)
                            first = False
                            if route._lease is not None:
                                route._lease.first_token()
                        elif item.token_ids:
                            gap = (now - last_token_at) / len(item.token_ids)
                            for _ in item.token_ids:
                                self.metrics.inter_token.labels(model_name).observe(gap)
                        last_token_at = now
                    if isinstance(item, Completion):
                        self.metrics.request_seconds.labels(model_name).observe(time.perf_counter() - t0)
                        self._record(job, item, worker.name)
                        self.pool.observe(worker.name, item, job.tokens + tuple(generated), job.namespace)
                        self._end_lead(route)  # the prefix is stored and live: followers may go
                    yield item
                return
            except WorkerUnavailable as exc:
                if generated:  # tokens reached the client: never start over elsewhere
                    self.metrics.worker_failures.labels(worker.name, "failed").inc()
                    raise WorkerFailed(f"worker {worker.name} failed mid-stream: {exc}") from exc
                busy = isinstance(exc, WorkerBusy)
                log.warning("attempt %d on %s failed before any token: %s", route.attempts, worker.name, exc)
                self.metrics.worker_failures.labels(worker.name, "busy" if busy else "unavailable").inc()
                self._release(route)
                if route.attempts >= MAX_ATTEMPTS:
                    raise self._no_worker(busy, exc) from exc
                if busy:
                    full.add(worker.name)
                await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (route.attempts - 1))
                try:
                    decision = self._retry_decision(job, tried, full)
                except (Unavailable, Overloaded) as no_other:
                    raise self._no_worker(busy, exc) from no_other
                route.worker, route.source, route.cached = decision.worker, decision.source, decision.cached_tokens
                route.predicted_ttft_s = decision.predicted_ttft_s
                route.reason = "retry"
                self._take(route, job, decision)
                self.metrics.retries.labels(model_name).inc()
                self.metrics.routing_decisions.labels(model_name, "retry").inc()
            except WorkerError as exc:
                self.metrics.worker_failures.labels(worker.name, "failed").inc()
                raise WorkerFailed(str(exc)) from exc

    def _retry_decision(self, job: Job, tried: set[str], full: set[str]):
        """The route of a retry: a worker not tried yet; when none can take it, one of
        `full` (tried workers that answered "queue full": the router's count said they
        had room, so their queue is draining, e.g. a generation whose client just left
        is still stopping). Raises Unavailable or Overloaded."""
        try:
            return self.pool.decide(job.model, job.tokens, job.namespace, exclude=frozenset(tried))
        except (Unavailable, Overloaded):
            if not full:
                raise
            return self.pool.decide(job.model, job.tokens, job.namespace, exclude=frozenset(tried - full))

    @staticmethod
    def _no_worker(busy: bool, exc: Exception):
        if busy:
            return Overloaded(f"every worker that could take the request is full: {exc}")
        return Unavailable(f"no worker could take the request: {exc}")

    def _record(self, job: Job, c: Completion, worker_name: str) -> None:
        m = self.metrics
        model_name = job.model.name
        m.prompt_tokens.labels(model_name, "computed").inc(c.prompt_tokens - c.cached_tokens)
        if c.cached_tokens:
            m.prompt_tokens.labels(model_name, c.cache_source).inc(c.cached_tokens)
        m.completion_tokens.labels(model_name).inc(c.completion_tokens)
        if c.prompt_tokens > c.cached_tokens:
            m.prefill_seconds.labels(model_name).observe(c.prefill_seconds)
        if c.cache_source == "disk":
            m.checkpoint_load_seconds.labels(model_name).observe(c.load_seconds)
            loaded = c.loaded_bytes or self._loaded_bytes(job, c.cached_tokens)
            if loaded:
                m.checkpoint_load_bytes.labels(model_name).observe(loaded)
        for e in c.store_events:
            m.checkpoint_events.labels(model_name, e.action, e.kind, e.reason).inc()
            if e.action == "stored":
                m.checkpoint_store_seconds.labels(model_name, e.kind).observe(e.seconds)
                m.checkpoint_store_bytes.labels(model_name, e.kind).observe(e.bytes)
        log.info(
            "done worker=%s prompt=%d cached=%d source=%s prefill_ms=%.0f completion=%d finish=%s",
            worker_name, c.prompt_tokens, c.cached_tokens, c.cache_source,
            c.prefill_seconds * 1000, c.completion_tokens, c.finish_reason,
        )

    def _loaded_bytes(self, job: Job, cached_tokens: int) -> int:
        """Payload bytes of the disk checkpoint a worker restored `cached_tokens` from: the
        longest stored prefix of at most cached_tokens + 1 tokens (a restore never covers
        the last prompt token). 0 without a store or when it is gone already."""
        store = self.pool.store
        if store is None:
            return 0
        try:
            hit = store.lookup(job.model.identity, job.namespace, job.tokens[: cached_tokens + 1])
        except Exception as exc:  # metrics must never fail a request
            log.debug("load size lookup failed: %s", exc)
            return 0
        return hit.entry.payload_bytes if hit else 0


def _release(lease, gauge) -> None:
    if not lease.released:
        lease.release()
        gauge.dec()
