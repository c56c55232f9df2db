"""Sending one tokenized request to a worker: decide the route, coalesce prefills
of a new shared prefix, retry before the first token. Shared by every protocol view.

    async with dispatcher.route(job) as route:      # decided; the worker's load counts it
        ... route.header() ...
        async for item in dispatcher.run(job, route):   # Delta..., then one Completion
            ...

The route's scope owns the request's lease on its worker (`router.leases`): load
counts from the decision (case C13) until the scope ends, whatever way it ends.

Failures: a worker that fails before any token reached the client (unreachable,
queue full, engine gone) is replaced by another (at most MAX_ATTEMPTS attempts,
with backoff; a worker whose queue was full is tried again when no other can
take the request, since the router's count said it had room); a failure after
the first token raises WorkerFailed, which the views turn into an error event
(never a normal stop). Client errors (BadRequest) pass through and never count
against a worker (case C14).

Coalescing: when a request's stable chat prefix (its cold anchor, long enough
to be stored) is held by nobody (not in the store, not in any worker's live
state) and another request is already prefilling it, the request waits for that
one (bounded) and is routed afterwards, when the prefix can be reused: at the
leader's first token its prompt is in its worker's batch (the routing view
counts it there, `WorkerView.in_batch`, and the worker copies it for a request
sharing the prefix). The first becomes the "leader" in `prepare`, which runs
without awaiting, so the order is exactly arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvrouter.cachestore.costs import Reuse, first_token_work_s
from kvrouter.router.affinity import AffinityMap
from kvrouter.router.errors import ContextTooLong, Overloaded, Unavailable, WorkerFailed
from kvrouter.router.leases import Leases
from kvrouter.router.metrics import RequestTimer, record_completion
from kvrouter.router.routing import Decision, choose_worker, request_seconds
from kvrouter.router.worker_client import (Completion, Delta, GenerateRequest, WorkerBusy, WorkerError,
                                           WorkerUnavailable)

log = logging.getLogger("kvrouter.router.dispatch")

MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.1  # doubled per attempt
COALESCE_MAX_WAIT_S = 60.0
DECODE_TOKENS_FOR_QUEUE = 64  # generated tokens assumed per queued request (max_tokens is an upper bound)


@dataclass(frozen=True)
class Job:
    """A tokenized request ready for a worker. Token counts in tokens."""

    model: object  # router.cluster.ServedModel
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

    def request(self) -> GenerateRequest:
        """What the worker is sent (a fresh request id each time)."""
        return GenerateRequest(uuid.uuid4().hex, self.tokens, self.max_tokens, self.temperature, self.top_p,
                               self.seed, self.namespace, self.anchor_tokens, self.text_preview, self.hint_tokens)


@dataclass
class Route:
    """Where a request went and why (for `x-kvrouter-route`).

    worker: its name; source: where the reused prefix comes from ("live", "ram",
    "disk", "none"); cached: prompt tokens reused: the prediction until the worker
    reports the real figure (its first token, or its final report); predicted_ttft_s:
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
    _held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)  # the current lease
    _lease: object = field(default=None, repr=False)
    _follow: object = field(default=None, repr=False)  # the leader's asyncio.Event to wait for
    _lead: object = field(default=None, repr=False)  # (key, event) of the prefix this request leads
    _in_batch: object = field(default=None, repr=False)  # (worker view, key) while its prompt is in that batch

    def header(self) -> str:
        return (f"worker={self.worker}; source={self.source}; cached={self.cached}; "
                f"predicted_ttft_ms={round(self.predicted_ttft_s * 1000)}")

    def _decided(self, decision: Decision) -> None:
        self.worker, self.source, self.cached = decision.worker, decision.source, decision.cached_tokens
        self.predicted_ttft_s = decision.predicted_ttft_s


async def first_item(stream: AsyncIterator, stall: asyncio.Event, worker: str):
    """The next item of `stream`, unless worker `worker` is marked stalled first
    (`stall` set): then the stream is abandoned (the worker cancels the request) and
    WorkerUnavailable raised, so the request is retried elsewhere."""
    if stall.is_set():
        raise WorkerUnavailable(f"worker {worker} is stalled")
    nxt = asyncio.ensure_future(anext(stream))
    stalled = asyncio.ensure_future(stall.wait())
    try:
        done, _ = await asyncio.wait({nxt, stalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stalled.cancel()
        if not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await nxt
    if nxt in done:
        return nxt.result()
    raise WorkerUnavailable(f"worker {worker} is stalled (no progress); moving the request")


def check_context(job: Job) -> None:
    """Raises ContextTooLong when the prompt does not leave room for one token."""
    if len(job.tokens) >= job.model.context_length:
        raise ContextTooLong(len(job.tokens), job.model.context_length, job.prompt_param)


def prefix_key(identity: str, namespace: str, tokens: tuple[int, ...]) -> tuple:
    """The coalescing key of a prefix: model identity, namespace, length and a digest of its tokens."""
    digest = hashlib.blake2b(repr(tuple(tokens)).encode(), digest_size=16).hexdigest()
    return (identity, namespace, len(tokens), digest)


class Dispatcher:
    """Routes jobs over a `router.cluster.Cluster`, counting them in `leases`, and
    records `router.metrics.RouterMetrics`.

    coalesce: wait for another request's prefill of a new shared prefix (see module doc).
    affinity_max_in_flight: see `router.routing.choose_worker`.
    affinity: which worker served each `prompt_cache_key` last (`router.affinity`); a
        job's key makes that worker preferred (`choose_worker`'s `prefer`).
    """

    def __init__(self, cluster, leases: Leases, metrics, *, coalesce: bool = True, affinity_max_in_flight: int = 4):
        self.cluster = cluster
        self.leases = leases
        self.metrics = metrics
        self.coalesce = coalesce
        self.affinity_max_in_flight = affinity_max_in_flight
        self._leaders: dict[tuple, asyncio.Event] = {}
        self._batch_keys = 0  # last key of a `WorkerView.in_batch` entry
        self.affinity = AffinityMap()
        cluster.checkpoint_listeners.append(self.checkpoint_stored)

    def checkpoint_stored(self, checkpoint) -> None:
        """A worker stored `checkpoint` (a `remote_stores.Checkpoint` with its token ids):
        requests waiting for a leader's prefill of exactly that prefix may go now."""
        event = self._leaders.pop(prefix_key(checkpoint.model_identity, checkpoint.namespace,
                                             checkpoint.token_ids), None)
        if event is not None:
            event.set()

    def decide(self, job: Job, exclude=frozenset(), hit=None) -> Decision:
        """The routing decision for `job`; raises Unavailable or Overloaded."""
        if hit is None:
            hit = self.cluster.stored_hit(job.model, job.namespace, job.tokens)
        candidates = self.cluster.snapshot(job.model, job.tokens, job.namespace, self.leases, hit)
        prefer = self.affinity.worker_for(job.model.name, job.namespace, job.affinity_key)
        decision = choose_worker(list(candidates), len(job.tokens), self.affinity_max_in_flight, frozenset(exclude),
                                 prefer)
        if decision.reason == "unavailable":
            raise Unavailable("no healthy worker is available for this model; try again shortly")
        if decision.reason == "overloaded":
            raise Overloaded(f"every worker serving {job.model.name} has a full queue; retry shortly",
                             retry_after_s=int(decision.retry_after_s + 0.999))
        return decision

    @contextlib.asynccontextmanager
    async def route(self, job: Job) -> AsyncIterator[Route]:
        """The scope of one request: the route decided on entry (raises ContextTooLong,
        Unavailable or Overloaded), its load counted on the worker until exit."""
        route = self.prepare(job)
        try:
            yield route
        finally:
            self.finish(route)

    def prepare(self, job: Job) -> Route:
        """Validates the job, decides the route and takes a lease on the worker.
        Raises ContextTooLong, Unavailable or Overloaded. Every prepared route must
        be given to `finish` (`route()` does both)."""
        check_context(job)
        started = time.perf_counter()
        hit = self.cluster.stored_hit(job.model, job.namespace, job.tokens)
        decision = self.decide(job, hit=hit)
        if job.affinity_key:
            self._count_affinity(job, decision)
        stored = min(hit.n_tokens, len(job.tokens) - 1) if hit is not None else 0
        route = Route(decision.worker, decision.reason, stored, started, decision.source, decision.cached_tokens,
                      decision.predicted_ttft_s)
        if self._coalesce(job, route, hit) is None:
            self._take(route, job, decision)
        self.metrics.routing_seconds.labels(job.model.name).observe(time.perf_counter() - started)
        self.metrics.routing_decisions.labels(job.model.name, route.reason).inc()
        return route

    def _count_affinity(self, job: Job, decision: Decision) -> None:
        """Logs and counts a request's prompt_cache_key and whether the decision followed it."""
        hints = self.metrics.client_hints
        hints.labels(job.model.name, "prompt_cache_key").inc()
        if decision.affinity:
            hints.labels(job.model.name, "prompt_cache_key_routed").inc()
        log.info("prompt_cache_key=%s last_worker=%s chosen=%s", job.affinity_key[:40],
                 self.affinity.worker_for(job.model.name, job.namespace, job.affinity_key) or "-", decision.worker)

    def finish(self, route: Route) -> None:
        """Ends a prepared route: gives its lease back and frees requests waiting on its prefill."""
        self._release(route)
        self._end_lead(route)
        self._left_batch(route)

    def _in_batch_now(self, job: Job, route: Route, worker_name: str) -> None:
        """At the request's first token: its prompt is in `worker_name`'s batch, where a
        request sharing its prefix can copy it (where the model's states can be cut
        anywhere), so the routing view counts it until the request ends; requests
        waiting on its prefill go now."""
        if job.model.rules.cut_any and route._in_batch is None:
            view = self.cluster.view(worker_name)
            self._batch_keys += 1
            view.in_batch[self._batch_keys] = (job.namespace, tuple(job.tokens))
            route._in_batch = (view, self._batch_keys)
        self._end_lead(route)

    @staticmethod
    def _left_batch(route: Route) -> None:
        if route._in_batch is not None:
            (view, key), route._in_batch = route._in_batch, None
            view.in_batch.pop(key, None)

    def _coalesce(self, job: Job, route: Route, hit):
        """Makes `route` the leader of its new prefix, or a follower of the request
        that leads it (returns the event to wait for), or neither (None)."""
        store = self.cluster.store
        if not self.coalesce or store is None or job.anchor_tokens < store.config.min_tokens:
            return None
        if job.anchor_tokens >= len(job.tokens):
            return None
        if hit is not None and hit.n_tokens >= job.anchor_tokens:
            return None  # stored already
        for c in self.cluster.snapshot(job.model, job.tokens, job.namespace, self.leases):
            if c.healthy and any(r.source == "live" and r.tokens >= job.anchor_tokens for r in c.reuse):
                return None  # a worker holds it live
        key = prefix_key(job.model.identity, job.namespace, job.tokens[: job.anchor_tokens])
        leader = self._leaders.get(key)
        if leader is None:
            event = self._leaders[key] = asyncio.Event()
            route._lead = (key, event)
            return None
        route._follow = leader
        route.reason = "coalesced"
        route.coalesced = True
        return leader

    def _take(self, route: Route, job: Job, decision: Decision) -> None:
        """Holds a lease on the decided worker until `_release`."""
        rates = self.cluster.view(decision.worker).rates
        reuse = Reuse(decision.source, decision.cached_tokens)
        seconds = request_seconds(len(job.tokens), reuse, min(job.max_tokens, DECODE_TOKENS_FOR_QUEUE), rates)
        prefill_s = first_token_work_s(len(job.tokens), reuse, rates)
        route._lease = route._held.enter_context(self.leases.hold(decision.worker, seconds, prefill_s))
        self.affinity.remember(job.model.name, job.namespace, job.affinity_key, decision.worker)

    def _release(self, route: Route) -> None:
        route._lease = None
        route._held.close()

    def _end_lead(self, route: Route) -> None:
        """Frees the requests waiting on the prefix this route leads (once; its checkpoint
        may have freed them already, and another request may lead that key since)."""
        if route._lead is not None:
            (key, event), route._lead = route._lead, None
            if self._leaders.get(key) is event:
                del self._leaders[key]
            event.set()

    async def _wait_for_leader(self, job: Job, route: Route) -> None:
        """Waits (bounded) for the leader's prefill (its first token: the prefix is then
        in its worker's batch and its checkpoint on the way), then routes afresh; a
        leader that went away without one hands the lead on. Past the bound the request
        goes ahead at once, with one log line, and follows no one again."""
        t0 = time.perf_counter()
        bound = min(COALESCE_MAX_WAIT_S, 5.0 + 3 * route.predicted_ttft_s)
        while route._follow is not None:
            event, route._follow = route._follow, None
            left = bound - (time.perf_counter() - t0)
            timed_out = False
            try:
                await asyncio.wait_for(event.wait(), max(0.0, left))
            except asyncio.TimeoutError:
                timed_out = True
                log.info("waited %.1f s for another request's prefill of a shared prefix; going ahead",
                         time.perf_counter() - t0)
            hit = self.cluster.stored_hit(job.model, job.namespace, job.tokens)
            decision = self.decide(job, hit=hit)
            route._decided(decision)
            follow = None if timed_out else self._coalesce(job, route, hit)
            route.reason = "coalesced"
            if follow is None:
                self._take(route, job, decision)

    async def run(self, job: Job, route: Route) -> AsyncIterator[Delta | Completion]:
        """Streams the job's output; retries on another worker while nothing was generated.

        Raises BadRequest, Unavailable / Overloaded (no worker could take it) or WorkerFailed.
        """
        if route._follow is not None:
            await self._wait_for_leader(job, route)
        request = job.request()
        model_name = job.model.name
        timer = RequestTimer(self.metrics, model_name, job.arrived_s or route.started or time.perf_counter())
        tried: set[str] = set()
        full: set[str] = set()  # tried workers that answered "queue full"
        while True:
            worker = self.cluster.worker(job.model, route.worker)
            tried.add(worker.name)
            route.attempts += 1
            generated: list[int] = []
            stream = worker.generate(request)
            stall = self.cluster.view(worker.name).stall_event
            try:
                while True:
                    try:
                        item = await (anext(stream) if generated else first_item(stream, stall, worker.name))
                    except StopAsyncIteration:
                        return
                    if isinstance(item, Delta):
                        if item.reuse is not None:  # the reuse that really happened replaces the prediction
                            route.cached, route.source = item.reuse
                        if route._lease is not None:
                            route._lease.first_token()
                        if not generated:
                            self._in_batch_now(job, route, worker.name)
                        generated.extend(item.token_ids)
                        timer.tokens(len(item.token_ids))
                    else:
                        route.cached, route.source = item.cached_tokens, item.cache_source
                        timer.done()
                        self._left_batch(route)  # its live state replaces it (`_completed`)
                        self._completed(job, item, worker.name, tuple(generated))
                        self._end_lead(route)  # a request that ended without a token
                    yield item
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
                except Overloaded as no_other:  # the others are full: 429 / 529, not 503
                    raise Overloaded(f"{exc}; every other worker is full", retry_after_s=no_other.retry_after_s
                                     ) from no_other
                except Unavailable as no_other:
                    raise self._no_worker(busy, exc) from no_other
                route._decided(decision)
                route.reason = "retry"
                self._take(route, job, decision)
                self.metrics.retries.labels(model_name).inc()
                self.metrics.routing_decisions.labels(model_name, "retry").inc()
            except WorkerError as exc:
                self.metrics.worker_failures.labels(worker.name, "failed").inc()
                raise WorkerFailed(str(exc)) from exc
            finally:
                await stream.aclose()

    def _completed(self, job: Job, c: Completion, worker_name: str, generated: tuple[int, ...]) -> None:
        loaded = c.loaded_bytes
        if c.cache_source == "disk" and not loaded:
            loaded = self._loaded_bytes(job, c.cached_tokens)
        record_completion(self.metrics, job.model.name, c, loaded)
        self.cluster.observe(worker_name, c, job.tokens + generated, job.namespace)
        log.info(
            "done worker=%s prompt=%d cached=%d source=%s prefill_ms=%.0f completion=%d finish=%s",
            worker_name, c.prompt_tokens, c.cached_tokens, c.cache_source,
            c.prefill_seconds * 1000, c.completion_tokens, c.finish_reason,
        )

    def _retry_decision(self, job: Job, tried: set[str], full: set[str]) -> Decision:
        """The route of a retry: a worker not tried yet; when none can take it, one of
        `full` (tried workers that answered "queue full": the router's count said they
        had room, so their queue is draining, e.g. a generation whose client just left
        is still stopping). Raises Unavailable or Overloaded."""
        try:
            return self.decide(job, exclude=frozenset(tried))
        except (Unavailable, Overloaded):
            if not full:
                raise
            return self.decide(job, exclude=frozenset(tried - full))

    @staticmethod
    def _no_worker(busy: bool, exc: Exception):
        if busy:
            return Overloaded(f"every worker that could take the request is full: {exc}")
        return Unavailable(f"no worker could take the request: {exc}")

    def _loaded_bytes(self, job: Job, cached_tokens: int) -> int:
        """Payload bytes of the disk checkpoint a worker restored `cached_tokens` from: the
        longest stored prefix of at most cached_tokens + 1 tokens (a restore never covers
        the last prompt token). 0 without a store or when it is gone already."""
        hit = self.cluster.stored_hit(job.model, job.namespace, job.tokens[: cached_tokens + 1])
        return hit.entry.payload_bytes if hit else 0
