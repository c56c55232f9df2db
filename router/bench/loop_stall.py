"""Event-loop stall benchmark: does a metrics scrape hold up routing decisions?

Setup: the routing benchmark's store (`bench.routing.build_index`, 10,000 checkpoints,
a 32K-token prompt) behind a router's cluster and dispatcher, in one asyncio loop as
in the router process. A scraper does what `GET /metrics` and `GET /v1/router/state`
do, once a second; meanwhile a routing decision (`Dispatcher.prepare`, the path of
every request after tokenization) is due `interval_ms` after the last one ended. For
each decision: how late it started (its wait: the loop was busy elsewhere) and how long
it took; and the loop's own worst stall (a ticker's oversleep). Run for `seconds` with the scraper, then as long
without it (the baseline), then with the scraper doing what the gauges used to do
(a scan of every row in a thread) for comparison.

Target (issue 13): no routing decision waits more than 5 ms for a scrape: the decisions
due while a scrape is in progress wait at most 5 ms (`during_scrape_wait_max_ms`). On a
shared machine the baseline without a scrape shows what other processes cost.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvrouter.router.bench.report import percentile
from kvrouter.router.bench.routing import SYSTEM_TOKENS, build_index

TARGET_WAIT_MS = 5.0


@dataclass
class _Worker:
    """What the router reads of a worker client: name, health, a quick status."""

    name: str
    healthy: bool = True
    address: str = "bench://"
    local: bool = True

    async def status(self, live_states: bool = False, timeout_s: float = 5.0):
        from kvrouter.router.worker_client import WorkerStatus

        return WorkerStatus(model_name="bench", queue_depth=1)


async def _measure(dispatcher, job, scrape, seconds: float, interval_ms: float) -> dict:
    """Decisions every `interval_ms` for `seconds` while `scrape()` (or nothing) runs each
    second. A decision's wait: how late it started (the loop was busy elsewhere); its own
    time is `decision_ms_*`. `during_scrape_*`: the decisions due while a scrape was in
    progress (what a scrape costs them); `scrape_on_loop_max_ms`: the longest the scraper
    held the loop in one go (the parts of a scrape that do not run in a thread)."""
    waits, lags, windows, held = [], [], [], []
    stop = time.perf_counter() + seconds

    async def ticker() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t - 0.001) * 1000)

    async def scraper() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await scrape(held)
            windows.append((t, time.perf_counter()))
            await asyncio.sleep(1.0)

    async def decisions() -> None:
        ended = time.perf_counter()
        while time.perf_counter() < stop:
            due = ended + interval_ms / 1000  # one decision every interval after the last one ended
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            started = time.perf_counter()
            dispatcher.finish(dispatcher.prepare(job))
            ended = time.perf_counter()
            waits.append((due, max(0.0, started - due) * 1000, (ended - started) * 1000))

    tasks = [ticker(), decisions()] + ([scraper()] if scrape is not None else [])
    await asyncio.gather(*tasks)
    during = [late for due, late, _ in waits if any(a <= due <= b + 0.001 for a, b in windows)]
    lates = [late for _, late, _ in waits]
    took = [d for _, _, d in waits]
    return {"decisions": len(waits), "decision_ms_p50": round(percentile(took, 50), 3),
            "decision_ms_max": round(max(took), 3),
            "wait_p50_ms": round(percentile(lates, 50), 3), "wait_p99_ms": round(percentile(lates, 99), 3),
            "wait_max_ms": round(max(lates), 3),
            "decisions_during_scrape": len(during),
            "during_scrape_wait_max_ms": round(max(during), 3) if during else None,
            "scrape_on_loop_max_ms": round(max(held), 3) if held else None,
            "loop_stall_max_ms": round(max(lags), 3)}


def run_loop_stall_bench(checkpoints: int = 10_000, prompt_tokens: int = 32_768, seconds: float = 10.0,
                         interval_ms: float = 5.0, seed: int = 0) -> dict:
    """Returns the three runs' figures (see module docstring) and whether the target was met."""
    from prometheus_client import generate_latest

    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.router.cluster import Cluster, ServedModel
    from kvrouter.router.dispatch import Dispatcher, Job
    from kvrouter.router.leases import Leases
    from kvrouter.router.metrics import create_metrics, refresh_scrape_gauges
    from kvrouter.router.views.state import router_state, store_summary

    rng = random.Random(seed)
    prompt = [rng.randrange(49152) for _ in range(prompt_tokens)]
    with tempfile.TemporaryDirectory(prefix="kvrouter-loop-") as tmp:
        store = CheckpointStore(StoreConfig(directory=Path(tmp), disk_budget_bytes=2**50))
        try:
            build_index(store, "bench-model", prompt, checkpoints, rng)
            store.index.write(lambda txn: txn.recount())  # as a worker's start-up repair leaves it
            workers = [_Worker("w0"), _Worker("w1")]
            cluster = Cluster(workers, store)
            cluster.view("w0").lives = {1: ("", tuple(prompt[:-512]))}
            cluster.view("w1").lives = {1: ("", tuple(prompt[:SYSTEM_TOKENS] + [7] * 2000))}
            cluster.models["bench"] = ServedModel("bench", "bench-model", prompt_tokens * 2, tokenizer=None,
                                                  workers=workers)
            job = Job(model=cluster.models["bench"], tokens=tuple(prompt), anchor_tokens=0, max_tokens=1,
                      temperature=0.0, top_p=1.0, seed=None)
            metrics, leases = create_metrics(), Leases()
            dispatcher = Dispatcher(cluster, leases, metrics)

            async def scrape(held: list) -> None:  # GET /metrics, then GET /v1/router/state
                await refresh_scrape_gauges(metrics, cluster)
                t = time.perf_counter()
                generate_latest(metrics.registry)
                held.append((time.perf_counter() - t) * 1000)
                summary = await asyncio.to_thread(store_summary, cluster)
                t = time.perf_counter()
                router_state(cluster, leases, summary)
                held.append((time.perf_counter() - t) * 1000)

            async def old_scrape(held: list) -> None:  # what the gauges did before: every row, in a thread
                await asyncio.to_thread(lambda: store.entries(include_quarantined=True))
                await asyncio.to_thread(store.entries)

            async def main() -> dict:
                for _ in range(50):  # warm up
                    dispatcher.finish(dispatcher.prepare(job))
                t = time.perf_counter()
                await old_scrape([])
                scan_ms = (time.perf_counter() - t) * 1000
                return {
                    "with_scrape": await _measure(dispatcher, job, scrape, seconds, interval_ms),
                    "without_scrape": await _measure(dispatcher, job, None, seconds, interval_ms),
                    "with_full_scan_scrape": await _measure(dispatcher, job, old_scrape, seconds, interval_ms),
                    "full_scan_ms": round(scan_ms, 1),
                }

            result = asyncio.run(main())
        finally:
            store.close()
    waits = result["with_scrape"]["during_scrape_wait_max_ms"] or 0.0
    return {"checkpoints": checkpoints, "prompt_tokens": prompt_tokens, "seconds_each": seconds,
            "decision_interval_ms": interval_ms, **result, "target_wait_ms": TARGET_WAIT_MS,
            "target_met": waits <= TARGET_WAIT_MS}
