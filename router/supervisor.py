"""`kvrouter serve`: start the worker processes, wait until they are ready, run
the gateway, and stop every process it started on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from aiohttp import web

from kvrouter.router.app import create_app
from kvrouter.router.config import ServeConfig
from kvrouter.worker.blas import preload_env
from kvrouter.worker.launch import module_command

log = logging.getLogger("kvrouter.serve")

STOP_GRACE_S = 30.0
ENGINE_DEATH_EXIT_STATUS = 3  # worker.server.ENGINE_DEATH_EXIT_STATUS
RESTART_MAX_BACKOFF_S = 30.0
STABLE_RUN_S = 60.0  # a worker that ran this long before dying restarts after 1 s again


class WorkerProcess:
    """One local worker process and the port it reports when ready."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port_file: Path):
        self.name = name
        self.port_file = port_file
        self.argv = argv
        self.env = env
        self.restarts = 0
        self._restart_at: float | None = None
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        # No preexec_fn: nothing runs between fork and exec (the router's gRPC threads make that unsafe).
        self._spawned_at = time.monotonic()
        return subprocess.Popen(self.argv, env=self.env)

    def pin_port(self, port: int) -> None:
        """Makes restarts listen on `port` (the one the router's client dials)."""
        i = self.argv.index("--listen")
        self.argv[i + 1] = f"127.0.0.1:{port}"

    def restart_if_dead(self) -> None:
        """Restarts a worker that exited, with exponential backoff (1 s doubling to
        RESTART_MAX_BACKOFF_S), logging how it died."""
        code = self.proc.poll()
        if code is None:
            return
        now = time.monotonic()
        if self._restart_at is None:
            if now - self._spawned_at >= STABLE_RUN_S:
                self.restarts = 0  # it ran well for a while: this crash starts a new backoff series
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            if code == ENGINE_DEATH_EXIT_STATUS:
                how += " (its generation thread died)"
            delay = min(RESTART_MAX_BACKOFF_S, 2.0 ** self.restarts)
            log.error("worker %s (pid %d) %s; restarting in %.0f s", self.name, self.proc.pid, how, delay)
            self._restart_at = now + delay
        elif now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.proc = self._spawn()
            log.info("worker %s restarted (pid %d, restart %d)", self.name, self.proc.pid, self.restarts)

    async def wait_port(self, timeout_s: float) -> int:
        """The worker's gRPC port once it is serving. Raises RuntimeError if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"worker {self.name} exited with status {code} during start (see its log above)")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"worker {self.name} not ready after {timeout_s:.0f} s")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not stop in %.0f s; killing it", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()


def worker_argv(cfg: ServeConfig, model: str | None, name: str, port_file: Path, kv_args: list[str]) -> list[str]:
    """The command line of one local worker process."""
    return [
        *module_command("kvrouter.router.cli"), "worker",
        "--listen", "127.0.0.1:0",
        "--name", name,
        "--cache-dir", str(cfg.cache_dir),
        "--port-file", str(port_file),
        "--parent-pid", str(os.getpid()),
        *(["--prefill-chunk-tokens", str(cfg.prefill_chunk_tokens)] if cfg.prefill_chunk_tokens else []),
        "--max-queue", str(cfg.router.max_queue),
        *cfg.batching.as_args(),
        *cfg.memory.as_args(),
        *kv_args,
        *(["--model", model] if model else []),
    ]


async def run_serve(cfg: ServeConfig, kv_args: list[str]) -> int:
    """Runs until SIGINT/SIGTERM. Returns the process exit status."""
    from kvrouter.worker.models import default_model_path

    models = cfg.models or (cfg.model,)
    # Fetch the default model once, here, so workers do not race to download it.
    if None in models and cfg.workers:
        await asyncio.to_thread(default_model_path, cfg.cache_dir)
    n_local = cfg.workers * len(models)
    from dataclasses import replace

    cfg = replace(cfg, memory=replace(cfg.memory, workers_on_host=max(1, n_local)))  # they share this machine
    threads = max(1, (os.cpu_count() or 1) // max(1, n_local))
    env = preload_env(dict(os.environ), threads=threads)
    tmp = Path(tempfile.mkdtemp(prefix="kvrouter-"))
    workers: list[WorkerProcess] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        for model in models:
            for _ in range(cfg.workers):
                name = f"w{len(workers)}"
                port_file = tmp / f"{name}.port"
                workers.append(WorkerProcess(name, worker_argv(cfg, model, name, port_file, kv_args), env, port_file))
            log.info("starting %d worker(s) for %s (BLAS threads each: %d)", cfg.workers,
                     model or "the default model", threads)
        wait = asyncio.gather(*(w.wait_port(cfg.router.worker_ready_timeout_s) for w in workers))
        done, _ = await asyncio.wait([asyncio.ensure_future(wait), asyncio.ensure_future(stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return 130
        ports = wait.result()
        router_cfg = replace(cfg.router, worker_addresses=tuple(f"127.0.0.1:{p}" for p in ports))
        app = create_app(router_cfg)
        # handler_cancellation: a client that goes away cancels its handler, and so its generation.
        # Header limits: aiohttp answers oversized headers itself in plain text, before the
        # error middleware; 64 KiB lets every realistic header reach the protocol-format errors.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=10, handler_cancellation=True,
                               max_line_size=65536, max_field_size=65536)
        await runner.setup()
        site = web.TCPSite(runner, router_cfg.host, router_cfg.port)
        await site.start()
        log.info("kvrouter serving on http://%s:%d (OpenAI API under /v1)", router_cfg.host, router_cfg.port)
        for w, port in zip(workers, ports):
            w.pin_port(port)  # a restarted worker listens where the router already connects
        while not stop.is_set():
            for w in workers:
                w.restart_if_dead()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        log.info("stopping")
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if runner is not None:
            await runner.cleanup()
        for w in workers:
            w.terminate()
        for w in workers:  # a worker finishes its requests, then writes its shutdown checkpoints
            await asyncio.to_thread(w.wait, STOP_GRACE_S + cfg.memory.shutdown_timeout_s)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
        log.info("all processes stopped")
