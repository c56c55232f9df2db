"""The workers behind the router, grouped by the model they serve, with each
model's tokenizer, the shared store index used to predict reuse, and the
router's view of each worker (`WorkerView`): live state, RAM-tier entries,
measured rates, which store it reads, and the load the router sent it.

A worker batches requests and keeps several live states (one per batch slot),
each with an id. The view is kept current three ways: each request's
completion (the live state it left, the worker's rates), the worker's cache
event stream (a live state held or dropped, RAM tier gained or dropped an
entry, a checkpoint stored or removed; numbered, and a gap triggers a resync
from GetStatus), and GetStatus when a stream (re)starts. A router that
restarts rebuilds it from GetStatus and the store's LMDB index; another host's
store, which it cannot open, from that host's workers' ListCheckpoints and
checkpoint events (`router.remote_stores`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from kvrouter.cachestore.keys import common_prefix_length
from kvrouter.router.errors import NotFound, Overloaded, Unavailable
from kvrouter.router.prompting import ModelTokenizer
from kvrouter.router.remote_stores import RemoteStores, is_remote
from kvrouter.cachestore.costs import Rates, Reuse, first_token_work_s
from kvrouter.router.routing import Candidate, Decision, choose_worker, request_seconds
from kvrouter.router.worker_client import GrpcWorkerClient, WorkerUnavailable, rates_from_proto

log = logging.getLogger("kvrouter.router.pool")

DECODE_TOKENS_FOR_QUEUE = 64  # generated tokens assumed per queued request (max_tokens is an upper bound)


@dataclass
class ServedModel:
    """One model: its name, identity (for store lookups), tokenizer and workers."""

    name: str
    identity: str
    context_length: int
    tokenizer: ModelTokenizer
    workers: list = field(default_factory=list)


@dataclass
class WorkerView:
    """What the router knows of one worker beyond its client's health and in-flight count.

    queued_s: predicted seconds of the requests dispatched to it and not finished.
    store_id: "host:directory" of the store it reads ("" unknown). ram_ids: store
    entry ids in its RAM tier. lives: its live states. event_seq: last cache event applied. pid: its
    process id (local workers). resyncs: times its view was rebuilt from GetStatus.
    """

    rates: Rates = field(default_factory=Rates)
    queued_s: float = 0.0
    prefill_backlog_s: float = 0.0  # see router.routing.Candidate
    store_id: str = ""
    ram_ids: set[str] = field(default_factory=set)
    event_seq: int = 0
    pid: int = 0
    max_queue: int = 0
    slots: int = 1  # sequences it decodes together (--decode-concurrency)
    lives: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # live_id -> (namespace, tokens)
    # Highest live id its events (or GetStatus) reported: the worker numbers live states in
    # order and publishes each before the Final naming it, so a completion naming an id
    # at or below this one is known to the event stream already (and may be gone).
    live_id_seen: int = 0
    requests_served: int = 0
    resyncs: int = 0
    last_error: str = ""


@dataclass
class Lease:
    """A slot on a worker, taken when the route is decided and given back exactly once.

    seconds: the predicted service time it added to the worker's queue;
    prefill_s: the part of it before the first token (load + prefill), counted
    in the worker's prefill backlog until `first_token()`.
    """

    pool: "WorkerPool"
    worker: object
    seconds: float
    prefill_s: float = 0.0
    released: bool = False
    prefilled: bool = False

    def first_token(self) -> None:
        """The worker produced the first token: the request's prefill is done."""
        if not self.prefilled:
            self.prefilled = True
            v = self.pool.view(self.worker)
            v.prefill_backlog_s = max(0.0, v.prefill_backlog_s - self.prefill_s)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self)


class WorkerPool:
    """All workers; built by `connect()` once they are ready.

    store: the store index this host's workers share (None: no disk reuse predicted).
    local_store_id: its "host:directory" (workers reporting another id read another
    host's store, which this router cannot open: `remote_stores` holds what their
    events and listings say it contains).
    affinity_max_in_flight: see router.routing. max_queue: requests in flight per
    worker past which it takes no more (0: no limit; a worker's own --max-queue
    applies too).
    """

    def __init__(self, clients: list, store=None, *, local_store_id: str = "", affinity_max_in_flight: int = 4,
                 max_queue: int = 0):
        self.clients = clients
        self.store = store
        self.local_store_id = local_store_id
        self.affinity_max_in_flight = affinity_max_in_flight
        self.max_queue = max_queue
        self.models: dict[str, ServedModel] = {}
        self._tasks: list[asyncio.Task] = []
        self.views: dict[str, WorkerView] = {}
        self.remote_stores = RemoteStores()  # other hosts' stores, from their workers' events

    @classmethod
    def from_addresses(cls, addresses, store=None, *, remote=(), token: str | None = None,
                       tls_ca: bytes | None = None, **kw) -> "WorkerPool":
        """Local workers "w0".. at `addresses`, remote ones "r0".. at `remote`."""
        clients = [GrpcWorkerClient(f"w{i}", a, local=True) for i, a in enumerate(addresses)]
        clients += [GrpcWorkerClient(f"r{i}", a, local=False, token=token, tls_ca=tls_ca)
                    for i, a in enumerate(remote)]
        return cls(clients, store, **kw)

    def view(self, worker) -> WorkerView:
        v = self.views.get(worker.name)
        if v is None:
            v = self.views[worker.name] = WorkerView()
        return v

    async def connect(self, timeout_s: float) -> None:
        """Waits for every worker, reads its model info and status, starts health
        watches and cache event streams. Raises WorkerUnavailable when a worker is
        not ready in time."""
        await asyncio.gather(*(c.wait_ready(timeout_s) for c in self.clients))
        for client in self.clients:
            info = await client.model_info()
            model = self.models.get(info.model_name)
            if model is None:
                tokenizer = await asyncio.to_thread(ModelTokenizer, info)
                model = ServedModel(info.model_name, info.identity, info.context_length, tokenizer)
                self.models[info.model_name] = model
            model.workers.append(client)
            await self.resync(client)
            log.info("worker %s at %s serves %s", client.name, client.address, info.model_name)
        self._tasks = [asyncio.create_task(c.watch_health()) for c in self.clients]
        self._tasks += [asyncio.create_task(self._follow_events(c)) for c in self.clients]

    async def resync(self, client) -> None:
        """Rebuilds the view of `client` from its GetStatus (quietly keeps the old one
        when the worker does not answer)."""
        try:
            st = await client.status()
        except WorkerUnavailable as exc:
            self.view(client).last_error = str(exc)
            return
        v = self.view(client)
        v.rates = rates_from_proto(st.rates)
        v.store_id = st.store_id
        v.ram_ids = set(st.ram_entry_ids)
        v.event_seq = st.event_seq
        seen_before = v.live_id_seen if v.pid == st.pid else 0  # ids restart with the worker process
        v.pid = st.pid
        v.max_queue = st.max_queue
        v.slots = max(1, st.decode_concurrency)
        v.requests_served = st.requests_served
        v.resyncs += 1
        v.lives = {s.live_id: (s.namespace, tuple(s.token_ids)) for s in st.live_states}
        # Within one process, a live state added and dropped before this GetStatus is
        # not in it, but its id was seen.
        v.live_id_seen = max(seen_before, max(v.lives, default=0))

    async def _follow_events(self, client) -> None:
        """Applies `client`'s cache events forever; resyncs on a gap or a new stream,
        and then rebuilds the view of its store when that is another host's. Events
        numbered at or below the resync's `event_seq` are in its picture already."""
        backoff = 0.5
        while True:
            try:
                resynced = False
                async for ev in client.cache_events():
                    v = self.view(client)
                    if not resynced or ev.seq > v.event_seq + 1:
                        if resynced:
                            log.info("worker %s: cache event %d after %d; resyncing", client.name, ev.seq,
                                     v.event_seq)
                        await self.resync(client)
                        resynced = True
                        if is_remote(v.store_id, self.local_store_id):
                            try:  # listed after GetStatus: holds every change numbered up to v.event_seq
                                await self.remote_stores.rebuild(v.store_id, client.list_checkpoints())
                            except WorkerUnavailable as exc:  # keep the old view; events still apply
                                log.warning("worker %s: no checkpoint listing of store %s: %s", client.name,
                                            v.store_id, exc)
                    if ev.seq <= v.event_seq:
                        continue
                    v.event_seq = ev.seq
                    self.apply(client.name, ev)
                    backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken stream: reconnect; the health watch decides routing
                log.debug("worker %s cache events: %s", client.name, exc)
                # The worker may have died: what it held in memory is unknown until the resync.
                v = self.view(client)
                v.lives.clear()
                v.ram_ids.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def apply(self, name: str, ev) -> None:
        """Applies one CacheUpdate to the view of worker `name` (a checkpoint change to
        the view of its store, when that is another host's)."""
        if ev.kind == "checkpoint":
            store_id = self.views.get(name, WorkerView()).store_id
            if ev.checkpoint is not None and is_remote(store_id, self.local_store_id):
                self.remote_stores.apply(store_id, ev.checkpoint, ev.added)
        elif ev.kind == "live":
            v = self.views.setdefault(name, WorkerView())
            v.live_id_seen = max(v.live_id_seen, ev.live_id)
            if ev.removed:
                v.lives.pop(ev.live_id, None)
            else:
                v.lives[ev.live_id] = (ev.namespace, ev.tokens)
        elif ev.kind == "ram":
            ids = self.views.setdefault(name, WorkerView()).ram_ids
            if ev.added:
                ids.add(ev.entry_id)
            else:
                ids.discard(ev.entry_id)

    def model(self, name: str | None) -> ServedModel:
        """The served model called `name`; raises NotFound."""
        if name in self.models:
            return self.models[name]
        raise NotFound(
            f"The model '{name}' does not exist. Available: {', '.join(sorted(self.models))}",
            param="model",
            code="model_not_found",
        )

    # -- routing ------------------------------------------------------------------
    def stored_hit(self, model: ServedModel, namespace: str, tokens):
        """The longest stored checkpoint of this prompt in the local store, or None."""
        if self.store is None:
            return None
        try:
            return self.store.lookup(model.identity, namespace, tokens)
        except Exception as exc:  # a broken index must not fail routing
            log.warning("store lookup failed: %s", exc)
            return None

    def reads_local_store(self, worker) -> bool:
        v = self.views.get(worker.name)
        if v is not None and v.store_id and self.local_store_id:
            return v.store_id == self.local_store_id
        return getattr(worker, "local", True)

    def candidates(self, model: ServedModel, tokens, namespace: str, hit=None) -> list[Candidate]:
        """The routing snapshot: every worker of `model` with what it could reuse of `tokens`.

        `hit`: the longest checkpoint in the router's own store (offered to workers on
        this host); a worker reading another host's store is offered that store's
        longest entry from `remote_stores` (RAM when its RAM tier holds it)."""
        limit = len(tokens) - 1
        out = []
        remote_hits: dict[str, object] = {}  # store id -> its longest entry, looked up once per call
        for w in model.workers:
            v = self.view(w)
            reuse = []
            n = min(self.live_match(w.name, tokens, namespace), limit)
            if n > 0:
                reuse.append(Reuse("live", n))
            if is_remote(v.store_id, self.local_store_id):
                if v.store_id not in remote_hits:
                    remote_hits[v.store_id] = self.remote_stores.longest(v.store_id, model.identity, namespace,
                                                                         tokens)
                cp = remote_hits[v.store_id]
                if cp is not None and min(cp.n_tokens, limit) > 0:
                    source = "ram" if cp.entry_id in v.ram_ids else "disk"
                    reuse.append(Reuse(source, min(cp.n_tokens, limit), cp.payload_bytes))
            elif hit is not None and self.reads_local_store(w) and min(hit.n_tokens, limit) > 0:
                source = "ram" if hit.entry.id in v.ram_ids else "disk"
                reuse.append(Reuse(source, min(hit.n_tokens, limit), hit.entry.payload_bytes))
            out.append(Candidate(w.name, w.healthy, w.in_flight, tuple(reuse), v.rates, v.queued_s,
                                 self.queue_limit(v), v.slots, v.prefill_backlog_s))
        return out

    def queue_limit(self, v: WorkerView) -> int:
        """Requests in flight a worker takes: the lower of the router's and its own
        --max-queue (0: no limit)."""
        return min([q for q in (self.max_queue, v.max_queue) if q], default=0)

    def live_match(self, name: str, tokens, namespace: str) -> int:
        """Tokens of `tokens` the best live state of worker `name` holds (0: none)."""
        v = self.views.get(name)
        if v is None:
            return 0
        return max((common_prefix_length(t, tokens) for ns, t in list(v.lives.values()) if ns == namespace and t),
                   default=0)

    def decide(self, model: ServedModel, tokens, namespace: str = "", exclude=frozenset(), hit=None,
               prefer: str = "") -> Decision:
        """The routing decision for a prompt (`prefer`: the worker an affinity hint names);
        raises Unavailable or Overloaded."""
        if hit is None:
            hit = self.stored_hit(model, namespace, tokens)
        decision = choose_worker(self.candidates(model, tokens, namespace, hit), len(tokens),
                                 self.affinity_max_in_flight, frozenset(exclude), prefer)
        if decision.reason == "unavailable":
            raise Unavailable("no healthy worker is available for this model; try again shortly")
        if decision.reason == "overloaded":
            raise Overloaded(f"every worker serving {model.name} has a full queue; retry shortly",
                             retry_after_s=int(decision.retry_after_s + 0.999))
        return decision

    def pick(self, model: ServedModel, tokens: tuple[int, ...], namespace: str = ""):
        """(worker client, routing decision) for a prompt; raises Unavailable or Overloaded."""
        decision = self.decide(model, tokens, namespace)
        return self.worker(model, decision.worker), decision

    @staticmethod
    def worker(model: ServedModel, name: str):
        return next(w for w in model.workers if w.name == name)

    def acquire(self, worker, decision: Decision, prompt_tokens: int, max_tokens: int) -> Lease:
        """Counts a request against `worker` from now (case C13) until the lease is released."""
        v = self.view(worker)
        reuse = Reuse(decision.source, decision.cached_tokens)
        seconds = request_seconds(prompt_tokens, reuse, min(max_tokens, DECODE_TOKENS_FOR_QUEUE), v.rates)
        prefill_s = first_token_work_s(prompt_tokens, reuse, v.rates)
        worker.in_flight += 1
        v.queued_s += seconds
        v.prefill_backlog_s += prefill_s
        return Lease(self, worker, seconds, prefill_s)

    def _release(self, lease: Lease) -> None:
        lease.first_token()
        lease.worker.in_flight -= 1
        v = self.view(lease.worker)
        v.queued_s = max(0.0, v.queued_s - lease.seconds) if lease.worker.in_flight else 0.0
        if not lease.worker.in_flight:
            v.prefill_backlog_s = 0.0

    def observe(self, worker_name: str, completion, live_tokens: tuple[int, ...], namespace: str) -> None:
        """Updates the view from a finished request: the live state it left (the
        worker's cache event, exact, may come later) and the worker's rates."""
        v = self.views.setdefault(worker_name, WorkerView())
        if completion.live_id > v.live_id_seen:  # else its events said where it stands
            v.lives[completion.live_id] = (namespace, live_tokens)
        if completion.rates is not None:
            v.rates = completion.rates

    # -- state ---------------------------------------------------------------------
    def state(self) -> dict:
        """The JSON body of GET /v1/router/state."""
        store = None
        if self.store is not None:
            try:
                entries = self.store.entries()
                store = {"id": self.local_store_id, "entries": len(entries),
                         "bytes": sum(e.payload_bytes for e in entries),
                         "tokens": sum(e.n_tokens for e in entries)}
            except Exception as exc:
                store = {"id": self.local_store_id, "error": str(exc)}
        workers = []
        for model in self.models.values():
            for w in model.workers:
                v = self.view(w)
                workers.append({
                    "name": w.name,
                    "address": w.address,
                    "model": model.name,
                    "local": getattr(w, "local", True),
                    "pid": v.pid if getattr(w, "local", True) and v.pid else None,
                    "healthy": w.healthy,
                    "load": {"in_flight": w.in_flight, "queued_seconds": round(v.queued_s, 3), "slots": v.slots,
                             "prefill_backlog_seconds": round(v.prefill_backlog_s, 3),
                             "max_queue": self.queue_limit(v)},
                    "rates": {"prefill_tokens_per_second": round(v.rates.prefill_tps, 1),
                              "disk_load_bytes_per_second": round(v.rates.disk_bps),
                              "ram_load_bytes_per_second": round(v.rates.ram_bps),
                              "decode_tokens_per_second": round(v.rates.decode_tps, 1)},
                    "cache": {"live_states": [{"tokens": len(t), "namespace": ns} for ns, t in v.lives.values()],
                              "live_tokens": sum(len(t) for _, t in v.lives.values()),
                              "ram_entries": len(v.ram_ids), "store_id": v.store_id,
                              "event_seq": v.event_seq, "resyncs": v.resyncs},
                })
        return {"time": time.time(), "models": sorted(self.models), "workers": workers, "store": store}

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            await c.close()
