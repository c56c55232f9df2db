"""The router's Prometheus metrics (prometheus-client), in one registry per app.

Workers run in other processes, but nothing here needs prometheus-client's
multiprocess mode: every worker-side figure (prefill and load time, checkpoint
stores, skips, evictions, quarantines) arrives with the request it belongs to,
in the worker's `Final` message (`usage` and `store_events`, see
proto/kvrouter_proto/worker.proto), and is recorded by `record_completion` (called by `router.dispatch`).
Scrape-time figures (worker health and queue depth, store entries and bytes
per kind) are read when `/metrics` is served (`refresh_scrape_gauges`).

The README's "Metrics" table lists every metric; `tests/unit/test_deploy_files.py`
checks the Grafana dashboard against a real router's `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("kvrouter.router.metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)
BYTES_BUCKETS = tuple(2.0**i for i in range(20, 36, 2))
LOAD_STAGES = ("read", "device", "build")  # kvrouter_checkpoint_load_seconds stages besides "total"
STORE_KINDS = ("anchor", "waypoint", "evict", "shutdown", "hint")  # cachestore.KINDS, without importing lmdb here
WORKER_STATUS_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class RouterMetrics:
    registry: CollectorRegistry
    ttft: Histogram
    inter_token: Histogram
    request_seconds: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    requests: Counter
    errors: Counter
    routing_decisions: Counter
    routing_seconds: Histogram
    retries: Counter
    worker_failures: Counter
    in_flight: Gauge
    worker_healthy: Gauge
    queue_depth: Gauge
    prefill_seconds: Histogram
    checkpoint_load_seconds: Histogram
    checkpoint_load_bytes: Histogram
    checkpoint_store_seconds: Histogram
    checkpoint_store_bytes: Histogram
    checkpoint_events: Counter
    store_entries: Gauge
    store_bytes: Gauge
    store_quarantined: Gauge
    store_budget_bytes: Gauge
    client_hints: Counter


def create_metrics() -> RouterMetrics:
    """A fresh registry with every router metric (names start with `kvrouter_`)."""
    reg = CollectorRegistry()
    return RouterMetrics(
        registry=reg,
        ttft=Histogram(
            "kvrouter_time_to_first_token_seconds", "Time from the routing decision (after tokenization) "
            "to the first generated token, retries included", ["model"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        inter_token=Histogram(
            "kvrouter_inter_token_latency_seconds", "Time between consecutive generated tokens of one request "
            "(a chunk of n tokens counts as n gaps of 1/n of its delay)",
            ["model"], buckets=TOKEN_LATENCY_BUCKETS, registry=reg,
        ),
        request_seconds=Histogram(
            "kvrouter_request_seconds", "Generation duration, routing decision to the last token",
            ["model"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        prompt_tokens=Counter(
            "kvrouter_prompt_tokens", "Prompt tokens by how they were obtained: computed (prefilled) or reused "
            "from a source (live, ram, disk)", ["model", "source"], registry=reg,
        ),
        completion_tokens=Counter(
            "kvrouter_completion_tokens", "Generated tokens", ["model"], registry=reg,
        ),
        requests=Counter(
            "kvrouter_requests", "HTTP API requests by endpoint and status code", ["endpoint", "status"], registry=reg,
        ),
        errors=Counter(
            "kvrouter_errors", "Error responses by error class (router.errors names, HTTPError, InternalError)",
            ["error_class", "status"], registry=reg,
        ),
        routing_decisions=Counter(
            "kvrouter_routing_decisions", "Routing decisions by reason (live_prefix, least_loaded, ...; "
            "retry when a request moved to another worker)", ["model", "reason"], registry=reg,
        ),
        routing_seconds=Histogram(
            "kvrouter_routing_decision_seconds", "Time to choose a worker and look the prompt up in the store index "
            "(tokenization excluded)", ["model"], buckets=DECISION_BUCKETS, registry=reg,
        ),
        retries=Counter(
            "kvrouter_retries", "Requests re-sent to another worker because the first could not take them "
            "(nothing generated yet)", ["model"], registry=reg,
        ),
        worker_failures=Counter(
            "kvrouter_worker_failures", "Worker-side failures: unavailable (before any token; retried if possible) "
            "or failed (the worker failed an accepted request)", ["worker", "kind"], registry=reg,
        ),
        in_flight=Gauge("kvrouter_worker_in_flight", "Requests dispatched to a worker and not finished",
                        ["worker"], registry=reg),
        worker_healthy=Gauge("kvrouter_worker_healthy", "1 when the worker reports SERVING", ["worker"], registry=reg),
        queue_depth=Gauge("kvrouter_worker_queue_depth", "Requests waiting plus running in the worker's engine "
                          "(its GetStatus at scrape time; absent when the worker does not answer)",
                          ["worker"], registry=reg),
        prefill_seconds=Histogram(
            "kvrouter_prefill_seconds", "Time a worker spent prefilling a prompt's uncached tokens",
            ["model"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        checkpoint_load_seconds=Histogram(
            "kvrouter_checkpoint_load_seconds", "Time to load a disk checkpoint into a worker, by stage: "
            "total (what the request waited), read (the one hashed read of the payload; it overlaps the "
            "others), device (bytes to arrays on the device), build (cache objects)",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        checkpoint_load_bytes=Histogram(
            "kvrouter_checkpoint_load_bytes", "Payload size of disk checkpoints loaded by workers",
            ["model"], buckets=BYTES_BUCKETS, registry=reg,
        ),
        checkpoint_store_seconds=Histogram(
            "kvrouter_checkpoint_store_seconds", "Time to write a checkpoint (payload, fsync, index commit)",
            ["model", "kind"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        checkpoint_store_bytes=Histogram(
            "kvrouter_checkpoint_store_bytes", "Payload size of stored checkpoints",
            ["model", "kind"], buckets=BYTES_BUCKETS, registry=reg,
        ),
        checkpoint_events=Counter(
            "kvrouter_checkpoint_events", "Checkpoint store actions: stored, skipped, evicted, quarantined; "
            "with the checkpoint kind and the reason (skips, evictions, quarantines)",
            ["model", "action", "kind", "reason"], registry=reg,
        ),
        store_entries=Gauge("kvrouter_store_entries", "Usable checkpoints in the store index, by kind",
                            ["kind"], registry=reg),
        store_bytes=Gauge("kvrouter_store_bytes", "Payload bytes of usable checkpoints, by kind",
                          ["kind"], registry=reg),
        store_quarantined=Gauge("kvrouter_store_quarantined_entries", "Quarantined index rows (never reused)",
                                registry=reg),
        store_budget_bytes=Gauge("kvrouter_store_budget_bytes", "The store's disk budget (--kv-cache-disk-mb, or sized by the workers)",
                                 registry=reg),
        client_hints=Counter(
            "kvrouter_client_hints",
            "What agent clients told the router beyond the conversation (router.client_hints): cache_control "
            "breakpoints placed on prompt tokens or not placed, prompt_cache_key affinity hints and whether routing "
            "followed them, client metadata removed from the prompt, system messages folded, tools rendered first",
            ["model", "hint"], registry=reg,
        ),
    )


class RequestTimer:
    """Times one request from `t0` (perf_counter seconds): its time to first token,
    the gaps between later tokens and its whole duration, for model `model`."""

    def __init__(self, m: RouterMetrics, model: str, t0: float):
        self.m, self.model, self.t0 = m, model, t0
        self._last = 0.0

    def tokens(self, n: int) -> None:
        """A chunk of `n` generated tokens arrived (the first chunk marks the first token;
        later ones count n gaps of 1/n of their delay)."""
        now = time.perf_counter()
        if not self._last:
            self.m.ttft.labels(self.model).observe(now - self.t0)
        elif n:
            gap = (now - self._last) / n
            for _ in range(n):
                self.m.inter_token.labels(self.model).observe(gap)
        self._last = now

    def done(self) -> None:
        """The request's last token arrived."""
        self.m.request_seconds.labels(self.model).observe(time.perf_counter() - self.t0)


def record_completion(m: RouterMetrics, model: str, c, loaded_bytes: int = 0) -> None:
    """Records what a worker reported at the end of a request (`worker_client.Completion`):
    prompt tokens by source, completion tokens, prefill and disk-load time and bytes
    (`loaded_bytes` of the checkpoint loaded from disk), and its store events."""
    m.prompt_tokens.labels(model, "computed").inc(c.prompt_tokens - c.cached_tokens)
    if c.cached_tokens:
        m.prompt_tokens.labels(model, c.cache_source).inc(c.cached_tokens)
    m.completion_tokens.labels(model).inc(c.completion_tokens)
    if c.prompt_tokens > c.cached_tokens:
        m.prefill_seconds.labels(model).observe(c.prefill_seconds)
    if c.cache_source == "disk":
        m.checkpoint_load_seconds.labels(model, "total").observe(c.load_seconds)
        for stage, seconds in zip(LOAD_STAGES, c.load_stages):
            m.checkpoint_load_seconds.labels(model, stage).observe(seconds)
        if loaded_bytes:
            m.checkpoint_load_bytes.labels(model).observe(loaded_bytes)
    for e in c.store_events:
        m.checkpoint_events.labels(model, e.action, e.kind, e.reason).inc()
        if e.action == "stored":
            m.checkpoint_store_seconds.labels(model, e.kind).observe(e.seconds)
            m.checkpoint_store_bytes.labels(model, e.kind).observe(e.bytes)


def error_class(exc: BaseException) -> str:
    """The `error_class` label of an exception that becomes an error response: the
    router.errors class name, HTTPNotFound-style aiohttp names, or InternalError."""
    from aiohttp import web

    from kvrouter.router.errors import ApiError

    if isinstance(exc, (ApiError, web.HTTPException)):
        return type(exc).__name__
    return "InternalError"


def count_errors_middleware(m: RouterMetrics):
    """An aiohttp middleware (to sit inside the error-mapping middleware) that counts
    every exception a handler raises in `kvrouter_errors` and re-raises it. Errors
    sent inside an already-started SSE stream never reach it; they are counted in
    `kvrouter_worker_failures`."""
    from aiohttp import web

    @web.middleware
    async def count_errors(request, handler):
        try:
            return await handler(request)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except web.HTTPException as exc:
            if exc.status >= 400:
                m.errors.labels(error_class(exc), str(exc.status)).inc()
            raise
        except Exception as exc:
            m.errors.labels(error_class(exc), str(getattr(exc, "status", 500))).inc()
            raise

    return count_errors


def store_gauges(store) -> tuple[dict[str, int], dict[str, int], int]:
    """(entries by kind, payload bytes by kind, quarantined rows) from the store index's
    counters (`CheckpointStore.stats`: a few point reads, no scan)."""
    stats = store.stats()
    return ({k: stats.entries.get(k, 0) for k in STORE_KINDS}, {k: stats.payload_bytes.get(k, 0) for k in STORE_KINDS},
            stats.quarantined)


async def refresh_scrape_gauges(m: RouterMetrics, cluster) -> None:
    """Sets the gauges read at scrape time from a `router.cluster.Cluster`: worker health
    and queue depth (GetStatus without live states, WORKER_STATUS_TIMEOUT_S each, in
    parallel) and the store's entries and bytes per kind."""
    clients = list(cluster.clients)
    for c in clients:
        m.worker_healthy.labels(c.name).set(1 if cluster.serving(c) else 0)

    budgets: list[int] = []  # disk budgets the workers reading this host's store apply

    async def depth(c):
        try:
            status = await asyncio.wait_for(c.status(), WORKER_STATUS_TIMEOUT_S)
            m.queue_depth.labels(c.name).set(status.queue_depth)
            if status.store_budget_bytes and status.store_id == getattr(cluster, "local_store_id", ""):
                budgets.append(status.store_budget_bytes)
        except Exception as exc:  # a worker that does not answer must not break the scrape
            log.debug("no status from %s: %s", c.name, exc)
            try:
                m.queue_depth.remove(c.name)
            except KeyError:
                pass

    await asyncio.gather(*(depth(c) for c in clients if c.healthy))
    store = cluster.store
    if store is not None:
        try:
            entries, size, quarantined = await asyncio.to_thread(store_gauges, store)
        except Exception as exc:  # a broken index must not break the scrape
            log.warning("store gauges unavailable: %s", exc)
            return
        for kind in entries:
            m.store_entries.labels(kind).set(entries[kind])
            m.store_bytes.labels(kind).set(size[kind])
        m.store_quarantined.set(quarantined)
        # the budget given to the router (--kv-cache-disk-mb), else the one its workers sized
        # (the same on every worker of one model: `worker.sizing.plan_disk_budget`)
        budget = store.config.disk_budget_bytes or max(budgets, default=0)
        if budget:
            m.store_budget_bytes.set(budget)
