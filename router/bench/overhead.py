"""Micro-benchmark: what the router adds over calling a worker directly.

One worker process (the default model, no disk store) and the router app in
this process. The same short chat prompt is sent N times both ways, so every
request after the first reuses the worker's live state and the worker's own
time is small and the same either way:

- direct: gRPC `Worker.Generate` with the prompt's token ids (tokenized once,
  here), time to the first token;
- routed: `POST /v1/chat/completions` with `stream: true` over HTTP, time to
  the first content chunk (the router parses, renders the chat template,
  tokenizes, looks the prefix up in the index, picks the worker, forwards).

Reports p50 and p95 of both, and the difference of the medians in ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from kvrouter.router.app import create_app
from kvrouter.router.config import RouterConfig
from kvrouter.router.keys import CLUSTER
from kvrouter.router.worker_client import GenerateRequest, GrpcWorkerClient
from kvrouter.worker.blas import preload_env
from kvrouter.worker.launch import module_command

MESSAGES = [{"role": "user", "content": "Say hi."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _direct(address: str, tokens: list[int], n: int) -> list[float]:
    out = []
    client = GrpcWorkerClient("direct", address)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            stream = client.generate(GenerateRequest("bench", tuple(tokens), max_tokens=1))
            async for _item in stream:  # the first Delta (or the Completion)
                out.append(time.perf_counter() - t0)
                break
            await stream.aclose()
    finally:
        await client.close()
    return out


async def _routed(url: str, model: str, n: int) -> list[float]:
    out = []
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 1, "stream": True}
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            t0 = time.perf_counter()
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: ") and b'"content"' in line and b'"content": ""' not in line:
                        out.append(time.perf_counter() - t0)
                        break
                await resp.read()
    return out


async def _measure(address: str, n: int) -> dict:
    config = RouterConfig(port=_free_port(), worker_addresses=(address,))
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.port).start()
    try:
        model = next(iter(app[CLUSTER].models.values()))
        tokens = list(model.tokenizer.chat_prompt(MESSAGES).tokens)
        url = f"http://127.0.0.1:{config.port}"
        await _direct(address, tokens, 3)  # warm both paths and the live state
        await _routed(url, model.name, 3)
        direct, routed = [], []
        for _ in range(n // 10):  # interleave so machine noise hits both alike
            direct += await _direct(address, tokens, 10)
            routed += await _routed(url, model.name, 10)
    finally:
        await runner.cleanup()
    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    return {
        "requests_each": len(direct),
        "direct_ttft_p50_ms": ms(statistics.median(direct)),
        "direct_ttft_p95_ms": ms(_pct(direct, 0.95)),
        "routed_ttft_p50_ms": ms(statistics.median(routed)),
        "routed_ttft_p95_ms": ms(_pct(routed, 0.95)),
        "router_adds_p50_ms": ms(statistics.median(routed) - statistics.median(direct)),
    }


def run_overhead_bench(n: int, cache_dir: Path) -> dict:
    """Starts one worker, measures, stops it. Returns the figures (milliseconds)."""
    port = _free_port()
    port_file = Path(tempfile.mkdtemp()) / "port"
    cmd = [*module_command("kvrouter.router.cli"), "--log-level", "WARNING", "worker", "--no-kv-cache",
           "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache_dir), "--port-file", str(port_file)]
    proc = subprocess.Popen(cmd, env=preload_env(dict(os.environ)))
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's worker did not start")
            time.sleep(0.2)
        return asyncio.run(_measure(f"127.0.0.1:{port}", n))
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    from kvrouter.worker.config import default_cache_dir

    print(json.dumps(run_overhead_bench(int(sys.argv[1]) if len(sys.argv) > 1 else 200, default_cache_dir()),
                     indent=2))
