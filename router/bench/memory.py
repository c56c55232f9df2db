"""Memory benchmark: a worker's RSS through a burst of distinct sessions, against the
formula of `worker.sizing` (issue 13, item 4).

`kvrouter bench --memory` starts `kvrouter serve` (one worker, the sized defaults
unless `--memory-flags` says otherwise), sends `sessions` distinct sessions at once
(each its own system block, so nothing is shared), samples the worker's RSS every
0.2 s, and prints: RSS at start, its peak, right after the burst and after `idle_s`
seconds idle; the worker's memory plan and its peak figure; and what the idle worker
holds by design (weights, live states, RAM tier, MLX's buffer cache limit), read from
its state.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import threading
import time
from pathlib import Path

from kvrouter.router.bench.processes import router_state, rss_bytes, worker_pids
from kvrouter.router.bench.servers import kvrouter_server

MIB = 2**20
PLAN_RE = re.compile(r"memory plan \(MiB\): (.*?); peak (\d+); KV ([\d.]+) KiB/token")


def _prompt(i: int, words: int) -> list[dict]:
    import random

    from kvrouter.router.bench.workload import WORDS

    rng = random.Random(f"memory:{i}")
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return [{"role": "system", "content": f"Session {i}. {text}"}, {"role": "user", "content": "Summarise."}]


async def _burst(base_url: str, sessions: int, words: int, max_tokens: int) -> tuple[int, list[str]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", timeout=1800, max_retries=0)

    async def one(i: int) -> str:
        try:
            await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=_prompt(i, words),
                                                 max_tokens=max_tokens, temperature=0)
            return ""
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    errors = await asyncio.gather(*(one(i) for i in range(sessions)))
    await client.close()
    return sum(1 for e in errors if not e), [e for e in errors if e]


def run_memory_bench(cache_dir: Path, sessions: int = 50, words: int = 150, max_tokens: int = 8,
                     idle_s: float = 10.0, extra_flags: tuple[str, ...] = ()) -> dict:
    """Runs the burst (see module docstring); returns its figures, in MiB."""
    with tempfile.TemporaryDirectory(prefix="kvrouter-memory-") as tmp:
        server = kvrouter_server("memory", Path(tmp), cache_dir,
                                 ["--workers", "1", "--max-queue", str(sessions + 8), *extra_flags])
        server.start()
        try:
            (name, pid), = worker_pids(server.base_url).items()
            samples: list[tuple[float, int]] = []
            stop = threading.Event()
            t0 = time.monotonic()

            def sample() -> None:
                while not stop.is_set():
                    rss = rss_bytes(pid)
                    if rss is not None:
                        samples.append((time.monotonic() - t0, rss))
                    stop.wait(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start_rss = rss_bytes(pid)
            t_burst = time.monotonic()
            completed, errors = asyncio.run(_burst(server.base_url, sessions, words, max_tokens))
            burst_s = time.monotonic() - t_burst
            after_rss = rss_bytes(pid)
            time.sleep(idle_s)
            idle_rss = rss_bytes(pid)
            stop.set()
            sampler.join()
            state = [w for w in router_state(server.base_url)["workers"] if w["name"] == name][0]
        finally:
            server.stop()
        log = server.log_path.read_text(errors="replace")
    plan = PLAN_RE.search(log)
    kv_kib = float(plan.group(3)) if plan else 0.0
    weights = re.search(r"weights (\d+)", plan.group(1)) if plan else None
    cache = re.search(r"MLX cache (\d+)", plan.group(1)) if plan else None
    live_mib = state["cache"]["live_tokens"] * kv_kib / 1024
    held = {"weights": int(weights.group(1)) if weights else None, "live_states": round(live_mib),
            "ram_tier": round(state["cache"]["ram_bytes"] / MIB), "mlx_cache_limit": int(cache.group(1)) if cache else None}
    return {
        "sessions": sessions, "completed": completed, "errors": errors[:5], "burst_seconds": round(burst_s, 1),
        "rss_mib": {"start": round((start_rss or 0) / MIB), "peak": round(max(r for _, r in samples) / MIB),
                    "after_burst": round((after_rss or 0) / MIB), f"idle_{idle_s:g}s": round((idle_rss or 0) / MIB)},
        "formula_peak_mib": int(plan.group(2)) if plan else None,
        "memory_plan": plan.group(0) if plan else None,
        "held_idle_by_design_mib": held,
        "rss_over_time": [(round(t, 1), round(r / MIB)) for t, r in samples[:: max(1, len(samples) // 60)]],
        "flags": list(extra_flags),
    }
