"""Router and `kvrouter serve` configuration: frozen dataclasses built from the
command line at the edge (`router.cli`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvrouter.cachestore import StoreConfig
from kvrouter.router.auth import ApiKeys
from kvrouter.worker.config import BatchingConfig, MemoryConfig


DEFAULT_STALL_TIMEOUT_S = 60.0
"""--worker-stall-timeout: a worker holding requests without progress this long leaves
routing (`router.stalls`). Longer than one prefill chunk takes on a slow machine (256
tokens of a quantized model on a CPU without BLAS: about 25 s)."""


@dataclass(frozen=True)
class RouterConfig:
    """The HTTP gateway.

    host, port: where it listens. worker_addresses: gRPC "HOST:PORT" of each worker.
    store: the checkpoint store the local workers share (the router reads its
        index to predict reuse), or None with --no-kv-cache.
    max_body_bytes: larger request bodies get 413.
    worker_ready_timeout_s: how long to wait for workers at start.
    default_max_tokens: max_tokens of a request that gives none.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    worker_addresses: tuple[str, ...] = ()
    store: StoreConfig | None = None
    max_body_bytes: int = 8 * 2**20
    worker_ready_timeout_s: float = 600.0
    default_max_tokens: int = 512
    # The client API (router.views, router.grpc_api):
    api_keys: ApiKeys | None = None  # None: no auth
    max_tokens_limit: int | None = None  # larger max_tokens requests are capped to this
    grpc_port: int | None = None  # public gRPC service (kvrouter.router.v1.Router); 0 picks a free port
    grpc_host: str = "127.0.0.1"
    chat_template: str | None = None  # replaces every model's chat template (--chat-template FILE)
    # Agent clients (router.client_hints, router.prompting):
    keep_billing_header: bool = False  # keep Claude Code's x-anthropic-billing-header line in the prompt
    tools_before_system: bool = False  # render tools before the system text where the template can
    stream_keepalive_s: float = 10.0  # SSE keep-alive interval while a stream has nothing to send, seconds
    stream_idle_delta_s: float = 60.0  # an Anthropic stream idle this long gets an empty text delta, seconds
    # Routing (router.cluster, router.routing, router.dispatch):
    remote_workers: tuple[str, ...] = ()  # gRPC "HOST:PORT" of workers on other hosts (--remote-worker)
    worker_token: str | None = None  # sent to remote workers (their --worker-token)
    worker_tls_ca: bytes | None = None  # PEM roots to verify TLS remote workers (None: plaintext)
    max_queue: int = 32  # requests in flight per worker; past it 429/529 with Retry-After (0: no limit)
    affinity_max_in_flight: int = 4  # a worker this busy gets no cache-motivated traffic
    coalesce: bool = True  # requests sharing a new prefix wait for the one prefilling it
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # no progress this long with requests: out of routing
    admin_keys: frozenset[str] = frozenset()  # key names that see every tenant in /v1/router/state
    body_read_timeout_s: float = 30.0  # a request body not received within this gets 408


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
    prefill_chunk_tokens: int | None = None
    batching: BatchingConfig = BatchingConfig()
    memory: MemoryConfig = MemoryConfig()
    models: tuple[str | None, ...] = ()  # every --model (workers each); empty: (model,)
