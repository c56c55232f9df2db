"""What the router knows of its workers: the models served, a view of each
worker's caches and speeds, and the routing snapshot built from them.

A worker batches requests and keeps several live states (one per batch slot),
each with an id. Its view (`WorkerView`) is kept current three ways: each
request's completion (the live state it left, the worker's rates), the worker's
cache event stream (a live state held or dropped, the RAM tier gained or dropped
an entry, a checkpoint stored or removed; numbered, and a gap triggers a resync
from GetStatus), and GetStatus when a stream (re)starts. A router that restarts
rebuilds it from GetStatus and the store's LMDB index; another host's store,
which it cannot open, from that host's workers' ListCheckpoints and checkpoint
events (`router.remote_stores`).

`Cluster.snapshot` turns all of it, plus the load the router sent each worker
(`router.leases`), into the `Candidate`s the pure `router.routing.choose_worker`
ranks. Nothing here speaks protobuf: the workers are `router.worker_client`
clients.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

from kvrouter.cachestore.costs import CUT_ANY, Rates, Reuse, ReuseRules, lookup_span, reusable_tokens
from kvrouter.cachestore.keys import common_prefix_length
from kvrouter.router.errors import NotFound
from kvrouter.router.leases import Leases
from kvrouter.router.prompting import ModelTokenizer
from kvrouter.router.remote_stores import RemoteStores, is_remote
from kvrouter.router.routing import Candidate
from kvrouter.router.worker_client import CacheUpdate, Completion, GrpcWorkerClient, WorkerStatus, WorkerUnavailable

log = logging.getLogger("kvrouter.router.cluster")

EVENTS_BACKOFF_S = (0.5, 1.0)  # first and longest wait before re-subscribing to a broken event stream
EVENTS_BUG_BACKOFF_S = 30.0  # the wait after an unexpected error (a bug): logged with its traceback each time


@dataclass
class ServedModel:
    """One model: its name, identity (for store lookups), context length in tokens,
    tokenizer, the clients of the workers serving it, the mlx-lm tool parser for its
    chat template ("" none; `router.views.tools.tool_syntax`), and its reuse rules (how
    far back its workers can cut a state: `ModelInfo.reuse`)."""

    name: str
    identity: str
    context_length: int
    tokenizer: ModelTokenizer
    workers: list = field(default_factory=list)
    rules: ReuseRules = CUT_ANY
    tool_parser: str = ""


@dataclass
class WorkerView:
    """What the router knows of one worker's caches and speeds.

    store_id: "host:directory" of the store it reads ("" unknown). ram_ids: store
    entry ids in its RAM tier; ram_bytes: their size. lives: its live states,
    live_id -> (namespace, tokens). event_seq: last cache event applied. pid: its
    process id. max_queue: requests it accepts (0: no limit). slots / prompt_slots:
    sequences it decodes / prefills together. resyncs: times the view was rebuilt
    from GetStatus. stalled: it holds requests and makes no progress (`router.stalls`);
    stall_event: set while it is stalled (requests waiting on it for a first token
    move elsewhere).
    """

    rates: Rates = field(default_factory=Rates)
    store_id: str = ""
    ram_ids: set[str] = field(default_factory=set)
    ram_bytes: int = 0
    event_seq: int = 0
    pid: int = 0
    max_queue: int = 0
    slots: int = 1
    prompt_slots: int = 1
    lives: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    in_batch: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # Highest live id its events (or GetStatus) reported: the worker numbers live states in
    # order and publishes each before the Final naming it, so a completion naming an id
    # at or below this one is known to the event stream already (and may be gone).
    live_id_seen: int = 0
    resyncs: int = 0
    stalled: bool = False
    stall_event: asyncio.Event = field(default_factory=asyncio.Event)


class Cluster:
    """The workers and what is known of them; `connect()` fills it.

    clients: worker clients (`router.worker_client.WorkerClient`). store: the store
    index this host's workers share (None: no disk reuse predicted). local_store_id:
    its "host:directory" (workers reporting another id read another host's store,
    which this router cannot open: `remote_stores` holds what their events and
    listings say it contains). max_queue: requests in flight per worker past which it
    takes no more (0: no limit; a worker's own --max-queue applies too). chat_template:
    a template that replaces every model's own (--chat-template), or None.
    """

    def __init__(self, clients: list, store=None, *, local_store_id: str = "", max_queue: int = 0,
                 chat_template: str | None = None):
        self.clients = clients
        self.store = store
        self.chat_template = chat_template
        self.local_store_id = local_store_id
        self.max_queue = max_queue
        self.models: dict[str, ServedModel] = {}
        self.views: dict[str, WorkerView] = {}
        self.remote_stores = RemoteStores()
        # Called with each checkpoint a worker announces as stored (a remote_stores.Checkpoint).
        self.checkpoint_listeners: list = []
        self._tasks: list[asyncio.Task] = []

    @classmethod
    def from_addresses(cls, addresses, store=None, *, remote=(), token: str | None = None,
                       tls_ca: bytes | None = None, **kw) -> "Cluster":
        """Local workers "w0".. at `addresses`, remote ones "r0".. at `remote`."""
        clients = [GrpcWorkerClient(f"w{i}", a, local=True) for i, a in enumerate(addresses)]
        clients += [GrpcWorkerClient(f"r{i}", a, local=False, token=token, tls_ca=tls_ca)
                    for i, a in enumerate(remote)]
        return cls(clients, store, **kw)

    def view(self, name: str) -> WorkerView:
        """The view of worker `name` (empty until it is known)."""
        v = self.views.get(name)
        if v is None:
            v = self.views[name] = WorkerView()
        return v

    def serving(self, worker) -> bool:
        """Whether requests may go to `worker`: its health check says SERVING and it is
        not stalled."""
        return worker.healthy and not self.view(worker.name).stalled

    def set_stalled(self, name: str, stalled: bool) -> None:
        """Marks worker `name` stalled (out of routing; its stall_event set) or moving."""
        v = self.view(name)
        if stalled == v.stalled:
            return
        v.stalled = stalled
        if stalled:
            v.stall_event.set()
        else:
            v.stall_event = asyncio.Event()

    # -- keeping it current ------------------------------------------------------------
    async def connect(self, timeout_s: float) -> None:
        """Waits for every worker, reads its model info and status, starts health
        watches and cache event streams. Raises WorkerUnavailable when a worker is
        not ready in time."""
        await asyncio.gather(*(c.wait_ready(timeout_s) for c in self.clients))
        for client in self.clients:
            info = await client.model_info(self.chat_template)
            if self.chat_template is not None:  # prompts are rendered with the router's template
                info = replace(info, chat_template=self.chat_template)
            model = self.models.get(info.model_name)
            if model is None:
                tokenizer = await asyncio.to_thread(ModelTokenizer, info)
                model = ServedModel(info.model_name, info.identity, info.context_length, tokenizer,
                                    tool_parser=info.tool_parser, rules=info.reuse)
                self.models[info.model_name] = model
            model.workers.append(client)
            await self.resync(client)
            log.info("worker %s at %s serves %s", client.name, client.address, info.model_name)
        self._tasks = [asyncio.create_task(c.watch_health()) for c in self.clients]
        self._tasks += [asyncio.create_task(self.follow_events(c)) for c in self.clients]

    async def resync(self, client) -> None:
        """Rebuilds the view of `client` from its GetStatus (keeps the old one, with a
        warning, when the worker does not answer)."""
        try:
            st = await client.status(live_states=True)
        except WorkerUnavailable as exc:
            log.warning("worker %s: no status for a resync: %s", client.name, exc)
            return
        self._apply_status(client.name, st)

    def _apply_status(self, name: str, st: WorkerStatus) -> None:
        v = self.view(name)
        seen_before = v.live_id_seen if v.pid == st.pid else 0  # ids restart with the worker process
        v.rates, v.store_id, v.event_seq, v.pid = st.rates, st.store_id, st.event_seq, st.pid
        v.ram_ids, v.ram_bytes = set(st.ram_entry_ids), st.ram_bytes
        v.max_queue, v.slots, v.prompt_slots = st.max_queue, st.slots, st.prompt_slots
        v.resyncs += 1
        v.lives = {s.live_id: (s.namespace, s.tokens) for s in st.live_states}
        # Within one process, a live state added and dropped before this GetStatus is
        # not in it, but its id was seen.
        v.live_id_seen = max(seen_before, max(v.lives, default=0))

    async def follow_events(self, client) -> None:
        """Applies `client`'s cache events forever; resyncs on a gap or a new stream,
        and then rebuilds the view of its store when that is another host's. Events
        numbered at or below the resync's `event_seq` are in its picture already.

        A stream that breaks (the worker restarts, or is gone) is logged once per
        outage, as a warning, and its end as info; an unexpected error is logged with
        its traceback and retried after EVENTS_BUG_BACKOFF_S."""
        backoff = EVENTS_BACKOFF_S[0]
        broken = False  # an outage was logged and no event has arrived since
        while True:
            try:
                resynced = False
                async for ev in client.cache_events():
                    v = self.view(client.name)
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
                    if broken:
                        log.info("worker %s: cache events flow again", client.name)
                        broken = False
                    if ev.seq <= v.event_seq:
                        continue
                    v.event_seq = ev.seq
                    self.apply(client.name, ev)
                    backoff = EVENTS_BACKOFF_S[0]
            except asyncio.CancelledError:
                raise
            except WorkerUnavailable as exc:  # a broken stream: resubscribe; the health watch decides routing
                (log.debug if broken else log.warning)("worker %s: cache event stream broke (%s); resubscribing",
                                                        client.name, exc)
                broken = True
            except Exception:  # a bug: never hidden, never a busy loop
                log.exception("worker %s: cache events failed unexpectedly; resubscribing in %.0f s", client.name,
                              EVENTS_BUG_BACKOFF_S)
                backoff = EVENTS_BUG_BACKOFF_S
            # The worker may have died: what it held in memory is unknown until the resync.
            v = self.view(client.name)
            v.lives.clear()
            v.ram_ids.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max(EVENTS_BACKOFF_S[1], backoff))

    def apply(self, name: str, ev: CacheUpdate) -> None:
        """Applies one cache event to the view of worker `name` (a checkpoint change to
        the view of its store, when that is another host's)."""
        v = self.view(name)
        if ev.kind == "checkpoint":
            if ev.checkpoint is not None and is_remote(v.store_id, self.local_store_id):
                self.remote_stores.apply(v.store_id, ev.checkpoint, ev.added)
            if ev.added and ev.checkpoint is not None:
                for listener in self.checkpoint_listeners:
                    listener(ev.checkpoint)
            if not ev.added:
                log.debug("worker %s: checkpoint %s removed from store %s (%s)", name, ev.entry_id, v.store_id,
                          ev.reason or "no reason given")
        elif ev.kind == "live":
            v.live_id_seen = max(v.live_id_seen, ev.live_id)
            if ev.removed:
                v.lives.pop(ev.live_id, None)
            else:
                v.lives[ev.live_id] = (ev.namespace, ev.tokens)
        elif ev.kind == "ram":
            if ev.added:
                v.ram_ids.add(ev.entry_id)
            else:
                v.ram_ids.discard(ev.entry_id)

    def observe(self, worker_name: str, completion: Completion, live_tokens: tuple[int, ...],
                namespace: str) -> None:
        """Updates the view from a finished request: the live state it left (the
        worker's cache event, exact, may come later) and the worker's rates."""
        v = self.view(worker_name)
        if completion.live_id > v.live_id_seen:  # else its events said where it stands
            v.lives[completion.live_id] = (namespace, live_tokens)
        if completion.rates is not None:
            v.rates = completion.rates

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            await c.close()

    # -- reading it ---------------------------------------------------------------------
    def model(self, name: str | None) -> ServedModel:
        """The served model called `name`; raises NotFound."""
        if name in self.models:
            return self.models[name]
        raise NotFound(
            f"The model '{name}' does not exist. Available: {', '.join(sorted(self.models))}",
            param="model",
            code="model_not_found",
        )

    @staticmethod
    def worker(model: ServedModel, name: str):
        """The client of worker `name` among `model`'s workers."""
        return next(w for w in model.workers if w.name == name)

    def stored_hit(self, model: ServedModel, namespace: str, tokens):
        """The longest stored checkpoint of this prompt in the local store that the
        model's workers can use (`costs.lookup_span`), or None."""
        if self.store is None:
            return None
        try:
            return self.store.lookup(model.identity, namespace, tokens[: lookup_span(len(tokens), model.rules)])
        except Exception as exc:  # a broken index must not fail routing
            log.warning("store lookup failed: %s", exc)
            return None

    def reads_local_store(self, worker) -> bool:
        v = self.views.get(worker.name)
        if v is not None and v.store_id and self.local_store_id:
            return v.store_id == self.local_store_id
        return getattr(worker, "local", True)

    def queue_limit(self, v: WorkerView) -> int:
        """Requests in flight a worker takes: the lower of the router's and its own
        --max-queue (0: no limit)."""
        return min([q for q in (self.max_queue, v.max_queue) if q], default=0)

    def live_reusable(self, name: str, tokens, namespace: str, rules: ReuseRules) -> int:
        """Prompt tokens the best live state of worker `name`, or the best prompt in its
        batch (`WorkerView.in_batch`), can give `tokens` under the model's reuse rules
        (`costs.reusable_tokens`: all it holds when the prompt extends it; cut back to
        the first differing token only where the rules allow; never the last prompt
        token). 0: none."""
        v = self.views.get(name)
        if v is None:
            return 0
        states = list(v.lives.values()) + (list(v.in_batch.values()) if rules.cut_any else [])
        return max((reusable_tokens(len(t), common_prefix_length(t, tokens), len(tokens), rules)
                    for ns, t in states if ns == namespace and t), default=0)

    def snapshot(self, model: ServedModel, tokens, namespace: str, leases: Leases,
                 hit=None) -> tuple[Candidate, ...]:
        """The routing snapshot: every worker of `model` with its health, the load
        `leases` counts on it, and what it could reuse of `tokens`.

        `hit`: the longest checkpoint in the router's own store (offered to workers on
        this host); a worker reading another host's store is offered that store's
        longest entry from `remote_stores` (RAM when its RAM tier holds it)."""
        total, rules = len(tokens), model.rules
        out = []
        remote_hits: dict[str, object] = {}  # store id -> its longest entry, looked up once per call
        for w in model.workers:
            v = self.view(w.name)
            reuse = []
            n = self.live_reusable(w.name, tokens, namespace, rules)
            if n > 0:
                reuse.append(Reuse("live", n))
            if is_remote(v.store_id, self.local_store_id):
                if v.store_id not in remote_hits:
                    remote_hits[v.store_id] = self.remote_stores.longest(
                        v.store_id, model.identity, namespace, tokens[: lookup_span(total, rules)])
                cp = remote_hits[v.store_id]
                n = reusable_tokens(cp.n_tokens, cp.n_tokens, total, rules) if cp is not None else 0
                if n > 0:
                    source = "ram" if cp.entry_id in v.ram_ids else "disk"
                    reuse.append(Reuse(source, n, cp.payload_bytes))
            elif hit is not None and self.reads_local_store(w):
                n = reusable_tokens(hit.n_tokens, hit.n_tokens, total, rules)
                if n > 0:
                    source = "ram" if hit.entry.id in v.ram_ids else "disk"
                    reuse.append(Reuse(source, n, hit.entry.payload_bytes))
            load = leases.load(w.name)
            out.append(Candidate(w.name, self.serving(w), load.in_flight, tuple(reuse), v.rates, load.queued_s,
                                 self.queue_limit(v), v.slots, load.prefill_backlog_s))
        return tuple(out)
