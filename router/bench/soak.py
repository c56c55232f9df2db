"""Load-and-kill soak: `kvrouter bench --soak` (issue 13).

Starts `kvrouter serve --workers 2` (store on, in a temporary directory) and replays the
bench's agent-session workload with `concurrency` streaming clients for `seconds`,
while a worker is killed (SIGKILL, alternating) every `kill_every_s`; `kvrouter serve`
restarts it. Every request ends as exactly one of:

- completed: the stream ended with a finish reason and usage;
- clean error: an error the client got in the protocol's format (an HTTP error status
  with an error body, or an error event inside the stream);
- hung: no end within `hung_after_s`;
- corrupted: anything else (a stream that ended without a finish, a dropped
  connection, a response that does not parse).

It prints those counts, time to first token and latency p50/p99 of completed requests,
and the RSS of the router and each worker over time (every `rss_every_s`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import tempfile
import time
from pathlib import Path

from kvrouter.router.bench.processes import router_state, rss_bytes
from kvrouter.router.bench.report import percentile
from kvrouter.router.bench.servers import kvrouter_server

MIB = 2**20


async def _request(client, messages, max_tokens: int, hung_after_s: float) -> tuple[str, float, float, str]:
    """(outcome, ttft s, latency s, detail) of one streaming request."""
    import openai

    t0 = time.perf_counter()
    ttft = 0.0
    finish = usage = None

    async def consume() -> None:
        nonlocal ttft, finish, usage
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not ttft:
                ttft = time.perf_counter() - t0
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage = chunk.usage

    try:
        await asyncio.wait_for(consume(), hung_after_s)
    except asyncio.TimeoutError:
        return "hung", 0.0, time.perf_counter() - t0, f"no end after {hung_after_s:.0f} s"
    except openai.APIStatusError as exc:  # an HTTP error status with its error body
        return "clean_error", 0.0, time.perf_counter() - t0, f"{exc.status_code}: {exc.message[:120]}"
    except openai.APIConnectionError as exc:
        return "corrupted", 0.0, time.perf_counter() - t0, f"connection: {exc}"
    except openai.APIError as exc:  # an error event inside the stream, in the protocol's format
        return "clean_error", 0.0, time.perf_counter() - t0, f"stream error: {exc.message[:120]}"
    except Exception as exc:
        return "corrupted", 0.0, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    if finish is None or usage is None:
        return "corrupted", ttft, time.perf_counter() - t0, f"ended without finish ({finish}) or usage"
    return "completed", ttft, time.perf_counter() - t0, ""


def run_soak_bench(cache_dir: Path, seconds: float = 120.0, concurrency: int = 4, kill_every_s: float = 30.0,
                   hung_after_s: float = 120.0, max_tokens: int = 16, rss_every_s: float = 5.0, seed: int = 0,
                   extra_flags: tuple[str, ...] = ()) -> dict:
    """Runs the soak (see module docstring); returns its figures."""
    from openai import AsyncOpenAI

    from kvrouter.router.bench.workload import WorkloadSpec, make_workload, schedule_order

    requests = schedule_order(make_workload(WorkloadSpec(seed=seed, sessions=24, turns=4)))
    with tempfile.TemporaryDirectory(prefix="kvrouter-soak-") as tmp:
        server = kvrouter_server("soak", Path(tmp), cache_dir, ["--workers", "2", *extra_flags])
        server.start()
        outcomes: list[tuple[str, float, float, str]] = []
        kills: list[tuple[float, str]] = []
        rss: list[dict] = []
        t0 = time.monotonic()

        async def main() -> None:
            client = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=hung_after_s + 30,
                                 max_retries=0)
            order = itertools.cycle(requests)
            deadline = t0 + seconds

            async def user() -> None:
                while time.monotonic() < deadline:
                    req = next(order)
                    outcomes.append(await _request(client, list(req.messages), max_tokens, hung_after_s))

            async def killer() -> None:
                for n in itertools.count():
                    await asyncio.sleep(kill_every_s)
                    if time.monotonic() >= deadline:
                        return
                    try:
                        pids = {w["name"]: w["pid"] for w in (await asyncio.to_thread(router_state, server.base_url))
                                ["workers"] if w.get("pid")}
                    except OSError:
                        continue
                    name = sorted(pids)[n % len(pids)] if pids else None
                    if name is not None:
                        try:
                            os.kill(pids[name], signal.SIGKILL)
                            kills.append((round(time.monotonic() - t0, 1), name))
                        except ProcessLookupError:
                            pass

            async def sampler() -> None:
                while time.monotonic() < deadline + 5:
                    row: dict = {"t": round(time.monotonic() - t0, 1),
                                 "router": round((rss_bytes(server.proc.pid) or 0) / MIB)}
                    try:
                        for w in (await asyncio.to_thread(router_state, server.base_url))["workers"]:
                            row[w["name"]] = round((rss_bytes(w["pid"]) or 0) / MIB) if w.get("pid") else None
                    except OSError:
                        pass
                    rss.append(row)
                    await asyncio.sleep(rss_every_s)

            tasks = [asyncio.create_task(killer()), asyncio.create_task(sampler())]
            await asyncio.gather(*(user() for _ in range(concurrency)))
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

        try:
            asyncio.run(main())
        finally:
            server.stop()
    done = [o for o in outcomes if o[0] == "completed"]
    counts = {k: sum(1 for o in outcomes if o[0] == k) for k in ("completed", "clean_error", "hung", "corrupted")}
    details: dict[str, list[str]] = {}
    for kind, _, _, detail in outcomes:
        if kind != "completed" and len(details.setdefault(kind, [])) < 5:
            details[kind].append(detail)
    return {
        "seconds": seconds, "concurrency": concurrency, "kill_every_s": kill_every_s, "requests": len(outcomes),
        **counts, "kills": kills,
        "ttft_p50_s": round(percentile([o[1] for o in done], 50), 3) if done else None,
        "latency_p50_s": round(percentile([o[2] for o in done], 50), 3) if done else None,
        "latency_p99_s": round(percentile([o[2] for o in done], 99), 3) if done else None,
        "examples": details, "rss_mib_over_time": rss, "flags": list(extra_flags),
    }
