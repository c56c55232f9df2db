"""The routing flags of `kvrouter serve` and `kvrouter worker` (parsing only)."""

from pathlib import Path

import pytest

from kvrouter.router.cli import build_parser
from kvrouter.router.config import RouterConfig, ServeConfig
from kvrouter.router.supervisor import worker_argv


def test_serve_takes_several_models_remote_workers_and_a_queue_bound():
    ns = build_parser().parse_args(["serve", "--model", "a.gguf", "--model", "b.gguf", "--workers", "2",
                                    "--remote-worker", "10.0.0.2:50051", "--remote-worker", "10.0.0.3:50051",
                                    "--worker-token", "t", "--max-queue", "8"])
    assert ns.model == ["a.gguf", "b.gguf"] and ns.remote_worker == ["10.0.0.2:50051", "10.0.0.3:50051"]
    assert ns.max_queue == 8 and ns.worker_token == "t"
    cfg = ServeConfig(RouterConfig(max_queue=8), "a.gguf", 2, Path("/tmp"), models=("a.gguf", "b.gguf"))
    argv = worker_argv(cfg, "b.gguf", "w2", Path("/tmp/p"), [])
    assert argv[argv.index("--max-queue") + 1] == "8" and argv[argv.index("--model") + 1] == "b.gguf"
    assert argv[argv.index("--listen") + 1].startswith("127.0.0.1:")


def test_worker_flags_for_another_host():
    ns = build_parser().parse_args(["worker", "--listen", "0.0.0.0:50051", "--worker-token", "t",
                                    "--tls-cert", "c.pem", "--tls-key", "k.pem", "--max-queue", "4"])
    assert ns.model is None or isinstance(ns.model, str)
    assert (ns.worker_token, ns.tls_cert, ns.tls_key, ns.max_queue) == ("t", Path("c.pem"), Path("k.pem"), 4)


def test_serve_without_any_worker_is_refused():
    from kvrouter.router.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--workers", "0"])
