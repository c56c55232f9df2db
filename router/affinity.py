"""Affinity hints: OpenAI's `prompt_cache_key` routed back to the worker that served it.

Codex CLI sends its session id as `prompt_cache_key`. The key says "these requests
share a prefix"; the worker that served the key last most likely still holds that
prefix live, even when the router's view of its live states lags (events in
flight) or two workers cost the same. `AffinityMap` remembers key -> worker
(bounded, least recently used dropped first) and `routing.choose_worker` prefers
that worker when its predicted time to first token is close to the best
(`routing.AFFINITY_SLACK_*`). The key is never part of a cache key or namespace:
it can only move a request between workers that may serve it anyway.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_KEYS = 10_000
"""Keys remembered (one per agent session; about 100 bytes each)."""


class AffinityMap:
    """prompt_cache_key -> name of the worker that served it last, per model and namespace.

    max_keys: keys kept; the least recently used is forgotten first.
    """

    def __init__(self, max_keys: int = MAX_KEYS):
        self.max_keys = max_keys
        self._workers: OrderedDict[tuple[str, str, str], str] = OrderedDict()

    def worker_for(self, model: str, namespace: str, key: str) -> str:
        """The worker that served `key` last, or "" (no key, or not seen)."""
        if not key:
            return ""
        return self._workers.get((model, namespace, key), "")

    def remember(self, model: str, namespace: str, key: str, worker: str) -> None:
        """Records that `worker` serves `key` now."""
        if not key or not worker:
            return
        k = (model, namespace, key)
        self._workers[k] = worker
        self._workers.move_to_end(k)
        while len(self._workers) > self.max_keys:
            self._workers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._workers)
