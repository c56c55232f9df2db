"""Runs a real `kvrouter serve` process for end-to-end tests (port chosen free,
store on the test's tmp_path, the default model from the user's cache)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import urllib.error
import urllib.request

from kvrouter.worker.launch import module_command

START_TIMEOUT_S = 600

# Small policy values so tests with short prompts exercise anchors and waypoints.
SMALL_KV_FLAGS = [
    "--kv-cache-min-tokens", "256",
    "--kv-cache-boundary-align-tokens", "256",
    "--kv-cache-boundary-trim-tokens", "32",
    "--kv-cache-continued-interval-tokens", "4096",
]


# The store cases (tests/e2e/test_store_*.py): smaller policy values still, and one slot.
STORE_CASE_FLAGS = [
    # One batch slot: an unrelated request drops the live state (writing its evict
    # checkpoint), so reuse across sessions comes from the store these tests check.
    "--decode-concurrency", "1",
    "--kv-cache-min-tokens", "128",
    "--kv-cache-boundary-align-tokens", "128",
    "--kv-cache-boundary-trim-tokens", "16",
    "--kv-cache-continued-interval-tokens", "512",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_cache_dir() -> Path:
    """Where tests find (or fetch once) the default model: shared across runs."""
    return Path(os.environ.get("KVROUTER_TEST_CACHE", Path.home() / ".cache" / "kvrouter"))


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(p.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class KvrouterServer:
    """One `kvrouter serve` subprocess. Its log goes to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, *, cwd: Path | None = None,
                 command: list[str] | None = None):
        """cwd: the directory to launch from (default: this one). command: the argv
        prefix that runs kvrouter (default: `python -P -m kvrouter.router.cli`)."""
        self.args = args
        self.log_path = log_path
        self.cwd = cwd
        self.command = command or module_command("kvrouter.router.cli")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.worker_pids: list[int] = []

    def start(self) -> "KvrouterServer":
        cmd = [*self.command, "serve", "--port", str(self.port),
               "--cache-dir", str(model_cache_dir()), *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvrouter serve exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.worker_pids = child_pids(self.proc.pid)
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"kvrouter serve not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def openai_client(server: KvrouterServer, **kw):
    """The official `openai` client for a test server: no retries (a retry would hide
    a failure), a timeout generous enough for a loaded 2-core machine."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"),
                         timeout=kw.pop("timeout", 300), max_retries=0, **kw)
