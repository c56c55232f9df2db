"""The worker's gRPC side with a fake engine (no model): a dead generation thread
ends streams with an error and flips health (C15), a full queue answers
RESOURCE_EXHAUSTED, the worker token is enforced, non-loopback needs a token,
GetStatus carries what routing needs, and cache events are numbered."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrouter_proto import worker_pb2
from kvrouter.router.errors import BadRequest
from kvrouter.cachestore.costs import Rates
from kvrouter.router.worker_client import GenerateRequest, GrpcWorkerClient, WorkerBusy, WorkerUnavailable
from kvrouter.worker.engine import EngineBusyError
from kvrouter.worker.events import FinishEvent, TokenEvent, Usage
from kvrouter.worker.cache_events import LiveChanged, RamChanged, StoreListeners
from kvrouter.worker.server import _watch_health, create_server, is_loopback
from kvrouter.worker.servicer import CacheEventHub

TLS_DIR = Path(__file__).resolve().parents[1] / "support" / "tls"
INFO = worker_pb2.ModelInfo(model_name="fake", identity="id", context_length=100)
TOOLS_TEMPLATE = (Path(__file__).resolve().parents[1] / "support" / "chatml_tools.jinja").read_text()


class FakeEngine:
    """Accepts jobs; `answer` says what to do with them: "ok", "hang"."""

    def __init__(self, answer="ok", max_queue=0):
        self.answer = answer
        self.tokenizer = SimpleNamespace(chat_template="{{ messages }}", get_vocab=lambda: {"a": 0})
        self._alive = True
        self.live = SimpleNamespace(namespace="ns", tokens=[1, 2, 3], live_id=4)
        self.live_states = (SimpleNamespace(namespace="other", tokens=[5], live_id=2), self.live)
        self.checkpoints = SimpleNamespace(ram=SimpleNamespace(ids=lambda: ["e1"], bytes=10))
        self.config = SimpleNamespace(max_queue=max_queue, decode_concurrency=6, prompt_concurrency=3)
        self.batch_width = 6
        self.rates = Rates(prefill_tps=250.0, disk_bps=5e8)
        self.queue_depth = 0
        self.progress = 0
        self.live_prefix_tokens = 3
        self.jobs = []

    @property
    def alive(self):
        return self._alive

    def submit(self, request, emit):
        if self.config.max_queue and len(self.jobs) >= self.config.max_queue:
            raise EngineBusyError("full")
        job = SimpleNamespace(request=request, emit=emit, cancelled=threading.Event())
        self.jobs.append(job)
        if self.answer == "ok":
            emit(TokenEvent((7,), "x"))
            emit(FinishEvent("length", Usage(len(request.prompt), 1, 0, "none", 0.1)))
        return job


async def serve(engine, token=None, hub=None, store=None):
    server, port, health_servicer = create_server("127.0.0.1:0", engine, INFO, token=token, store_id="h:/kv",
                                                  worker_name="w9", hub=hub, store=store)
    await server.start()
    for name in ("", "kvrouter.worker.v1.Worker"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def request(n=3, max_tokens=1):
    return GenerateRequest("r", tuple(range(1, n + 1)), max_tokens)


async def test_model_info_names_mlx_lm_s_tool_parser_for_the_routers_template():
    """The router renders with --chat-template: the worker chooses the tool parser for
    that template with mlx-lm's own rules (its own template has no tool syntax here)."""
    server, port, _ = await serve(FakeEngine())
    client = GrpcWorkerClient("w9", f"127.0.0.1:{port}")
    try:
        assert (await client.model_info()).tool_parser == ""
        assert (await client.model_info(TOOLS_TEMPLATE)).tool_parser == "json_tools"
        assert (await client.model_info("{{ messages }}")).tool_parser == ""
    finally:
        await client.close()
        await server.stop(None)


async def test_dead_engine_ends_streams_with_an_error_and_goes_not_serving_c15():
    engine = FakeEngine(answer="hang")
    server, port, health_servicer = await serve(engine)
    client = GrpcWorkerClient("w9", f"127.0.0.1:{port}")
    try:
        async def consume():
            return [item async for item in client.generate(request())]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        stop = asyncio.Event()
        died = asyncio.Event()
        watcher = asyncio.create_task(_watch_health(engine, health_servicer, None, stop, died))
        await asyncio.sleep(0.1)
        engine._alive = False  # the generation thread died with a request waiting
        with pytest.raises(WorkerUnavailable):  # nothing was generated: the router may retry elsewhere
            await asyncio.wait_for(task, 5)
        stub = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        for _ in range(20):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.1)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(watcher, 10)
        assert died.is_set() and stop.is_set()  # the process exits so that its supervisor restarts it
    finally:
        await client.close()
        await server.stop(None)


async def test_status_busy_and_client_errors():
    engine = FakeEngine(max_queue=1)
    server, port, _ = await serve(engine)
    client = GrpcWorkerClient("w9", f"127.0.0.1:{port}")
    try:
        st = await client.status(live_states=True)
        assert (st.store_id, st.ram_entry_ids, st.ram_bytes) == ("h:/kv", ("e1",), 10)
        assert st.rates.prefill_tps == 250.0
        assert [(s.live_id, s.namespace, s.tokens) for s in st.live_states] == \
            [(2, "other", (5,)), (4, "ns", (1, 2, 3))]
        assert (st.slots, st.prompt_slots) == (6, 3)
        assert (await client.status()).live_states == ()  # a scrape asks for counters only
        out = [item async for item in client.generate(request())]
        assert out[-1].rates == Rates(prefill_tps=250.0, disk_bps=5e8)
        with pytest.raises(WorkerBusy):
            [item async for item in client.generate(request())]
        with pytest.raises(BadRequest):
            [item async for item in client.generate(request(n=200))]
    finally:
        await client.close()
        await server.stop(None)


async def test_worker_token_is_required():
    server, port, _ = await serve(FakeEngine(), token="s3cret")
    good = GrpcWorkerClient("r0", f"127.0.0.1:{port}", local=False, token="s3cret")
    bad = GrpcWorkerClient("r1", f"127.0.0.1:{port}", local=False, token="wrong")
    try:
        await good.wait_ready(5)
        assert (await good.status()).store_id == "h:/kv"
        with pytest.raises(WorkerUnavailable):
            await bad.status()
        with pytest.raises(WorkerUnavailable):
            [item async for item in bad.generate(request())]
        with pytest.raises(WorkerUnavailable):
            await bad.wait_ready(0.5)
    finally:
        await good.close()
        await bad.close()
        await server.stop(None)


def test_non_loopback_listen_needs_a_token():
    assert is_loopback("127.0.0.1:0") and is_loopback("[::1]:5") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("10.0.0.2:1")
    with pytest.raises(ValueError, match="worker-token"):
        create_server("0.0.0.0:0", FakeEngine(), INFO)


async def test_smg_port_off_loopback_needs_the_worker_token():
    """Issue 13: the SMG port bound any address without a token; every non-loopback
    worker port needs --worker-token (SMG sends it: `smg launch --api-key TOKEN`)."""
    pytest.importorskip("smg_grpc_proto")
    from grpc_health.v1 import health_pb2_grpc

    from kvrouter.worker.smg_servicer import create_smg_server

    from tokenizers import Tokenizer, models

    engine = FakeEngine()
    engine.bundle = SimpleNamespace(tokenizer_json=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).to_str())
    with pytest.raises(ValueError, match="worker-token"):
        create_smg_server("0.0.0.0:0", engine, "model")
    server, port, _, health_servicer = create_smg_server("127.0.0.1:0", engine, "model", token="s3cret")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10,
                                  metadata=(("authorization", "Bearer s3cret"),))
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_cache_events_are_numbered_and_start_with_the_live_states():
    engine = FakeEngine()
    hub = CacheEventHub(asyncio.get_running_loop())
    server, port, _ = await serve(engine, hub=hub)
    client = GrpcWorkerClient("w9", f"127.0.0.1:{port}")
    try:
        events = client.cache_events()
        first = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(2)]
        assert [(e.seq, e.kind, e.live_id, e.namespace, e.tokens) for e in first] == \
            [(1, "live", 2, "other", (5,)), (2, "live", 4, "ns", (1, 2, 3))]
        hub.publish_threadsafe(RamChanged("e2", True))
        hub.publish_threadsafe(LiveChanged(2, "other", (), True))
        third, fourth = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(2)]
        assert (third.seq, third.kind, third.entry_id, third.added) == (3, "ram", "e2", True)
        assert (fourth.seq, fourth.live_id, fourth.removed) == (4, 2, True)
        assert (await client.status()).event_seq == 4
        await events.aclose()
    finally:
        await client.close()
        await server.stop(None)


async def test_store_changes_are_cache_events_and_the_store_can_be_listed(tmp_path):
    """What a router needs to know another host's store: every checkpoint the worker
    stores (with token ids) or removes (evicted, quarantined) is a `checkpoint`
    event, and ListCheckpoints lists what the store holds, with token ids. The
    per-request listener (Final.store_events) still gets every event."""
    from kvrouter.cachestore import CheckpointStore, StoreConfig

    engine = FakeEngine()
    hub = CacheEventHub(asyncio.get_running_loop())
    per_request = []
    listeners = StoreListeners(per_request.append)  # as worker.server.build_engine and serve wire it
    store = CheckpointStore(StoreConfig(directory=tmp_path / "kv", disk_budget_bytes=2500, min_tokens=1),
                            on_event=listeners)
    listeners.add(hub.publish_store_event)
    server, port, _ = await serve(engine, hub=hub, store=store)
    client = GrpcWorkerClient("w9", f"127.0.0.1:{port}")

    def save(tokens, data):  # on another thread, like the engine's
        return store.save("anchor", "id", "ns", tokens, lambda path: path.write_bytes(data))

    try:
        events = client.cache_events()
        for _ in engine.live_states:  # the stream starts with the live states held
            assert (await asyncio.wait_for(events.__anext__(), 5)).kind == "live"
        a = await asyncio.to_thread(save, list(range(100)), b"a" * 1000)
        b = await asyncio.to_thread(save, list(range(200)), b"b" * 1000)
        await asyncio.to_thread(save, list(range(100)), b"a" * 1000)  # a duplicate: skipped, no event
        c = await asyncio.to_thread(save, list(range(300)), b"c" * 1000)  # over budget: evicts a
        await asyncio.to_thread(store.quarantine, b.id, "load failed: bad")
        got = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(5)]
        assert [(u.kind, u.entry_id, u.added) for u in got] == [
            ("checkpoint", a.id, True), ("checkpoint", b.id, True), ("checkpoint", a.id, False),
            ("checkpoint", c.id, True), ("checkpoint", b.id, False)]
        assert [u.seq for u in got] == [3, 4, 5, 6, 7]
        first = got[0].checkpoint
        assert (first.namespace, first.model_identity, first.kind, first.token_ids, first.n_tokens,
                first.payload_bytes) == ("ns", "id", "anchor", tuple(range(100)), 100, 1000)
        assert got[2].checkpoint.token_ids == () and got[2].checkpoint.n_tokens == 100
        listed = [cp async for cp in client.list_checkpoints()]
        assert [(cp.entry_id, cp.token_ids, cp.payload_bytes) for cp in listed] == [(c.id, tuple(range(300)), 1000)]
        assert [e.action for e in per_request] == ["stored", "stored", "skipped", "evicted", "stored", "quarantined"]
        await events.aclose()
    finally:
        await client.close()
        await server.stop(None)
        store.close()


async def test_tls_worker_with_token():
    # A self-signed test certificate for 127.0.0.1 (tests/support/tls, valid until 2126), checked in
    # as gRPC's own examples check theirs in, so this test starts no process.
    cert, key = TLS_DIR / "cert.pem", TLS_DIR / "key.pem"
    server, port, _ = create_server("127.0.0.1:0", FakeEngine(), INFO, token="t",
                                    tls=(cert.read_bytes(), key.read_bytes()))
    await server.start()
    secure = GrpcWorkerClient("r0", f"127.0.0.1:{port}", local=False, token="t", tls_ca=cert.read_bytes())
    plain = GrpcWorkerClient("r1", f"127.0.0.1:{port}", local=False, token="t")
    try:
        assert (await secure.status()).model_name == "fake"
        with pytest.raises(WorkerUnavailable):
            await plain.status()
    finally:
        await secure.close()
        await plain.close()
        await server.stop(None)


def test_hint_positions_reach_the_engine_request_inside_the_prompt_only():
    from kvrouter.router.worker_client import request_to_proto
    from kvrouter.worker.servicer import request_from_proto

    msg = request_to_proto(GenerateRequest("r", tuple(range(10)), 4, hint_tokens=(9, 0, 3, 12, 3, 10)))
    assert list(msg.hint_tokens) == [9, 0, 3, 12, 3, 10]
    assert request_from_proto(msg, 100).hint_tokens == (3, 9)  # sorted, unique, within (0, 10)
