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
    )
