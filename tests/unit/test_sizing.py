"""The one sizing function (`worker.sizing.plan_memory`): budgets from the model's KV bytes
per token, its weights and the machine's memory; given flags kept; the peak formula."""

from __future__ import annotations

import dataclasses

import pytest

from kvrouter.worker.sizing import (
    KV_SPLIT,
    MEMORY_FRACTION,
    MIN_BUDGET_BYTES,
    MLX_CACHE_RANGE,
    PREFETCH_FRACTION,
    PREFETCH_MAX_BYTES,
    batch_bytes,
    plan_memory,
    sequence_bytes,
)

GiB = 2**30
SMOLLM = dict(kv_bytes_per_token=46080, weights_bytes=540 * 2**20)  # 135M, fp32
LLAMA_8B = dict(kv_bytes_per_token=131072, weights_bytes=16 * GiB)  # bf16


def test_budgets_split_what_the_weights_leave_and_add_up_to_the_share():
    plan = plan_memory(**SMOLLM, machine_bytes=24 * GiB, workers_on_host=2)
    share = int(24 * GiB * MEMORY_FRACTION / 2)
    assert plan.share_bytes == share
    kv = share - plan.weights_bytes - plan.working_set_bytes
    assert plan.prefetch_bytes == min(PREFETCH_MAX_BYTES, int(kv * PREFETCH_FRACTION))  # reads for queued requests
    kv -= plan.prefetch_bytes
    assert plan.running_kv_bytes == int(kv * KV_SPLIT["running_kv"])
    assert plan.live_state_bytes == int(kv * KV_SPLIT["live_states"])
    assert plan.ram_tier_bytes == int(kv * KV_SPLIT["ram_tier"])
    assert plan.writer_queue_bytes == int(kv * KV_SPLIT["writer_queue"])
    assert plan.peak_bytes <= share + 4  # the parts never add up to more than the share (rounding)
    assert plan.prefill_chunk_tokens == 256


def test_a_big_model_on_a_gpu_gets_large_chunks_and_room_for_long_contexts():
    plan = plan_memory(**LLAMA_8B, machine_bytes=141 * GiB, backend="gpu")
    assert plan.prefill_chunk_tokens == 2048
    assert plan.running_kv_bytes // LLAMA_8B["kv_bytes_per_token"] > 150_000  # tokens in flight
    assert plan.ram_tier_bytes > 10 * GiB and plan.live_state_bytes > 10 * GiB
    assert plan.mlx_cache_limit_bytes == MLX_CACHE_RANGE[1]
    assert plan.prefetch_bytes == PREFETCH_MAX_BYTES  # two reads of 8K-token checkpoints fit


def test_given_flags_are_kept_and_a_tiny_machine_still_gets_minimums():
    plan = plan_memory(**SMOLLM, machine_bytes=24 * GiB, running_kv_bytes=123, ram_tier_bytes=0,
                       live_state_bytes=456, writer_queue_bytes=789, mlx_cache_limit_bytes=7, prefill_chunk_tokens=64)
    assert (plan.running_kv_bytes, plan.ram_tier_bytes, plan.live_state_bytes, plan.writer_queue_bytes,
            plan.mlx_cache_limit_bytes, plan.prefill_chunk_tokens) == (123, 0, 456, 789, 7, 64)
    tiny = plan_memory(**LLAMA_8B, machine_bytes=8 * GiB)  # the weights alone do not fit
    assert tiny.running_kv_bytes == MIN_BUDGET_BYTES and tiny.mlx_cache_limit_bytes == MLX_CACHE_RANGE[0]
    with pytest.raises(ValueError):
        plan_memory(kv_bytes_per_token=0, weights_bytes=1, machine_bytes=1)


def test_batch_bytes_pads_to_the_longest_sequence_in_256_token_steps():
    assert sequence_bytes(1, 10) == 2560 and sequence_bytes(256, 10) == 2560 and sequence_bytes(257, 10) == 5120
    assert batch_bytes([], 10) == 0
    assert batch_bytes([100, 3000], 10) == 2 * 3072 * 10


def test_workers_of_different_models_sharing_a_store_size_the_largest_models_budget(tmp_path):
    """A small model's worker on a store that holds a big model's checkpoints sizes the
    big model's budget, so it does not evict them down to its own (the store evicts
    under the budget of whichever worker writes)."""
    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.worker.config import WorkerConfig
    from kvrouter.worker.server import size_for_shared_store, sized_store_config
    from tests.support.store_data import toks, writer

    base = StoreConfig(directory=tmp_path / "kv", min_tokens=1, disk_budget_bytes=None)  # no --kv-cache-disk-mb
    small_kv, big_kv = SMOLLM["kv_bytes_per_token"], LLAMA_8B["kv_bytes_per_token"]
    disk, store_cfg = sized_store_config(base, small_kv, 8192)
    plan = dataclasses.replace(plan_memory(**SMOLLM, machine_bytes=24 * GiB), disk=disk, store_config=store_cfg)
    config = WorkerConfig(model=None, listen="127.0.0.1:0", store=base, cache_dir=tmp_path)
    with CheckpointStore(store_cfg) as store:
        assert size_for_shared_store(plan, store, config, "small", 8192) is plan  # nothing else stored
        store.save("anchor", "small", "", toks(100), writer(b"s" * 100 * small_kv))
        assert store.largest_bytes_per_token(exclude_model="small") == 0
        assert size_for_shared_store(plan, store, config, "small", 8192) is plan  # its own rows do not count
        store.save("anchor", "big", "", toks(64, seed=1), writer(b"b" * 64 * big_kv))
        assert store.largest_bytes_per_token(exclude_model="small") == big_kv
        sized = size_for_shared_store(plan, store, config, "small", 8192)
        assert sized.disk.checkpoint_bytes == 8192 * big_kv > plan.disk.checkpoint_bytes
        assert store.config.disk_budget_bytes == sized.disk.budget_bytes == sized.store_config.disk_budget_bytes
        given = dataclasses.replace(plan, disk=dataclasses.replace(plan.disk, given=True))
        assert size_for_shared_store(given, store, config, "small", 8192) is given  # --kv-cache-disk-mb wins
