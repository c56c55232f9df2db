"""The workers behind the router, grouped by the model they serve, with each
model's tokenizer, and the shared store index used to predict reuse."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from router.errors import NotFound, Unavailable
from router.prompting import ModelTokenizer
from router.routing import Candidate, choose_worker
from router.worker_client import GrpcWorkerClient

log = logging.getLogger("kvrouter.router.pool")


@dataclass
class ServedModel:
    """One model: its name, identity (for store lookups), tokenizer and workers."""

    name: str
    identity: str
    context_length: int
    tokenizer: ModelTokenizer
    workers: list = field(default_factory=list)


class WorkerPool:
    """All workers; built by `connect()` once they are ready."""

    def __init__(self, clients: list, store=None):
        self.clients = clients
        self.store = store
        self.models: dict[str, ServedModel] = {}
        self._tasks: list[asyncio.Task] = []
        self.live_tokens: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_addresses(cls, addresses, store=None) -> "WorkerPool":
        return cls([GrpcWorkerClient(f"w{i}", a) for i, a in enumerate(addresses)], store)

    async def connect(self, timeout_s: float) -> None:
        """Waits for every worker, reads its model info, starts health watches.

        Raises WorkerUnavailable when a worker is not ready in time.
        """
        await asyncio.gather(*(c.wait_ready(timeout_s) for c in self.clients))
        for client in self.clients:
            info = await client.model_info()
            model = self.models.get(info.model_name)
            if model is None:
                tokenizer = await asyncio.to_thread(ModelTokenizer, info)
                model = ServedModel(info.model_name, info.identity, info.context_length, tokenizer)
                self.models[info.model_name] = model
            model.workers.append(client)
            log.info("worker %s at %s serves %s", client.name, client.address, info.model_name)
        self._tasks = [asyncio.create_task(c.watch_health()) for c in self.clients]

    def model(self, name: str | None) -> ServedModel:
        """The served model called `name`; raises NotFound."""
        if name in self.models:
            return self.models[name]
        raise NotFound(
            f"The model '{name}' does not exist. Available: {', '.join(sorted(self.models))}",
            param="model",
            code="model_not_found",
        )

    def pick(self, model: ServedModel, tokens: tuple[int, ...]):
        """(worker client, routing decision) for a prompt; raises Unavailable."""
        cands = []
        for w in model.workers:
            live = self.live_tokens.get(w.name, ())
            match = 0
            for a, b in zip(live, tokens):
                if a != b:
                    break
                match += 1
            cands.append(Candidate(w.name, w.healthy, w.in_flight, match))
        decision = choose_worker(cands)
        if decision is None:
            raise Unavailable("no healthy worker is available for this model; try again shortly")
        worker = next(w for w in model.workers if w.name == decision.worker)
        return worker, decision

    def stored_prefix(self, model: ServedModel, namespace: str, tokens) -> int:
        """Tokens of the longest stored checkpoint for this prompt (0 without a store)."""
        if self.store is None:
            return 0
        hit = self.store.lookup(model.identity, namespace, tokens)
        return hit.n_tokens if hit else 0

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            await c.close()
