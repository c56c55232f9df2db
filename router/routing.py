"""Choosing a worker: a pure policy over a snapshot of worker state.

For the single-host slice the cost model is: prefer the worker whose live
state shares the longest prefix with the prompt (no load cost), then the one
with the fewest requests in flight (counted from dispatch, case C13).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A worker as routing sees it: name, health, requests in flight, and the
    number of prompt tokens its live state already holds."""

    name: str
    healthy: bool
    in_flight: int
    live_match_tokens: int = 0


@dataclass(frozen=True)
class Decision:
    worker: str
    reason: str  # "live_prefix", "least_loaded"


def choose_worker(candidates: list[Candidate], max_in_flight_for_affinity: int = 4) -> Decision | None:
    """The worker to send a request to, or None when no candidate is healthy.

    A live-prefix match wins unless that worker already has
    `max_in_flight_for_affinity` requests in flight (affinity must not become a
    hot spot); otherwise the least-loaded healthy worker, ties by name order.
    """
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        return None
    best_live = max(healthy, key=lambda c: (c.live_match_tokens, -c.in_flight))
    if best_live.live_match_tokens > 0 and best_live.in_flight < max_in_flight_for_affinity:
        return Decision(best_live.name, "live_prefix")
    least = min(healthy, key=lambda c: c.in_flight)
    return Decision(least.name, "least_loaded")
