"""The Shepherd Model Gateway (PyPI `smg`) configurations of `kvrouter bench --compare`,
and finding or installing the programs they need (shared with tests/e2e/test_smg.py).

- "smg+kvrouter": `smg launch --policy cache_aware` in front of 2 kvrouter workers
  (`router.cli worker --smg-listen`), one shared checkpoint store.
- "smg+mlx": the same gateway in front of 2 of SMG's own MLX workers
  (`python -m smg_grpc_servicer.mlx.server`, PyPI `smg-grpc-servicer[mlx]`).

Each program lives in a virtual environment of its own under the cache directory:
the gateway needs no model code, and `smg-grpc-servicer[mlx]` pins an older mlx-lm
(<0.32) than kvrouter's. Every worker gets OpenBLAS preloaded and 1 BLAS thread
(2 workers on a 2-core machine, as `kvrouter serve` gives its workers).

A restart (the bench's restart in the middle) stops and starts the whole stack, the
gateway and both workers, as `kvrouter serve`'s restart does with its router and
workers: the workers lose their live state and SMG its approximate prefix tree;
kvrouter workers keep their disk store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvrouter.worker.launch import module_command

SMG_VERSION = "1.13.0"
SMG_MLX_SERVICER_VERSION = "0.14.1"
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
WORKERS = 2


class SmgUnavailable(RuntimeError):
    """A program an SMG configuration needs is missing and was not (or could not be) installed."""


def smg_venv(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"smg-venv-{SMG_VERSION}"


def smg_mlx_venv(cache_dir: Path) -> Path:
    return Path(cache_dir) / "smg-mlx-venv"


def smg_mlx_requirements(platform: str = sys.platform) -> list[str]:
    """pip requirements of the SMG MLX worker venv (Linux needs mlx's CPU backend wheel)."""
    reqs = [f"smg-grpc-servicer[mlx]=={SMG_MLX_SERVICER_VERSION}"]
    return reqs + (["mlx[cpu]"] if platform.startswith("linux") else [])


def _install_venv(venv: Path, requirements: list[str]) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False, capture_output=True, text=True)
    if done.returncode == 0:
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
                              check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SmgUnavailable(f"cannot install {' '.join(requirements)} into {venv}:\n"
                             f"{(done.stderr or done.stdout)[-3000:]}")


def smg_binary(cache_dir: Path, install: bool = True) -> Path:
    """The `smg` executable: $KVROUTER_SMG_BIN, or `smg` in a venv of its own under
    `cache_dir` (created when missing and `install`). Raises SmgUnavailable."""
    if os.environ.get("KVROUTER_SMG_BIN"):
        return Path(os.environ["KVROUTER_SMG_BIN"])
    venv = smg_venv(cache_dir)
    exe = venv / "bin" / "smg"
    if not exe.exists():
        if not install:
            raise SmgUnavailable(f"smg is not installed ({exe} missing; pass it in --targets to install "
                                 f"smg=={SMG_VERSION} there, or set KVROUTER_SMG_BIN)")
        _install_venv(venv, [f"smg=={SMG_VERSION}"])
    return exe


def smg_mlx_python(cache_dir: Path, install: bool = True) -> Path:
    """A Python that runs SMG's MLX worker: $KVROUTER_SMG_MLX_PYTHON, or the venv
    `cache_dir`/smg-mlx-venv (created when missing and `install`). Checks that
    `smg_grpc_servicer.mlx.server` imports there. Raises SmgUnavailable with the error."""
    if os.environ.get("KVROUTER_SMG_MLX_PYTHON"):
        python = Path(os.environ["KVROUTER_SMG_MLX_PYTHON"])
    else:
        venv = smg_mlx_venv(cache_dir)
        python = venv / "bin" / "python"
        if not (venv / "bin" / "smg-mlx-installed").exists():
            if not install:
                raise SmgUnavailable(f"SMG's MLX worker is not installed ({venv}; pass smg+mlx in --targets to "
                                     f"install {' '.join(smg_mlx_requirements())} there)")
            _install_venv(venv, smg_mlx_requirements())
            (venv / "bin" / "smg-mlx-installed").write_text(" ".join(smg_mlx_requirements()) + "\n")
    done = subprocess.run([str(python), "-c", "import smg_grpc_servicer.mlx.server"], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SmgUnavailable(f"SMG's MLX worker does not import with {python}:\n{done.stderr[-3000:]}")
    return python


# The command lines (pure).

def gateway_argv(smg: Path, port: int, worker_ports: list[int], metrics_port: int,
                 policy: str = "cache_aware") -> list[str]:
    """`smg launch` on loopback in front of gRPC workers on `worker_ports` (its Prometheus
    endpoint on loopback too, on a port of its own rather than the shared default 29000)."""
    return [str(smg), "launch", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *[f"grpc://127.0.0.1:{p}" for p in worker_ports],
            "--policy", policy, "--health-check-interval-secs", "1", "--log-level", "info",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]


def kvrouter_worker_argv(python: str, name: str, smg_port: int, kv_dir: Path, cache_dir: Path,
                         extra: list[str] = ()) -> list[str]:
    """A kvrouter worker: its own service on an ephemeral port, SMG's protocol on `smg_port`."""
    return [*module_command("kvrouter.router.cli", python), "worker", "--cache-dir", str(cache_dir), "--name", name,
            "--listen", "127.0.0.1:0", "--smg-listen", f"127.0.0.1:{smg_port}", "--kv-cache-dir", str(kv_dir),
            *extra]


def mlx_worker_argv(python: Path, model_dir: Path, port: int) -> list[str]:
    """SMG's own MLX worker on an mlx-lm model directory."""
    return [str(python), "-m", "smg_grpc_servicer.mlx.server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port)]


def worker_env(env: dict[str, str], offline: bool = False) -> dict[str, str]:
    """OpenBLAS preloaded and 1 BLAS thread per worker; `offline`: no Hugging Face downloads."""
    from kvrouter.worker.blas import preload_env

    return preload_env({**env, "HF_HUB_OFFLINE": "1"} if offline else env, threads=1)


# The running configuration.

def _free_port() -> int:
    from kvrouter.router.bench.servers import free_port

    return free_port()


@dataclass
class _Proc:
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    _log: object = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        # A process group of its own: `smg launch` runs the gateway in a child process
        # (`smg::router`) that can outlive a SIGTERM sent to the launcher alone (seen here once).
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def check(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {self.proc.returncode}; {self.log_path}:\n"
                               f"{self.tail()}")

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # the group this process leads (start_new_session)
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 15  # what is left of the group (smg's router child) gets 15 s
        while _signal_group(pgid, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        self.proc = None
        self._log.close()


def _signal_group(pgid: int, sig: int) -> bool:
    """Sends `sig` to process group `pgid`; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class SmgCluster:
    """SMG and its workers, started, restarted and stopped together (the bench's
    ManagedServer interface: name, base_url, model, log_path, start_seconds,
    start, stop, restart, metrics_text)."""

    name: str
    worker_argvs: list[list[str]]
    worker_ports: list[int]
    smg: Path
    env: dict[str, str]
    work: Path
    port: int = field(default_factory=_free_port)
    metrics_port: int = field(default_factory=_free_port)
    model: str | None = None  # read from SMG's /v1/models once it serves
    start_seconds: list[float] = field(default_factory=list)
    _procs: list[_Proc] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work / f"{self.name}-smg.log"

    @property
    def commands(self) -> dict[str, list]:
        return {"gateway": gateway_argv(self.smg, self.port, self.worker_ports, self.metrics_port),
                "workers": self.worker_argvs}

    def start(self) -> None:
        """Starts the workers, waits for their HealthCheck, starts SMG, waits until it
        reports every worker healthy and answers a 1-token request. Raises RuntimeError."""
        t0 = time.monotonic()
        deadline = t0 + START_TIMEOUT_S
        workers = [_Proc(argv, self.work / f"{self.name}-w{i + 1}.log", self.env)
                   for i, argv in enumerate(self.worker_argvs)]
        self._procs = list(workers)
        try:
            for w in workers:
                w.start()
            for w, port in zip(workers, self.worker_ports):
                self._wait_worker(w, port, deadline)
            gw = _Proc(gateway_argv(self.smg, self.port, self.worker_ports, self.metrics_port), self.log_path,
                       dict(os.environ))
            self._procs.append(gw)
            gw.start()
            self._wait_gateway(gw, deadline)
        except BaseException:
            self.stop()
            raise
        self.start_seconds.append(time.monotonic() - t0)

    def _wait_worker(self, w: _Proc, port: int, deadline: float) -> None:
        import grpc
        from smg_grpc_proto.generated import mlx_engine_pb2, mlx_engine_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = mlx_engine_pb2_grpc.MlxEngineStub(ch)
            while time.monotonic() < deadline:
                w.check(f"{self.name} worker")
                try:
                    if stub.HealthCheck(mlx_engine_pb2.HealthCheckRequest(), timeout=2).healthy:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} worker not healthy after {START_TIMEOUT_S:.0f} s:\n{w.tail()}")

    def _wait_gateway(self, gw: _Proc, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            gw.check("smg")
            try:
                ready = _get_json(self.base_url + "/readiness")
                if ready.get("healthy_workers") == len(self.worker_ports):
                    self.model = _get_json(self.base_url + "/v1/models")["data"][0]["id"]
                    _post_json(self.base_url + "/v1/chat/completions",
                               {"model": self.model, "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 1, "temperature": 0})
                    return
            except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(1)
        raise RuntimeError(f"smg not serving after {START_TIMEOUT_S:.0f} s ({last}):\n{gw.tail()}")

    def stop(self) -> None:
        """SIGTERM to SMG, then to the workers (kvrouter workers store their live state)."""
        for p in reversed(self._procs):
            p.stop()
        self._procs = []

    def restart(self) -> None:
        self.stop()
        self.start()

    def metrics_text(self) -> str | None:
        return None


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def smg_kvrouter(work: Path, cache_dir: Path, extra: list[str], install: bool = True) -> SmgCluster:
    """"smg+kvrouter": 2 kvrouter workers (one store, fresh in `work`) behind SMG."""
    smg = smg_binary(cache_dir, install)
    ports = [_free_port() for _ in range(WORKERS)]
    kv = work / "kv-smg+kvrouter"
    argvs = [kvrouter_worker_argv(sys.executable, f"w{i + 1}", p, kv, cache_dir, extra) for i, p in enumerate(ports)]
    return SmgCluster("smg+kvrouter", argvs, ports, smg, worker_env(dict(os.environ)), work)


def smg_mlx(work: Path, cache_dir: Path, model_dir: Path, install: bool = True) -> SmgCluster:
    """"smg+mlx": 2 of SMG's own MLX workers on the exported float32 model directory behind SMG."""
    smg = smg_binary(cache_dir, install)
    python = smg_mlx_python(cache_dir, install)
    ports = [_free_port() for _ in range(WORKERS)]
    argvs = [mlx_worker_argv(python, model_dir, p) for p in ports]
    return SmgCluster("smg+mlx", argvs, ports, smg, worker_env(dict(os.environ), offline=True), work)
