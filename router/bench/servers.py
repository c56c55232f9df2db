"""The programs `kvrouter bench --compare` starts, restarts and stops: kvrouter,
kvrouter --no-kv-cache and mlx_lm.server, each on a free loopback port with the
same float32 weights and the same BLAS (OpenBLAS preloaded, as a worker has it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvrouter.worker.blas import preload_env
from kvrouter.worker.launch import module_command

START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ManagedServer:
    """One server process the bench owns. `argv` gets `{port}` filled in at each start."""

    name: str
    argv: list[str]
    model: str  # the `model` field to send
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    start_seconds: list[float] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Starts the process and waits up to `timeout_s` seconds until GET /health
        answers 200. Raises RuntimeError (the process is stopped on a timeout)."""
        t0 = time.monotonic()
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.start_seconds.append(time.monotonic() - t0)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (kvrouter stores its live state as a `shutdown` checkpoint), then wait
        up to `timeout_s` seconds before SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def metrics_text(self) -> str | None:
        """The server's /metrics (Prometheus text), or None when it has none."""
        try:
            with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as resp:
                return resp.read().decode()
        except (urllib.error.URLError, OSError):
            return None


def kvrouter_server(name: str, work: Path, cache_dir: Path, extra: list[str]) -> ManagedServer:
    """`kvrouter serve` with its store in `work`/kv-<name> (fresh per run)."""
    argv = [*module_command("kvrouter.router.cli"), "serve", "--port", "{port}", "--cache-dir", str(cache_dir),
            "--kv-cache-dir", str(work / f"kv-{name}"), *extra]
    return ManagedServer(name, argv, "SmolLM2-135M-Instruct", dict(os.environ), work / f"{name}.log")


def mlx_lm_server(model_dir: Path, work: Path) -> ManagedServer:
    """`python -m mlx_lm.server` on an exported model directory, with OpenBLAS preloaded
    (all cores, as a single kvrouter worker gets) and an empty Hugging Face cache
    directory (its /v1/models raises without one)."""
    hf_home = work / "hf-home"
    (hf_home / "hub").mkdir(parents=True, exist_ok=True)
    env = preload_env({**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
                      threads=os.cpu_count() or 1)
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", "{port}", "--temp", "0"]
    return ManagedServer("mlx_lm.server", argv, "default_model", env, work / "mlx_lm_server.log")
