"""The router's Prometheus metrics (prometheus-client), in one registry per app."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class RouterMetrics:
    registry: CollectorRegistry
    ttft: Histogram
    request_seconds: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    requests: Counter
    in_flight: Gauge
    worker_healthy: Gauge
    prefill_seconds: Histogram
    checkpoint_load_seconds: Histogram
    checkpoint_store_seconds: Histogram
    checkpoint_store_bytes: Histogram
    checkpoint_events: Counter


def create_metrics() -> RouterMetrics:
    """A fresh registry with every router metric (names start with `kvrouter_`)."""
    reg = CollectorRegistry()
    return RouterMetrics(
        registry=reg,
        ttft=Histogram(
            "kvrouter_time_to_first_token_seconds", "Time from request arrival to the first generated token",
            ["model"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        request_seconds=Histogram(
            "kvrouter_request_seconds", "Whole request duration", ["model"], buckets=LATENCY_BUCKETS, registry=reg,
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
        in_flight=Gauge("kvrouter_worker_in_flight", "Requests dispatched to a worker and not finished",
                        ["worker"], registry=reg),
        worker_healthy=Gauge("kvrouter_worker_healthy", "1 when the worker reports SERVING", ["worker"], registry=reg),
        prefill_seconds=Histogram(
            "kvrouter_prefill_seconds", "Time a worker spent prefilling a prompt's uncached tokens",
            ["model"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        checkpoint_load_seconds=Histogram(
            "kvrouter_checkpoint_load_seconds", "Time to load a disk checkpoint into a worker",
            ["model"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        checkpoint_store_seconds=Histogram(
            "kvrouter_checkpoint_store_seconds", "Time to write a checkpoint (payload, fsync, index commit)",
            ["model", "kind"], buckets=LATENCY_BUCKETS, registry=reg,
        ),
        checkpoint_store_bytes=Histogram(
            "kvrouter_checkpoint_store_bytes", "Payload size of stored checkpoints",
            ["model", "kind"], buckets=tuple(2.0**i for i in range(20, 36, 2)), registry=reg,
        ),
        checkpoint_events=Counter(
            "kvrouter_checkpoint_events", "Checkpoint store actions: stored, skipped, evicted, quarantined; "
            "with the checkpoint kind and the reason (skips, evictions, quarantines)",
            ["model", "action", "kind", "reason"], registry=reg,
        ),
    )
