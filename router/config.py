"""Router and `kvrouter serve` configuration: frozen dataclasses built from the
command line at the edge (`router.cli`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cachestore import StoreConfig


@dataclass(frozen=True)
class RouterConfig:
    """The HTTP gateway.

    host, port: where it listens. worker_addresses: gRPC "HOST:PORT" of each worker.
    store: the checkpoint store the local workers share (the router reads its
        index to predict reuse), or None with --no-kv-cache.
    max_body_bytes: larger request bodies get 413.
    worker_ready_timeout_s: how long to wait for workers at start.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    worker_addresses: tuple[str, ...] = ()
    store: StoreConfig | None = None
    max_body_bytes: int = 8 * 2**20
    worker_ready_timeout_s: float = 600.0
    default_max_tokens: int = 512


@dataclass(frozen=True)
class ServeConfig:
    """`kvrouter serve`: the router plus `workers` local worker processes.

    model: model spec (None = the default model). cache_dir: the user's
    kvrouter cache directory (models, and the default store location).
    """

    router: RouterConfig
    model: str | None
    workers: int
    cache_dir: Path
    prefill_chunk_tokens: int = 256
    log_dir: Path | None = None
