"""Sending one tokenized request to a worker: pick, dispatch, retry before the
first token, record metrics. Shared by every protocol view."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from kvrouter_proto import worker_pb2
from router.errors import ContextTooLong, Unavailable, WorkerFailed
from router.worker_client import Completion, Delta, WorkerError, WorkerUnavailable

log = logging.getLogger("kvrouter.router.dispatch")

MAX_ATTEMPTS = 2


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


@dataclass
class Route:
    """Where a request went and what reuse the router predicted (for `x-kvrouter-route`)."""

    worker: str = ""
    reason: str = ""
    predicted_cached: int = 0

    def header(self) -> str:
        return f"worker={self.worker}; reason={self.reason}; predicted_cached={self.predicted_cached}"


def check_context(job: Job) -> None:
    """Raises ContextTooLong when the prompt does not leave room for one token."""
    if len(job.tokens) >= job.model.context_length:
        raise ContextTooLong(len(job.tokens), job.model.context_length)


class Dispatcher:
    """Routes jobs over a WorkerPool and records RouterMetrics."""

    def __init__(self, pool, metrics):
        self.pool = pool
        self.metrics = metrics

    def prepare(self, job: Job) -> Route:
        """Validates the job and decides the route; raises ContextTooLong or Unavailable."""
        check_context(job)
        worker, decision = self.pool.pick(job.model, job.tokens)
        stored = self.pool.stored_prefix(job.model, job.namespace, job.tokens)
        return Route(worker.name, decision.reason, min(stored, len(job.tokens) - 1))

    async def run(self, job: Job, route: Route) -> AsyncIterator[Delta | Completion]:
        """Streams the job's output; retries on another worker while nothing was generated.

        Raises BadRequest, Unavailable (no worker could take it) or WorkerFailed.
        """
        request = worker_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=job.tokens,
            sampling=worker_pb2.SamplingParams(
                temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens
            ),
            namespace=job.namespace,
            anchor_tokens=job.anchor_tokens,
            text_preview=job.text_preview,
        )
        if job.seed is not None:
            request.sampling.seed = job.seed
        model_name = job.model.name
        t0 = time.perf_counter()
        first = True
        tried: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            worker = next(w for w in job.model.workers if w.name == route.worker)
            tried.add(worker.name)
            self.metrics.in_flight.labels(worker.name).inc()
            try:
                async for item in worker.generate(request):
                    if first and isinstance(item, Delta):
                        self.metrics.ttft.labels(model_name).observe(time.perf_counter() - t0)
                        first = False
                    if isinstance(item, Completion):
                        self._record(model_name, item, job.tokens, worker.name)
                    yield item
                return
            except WorkerUnavailable as exc:
                log.warning("attempt %d on %s failed before any token: %s", attempt + 1, worker.name, exc)
                others = [w for w in job.model.workers if w.name not in tried and w.healthy]
                if not others:
                    raise Unavailable(f"no worker could take the request: {exc}") from exc
                route.worker = min(others, key=lambda w: w.in_flight).name
                route.reason = "retry"
            except WorkerError as exc:
                raise WorkerFailed(str(exc)) from exc
            finally:
                self.metrics.in_flight.labels(worker.name).dec()
        raise Unavailable("no worker could take the request")

    def _record(self, model_name: str, c: Completion, tokens, worker_name: str) -> None:
        m = self.metrics
        m.prompt_tokens.labels(model_name, "computed").inc(c.prompt_tokens - c.cached_tokens)
        if c.cached_tokens:
            m.prompt_tokens.labels(model_name, c.cache_source).inc(c.cached_tokens)
        m.completion_tokens.labels(model_name).inc(c.completion_tokens)
        if c.prompt_tokens > c.cached_tokens:
            m.prefill_seconds.labels(model_name).observe(c.prefill_seconds)
        if c.cache_source == "disk":
            m.checkpoint_load_seconds.labels(model_name).observe(c.load_seconds)
        for e in c.store_events:
            m.checkpoint_events.labels(model_name, e.action, e.kind, e.reason).inc()
            if e.action == "stored":
                m.checkpoint_store_seconds.labels(model_name, e.kind).observe(e.seconds)
                m.checkpoint_store_bytes.labels(model_name, e.kind).observe(e.bytes)
        self.pool.live_tokens[worker_name] = tokens
        log.info(
            "done worker=%s prompt=%d cached=%d source=%s prefill_ms=%.0f completion=%d finish=%s",
            worker_name, c.prompt_tokens, c.cached_tokens, c.cache_source,
            c.prefill_seconds * 1000, c.completion_tokens, c.finish_reason,
        )
