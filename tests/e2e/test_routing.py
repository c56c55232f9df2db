"""Routing across 2 real workers on the default model (`kvrouter serve --workers 2`):
router state, spread (C13), affinity, prefill coalescing, and failover when a
worker is killed with requests queued (then the supervisor restarts it); then a
second host (a worker on 127.0.0.2 with its own store): it joins, and what its
store holds reaches the router through its events.

Prompts are short and max_tokens tiny: the CI machine has 2 shared CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.prompts import long_system_prompt
from tests.support.server import SMALL_KV_FLAGS, pid_alive
from kvrouter.worker.engine import FAILPOINT_ENV
from kvrouter.worker.launch import module_command

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    kv = tmp_path_factory.mktemp("kv-routing")
    failpoint = tmp_path_factory.mktemp("failpoint") / "die"
    os.environ[FAILPOINT_ENV] = str(failpoint)  # inherited by `kvrouter serve` and its workers
    try:
        s = start_server("--workers", "2", "--kv-cache-dir", str(kv), *SMALL_KV_FLAGS, name="routing")
    finally:
        del os.environ[FAILPOINT_ENV]
    s.failpoint = failpoint
    return s


def wait_back(server, name: str, old_pid: int, timeout_s: float = 180) -> dict:
    """The state of worker `name` once it is healthy again with a new pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        w = next(w for w in state(server)["workers"] if w["name"] == name)
        if w["healthy"] and w["pid"] not in (None, old_pid):
            return w
        time.sleep(1)
    pytest.fail(f"{name} not back: {w}")


def post_chat(server, messages, max_tokens=1, timeout=240) -> tuple[int, dict, dict]:
    """(status, body, route header fields) of one non-streaming chat request."""
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            route = dict(kv.split("=", 1) for kv in resp.headers["x-kvrouter-route"].split("; "))
            return resp.status, json.loads(resp.read()), route
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), {}


def state(server) -> dict:
    with urllib.request.urlopen(server.url + "/v1/router/state", timeout=30) as resp:
        return json.loads(resp.read())


def test_router_state_lists_both_local_workers(server):
    s = state(server)
    workers = {w["name"]: w for w in s["workers"]}
    assert set(workers) == {"w0", "w1"}
    for w in workers.values():
        assert w["healthy"] and w["local"] and w["model"] == MODEL
        assert w["pid"] in server.worker_pids
        assert w["load"]["in_flight"] == 0 and w["load"]["max_queue"] == 32
        assert w["cache"]["store_id"]


def test_route_header_has_the_documented_fields(server):
    status, body, route = post_chat(server, [{"role": "user", "content": "Say hi."}])
    assert status == 200
    assert list(route) == ["worker", "source", "cached", "predicted_ttft_ms"]
    assert route["worker"] in ("w0", "w1") and route["source"] in ("live", "ram", "disk", "none")
    assert int(route["cached"]) >= 0 and int(route["predicted_ttft_ms"]) >= 0


def test_concurrent_unique_prompts_spread_over_both_workers_c13(server):
    prompts = [[{"role": "user", "content": f"Item {i}: name one colour. {uuid.uuid4().hex[:8]}"}]
               for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda m: post_chat(server, m), prompts))
    assert all(status == 200 for status, _, _ in results), [r[:2] for r in results if r[0] != 200]
    counts = {name: sum(1 for _, _, r in results if r["worker"] == name) for name in ("w0", "w1")}
    assert min(counts.values()) >= 12, (counts, [w["rates"] for w in state(server)["workers"]])  # >= 30% each
    loads = [w["load"]["in_flight"] for w in state(server)["workers"]]
    assert loads == [0, 0]  # in-flight fell on completion


def test_second_turn_goes_to_the_worker_holding_the_session(server):
    # a short system prompt: below the store's minimum, so only the live state can serve it
    messages = [{"role": "system", "content": f"You are terse. Session {uuid.uuid4().hex}."},
                {"role": "user", "content": "Name a fruit."}]
    status, body, first = post_chat(server, messages, max_tokens=4)
    assert status == 200
    messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Another one."}]
    status, body, second = post_chat(server, messages, max_tokens=2)
    assert status == 200
    assert second["worker"] == first["worker"] and second["source"] == "live"
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 20


def test_a_burst_sharing_a_new_prefix_prefills_it_once(server):
    system = f"Project {uuid.uuid4().hex}.\n" + long_system_prompt(n_rules=36, project="Borealis")
    bursts = [[{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: what now?"}]
              for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda m: post_chat(server, m), bursts))
    assert all(status == 200 for status, _, _ in results)
    usages = [body["usage"] for _, body, _ in results]
    prompt = min(u["prompt_tokens"] for u in usages)
    assert prompt > 600
    prefilled = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert prefilled < 1.5 * prompt, (prefilled, usages)
    # the workers measured themselves on the way (the cost model's inputs)
    rates = [w["rates"] for w in state(server)["workers"]]
    assert max(r["prefill_tokens_per_second"] for r in rates) > 0


def test_a_dead_generation_thread_ends_its_stream_with_an_error_and_the_worker_restarts_c15(server):
    pids = {w["name"]: w["pid"] for w in state(server)["workers"]}
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 60, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a long story about a cat and a boat."}]})
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            victim = resp.headers["x-kvrouter-route"].split(";")[0].split("=")[1]
            while True:  # wait for generated text, then kill the generation thread
                line = resp.readline().decode()
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
            server.failpoint.touch()
            rest = resp.read().decode()
    finally:
        server.failpoint.unlink(missing_ok=True)
    events = [json.loads(ln[6:]) for ln in rest.splitlines() if ln.startswith("data: {")]
    assert "error" in events[-1], events[-3:]  # an error event, never a normal stop
    assert not any(c.get("finish_reason") for e in events for c in e.get("choices", []))
    # the router stops sending to it: the other worker serves meanwhile
    status, _, route = post_chat(server, [{"role": "user", "content": "Are you there?"}])
    assert status == 200
    back = wait_back(server, victim, pids[victim])
    assert back["healthy"]
    log = server.log_path.read_text()
    assert "generation thread died" in log and "restarted" in log


def test_killing_a_worker_with_requests_queued_fails_over_and_it_restarts(server):
    before = {w["name"]: w["pid"] for w in state(server)["workers"]}
    victim = before["w0"]
    prompts = [[{"role": "user", "content": f"Count to three, attempt {i}. {uuid.uuid4().hex[:6]}"}]
               for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post_chat, server, m, 3, 120) for m in prompts]
        time.sleep(0.5)  # requests are queued on both workers
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=150) for f in futures]  # none hangs
    for status, body, _ in results:
        assert status == 200 or (status >= 500 and "error" in body), (status, body)
    assert sum(1 for status, _, _ in results if status == 200) >= 4
    assert not pid_alive(victim)
    # the router keeps serving on w1 meanwhile
    status, _, route = post_chat(server, [{"role": "user", "content": "Still there?"}])
    assert status == 200
    # the supervisor restarts w0 and the router sends traffic to it again
    wait_back(server, "w0", victim)
    assert "restarted" in server.log_path.read_text()


@pytest.fixture(scope="module")
def two_hosts(start_server, tmp_path_factory):
    """A worker alone on 127.0.0.2 with its own store (the "other host"), and
    `kvrouter serve` with one local worker plus that one as --remote-worker."""
    import subprocess

    from tests.support.server import free_port, model_cache_dir

    port = free_port()
    log = open(tmp_path_factory.mktemp("logs") / "remote-worker.log", "wb")
    remote = subprocess.Popen(
        [*module_command("kvrouter.router.cli"), "worker", "--listen", f"127.0.0.2:{port}", "--name", "remote",
         "--worker-token", "t0ken", "--cache-dir", str(model_cache_dir()),
         "--kv-cache-dir", str(tmp_path_factory.mktemp("kv-remote")), *SMALL_KV_FLAGS,
         "--decode-concurrency", "1"],  # one live state: an unrelated request moves it on
        stdout=log, stderr=subprocess.STDOUT)
    try:
        server = start_server("--workers", "1", "--remote-worker", f"127.0.0.2:{port}", "--worker-token", "t0ken",
                              "--kv-cache-dir", str(tmp_path_factory.mktemp("kv-local")), *SMALL_KV_FLAGS,
                              name="two-hosts")
        server.remote_address = f"127.0.0.2:{port}"
        yield server
        server.stop()
    finally:
        remote.terminate()
        try:
            remote.wait(60)
        except subprocess.TimeoutExpired:
            remote.kill()
        log.close()


def test_a_remote_worker_joins_with_its_own_store(two_hosts):
    workers = {w["name"]: w for w in state(two_hosts)["workers"]}
    assert set(workers) == {"w0", "r0"}
    assert workers["w0"]["local"] and workers["w0"]["pid"] in two_hosts.worker_pids
    assert not workers["r0"]["local"] and workers["r0"]["pid"] is None and workers["r0"]["healthy"]
    assert workers["r0"]["cache"]["store_id"] != workers["w0"]["cache"]["store_id"]
    prompts = [[{"role": "user", "content": f"Pick a number, {i}. {uuid.uuid4().hex[:6]}"}] for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda m: post_chat(two_hosts, m), prompts))
    assert all(status == 200 for status, _, _ in results)
    assert {r["worker"] for _, _, r in results} == {"w0", "r0"}


def test_a_checkpoint_stored_on_the_remote_host_is_predicted_there(two_hosts):
    """The router cannot open the other host's store; the remote worker's events tell
    it what that store holds. A prompt prefilled on the remote worker by another client
    (this test, over gRPC) leaves its anchor there; the remote worker's live state then
    moves on, so only its store holds the prefix; a chat sharing that prefix is routed
    to it with RAM (or disk) reuse predicted and really reused."""
    import asyncio

    from kvrouter.router.prompting import ModelTokenizer
    from kvrouter.router.worker_client import GenerateRequest, GrpcWorkerClient

    system = f"Project {uuid.uuid4().hex}.\n" + long_system_prompt(n_rules=36, project="Halcyon")

    def request(tokens, anchor=0):
        return GenerateRequest(uuid.uuid4().hex, tuple(tokens), max_tokens=1, anchor_tokens=anchor)

    async def prefill_on_the_remote_host():
        client = GrpcWorkerClient("remote", two_hosts.remote_address, local=False, token="t0ken")
        try:
            tokenizer = ModelTokenizer(await client.model_info())  # the router's own tokenization
            prompt = tokenizer.chat_prompt([{"role": "system", "content": system},
                                            {"role": "user", "content": "What now?"}])
            done = [item async for item in client.generate(request(prompt.tokens, prompt.anchor_tokens))][-1]
            other = tokenizer.chat_prompt([{"role": "user", "content": "Hi"}])
            [item async for item in client.generate(request(other.tokens))]  # its live state moves on
            return prompt, done, (await client.status()).event_seq
        finally:
            await client.close()

    prompt, done, seq = asyncio.run(prefill_on_the_remote_host())
    assert [e.tokens for e in done.store_events if e.action == "stored" and e.kind == "anchor"] == [
        prompt.anchor_tokens]
    deadline = time.monotonic() + 30  # the router has applied every event the remote worker sent
    while next(w for w in state(two_hosts)["workers"] if w["name"] == "r0")["cache"]["event_seq"] < seq:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status, body, route = post_chat(two_hosts, [{"role": "system", "content": system},
                                                {"role": "user", "content": "Name a colour."}])
    assert status == 200
    # The remote worker's RAM tier event says the anchor is in its memory: a RAM hit there
    # beats prefilling it anywhere. (When those events were lost, the router saw a disk hit
    # on another host and once judged the local worker faster under the whole suite.)
    ram = next(w for w in state(two_hosts)["workers"] if w["name"] == "r0")["cache"]["ram_entries"]
    assert ram >= 1
    assert route["worker"] == "r0", route
    assert (route["source"], int(route["cached"])) == ("ram", prompt.anchor_tokens), route
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt.anchor_tokens
