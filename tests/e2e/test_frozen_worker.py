"""A worker frozen with SIGSTOP (issue 13, item 5): the router takes it out of routing
once it holds requests without progress for --worker-stall-timeout, moves the requests
that had no token yet, and new requests complete on the other worker; after SIGCONT it
serves again."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.server import openai_client

MODEL = "SmolLM2-135M-Instruct"
STALL_S = 5


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--workers", "2", "--no-kv-cache", "--worker-stall-timeout", str(STALL_S),
                        "--decode-concurrency", "4", name="frozen")


def state(server) -> dict:
    with urllib.request.urlopen(server.url + "/v1/router/state", timeout=30) as resp:
        return json.load(resp)


def ask(server, i: int) -> tuple[str, float]:
    t0 = time.monotonic()
    r = openai_client(server, timeout=120).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], temperature=0, max_tokens=3)
    route = r.headers["x-kvrouter-route"]
    assert r.parse().choices[0].message.content is not None
    return route.split(";")[0].removeprefix("worker="), time.monotonic() - t0


def test_requests_complete_on_the_other_worker_while_one_is_frozen(server):
    workers = {w["name"]: w["pid"] for w in state(server)["workers"]}
    frozen_name, frozen_pid = sorted(workers.items())[0]
    os.kill(frozen_pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: ask(server, i), range(6)))
        # every request completed, none on the frozen worker (the ones first sent there moved)
        assert all(name != frozen_name for name, _ in results), results
        assert max(s for _, s in results) < 60  # none hung until the worker resumed
        view = {w["name"]: w for w in state(server)["workers"]}[frozen_name]
        assert view["stalled"] is True or view["healthy"] is False
        name, _ = ask(server, 7)  # a new request goes to the other worker at once
        assert name != frozen_name
    finally:
        os.kill(frozen_pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if {w["name"]: w for w in state(server)["workers"]}[frozen_name]["healthy"]:
            break
        time.sleep(0.5)
    assert {w["name"]: w for w in state(server)["workers"]}[frozen_name]["healthy"], server.log_tail()
    assert "made no progress" in server.log_path.read_text()
