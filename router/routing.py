"""Choosing a worker: a pure cost model over a snapshot of worker state.

For each candidate worker the router predicts the time to first token:

    queue wait  +  cost of bringing the best reusable prefix onto that worker
                +  remaining prompt tokens / that worker's prefill rate

Workers batch (continuous batching, `--decode-concurrency` slots). The queue
wait on a worker with a free slot is the prefill work still ahead of the
request there (prompts being prefilled share the worker's compute, and its
measured prefill rate is the batch's); on a worker whose slots are all taken,
add the time until a slot frees. A worker with one slot serves one request at
a time and its queue wait is all the work dispatched to it (`queue_wait_s`).

where bringing a prefix costs nothing from the worker's live state, its bytes
over RAM bandwidth from the RAM tier, its bytes over the worker's measured disk
load bandwidth from the store on the worker's own host, and is impossible from
another host's store (stores are per host). The lowest prediction wins; ties go
to the worker with fewer requests in flight, then by name. A worker the
request's affinity hint names (`router.affinity`: the one that served its
`prompt_cache_key` last) wins when its prediction is within the affinity slack
of the best (`AFFINITY_SLACK_FRACTION` of it, at least `AFFINITY_SLACK_S`).

Affinity never becomes a hot spot: a worker with `affinity_max_in_flight` or
more requests in flight is costed as if it held nothing (it gets no
cache-motivated traffic), so misses and overflow go to idle workers. A worker
with `max_queue` requests in flight takes nothing; when every healthy worker is
full, `choose_worker` says so (the caller answers 429/529 with Retry-After).

The same costs (`kvrouter.cachestore.costs`) decide load-or-recompute on the worker (`should_load`): when
loading a checkpoint would take longer than prefilling its tokens, recompute.
Nothing here does I/O; every input is a number in the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrouter.cachestore.costs import NO_REUSE, Rates, Reuse, first_token_work_s, prefill_seconds

AFFINITY_SLACK_FRACTION = 0.1
"""An affinity worker may be predicted this much slower (a fraction of the best prediction)
and still win: its live state may be newer than the router's view, and the prediction is an
estimate."""
AFFINITY_SLACK_S = 0.05
"""...and at least this many seconds slower (predictions of a few ms differ by noise only)."""


def best_reuse(options: list[Reuse], prompt_tokens: int, rates: Rates) -> tuple[Reuse, float]:
    """The option with the lowest load + prefill time for a `prompt_tokens` prompt,
    and that time in seconds (NO_REUSE when recomputing everything is fastest)."""
    best, best_s = NO_REUSE, prefill_seconds(prompt_tokens, rates)
    for r in options:
        s = first_token_work_s(prompt_tokens, r, rates)
        if s < best_s or (s == best_s and r.tokens > best.tokens):
            best, best_s = r, s
    return best, best_s


@dataclass(frozen=True)
class Candidate:
    """A worker as routing sees it.

    queued_s: predicted seconds of work already dispatched to it and not finished.
    reuse: prefixes of this prompt it could start from (live, ram, disk on its host).
    max_queue: requests in flight it accepts (0 = no limit).
    slots: sequences it decodes together (its --decode-concurrency).
    prefill_backlog_s: predicted load + prefill seconds of the requests
        dispatched to it that have not produced a first token yet.
    """

    name: str
    healthy: bool
    in_flight: int
    reuse: tuple[Reuse, ...] = ()
    rates: Rates = Rates()
    queued_s: float = 0.0
    max_queue: int = 0
    slots: int = 1
    prefill_backlog_s: float = 0.0

    @property
    def full(self) -> bool:
        return self.max_queue > 0 and self.in_flight >= self.max_queue


@dataclass(frozen=True)
class Decision:
    """The chosen worker, where its reuse comes from, and the prediction.

    reason: "live_prefix", "ram_prefix", "disk_prefix" (the reuse it counts on),
    "least_loaded" (no reuse), or "overloaded"
    / "unavailable" with worker "" when nothing can take the request.
    retry_after_s: with "overloaded", when a slot should be free.
    affinity: the worker is the one the affinity hint preferred.
    """

    worker: str
    reason: str
    source: str = "none"
    cached_tokens: int = 0
    predicted_ttft_s: float = 0.0
    retry_after_s: float = 0.0
    affinity: bool = False


def queue_wait_s(c: Candidate) -> float:
    """Seconds before a new request's own load and prefill get going on `c`.

    One slot: everything dispatched to it (`queued_s`). Several slots: the
    prefill backlog, plus, when every slot is taken, the time until one frees,
    estimated from the mean predicted service time of its requests in flight.
    """
    if c.slots <= 1:
        return c.queued_s
    wait = c.prefill_backlog_s
    if c.in_flight >= c.slots:
        mean = c.queued_s / max(1, c.in_flight)
        wait += mean * (c.in_flight - c.slots + 1) / c.slots
    return wait


def predict(c: Candidate, prompt_tokens: int, affinity_max_in_flight: int) -> tuple[float, Reuse]:
    """(predicted time to first token, the reuse it assumes) for one candidate."""
    options = list(c.reuse) if c.in_flight < affinity_max_in_flight else []
    reuse, work_s = best_reuse(options, prompt_tokens, c.rates)
    return queue_wait_s(c) + work_s, reuse


def choose_worker(candidates: list[Candidate], prompt_tokens: int,
                  affinity_max_in_flight: int = 4, exclude: frozenset[str] = frozenset(),
                  prefer: str = "") -> Decision:
    """The worker with the lowest predicted time to first token.

    `exclude`: workers already tried for this request. `prefer`: the worker an
    affinity hint names ("" for none); it wins within the affinity slack of the best
    prediction, unless it is excluded, full or unhealthy. Returns a Decision with
    worker "" and reason "unavailable" when no candidate is healthy, or
    "overloaded" when every healthy one is full.
    """
    healthy = [c for c in candidates if c.healthy and c.name not in exclude]
    if not healthy:
        return Decision("", "unavailable")
    open_ = [c for c in healthy if not c.full]
    if not open_:
        wait = min(c.queued_s / max(1, c.in_flight) for c in healthy)
        return Decision("", "overloaded", retry_after_s=max(1.0, wait))
    scored = []
    for c in open_:
        ttft, reuse = predict(c, prompt_tokens, affinity_max_in_flight)
        scored.append((round(ttft, 6), c.in_flight, c.name, reuse, c))
    best = min(scored, key=lambda s: s[:3])
    preferred = next((s for s in scored if s[2] == prefer), None) if prefer else None
    if preferred is not None and preferred[0] <= best[0] + max(AFFINITY_SLACK_S, AFFINITY_SLACK_FRACTION * best[0]):
        best = preferred
    ttft, _, name, reuse, c = best
    reason = f"{reuse.source}_prefix" if reuse.tokens > 0 else "least_loaded"
    return Decision(name, reason, reuse.source, reuse.tokens, ttft, affinity=bool(prefer) and name == prefer)


def request_seconds(prompt_tokens: int, reuse: Reuse, max_tokens: int, rates: Rates) -> float:
    """Predicted service time of one request (what it adds to that worker's
    `queued_s`): load + prefill + decode, seconds."""
    return first_token_work_s(prompt_tokens, reuse, rates) + max(1, max_tokens) / rates.decode()
