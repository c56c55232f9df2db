"""Worker configuration, parsed once at the edge (command line) into frozen dataclasses."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kvrouter.cachestore import StoreConfig


def default_cache_dir() -> Path:
    """The user's kvrouter cache directory: $KVROUTER_CACHE_DIR, else
    ~/Library/Caches/kvrouter on macOS, else $XDG_CACHE_HOME/kvrouter or ~/.cache/kvrouter."""
    if os.environ.get("KVROUTER_CACHE_DIR"):
        return Path(os.environ["KVROUTER_CACHE_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kvrouter"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvrouter"


# mlx_lm.server's defaults (its `--decode-concurrency`, `--prompt-concurrency`).
DEFAULT_DECODE_CONCURRENCY = 32
DEFAULT_PROMPT_CONCURRENCY = 8

DEFAULT_LONG_PREFILL_TOKENS = 4096
"""Prompts at least this long (tokens) are prefilled outside the batch by default
(`worker.long_prefill`). On an H200 the batch's array mask cost nothing measurable
at 8K and 4x at 32K; shorter prompts stay in the batch, where several prefill in
one forward pass."""

DEFAULT_PLAIN_ATTENTION_TOKENS = 512
"""On MLX's CUDA backend, query chunks of 2 to this many tokens take plain attention
operations instead of cuDNN's fused attention, which builds a graph for every new
shape (`worker.cuda_attention`); longer chunks stay fused."""


@dataclass(frozen=True)
class BatchingConfig:
    """Continuous batching: sequences decoded together (also the batch slots that
    running requests and idle live states share), prompts prefilled together,
    and the memory idle live states may hold, bytes (0: bounded by slots only;
    None: sized from the model and machine, `worker.sizing`). Defaults are
    mlx_lm.server's. long_prefill_tokens: prompts at least this long (tokens) are
    prefilled outside the batch, one at a time, by a plain per-sequence loop, then
    join it to decode (0: never; `worker.long_prefill`). plain_attention_tokens: on
    CUDA, query chunks up to this long (tokens) skip cuDNN's per-shape graphs (0: never;
    `worker.cuda_attention`)."""

    decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY
    prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY
    live_state_bytes: int | None = None
    long_prefill_tokens: int = DEFAULT_LONG_PREFILL_TOKENS
    plain_attention_tokens: int = DEFAULT_PLAIN_ATTENTION_TOKENS

    def as_args(self) -> list[str]:
        """The worker command-line flags that rebuild this config."""
        args = ["--decode-concurrency", str(self.decode_concurrency),
                "--prompt-concurrency", str(self.prompt_concurrency),
                "--long-prefill-tokens", str(self.long_prefill_tokens),
                "--plain-attention-tokens", str(self.plain_attention_tokens)]
        if self.live_state_bytes is not None:
            args += ["--live-state-mb", str(self.live_state_bytes // 2**20)]
        return args


DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0
DEFAULT_WRITER_ITEMS = 8
DEFAULT_RAM_WARM_FRACTION = 1.0
"""Share of the RAM tier a worker fills, after its start, with stored checkpoints loaded
while it is idle (`--kv-cache-warm-mb`, `Engine._plan_warmup`): after a restart the
shared blocks and the sessions' last states are RAM-tier hits instead of disk loads or
recomputes. All of it: the tier is empty after a start and its memory is budgeted
(`worker.sizing`) whether it is filled or not; new checkpoints push out the least
valuable warm-up loads (least recently used first). With half the tier, an H200 run
(issue 15) left one session's state on disk after the restart, and the worker
recomputed its 5.4K tokens."""


@dataclass(frozen=True)
class MemoryConfig:
    """A worker's memory bounds beyond batching (`worker.sizing` explains each; None:
    sized from the model's KV bytes per token, its weights and the machine's memory).

    running_kv_bytes: KV the sequences in the batch may hold together; admission
        waits past it (a burst queues instead of over-committing), bytes.
    mlx_cache_limit_bytes: MLX's buffer cache limit (`mx.set_cache_limit`), bytes.
    writer_queue_bytes / writer_max_items: the checkpoint writer's queue bounds.
    shutdown_timeout_s: time a stop gives the shutdown checkpoints, seconds.
    workers_on_host: local workers sharing the machine's memory (set by `serve`).
    """

    running_kv_bytes: int | None = None
    mlx_cache_limit_bytes: int | None = None
    writer_queue_bytes: int | None = None
    writer_max_items: int = DEFAULT_WRITER_ITEMS
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    workers_on_host: int = 1

    def __post_init__(self) -> None:
        if self.writer_max_items < 1 or self.workers_on_host < 1 or not self.shutdown_timeout_s >= 0:
            raise ValueError("writer items and workers on host must be >= 1, the shutdown timeout >= 0")

    def as_args(self) -> list[str]:
        """The worker command-line flags that rebuild this config."""
        args = ["--checkpoint-writer-items", str(self.writer_max_items),
                "--shutdown-timeout", f"{self.shutdown_timeout_s:g}",
                "--workers-on-host", str(self.workers_on_host)]
        for flag, value in (("--running-kv-mb", self.running_kv_bytes),
                            ("--mlx-cache-limit-mb", self.mlx_cache_limit_bytes),
                            ("--checkpoint-writer-mb", self.writer_queue_bytes)):
            if value is not None:
                args += [flag, str(value // 2**20)]
        return args


KV_BITS = (4, 8)  # mlx_lm.server's --kv-bits choices
KV_GROUP_SIZES = (32, 64, 128)  # group sizes mx.quantize supports


@dataclass(frozen=True)
class KvQuantization:
    """Quantized KV cache (`--kv-bits`, `--kv-group-size`, mlx_lm.server's names):
    every layer an mlx-lm `QuantizedKVCache(group_size, bits)` from token 0. Only for
    models whose layers are all plain `KVCache` (checked when the model loads).
    Raises ValueError for bits outside KV_BITS or a group size outside KV_GROUP_SIZES."""

    bits: int
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS:
            raise ValueError(f"--kv-bits must be one of {KV_BITS}, got {self.bits}")
        if self.group_size not in KV_GROUP_SIZES:
            raise ValueError(f"--kv-group-size must be one of {KV_GROUP_SIZES}, got {self.group_size}")

    def as_args(self) -> list[str]:
        """The worker command-line flags that rebuild this config."""
        return ["--kv-bits", str(self.bits), "--kv-group-size", str(self.group_size)]


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs.

    model: a GGUF path, an mlx-lm model directory, a Hugging Face repo id in the
        local cache, or None for the default model.
    listen: "HOST:PORT" of the gRPC service (port 0 picks a free port).
    store: the disk checkpoint store, or None with --no-kv-cache.
    cache_dir: where models and digests are cached.
    ram_bytes: RAM tier budget (recent checkpoints kept in memory), bytes (None: sized).
    warm_bytes: stored checkpoints loaded into the RAM tier while idle after the start,
        bytes (None: DEFAULT_RAM_WARM_FRACTION of the RAM tier; 0: none).
    prefill_chunk_tokens: prefill chunk, tokens (None: by backend, `worker.sizing`).
    memory: the other memory bounds (`MemoryConfig`).
    port_file: when set, the bound port is written there once the worker is ready.
    parent_pid: when set, the worker exits if that process goes away (no orphans).
    smg_listen: when set, "HOST:PORT" of SMG's mlx.grpc.engine.MlxEngine service
        (worker/smg_servicer.py), served beside the kvrouter one.
    kv_quant: quantized KV cache (`--kv-bits`), or None for the model's own caches.
    """

    model: str | None
    listen: str
    store: StoreConfig | None
    cache_dir: Path
    prefill_chunk_tokens: int | None = None
    batching: BatchingConfig = BatchingConfig()
    ram_bytes: int | None = None
    warm_bytes: int | None = None
    port_file: Path | None = None
    parent_pid: int | None = None
    worker_name: str = "w0"
    max_queue: int = 0
    worker_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    smg_listen: str | None = None
    memory: MemoryConfig = MemoryConfig()
    kv_quant: KvQuantization | None = None
