"""Replaying the workload against one OpenAI-compatible endpoint with the official
async `openai` client: C requests at once, streaming, one `RequestRecord` each,
a tqdm progress bar, and an optional restart in the middle."""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

from openai import AsyncOpenAI
from tqdm import tqdm

from kvrouter.router.bench.workload import BenchRequest


@dataclass(frozen=True)
class RequestRecord:
    """What one request measured. Times in seconds from the run's start; counts in tokens."""

    session: int
    turn: int
    phase: int  # 0 before the restart, 1 after
    started: float
    ttft: float
    latency: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: str = ""

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "prefilled_tokens": self.prefilled_tokens}


@dataclass
class RunResult:
    records: list[RequestRecord]
    wall_seconds: float
    restarted: bool
    restart_seconds: float
    metrics_snapshots: list[str]  # /metrics text before the restart and at the end (kvrouter only)
    warmup: list[RequestRecord] = field(default_factory=list)  # not in `records`: phase says before/after the restart


async def _one(client: AsyncOpenAI, model: str, req: BenchRequest, max_tokens: int, t_run: float,
               phase: int) -> RequestRecord:
    t0 = time.perf_counter()
    ttft = None
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=list(req.messages), max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if ttft is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as exc:  # recorded, never fatal: a failed request is a result too
        return RequestRecord(req.session, req.turn, phase, t0 - t_run, -1.0, time.perf_counter() - t0, 0, 0, 0,
                             f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - t0
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    return RequestRecord(
        req.session, req.turn, phase, t0 - t_run, latency if ttft is None else ttft, latency,
        usage.prompt_tokens if usage else 0, cached, usage.completion_tokens if usage else 0,
        "" if usage else "no usage in the stream",
    )


async def run_workload(
    base_url: str,
    model: str,
    sessions: list[list[BenchRequest]],
    concurrency: int,
    max_tokens: int,
    restart: Callable[[], Awaitable[None]] | None = None,
    snapshot: Callable[[], Awaitable[str | None]] | None = None,
    label: str = "",
    warmup: Callable[[int], list[BenchRequest]] | None = None,
) -> RunResult:
    """Runs every request once, C at a time, ready requests in (turn, session) order;
    after half of them, waits for the in-flight ones and calls `restart` (if given).
    `warmup(round)`: requests sent all at once, and awaited, before the first
    request and again after the restart (round 0, then 1); they are timed apart
    (`RunResult.warmup`) and left out of `records`."""
    client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=900)
    total = sum(len(s) for s in sessions)
    ready: list[tuple[int, int]] = [(0, s) for s in range(len(sessions)) if sessions[s]]
    heapq.heapify(ready)
    records: list[RequestRecord] = []
    snapshots: list[str] = []
    restart_at = total // 2 if restart is not None else None
    restarted = False
    restart_seconds = 0.0
    phase = 0
    t_run = time.perf_counter()
    wake = asyncio.Event()
    in_flight = 0
    warm: list[RequestRecord] = []

    async def warm_up(round_: int) -> None:
        if warmup is not None and (reqs := warmup(round_)):
            bar.set_description(f"{label} (warm-up)")
            t0 = time.perf_counter()
            warm.extend(await asyncio.gather(*(_one(client, model, r, max_tokens, t0, round_) for r in reqs)))
            bar.set_description(label or base_url)

    bar = tqdm(total=total, desc=label or base_url, unit="req", leave=True)

    async def finish(task_req: BenchRequest) -> None:
        nonlocal in_flight
        rec = await _one(client, model, task_req, max_tokens, t_run, phase)
        records.append(rec)
        in_flight -= 1
        if task_req.turn + 1 < len(sessions[task_req.session]):
            heapq.heappush(ready, (task_req.turn + 1, task_req.session))
        bar.update(1)
        bar.set_postfix(ttft=f"{rec.ttft:.2f}s", cached=rec.cached_tokens)
        wake.set()

    tasks = set()
    issued = 0
    try:
        await warm_up(0)
        t_run = time.perf_counter()
        while len(records) < total:
            if restart_at is not None and not restarted and issued >= restart_at:
                if in_flight == 0:
                    if snapshot is not None and (text := await snapshot()):
                        snapshots.append(text)
                    t0 = time.perf_counter()
                    bar.set_description(f"{label} (restarting)")
                    await restart()
                    restart_seconds = time.perf_counter() - t0
                    bar.set_description(label or base_url)
                    restarted, phase = True, 1
                    t_warm = time.perf_counter()
                    await warm_up(1)
                    t_run += time.perf_counter() - t_warm  # started times and the wall exclude warm-ups
                    continue
            elif ready and in_flight < concurrency:
                turn, s = heapq.heappop(ready)
                in_flight += 1
                issued += 1
                task = asyncio.create_task(finish(sessions[s][turn]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                continue
            wake.clear()
            await wake.wait()
        if snapshot is not None and (text := await snapshot()):
            snapshots.append(text)
    finally:
        bar.close()
        for t in tasks:
            t.cancel()
        await client.close()
    wall = time.perf_counter() - t_run
    records.sort(key=lambda r: r.started)
    return RunResult(records, wall, restarted, restart_seconds, snapshots, warm)
