"""One sizing function for a worker's memory: what its budgets default to, from the
model's KV bytes per token, its weights and the machine's memory (issues 13 and 15).

A worker's peak memory is, by construction of these budgets,

    peak = weights
         + running_kv        (KV of the sequences in the batch: admission's budget)
         + live_states       (idle live states kept for the next turn)
         + ram_tier          (recent checkpoints kept in memory)
         + writer_queue      (snapshots waiting for the checkpoint writer)
         + prefetch          (checkpoint reads started for queued requests: `worker.prefetch`)
         + working_set       (activations of one batch step: prompt_concurrency x
                              prefill_chunk_tokens tokens through the model)
         + mlx_cache_limit   (freed buffers MLX keeps for reuse; beyond it they go back)

Each term is bounded by its flag; every flag left unset comes from `plan_memory`: the
worker's share of the machine (MEMORY_FRACTION of it, divided among the workers on the
host), less the weights, the working set and the prefetch buffers (PREFETCH_FRACTION of
what is left, at most PREFETCH_MAX_BYTES), split among the KV terms in KV_SPLIT.
`kvrouter bench --memory` prints the formula's figure next to measured RSS.

`plan_memory` is pure (no MLX): `measure_model` and `machine_memory_bytes` read the
inputs from a loaded model and the machine.

The store's disk budget (`--kv-cache-disk-mb`) comes from `plan_disk_budget`, also pure:
DISK_CHECKPOINTS long checkpoints of this model, at least DISK_BUDGET_FLOOR_BYTES, at
most DISK_FRACTION of the disk open to the store; logged on the same line as the memory
plan and reported to the router in `WorkerStatus.store_budget_bytes`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrouter.cachestore import StoreConfig

MIB = 2**20

MEMORY_FRACTION = 0.6
"""Share of the machine's memory kvrouter's workers size themselves to, all together
(the rest: the OS, the router, other programs; on a Mac the GPU's wired limit is lower
than the whole memory)."""

KV_SPLIT = {"running_kv": 0.45, "live_states": 0.2, "ram_tier": 0.2, "writer_queue": 0.1, "mlx_cache": 0.05}
"""How the KV memory of a worker is split by default (fractions of what is left after
weights and working set)."""

PREFETCH_FRACTION = 0.05
PREFETCH_MAX_BYTES = 2 << 30
"""Payload bytes read ahead for queued requests: at most two reads (`worker.prefetch`),
PREFETCH_FRACTION of the KV memory, never more than PREFETCH_MAX_BYTES (2 GiB: two
8K-token checkpoints of an 8B model)."""

MIN_BUDGET_BYTES = 64 * MIB  # no default budget below this (a tiny machine still serves)
MLX_CACHE_RANGE = (128 * MIB, 2048 * MIB)  # the buffer cache limit's default stays within this
WORKING_SET_TOKEN_FACTOR = 8
"""Working set per token of a batch step, in multiples of the KV bytes per token: the
hidden states, MLP activations and attention scores of one chunk (a rough, generous
figure; measured RSS in `kvrouter bench --memory` checks it)."""

PREFILL_CHUNK_TOKENS = {"cpu": 256, "gpu": 2048}
"""Default prefill chunk: small on the CPU (attention scores grow with it; measured 250
tok/s at 512), large on a GPU (mlx_lm.server uses 2048)."""


@dataclass(frozen=True)
class MemoryPlan:
    """A worker's memory budgets, bytes (prefill_chunk_tokens in tokens).

    running_kv_bytes: KV the sequences in the batch may hold together (admission waits
    past it). live_state_bytes / ram_tier_bytes / writer_queue_bytes: the other KV
    holders. prefetch_bytes: checkpoint bytes read ahead for queued requests
    (`worker.prefetch`). mlx_cache_limit_bytes: `mx.set_cache_limit`. working_set_bytes: the
    estimate of one batch step's activations. weights_bytes, kv_bytes_per_token,
    share_bytes (this worker's share of the machine): the inputs, kept for the log.
    disk: the store's disk budget (`plan_disk_budget`; None: no store, or not sized here);
    store_config: the `cachestore.StoreConfig` with that budget set (None: no store).
    """

    share_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    working_set_bytes: int
    running_kv_bytes: int
    live_state_bytes: int
    ram_tier_bytes: int
    writer_queue_bytes: int
    mlx_cache_limit_bytes: int
    prefill_chunk_tokens: int
    prefetch_bytes: int = 0
    disk: DiskPlan | None = None
    store_config: StoreConfig | None = None

    @property
    def peak_bytes(self) -> int:
        """The formula in the module docstring: the most this worker should hold."""
        return (self.weights_bytes + self.running_kv_bytes + self.live_state_bytes + self.ram_tier_bytes
                + self.writer_queue_bytes + self.prefetch_bytes + self.working_set_bytes
                + self.mlx_cache_limit_bytes)

    def describe(self) -> str:
        """One log line: every budget in MiB."""
        m = lambda b: f"{b / MIB:.0f}"  # noqa: E731
        return (f"memory plan (MiB): share {m(self.share_bytes)} = weights {m(self.weights_bytes)} + running KV "
                f"{m(self.running_kv_bytes)} + live states {m(self.live_state_bytes)} + RAM tier "
                f"{m(self.ram_tier_bytes)} + writer queue {m(self.writer_queue_bytes)} + prefetch "
                f"{m(self.prefetch_bytes)} + working set "
                f"{m(self.working_set_bytes)} + MLX cache {m(self.mlx_cache_limit_bytes)}; peak "
                f"{m(self.peak_bytes)}; KV {self.kv_bytes_per_token / 1024:.1f} KiB/token; prefill chunk "
                f"{self.prefill_chunk_tokens} tokens" + (f"; {self.disk.describe()}" if self.disk else ""))


def plan_memory(*, kv_bytes_per_token: int, weights_bytes: int, machine_bytes: int, workers_on_host: int = 1,
                backend: str = "cpu", prompt_concurrency: int = 8, prefill_chunk_tokens: int | None = None,
                running_kv_bytes: int | None = None, live_state_bytes: int | None = None,
                ram_tier_bytes: int | None = None, writer_queue_bytes: int | None = None,
                mlx_cache_limit_bytes: int | None = None, prefetch_bytes: int | None = None) -> MemoryPlan:
    """The budgets for one worker. Keyword arguments left None get their default from
    the machine (see the module docstring); given ones are kept as they are.

    kv_bytes_per_token: KV state of one token over all layers, bytes (> 0).
    weights_bytes: the model's parameters in memory, bytes. machine_bytes: memory the
    KV lives in (RAM; a GPU's own memory on CUDA), bytes. workers_on_host: workers
    sharing it. backend: "cpu" or "gpu". Raises ValueError on a non-positive input.
    """
    if kv_bytes_per_token <= 0 or machine_bytes <= 0 or workers_on_host < 1:
        raise ValueError("kv_bytes_per_token and machine_bytes must be positive, workers_on_host >= 1")
    chunk = prefill_chunk_tokens or PREFILL_CHUNK_TOKENS.get(backend, 256)
    share = int(machine_bytes * MEMORY_FRACTION / workers_on_host)
    working_set = max(MIN_BUDGET_BYTES, prompt_concurrency * chunk * kv_bytes_per_token * WORKING_SET_TOKEN_FACTOR)
    kv = max(0, share - weights_bytes - working_set)
    if prefetch_bytes is None:
        prefetch_bytes = min(PREFETCH_MAX_BYTES, int(kv * PREFETCH_FRACTION))
    kv = max(0, kv - prefetch_bytes)

    def part(name: str, given: int | None) -> int:
        return given if given is not None else max(MIN_BUDGET_BYTES, int(kv * KV_SPLIT[name]))

    cache = mlx_cache_limit_bytes
    if cache is None:
        cache = min(max(int(kv * KV_SPLIT["mlx_cache"]), MLX_CACHE_RANGE[0]), MLX_CACHE_RANGE[1])
    return MemoryPlan(
        share_bytes=share, weights_bytes=weights_bytes, kv_bytes_per_token=kv_bytes_per_token,
        working_set_bytes=working_set, running_kv_bytes=part("running_kv", running_kv_bytes),
        live_state_bytes=part("live_states", live_state_bytes), ram_tier_bytes=part("ram_tier", ram_tier_bytes),
        writer_queue_bytes=part("writer_queue", writer_queue_bytes), mlx_cache_limit_bytes=cache,
        prefill_chunk_tokens=chunk, prefetch_bytes=prefetch_bytes,
    )


def return_free_memory() -> None:
    """Hands memory nothing uses back to the system: MLX's buffer cache, then (Linux,
    glibc) the C heap's free pages (`malloc_trim`; glibc keeps freed blocks otherwise, so
    a worker's RSS stayed at its burst peak while idle). Call it when the engine idles."""
    import ctypes
    import sys

    import mlx.core as mx

    mx.clear_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def sequence_bytes(tokens: int, kv_bytes_per_token: int, step: int = 256) -> int:
    """KV a sequence of `tokens` holds in mlx-lm's batch cache, which grows in `step`-token
    blocks, bytes."""
    return -(-max(1, tokens) // step) * step * kv_bytes_per_token


def batch_bytes(lengths: list[int], kv_bytes_per_token: int) -> int:
    """KV of a batch whose sequences will reach `lengths` tokens: mlx-lm's batch cache
    pads every sequence to the longest (left padding), so it is len x the longest."""
    if not lengths:
        return 0
    return len(lengths) * sequence_bytes(max(lengths), kv_bytes_per_token)


def machine_memory_bytes() -> tuple[int, str]:
    """(memory the KV lives in, bytes; backend "cpu" or "gpu"): MLX's device memory on a
    GPU (Metal: the unified memory; CUDA: the GPU's), else physical RAM."""
    import mlx.core as mx

    backend = "gpu" if mx.default_device() == mx.gpu else "cpu"
    if backend == "gpu":
        try:
            size = int(mx.device_info().get("memory_size", 0))
        except Exception:  # older MLX or a backend without it
            size = 0
        if size:
            return size, backend
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), backend


def measure_model(model) -> tuple[int, int]:
    """(KV bytes per token, weights bytes) of a loaded mlx-lm model: the KV by running
    one token through a fresh prompt cache and summing what it holds."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    cache = make_prompt_cache(model)
    model(mx.array([[0]], dtype=mx.int32), cache=cache)
    per_token = 0
    for c in cache:
        state = c.state if isinstance(c.state, (list, tuple)) else [c.state]
        for s in state:
            # (batch, heads, tokens, dim) grows per token; a fixed-size state (a recurrent
            # layer's, a full sliding window) does not and is left out of the per-token figure
            if isinstance(s, mx.array) and s.ndim == 4:
                per_token += s.nbytes // max(1, s.shape[2])
    del cache
    mx.clear_cache()
    return max(1, per_token), weights


# -- the store's disk budget ---------------------------------------------------------------

DISK_CHECKPOINTS = 10
"""Long checkpoints the default disk budget holds. On the H200 bench (issue 15: 16 agent
sessions on a ~5.2K-token shared block, 8B shape) the hand-tuned `--kv-cache-disk-mb 40000`
is about ten 30K-token checkpoints of that model (3.7 GiB each at 128 KiB/token); the
fixed 4096 MiB default held one and evicted the rest."""

DISK_FRACTION = 0.5
"""Share of the disk space open to the store (free bytes plus the store's own payloads)
the default budget may take: the store is a cache, and models, logs and other programs
keep the other half."""

DISK_BUDGET_FLOOR_BYTES = 4096 * MIB
"""The default budget is never below this while the disk allows it: the fixed default it
replaces (enough for a small model: the 135M default model's 8K-token context is 360 MiB)."""

DISK_BUDGET_STEP_BYTES = 256 * MIB
"""The default budget is a multiple of this (at least one step), so that workers on one
host that see slightly different free space (another one's temp file) agree on it."""


@dataclass(frozen=True)
class DiskPlan:
    """A store's disk budget and how it was chosen, bytes (checkpoint_tokens in tokens).

    budget_bytes: the budget (`StoreConfig.disk_budget_bytes`). given: True when
    `--kv-cache-disk-mb` set it (the other fields are then the inputs, unused).
    checkpoint_tokens / checkpoint_bytes: one long checkpoint, the unit of the default.
    room_bytes: free disk plus the store's own payloads; cap_bytes: DISK_FRACTION of it.
    """

    budget_bytes: int
    given: bool
    checkpoint_tokens: int
    checkpoint_bytes: int
    room_bytes: int
    cap_bytes: int

    def describe(self) -> str:
        """One log line: the budget in MiB and where it came from."""
        if self.given:
            return f"disk budget {self.budget_bytes / MIB:.0f} MiB (--kv-cache-disk-mb)"
        return (f"disk budget {self.budget_bytes / MIB:.0f} MiB = min(max({DISK_CHECKPOINTS} x "
                f"{self.checkpoint_tokens}-token checkpoints of {self.checkpoint_bytes / MIB:.0f} MiB, floor "
                f"{DISK_BUDGET_FLOOR_BYTES / MIB:.0f}), {DISK_FRACTION:g} x {self.room_bytes / 2**30:.1f} GiB "
                f"free-or-stored on the store's disk)")


def plan_disk_budget(*, kv_bytes_per_token: int, context_length: int, cold_max_tokens: int, free_bytes: int,
                     stored_bytes: int = 0, given_bytes: int | None = None) -> DiskPlan:
    """The store's disk budget: `given_bytes` (`--kv-cache-disk-mb`) when set, else

        min(max(DISK_CHECKPOINTS x one long checkpoint, DISK_BUDGET_FLOOR_BYTES),
            DISK_FRACTION x (free_bytes + stored_bytes))

    rounded down to DISK_BUDGET_STEP_BYTES, at least one step. One long checkpoint is
    min(context_length, cold_max_tokens) tokens x kv_bytes_per_token: the longest cold
    anchor the store keeps (`--kv-cache-cold-max-tokens`), or the whole context when that
    is shorter. `stored_bytes` (the store's own payloads) counts as room, so a restarted
    worker sizes the same budget as the first one did: workers of one model on one host
    (same inputs) agree.

    kv_bytes_per_token: bytes (> 0); context_length, cold_max_tokens: tokens (> 0);
    free_bytes, stored_bytes: bytes (>= 0). Raises ValueError on a value out of range.
    """
    if kv_bytes_per_token <= 0 or context_length <= 0 or cold_max_tokens <= 0:
        raise ValueError("kv_bytes_per_token, context_length and cold_max_tokens must be positive")
    if free_bytes < 0 or stored_bytes < 0:
        raise ValueError("free_bytes and stored_bytes must be >= 0")
    tokens = min(context_length, cold_max_tokens)
    checkpoint = tokens * kv_bytes_per_token
    room = free_bytes + stored_bytes
    cap = int(room * DISK_FRACTION)
    if given_bytes is not None:
        if given_bytes < 1:
            raise ValueError(f"given_bytes must be >= 1, got {given_bytes}")
        return DiskPlan(given_bytes, True, tokens, checkpoint, room, cap)
    want = min(max(DISK_CHECKPOINTS * checkpoint, DISK_BUDGET_FLOOR_BYTES), cap)
    budget = max(DISK_BUDGET_STEP_BYTES, want // DISK_BUDGET_STEP_BYTES * DISK_BUDGET_STEP_BYTES)
    return DiskPlan(budget, False, tokens, checkpoint, room, cap)
