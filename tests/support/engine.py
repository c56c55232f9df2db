"""An engine in process (no server) and one request on it, for tests/model/."""

from __future__ import annotations

import queue

from tests.support.server import model_cache_dir

MODEL_TIMEOUT_S = 300


class Call:
    """One request: its events land in a queue read by `next_event` / `wait`.
    tokens: generated token ids so far; first_reuse: the reuse the first token reported."""

    def __init__(self, engine, prompt, max_tokens=4, temperature=0.0, seed=None, namespace="", hint_tokens=()):
        from kvrouter.worker.events import GenerationRequest, SamplingConfig

        self.events: queue.Queue = queue.Queue()
        self.tokens: list[int] = []
        self.final = None
        self.first_reuse = None
        req = GenerationRequest("t", tuple(prompt), SamplingConfig(temperature, 1.0, max_tokens, seed),
                                namespace=namespace, hint_tokens=tuple(hint_tokens))
        self.job = engine.submit(req, self.events.put)

    def next_event(self):
        from kvrouter.worker.events import TokenEvent

        ev = self.events.get(timeout=MODEL_TIMEOUT_S)
        if isinstance(ev, TokenEvent):
            self.tokens += ev.token_ids
            if ev.reuse is not None:
                self.first_reuse = ev.reuse
        else:
            self.final = ev
        return ev

    def wait(self):
        while self.final is None:
            self.next_event()
        return self.final


def make_engine(tmp_path=None, decode_concurrency=1, prompt_concurrency=1, model=None, store_kw=None, **kw):
    """A started engine for `model` (None: the default model), with a store in
    `tmp_path` (None: no store) using small policy values (`store_kw` overrides)."""
    from kvrouter.worker.config import BatchingConfig, WorkerConfig
    from kvrouter.worker.server import build_engine

    store = None
    if tmp_path is not None:
        from kvrouter.cachestore import StoreConfig

        store = StoreConfig(tmp_path, **{"min_tokens": 256, "boundary_align_tokens": 256,
                                         "boundary_trim_tokens": 32, **(store_kw or {})})
    config = WorkerConfig(model=None if model is None else str(model), listen="127.0.0.1:0", store=store,
                          cache_dir=model_cache_dir(), batching=BatchingConfig(decode_concurrency, prompt_concurrency),
                          **kw)
    engine, _ = build_engine(config)
    engine.start()
    return engine
