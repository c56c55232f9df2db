"""The SMG configurations of `kvrouter bench --compare` (pure parts): --targets, the
command lines of the gateway and both kinds of workers, their environment, and how a
missing program is reported without installing anything."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvrouter.router.bench import smg
from kvrouter.router.bench.cli import SMG_TARGETS, TARGETS, parse_targets


def test_targets_accept_the_smg_configurations_in_order_without_repeats():
    assert {"smg+kvrouter", "smg+mlx"} <= set(TARGETS) and set(SMG_TARGETS) <= set(TARGETS)
    assert parse_targets("smg+mlx, smg+kvrouter,smg+mlx") == ["smg+mlx", "smg+kvrouter"]
    with pytest.raises(argparse.ArgumentTypeError, match="smg-mlx"):
        parse_targets("kvrouter,smg-mlx")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_targets(",")


def test_gateway_command_line():
    argv = smg.gateway_argv(Path("/v/bin/smg"), 30000, [50061, 50062], 29123)
    assert argv[:2] == ["/v/bin/smg", "launch"]
    i = argv.index("--worker-urls")
    assert argv[i + 1:i + 3] == ["grpc://127.0.0.1:50061", "grpc://127.0.0.1:50062"]
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "30000"
    # Prometheus on loopback and a port of its own, not the shared default 0.0.0.0:29000.
    assert argv[argv.index("--prometheus-port") + 1] == "29123"
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"


def test_kvrouter_worker_command_line():
    argv = smg.kvrouter_worker_argv("/py", "w2", 50062, Path("/tmp/kv"), Path("/cache"), ["--model", "m.gguf"])
    assert argv[:5] == ["/py", "-P", "-m", "kvrouter.router.cli", "worker"]
    assert argv[argv.index("--smg-listen") + 1] == "127.0.0.1:50062"
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:0"
    assert argv[argv.index("--kv-cache-dir") + 1] == "/tmp/kv"
    assert argv[argv.index("--cache-dir") + 1] == "/cache"
    assert argv[argv.index("--name") + 1] == "w2"
    assert argv[-2:] == ["--model", "m.gguf"]


def test_mlx_worker_command_line():
    argv = smg.mlx_worker_argv(Path("/venv/bin/python"), Path("/w/mlx-model"), 50071)
    assert argv == ["/venv/bin/python", "-m", "smg_grpc_servicer.mlx.server", "--model", "/w/mlx-model",
                    "--host", "127.0.0.1", "--port", "50071"]


def test_mlx_worker_requirements_pin_the_servicer_and_add_the_cpu_backend_on_linux():
    assert smg.smg_mlx_requirements("linux") == [f"smg-grpc-servicer[mlx]=={smg.SMG_MLX_SERVICER_VERSION}",
                                                 "mlx[cpu]"]
    assert smg.smg_mlx_requirements("darwin") == [f"smg-grpc-servicer[mlx]=={smg.SMG_MLX_SERVICER_VERSION}"]


def test_workers_get_one_blas_thread_each(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    env = smg.worker_env({"PATH": "/bin"}, offline=True)
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/bin"
    assert "HF_HUB_OFFLINE" not in smg.worker_env({"PATH": "/bin"})


def test_missing_programs_are_reported_not_installed_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("KVROUTER_SMG_BIN", raising=False)
    monkeypatch.delenv("KVROUTER_SMG_MLX_PYTHON", raising=False)
    with pytest.raises(smg.SmgUnavailable, match="not installed"):
        smg.smg_binary(tmp_path, install=False)
    with pytest.raises(smg.SmgUnavailable, match="not installed"):
        smg.smg_mlx_python(tmp_path, install=False)
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("KVROUTER_SMG_BIN", "/opt/smg/bin/smg")
    assert smg.smg_binary(tmp_path, install=False) == Path("/opt/smg/bin/smg")
