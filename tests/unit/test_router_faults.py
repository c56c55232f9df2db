"""Issue 13's router faults, each a regression test that fails without its fix: a frozen
worker, a retry that finds the other worker full, the route header after a damaged
checkpoint, coalescing that waits only for the leader's checkpoint and logs once, the
cache event stream's logging, the per-key /v1/router/state, a body that trickles in,
tokenization off the event loop on the gRPC API, malformed protobuf, and usage errors."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvrouter.cachestore import CheckpointStore, StoreConfig
from kvrouter.router import dispatch as dispatch_module
from kvrouter.router.app import create_app
from kvrouter.router.auth import ApiKeys, make_namespace
from kvrouter.router.cluster import Cluster, ServedModel
from kvrouter.router.config import RouterConfig
from kvrouter.router.errors import BadRequest, Overloaded
from kvrouter.router.keys import CLUSTER
from kvrouter.router.stalls import StallWatch
from kvrouter.router.worker_client import Completion, Delta, WorkerUnavailable
from tests.support.fake_worker import FakeWorkerClient
from tests.unit.test_cluster_dispatch import dispatcher_for, job, make, run


# ---- a frozen worker ------------------------------------------------------------------------


async def test_a_frozen_worker_leaves_routing_and_its_waiting_requests_move():
    cluster, model, (w0, w1), d = make(2)
    watch = asyncio.create_task(StallWatch(cluster, d.leases, stall_timeout_s=0.5, poll_s=0.05).run())
    try:
        w0.freeze()  # SIGSTOP: no status, no token
        routes = await asyncio.wait_for(asyncio.gather(*(run(d, job(model, [i] * 50)) for i in range(4))), 30)
        assert all(route.worker == "w1" for route, _ in routes)  # the ones sent to w0 moved
        assert any(route.attempts == 2 for route, _ in routes)
        assert all(isinstance(out[-1], Completion) for _, out in routes)
        assert cluster.view("w0").stalled and not cluster.serving(w0)
        route, _ = await run(d, job(model, [9] * 50))  # new requests go elsewhere at once
        assert (route.worker, route.attempts) == ("w1", 1)
        w0.thaw()  # SIGCONT: it answers again, holding nothing
        for _ in range(200):
            if not cluster.view("w0").stalled:
                break
            await asyncio.sleep(0.05)
        assert cluster.serving(w0)
    finally:
        watch.cancel()


async def test_a_long_prefill_is_not_a_stall():
    cluster, model, (w0,), d = make(1, time_scale=1.0, prefill_tps=100)  # 50 tokens: 0.5 s of "prefill"
    w0.decode_s = 0.2
    watch = asyncio.create_task(StallWatch(cluster, d.leases, stall_timeout_s=0.3, poll_s=0.05).run())
    try:
        route, out = await run(d, job(model, [1] * 50, max_tokens=4))
        # progress moved at every step it reported: never taken out of routing
        assert route.attempts == 1 and isinstance(out[-1], Completion) and not cluster.view("w0").stalled
    finally:
        watch.cancel()


# ---- a retry that finds the other worker full -------------------------------------------------


async def test_a_retry_that_finds_the_other_worker_full_is_overloaded():
    workers = [FakeWorkerClient("w0"), FakeWorkerClient("w1")]
    cluster = Cluster(workers, max_queue=1)
    model = cluster.models["fake"] = ServedModel("fake", "id-fake", 4096, tokenizer=None, workers=workers)
    d = dispatcher_for(cluster)
    workers[0].fail_next = WorkerUnavailable
    with d.leases.hold("w1", 1.0, 0.5):  # w1 is full: one request in flight, --max-queue 1
        with pytest.raises(Overloaded):  # 429 (Anthropic 529) with Retry-After, not 503
            await run(d, job(model, [1, 2, 3]))


# ---- the route header -------------------------------------------------------------------------


async def test_the_route_header_shows_the_reuse_the_worker_really_made(tmp_path):
    store = CheckpointStore(StoreConfig(directory=tmp_path / "kv", min_tokens=1))
    tokens = list(range(1, 400))
    store.save("anchor", "id-fake", "", tokens[:300], lambda p: p.write_bytes(b"x" * 1000))
    cluster, model, workers, d = make(1, store=store)
    j = job(model, tokens)
    async with d.route(j) as route:
        assert "cached=300" in route.header() and "source=disk" in route.header()  # the prediction
        items = [item async for item in d.run(j, route)]
        # the worker reused nothing (say the checkpoint failed its checksum and was quarantined)
        assert items[0].reuse == (0, "none")
        assert "cached=0" in route.header() and "source=none" in route.header()
    store.close()


# ---- coalescing -------------------------------------------------------------------------------


@pytest.fixture
def coalescing(tmp_path):
    store = CheckpointStore(StoreConfig(directory=tmp_path / "kv", min_tokens=16))
    cluster, model, workers, d = make(2, store=store)
    for w in workers:
        w.store_anchors = True
    yield cluster, model, workers, d
    store.close()


async def test_followers_go_when_the_leaders_checkpoint_is_stored_not_at_its_end(coalescing):
    cluster, model, (w0, w1), d = coalescing
    w0.decode_s = w1.decode_s = 0.1
    followers = [asyncio.create_task(cluster.follow_events(w)) for w in (w0, w1)]
    try:
        shared = list(range(1, 101))
        events: list[str] = []

        async def one(name: str, suffix: int):
            j = job(model, shared + [suffix] * 5, max_tokens=10, anchor=100)
            async with d.route(j) as route:
                async for item in d.run(j, route):
                    if isinstance(item, Delta) and not any(e.startswith(name + " first") for e in events):
                        events.append(f"{name} first")
                    if isinstance(item, Completion):
                        events.append(f"{name} done")
            return route

        leader = asyncio.create_task(one("leader", 1))
        await asyncio.sleep(0)
        follower = await one("follower", 2)
        await leader
        assert follower.coalesced
        # the follower started once the anchor was stored, a second before the leader ended
        assert events.index("follower first") < events.index("leader done"), events
    finally:
        for t in followers:
            t.cancel()


async def test_followers_go_at_the_leaders_first_token_to_the_leaders_worker(coalescing):
    """Nothing is stored (the fake stores no anchor): the follower goes at the leader's
    first token, to the worker whose batch holds the prefix, predicted as a reuse there."""
    cluster, model, (w0, w1), d = coalescing
    w0.store_anchors = w1.store_anchors = False
    w0.decode_s = w1.decode_s = 0.1
    for w in (w0, w1):  # batching workers: a request joins the batch at once
        cluster.view(w.name).slots = 4
    shared = list(range(1, 2001))  # 2 s to prefill at the fakes' 1,000 tokens/s
    events: list[str] = []

    async def one(name: str, suffix: int):
        j = job(model, shared + [suffix] * 5, max_tokens=10, anchor=len(shared))
        async with d.route(j) as route:
            async for item in d.run(j, route):
                if isinstance(item, Delta) and f"{name} first" not in events:
                    events.append(f"{name} first")
                    if name == "leader":  # its prompt now counts as in its worker's batch
                        assert any(t[:2000] == tuple(shared) for _, t in cluster.view(route.worker).in_batch.values())
                if isinstance(item, Completion):
                    events.append(f"{name} done")
                    sent[name] = len(w0.requests) + len(w1.requests)
        return route

    sent: dict[str, int] = {}  # requests the workers had been sent when each one ended
    leader_task = asyncio.create_task(one("leader", 1))
    await asyncio.sleep(0)
    follower = await one("follower", 2)
    leader = await leader_task
    assert follower.coalesced and follower.worker == leader.worker
    # the follower was sent before the leader ended (this fake worker runs one request at a time)
    assert sent["leader"] == 2, (sent, events)
    assert cluster.view(leader.worker).in_batch == {}  # gone when the requests ended


async def test_a_follower_that_times_out_goes_ahead_once(coalescing, monkeypatch, caplog):
    cluster, model, (w0, w1), d = coalescing
    monkeypatch.setattr(dispatch_module, "COALESCE_MAX_WAIT_S", 0.3)
    shared = list(range(1, 101))
    w0.freeze()
    leader_job = job(model, shared + [1] * 5, max_tokens=2, anchor=100)
    async with d.route(leader_job) as leader_route:  # a leader that never gets anywhere
        leader_route_worker = leader_route.worker
        frozen = w0 if leader_route_worker == "w0" else w1
        if frozen is not w0:
            w0.thaw()
            w1.freeze()
        with caplog.at_level(logging.INFO, logger="kvrouter.router.dispatch"):
            route, out = await asyncio.wait_for(run(d, job(model, shared + [2] * 5, anchor=100)), 10)
        assert isinstance(out[-1], Completion) and route.coalesced
        assert caplog.text.count("going ahead") == 1
        frozen.thaw()


# ---- the cache event stream --------------------------------------------------------------------


class BrokenEvents(FakeWorkerClient):
    """A worker whose event stream breaks at once, `breaks` times, then works."""

    def __init__(self, *a, breaks: int = 3, **kw):
        super().__init__(*a, **kw)
        self.breaks = breaks

    async def cache_events(self):
        if self.breaks:
            self.breaks -= 1
            raise WorkerUnavailable("worker w0 cache events: UNAVAILABLE: connection refused")
        async for ev in super().cache_events():
            yield ev


async def test_a_broken_event_stream_warns_once_and_a_bug_is_logged_with_its_traceback(monkeypatch, caplog):
    from kvrouter.router import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "EVENTS_BACKOFF_S", (0.01, 0.01))
    w = BrokenEvents("w0")
    cluster = Cluster([w])
    with caplog.at_level(logging.DEBUG, logger="kvrouter.router.cluster"):
        task = asyncio.create_task(cluster.follow_events(w))
        for _ in range(200):
            if "flow again" in caplog.text:
                break
            await asyncio.sleep(0.01)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "broke" in r.getMessage()]
        assert len(warnings) == 1, caplog.text  # one outage, one warning
        assert "flow again" in caplog.text

        def bug(name, ev):
            raise KeyError("a bug in applying an event")

        monkeypatch.setattr(cluster, "apply", bug)
        w.store_checkpoint([1, 2, 3])
        for _ in range(200):
            if any(r.levelno == logging.ERROR for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and errors[0].exc_info is not None  # with its traceback, not at DEBUG
        task.cancel()


# ---- the HTTP and gRPC edges of the app ----------------------------------------------------------


KEYS = ApiKeys.parse("sk-alice alice\nsk-bob bob\nsk-ops ops\n")


async def app_client(config: RouterConfig, cluster: Cluster) -> TestClient:
    client = TestClient(TestServer(create_app(config, cluster=cluster)))
    await client.start_server()
    return client


async def test_router_state_shows_a_key_its_own_namespaces_and_admins_everything():
    w = FakeWorkerClient("w0")
    cluster = Cluster([])  # no worker to connect to at start (a fake has no tokenizer)...
    client = await app_client(RouterConfig(api_keys=KEYS, admin_keys=frozenset({"ops"})), cluster)
    try:
        cluster.clients.append(w)  # ...so it joins after
        cluster.models["fake"] = ServedModel("fake", "id-fake", 4096, tokenizer=None, workers=[w])
        alice, bob = make_namespace("alice", None), make_namespace("bob", "team")
        v = cluster.view("w0")
        v.pid, v.lives = 4242, {1: (alice, (1, 2, 3)), 2: (bob, (4, 5))}

        async def state(key: str) -> dict:
            resp = await client.get("/v1/router/state", headers={"Authorization": f"Bearer {key}"})
            assert resp.status == 200
            return await resp.json()

        mine = await state("sk-alice")
        worker = mine["workers"][0]
        assert [s["namespace"] for s in worker["cache"]["live_states"]] == [alice]
        assert worker["pid"] is None and worker["address"] is None and mine["store"] is None
        everything = await state("sk-ops")
        assert {s["namespace"] for s in everything["workers"][0]["cache"]["live_states"]} == {alice, bob}
        assert everything["workers"][0]["pid"] == 4242
        assert (await client.get("/v1/router/state")).status == 401
    finally:
        await client.close()


def test_admin_keys_must_name_keys_of_the_keys_file():
    from kvrouter.router.auth import check_admin_keys

    assert check_admin_keys(KEYS, ("ops",)) == frozenset({"ops"})
    with pytest.raises(ValueError, match="no key named carol"):
        check_admin_keys(KEYS, ("carol",))
    with pytest.raises(ValueError, match="api-keys-file"):
        check_admin_keys(None, ("ops",))


async def test_a_body_that_trickles_in_gets_408():
    client = await app_client(RouterConfig(body_read_timeout_s=0.5), Cluster([]))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        await writer.drain()

        async def trickle():
            while True:
                await asyncio.sleep(0.1)
                writer.write(b" ")
                await writer.drain()

        dripping = asyncio.create_task(trickle())
        try:
            status = await asyncio.wait_for(reader.readline(), 10)
        finally:
            dripping.cancel()
        assert status.startswith(b"HTTP/1.1 408"), status
        writer.close()
    finally:
        await client.close()


class SlowTokenizer:
    """Stands in for a tokenizer rendering a huge prompt: `chat_prompt` blocks until the
    test says so (at most 10 s), recording whether it was still running when /health
    was answered."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.finished = False

    def chat_prompt(self, messages, tools=None):
        self.started.set()
        self.release.wait(10)
        self.finished = True
        raise BadRequest("too long for this test's model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_health_is_answered_while_a_3mb_grpc_prompt_is_tokenized():
    from kvrouter_proto import router_pb2, router_pb2_grpc

    port = free_port()
    w = FakeWorkerClient("w0")
    cluster = Cluster([])
    client = await app_client(RouterConfig(grpc_port=port), cluster)
    cluster.clients.append(w)
    tokenizer = SlowTokenizer()
    cluster.models["fake"] = ServedModel("fake", "id-fake", 4096, tokenizer=tokenizer, workers=[w])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_send_message_length", 8 * 2**20)]) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            content = "word " * (3 * 2**20 // 5)  # 3 MiB of text
            request = router_pb2.GenerateRequest(model="fake", messages=router_pb2.Messages(
                messages=[router_pb2.ChatMessage(role="user", content=content)]))
            call = asyncio.create_task(anext(aiter(stub.Generate(request))))
            assert await asyncio.to_thread(tokenizer.started.wait, 30)
            resp = await client.get("/health")  # answered while the tokenizer still runs
            assert resp.status == 200 and not tokenizer.finished
            tokenizer.release.set()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and tokenizer.finished

            # bytes that are no GenerateRequest: INVALID_ARGUMENT, not UNKNOWN with a Python class
            raw = channel.unary_stream("/kvrouter.router.v1.Router/Generate", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in raw(b"\xff\xff\xff\xff\x0f"):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid kvrouter.router.v1.GenerateRequest" in err.value.details()
    finally:
        await client.close()


# ---- the command line ---------------------------------------------------------------------------


def test_only_bad_flags_are_usage_errors(monkeypatch, capsys):
    from kvrouter.router import cli, supervisor

    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--workers", "0"])  # a bad flag: usage error, exit 2
    assert exit_.value.code == 2 and "--workers must be at least 1" in capsys.readouterr().err

    async def failing_run(cfg, kv_args):
        raise ValueError("a bug while serving")

    monkeypatch.setattr(supervisor, "run_serve", failing_run)
    with pytest.raises(ValueError, match="a bug while serving"):  # not turned into bad usage
        cli.main(["serve", "--no-kv-cache"])
