"""Routing policy through the real cluster, leases and dispatcher against in-memory
fake workers (tests/support/fake_worker.py): spread and in-flight counting
(C13), client errors (C14), retry before the first token, errors mid-stream,
back-pressure, affinity, coalescing, cache events and /v1/router/state."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from kvrouter.cachestore.costs import DEFAULT_PREFILL_TPS, Rates
from kvrouter.router.cluster import Cluster, ServedModel
from kvrouter.router.dispatch import Dispatcher, Job
from kvrouter.router.errors import BadRequest, Overloaded, Unavailable, WorkerFailed
from kvrouter.router.leases import Leases
from kvrouter.router.metrics import create_metrics
from kvrouter.router.views.state import router_state
from kvrouter.router.worker_client import Completion, Delta, WorkerUnavailable
from tests.support.fake_worker import FakeWorkerClient


def dispatcher_for(cluster, **kw):
    return Dispatcher(cluster, Leases(), create_metrics(), **kw)


def make(n=2, store=None, **kw):
    workers = [FakeWorkerClient(f"w{i}", **kw) for i in range(n)]
    cluster = Cluster(workers, store)
    model = ServedModel("fake", "id-fake", 4096, tokenizer=None, workers=workers)
    cluster.models["fake"] = model
    return cluster, model, workers, dispatcher_for(cluster)


def job(model, tokens, max_tokens=1, anchor=0, namespace=""):
    return Job(model=model, tokens=tuple(tokens), anchor_tokens=anchor, max_tokens=max_tokens, temperature=0.0,
               top_p=1.0, seed=None, namespace=namespace)


async def run(dispatcher, j):
    async with dispatcher.route(j) as route:
        out = [item async for item in dispatcher.run(j, route)]
    return route, out


async def test_spread_counts_load_from_dispatch_c13():
    cluster, model, workers, d = make(time_scale=1.0, prefill_tps=20_000)
    jobs = [job(model, [i] * 200) for i in range(40)]
    results = await asyncio.gather(*(run(d, j) for j in jobs))
    counts = {w.name: sum(1 for r, _ in results if r.worker == w.name) for w in workers}
    assert all(c >= 12 for c in counts.values()), counts
    assert all(d.leases.in_flight(w.name) == 0 for w in workers)
    assert all(d.leases.load(w.name).queued_s == 0 for w in workers)


async def test_in_flight_falls_on_error_and_disconnect():
    cluster, model, workers, d = make(1)
    w = workers[0]
    # disconnect: the view closes the stream after the first token, and its route scope ends
    j = job(model, [1, 2, 3], max_tokens=5)
    async with d.route(j) as route:
        assert d.leases.in_flight(w.name) == 1  # counted at dispatch, before the stream starts
        items = d.run(j, route)
        assert isinstance(await items.__anext__(), Delta)
        await items.aclose()
    assert d.leases.in_flight(w.name) == 0
    # error mid-stream: WorkerFailed, in-flight back to 0
    w.fail_next, w.fail_mid_stream = WorkerUnavailable, True
    with pytest.raises(WorkerFailed):
        await run(d, job(model, [4, 5, 6], max_tokens=5))
    assert d.leases.in_flight(w.name) == 0
    # a route decided and never run (the view failed in between) gives its slot back
    with pytest.raises(RuntimeError):
        async with d.route(job(model, [7, 8])):
            assert d.leases.in_flight(w.name) == 1
            raise RuntimeError("the view failed before running the job")
    assert d.leases.in_flight(w.name) == 0


async def test_client_errors_never_mark_a_worker_unhealthy_c14():
    cluster, model, workers, d = make(1)
    w = workers[0]
    for _ in range(10):
        w.fail_next = BadRequest
        with pytest.raises(BadRequest):
            await run(d, job(model, [1, 2, 3]))
    assert w.healthy and d.leases.in_flight(w.name) == 0
    route, out = await run(d, job(model, [1, 2, 3]))
    assert isinstance(out[-1], Completion)


async def test_retry_on_another_worker_before_the_first_token():
    cluster, model, workers, d = make(2)
    j = job(model, [9] * 50)
    async with d.route(j) as route:
        first = next(w for w in workers if w.name == route.worker)
        first.fail_next = WorkerUnavailable
        out = [item async for item in d.run(j, route)]
    assert isinstance(out[-1], Completion) and route.worker != first.name and route.reason == "retry"
    assert all(d.leases.in_flight(w.name) == 0 for w in workers)


async def test_no_worker_left_is_unavailable_and_full_queues_are_overloaded():
    cluster, model, workers, d = make(2)
    for w in workers:
        w.healthy = False
    with pytest.raises(Unavailable):
        async with d.route(job(model, [1, 2])):
            pass
    for w in workers:
        w.healthy = True
    cluster.max_queue = 1
    async with d.route(job(model, [1, 2])), d.route(job(model, [3, 4])):
        with pytest.raises(Overloaded) as exc:
            async with d.route(job(model, [5, 6])):
                pass
    assert int(exc.value.headers()["Retry-After"]) >= 1 and exc.value.anthropic_status == 529


async def test_a_worker_that_answers_queue_full_is_retried_when_no_other_can_take_it():
    """The router's count said it had room (e.g. a cancelled generation is still
    stopping on it): retry it after the backoff instead of refusing the client."""
    cluster, model, workers, d = make(1, max_queue=1)
    w = workers[0]
    w._queued = 1  # a generation the router no longer counts
    asyncio.get_running_loop().call_later(0.05, setattr, w, "_queued", 0)
    route, out = await run(d, job(model, [1, 2, 3]))
    assert isinstance(out[-1], Completion) and route.worker == "w0"
    assert route.attempts == 2 and route.reason == "retry" and d.leases.in_flight(w.name) == 0
    # still full after every attempt: 429 / 529 with Retry-After, the slot given back
    w._queued = 1
    with pytest.raises(Overloaded):
        await run(d, job(model, [4, 5, 6]))
    assert d.leases.in_flight(w.name) == 0 and len(w.requests) == 2 + 3


async def test_second_turn_goes_to_the_worker_holding_the_session():
    cluster, model, workers, d = make(2)
    first = [5] * 300
    async with d.route(job(model, [6] * 300)):  # keeps w0 busy, so the session starts on w1
        r1, out = await run(d, job(model, first, max_tokens=3))
    assert r1.worker == "w1"
    generated = [t for item in out if isinstance(item, Delta) for t in item.token_ids]
    r2, out2 = await run(d, job(model, first + generated + [7, 8, 9]))
    assert r2.worker == r1.worker and r2.source == "live" and r2.cached >= 300
    assert out2[-1].cached_tokens >= 300
    assert r2.header() == (f"worker={r1.worker}; source=live; cached={r2.cached}; "
                           f"predicted_ttft_ms={round(r2.predicted_ttft_s * 1000)}")


@dataclass
class _Entry:
    id: str
    n_tokens: int
    payload_bytes: int


class FakeStore:
    """What the router reads of the store: config.min_tokens and lookup()."""

    def __init__(self):
        self.config = SimpleNamespace(min_tokens=64)
        self.rows: list[tuple[int, ...]] = []

    def lookup(self, model_id, namespace, tokens):
        best = max((r for r in self.rows if tuple(tokens[: len(r)]) == r), key=len, default=None)
        return SimpleNamespace(n_tokens=len(best), entry=_Entry(str(hash(best)), len(best), 1000)) if best else None


class StoringWorker(FakeWorkerClient):
    """Stores the anchor of every prompt it prefills and reuses stored rows, as a worker does."""

    def __init__(self, name, store, **kw):
        super().__init__(name, **kw)
        self.store = store

    async def generate(self, request):
        prompt = tuple(request.prompt)
        hit = self.store.lookup("", "", prompt)
        if hit is not None and hit.n_tokens > 0:
            # a restored checkpoint: make the fake's live state start from it
            self.live, self.live_namespace = prompt[: hit.n_tokens], request.namespace
        async for item in super().generate(request):
            if isinstance(item, Completion) and request.anchor_tokens:
                anchor = prompt[: request.anchor_tokens]
                if anchor not in self.store.rows:
                    self.store.rows.append(anchor)
            yield item


async def test_a_burst_sharing_a_new_prefix_prefills_it_once():
    store = FakeStore()
    workers = [StoringWorker(f"w{i}", store, time_scale=1.0, prefill_tps=5000) for i in range(2)]
    cluster = Cluster(workers, store)
    model = ServedModel("fake", "id-fake", 4096, tokenizer=None, workers=workers)
    cluster.models["fake"] = model
    d = dispatcher_for(cluster)
    prefix = list(range(100, 800))
    jobs = [job(model, prefix + [i, i + 1, i + 2], anchor=len(prefix)) for i in range(6)]
    routes = [d.prepare(j) for j in jobs]  # a burst: all decided before any ran
    assert sum(r.coalesced for r in routes) == 5
    results = await asyncio.gather(*(_drain(d, j, r) for j, r in zip(jobs, routes)))
    assert all(isinstance(out[-1], Completion) for out in results)
    prefilled = sum(w.prefilled_tokens for w in workers)
    assert prefilled < 1.5 * len(prefix), prefilled
    # without coalescing both workers would prefill it
    store2 = FakeStore()
    workers2 = [StoringWorker(f"w{i}", store2, time_scale=1.0, prefill_tps=5000) for i in range(2)]
    cluster2 = Cluster(workers2, store2)
    model2 = ServedModel("fake", "id-fake", 4096, tokenizer=None, workers=workers2)
    d2 = dispatcher_for(cluster2, coalesce=False)
    jobs2 = [job(model2, prefix + [i, i + 1, i + 2], anchor=len(prefix)) for i in range(6)]
    routes2 = [d2.prepare(j) for j in jobs2]
    await asyncio.gather(*(_drain(d2, j, r) for j, r in zip(jobs2, routes2)))
    assert sum(w.prefilled_tokens for w in workers2) >= 2 * len(prefix)


async def _drain(d, j, route):
    """Runs a prepared route to its end, then finishes it (what `Dispatcher.route` does)."""
    try:
        return [item async for item in d.run(j, route)]
    finally:
        d.finish(route)


async def test_cache_events_keep_the_view_and_a_gap_resyncs():
    cluster, model, workers, d = make(1)
    w = workers[0]
    task = asyncio.create_task(cluster.follow_events(w))
    await asyncio.sleep(0.01)
    assert cluster.views["w0"].resyncs == 1
    await run(d, job(model, [3] * 10, max_tokens=2))
    await asyncio.sleep(0.01)
    assert cluster.view(cluster.clients[0].name).lives[FakeWorkerClient.LIVE_ID][1][:10] == (3,) * 10
    w._seq += 5  # events lost
    w._emit_live()
    await asyncio.sleep(0.01)
    assert cluster.views["w0"].resyncs == 2
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_router_state_lists_workers_load_and_cache():
    cluster, model, workers, d = make(2)
    async with d.route(job(model, [1, 2, 3])) as route:
        state = router_state(cluster, d.leases)
    by_name = {w["name"]: w for w in state["workers"]}
    assert set(by_name) == {"w0", "w1"} and state["models"] == ["fake"]
    assert by_name[route.worker]["load"]["in_flight"] == 1
    assert {"healthy", "pid", "rates", "cache", "local"} <= set(by_name["w0"])


async def test_measured_rates_reach_the_view():
    cluster, model, workers, d = make(1, prefill_tps=1234.0)
    await run(d, job(model, [1] * 20))
    assert cluster.views["w0"].rates == Rates(prefill_tps=1234.0)


async def test_a_leader_dropped_unused_frees_its_followers():
    store = FakeStore()
    workers = [StoringWorker("w0", store)]
    cluster = Cluster(workers, store)
    model = ServedModel("fake", "id-fake", 4096, tokenizer=None, workers=workers)
    d = dispatcher_for(cluster)
    prefix = list(range(100, 300))
    follower_job = job(model, prefix + [2], anchor=len(prefix))
    async with d.route(job(model, prefix + [1], anchor=len(prefix))):
        follower = d.prepare(follower_job)
        assert follower.coalesced
    # the leader's client went away before its request ran: its scope ended
    out = await asyncio.wait_for(_drain(d, follower_job, follower), 5)
    assert isinstance(out[-1], Completion) and d.leases.in_flight("w0") == 0


async def test_requests_go_only_to_workers_serving_their_model(monkeypatch):
    monkeypatch.setattr("kvrouter.router.cluster.ModelTokenizer", lambda info: None)  # fakes carry no tokenizer
    a, b = FakeWorkerClient("w0", "alpha"), FakeWorkerClient("w1", "beta")
    cluster = Cluster([a, b])
    await cluster.connect(1)
    try:
        d = dispatcher_for(cluster)
        for _ in range(3):
            route, _ = await run(d, job(cluster.model("beta"), [1, 2, 3]))
            assert route.worker == "w1"
        from kvrouter.router.errors import NotFound

        with pytest.raises(NotFound):
            cluster.model("gamma")
    finally:
        await cluster.close()


async def test_another_hosts_store_is_not_offered_to_its_workers():
    store = FakeStore()
    store.rows.append(tuple(range(100)))
    cluster, model, workers, d = make(2, store)
    cluster.local_store_id = "hostA:/kv"
    cluster.view("w0").store_id = "hostA:/kv"
    cluster.view("w1").store_id = "hostB:/kv"
    hit = store.lookup("", "", range(120))
    cands = {c.name: c for c in cluster.snapshot(model, tuple(range(120)), "", d.leases, hit)}
    assert [r.source for r in cands["w0"].reuse] == ["disk"]
    assert cands["w1"].reuse == ()
    cluster.view("w0").ram_ids.add(hit.entry.id)
    cands = {c.name: c for c in cluster.snapshot(model, tuple(range(120)), "", d.leases, hit)}
    assert [r.source for r in cands["w0"].reuse] == ["ram"]


async def _settle(cluster, fakes: dict):
    """Waits until the cluster followed each fake's event stream (after connect's own
    resync, the stream's) and applied every event it sent."""
    for _ in range(200):
        if all(cluster.views[n].resyncs >= 2 and cluster.views[n].event_seq == f._seq for n, f in fakes.items()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError({n: (cluster.views[n], f._seq) for n, f in fakes.items()})


async def test_another_hosts_store_is_predicted_from_its_workers_events(monkeypatch):
    """Host B's store (shared by r0 and r1) is known only through their events and
    listings: a checkpoint r0 stores is offered to r0 and r1 (RAM where their RAM tier
    holds it), never to w0 (host A); removals and listings after a gap keep it true."""
    from kvrouter.router.worker_client import CacheUpdate

    monkeypatch.setattr("kvrouter.router.cluster.ModelTokenizer", lambda info: None)  # fakes carry no tokenizer
    host_b: dict = {}
    w0 = FakeWorkerClient("w0", store_id="hostA:/kv")
    r0 = FakeWorkerClient("r0", store_id="hostB:/kv", stored=host_b, local=False)
    r1 = FakeWorkerClient("r1", store_id="hostB:/kv", stored=host_b, local=False)
    before = r1.store_checkpoint(list(range(1000, 1100)))  # stored before the router started
    cluster = Cluster([w0, r0, r1], local_store_id="hostA:/kv")
    d = dispatcher_for(cluster)
    fakes = {"w0": w0, "r0": r0, "r1": r1}
    await cluster.connect(1)
    try:
        model = cluster.model("fake")
        prompt = tuple(range(400))
        await _settle(cluster, fakes)

        def reuse():
            return {c.name: [(r.source, r.tokens, r.bytes) for r in c.reuse]
                    for c in cluster.snapshot(model, prompt, "", d.leases)}

        assert reuse() == {"w0": [], "r0": [], "r1": []}
        assert cluster.remote_stores.longest("hostB:/kv", "id-fake", "", range(1000, 1200)).entry_id == before.entry_id
        stored = r0.store_checkpoint(prompt[:300], payload_bytes=5000)
        r0._emit(CacheUpdate(0, "ram", entry_id=stored.entry_id, added=True))
        w0.store_checkpoint(prompt[:350])  # host A's store is the router's own (LMDB): its events are not used
        await _settle(cluster, fakes)
        assert reuse() == {"w0": [], "r0": [("ram", 300, 5000)], "r1": [("disk", 300, 5000)]}
        decision = d.decide(job(model, prompt))
        assert (decision.worker, decision.source, decision.cached_tokens) == ("r0", "ram", 300)
        assert cluster.snapshot(model, prompt, "other-namespace", d.leases)[1].reuse == ()
        # evicted by r1 (the same store): gone for both
        r1.remove_checkpoint(stored.entry_id)
        await _settle(cluster, fakes)
        assert reuse() == {"w0": [], "r0": [], "r1": []}
        # removed without an event (`kvrouter cache rm`), another one stored while events were
        # lost: the listing after the gap makes the view true again
        r0.remove_checkpoint(before.entry_id, event=False)
        stream, r0._events = r0._events, None
        lost = r0.store_checkpoint(prompt[:200])  # numbered, never sent
        r0._events = stream
        r0._emit_live()
        await _settle(cluster, fakes)
        assert cluster.views["r0"].resyncs == 3  # connect, stream start, gap
        assert reuse()["r1"] == [("disk", 200, 1000)] and lost.entry_id in cluster.remote_stores.views["hostB:/kv"]
        assert cluster.remote_stores.longest("hostB:/kv", "id-fake", "", range(1000, 1200)) is None
    finally:
        await cluster.close()


async def test_prefill_backlog_lasts_until_the_first_token():
    """A batching worker's queue wait is the prefill ahead of a request: the router
    counts a request's predicted prefill until its first token, its whole service
    time until it ends."""
    cluster, model, workers, d = make(1)
    w, v = workers[0], d.leases.load("w0")
    j = job(model, [1] * 500, max_tokens=5)
    async with d.route(j) as route:
        assert v.prefill_backlog_s == pytest.approx(500 / DEFAULT_PREFILL_TPS)  # not measured yet: the prior
        items = d.run(j, route)
        assert isinstance(await items.__anext__(), Delta)
        assert v.prefill_backlog_s == 0.0 and v.queued_s > 0  # prefilled, still decoding
        await items.aclose()
    assert v.queued_s == 0.0 and d.leases.in_flight(w.name) == 0


def test_a_completion_does_not_revive_a_live_state_its_worker_already_dropped():
    """The worker publishes live state N (event), then the request's Final names N.
    The two travel on different streams: when N's removal event is applied before
    the Final, the completion must not put N back (the router would believe in a
    live state the worker no longer holds, and in more of them than it has slots)."""
    from kvrouter.router.worker_client import CacheUpdate

    cluster, model, workers, _ = make(1)
    cluster.apply("w0", CacheUpdate(1, "live", namespace="", tokens=(1, 2, 3), live_id=5))
    cluster.apply("w0", CacheUpdate(2, "live", live_id=5, removed=True))
    done = Completion("length", 3, 1, 0, "none", 0.0, 0.0, live_id=5)
    cluster.observe("w0", done, (1, 2, 3, 4), "")
    assert cluster.views["w0"].lives == {}
    # a completion that arrives before its live state's event still counts at once
    cluster.observe("w0", Completion("length", 3, 1, 0, "none", 0.0, 0.0, live_id=6), (7, 8, 9), "")
    assert cluster.views["w0"].lives == {6: ("", (7, 8, 9))}


def test_the_router_predicts_only_the_reuse_the_workers_rules_allow():
    """A worker reports how far back its model's state can be cut (ModelInfo.reuse);
    routing counts on a live state only as far as that allows: cut back anywhere for
    full KV caches, only while a sliding window has not wrapped, never for recurrent
    state (reused by extension only)."""
    from kvrouter_proto import worker_pb2
    from kvrouter.cachestore.costs import CUT_ANY, ReuseRules
    from kvrouter.router.worker_client import model_info_from_proto

    def rules(**kw):
        return model_info_from_proto(worker_pb2.ModelInfo(reuse=worker_pb2.ReuseRules(**kw))).reuse

    exact, window = rules(whole_only=True), rules(cut_below_tokens=64)
    assert exact == ReuseRules(False, 0) and window == ReuseRules(False, 64) and rules() == CUT_ANY
    cluster, model, workers, d = make(1)
    cluster.view("w0").lives = {1: ("", tuple(range(100)))}
    extends, diverges = tuple(range(120)), tuple(range(60)) + (9999,) * 40
    expected = {CUT_ANY: (100, 60), window: (100, 0), exact: (100, 0)}
    for r, (ext, div) in expected.items():
        model.rules = r
        assert d.decide(job(model, extends)).cached_tokens == ext
        assert d.decide(job(model, diverges)).cached_tokens == div
    cluster.view("w0").lives = {1: ("", tuple(range(40)))}  # within the window: it can be cut
    model.rules = window
    assert d.decide(job(model, tuple(range(20)) + (9999,) * 40)).cached_tokens == 20
