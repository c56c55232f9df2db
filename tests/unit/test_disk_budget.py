"""The store's disk budget (`worker.sizing.plan_disk_budget`): sized from the model's KV
bytes per token and the store disk's room when `--kv-cache-disk-mb` is not given; the
flag always wins; the CLI keeps "given or not" in the frozen StoreConfig; the budget the
worker applies reaches the router through WorkerStatus."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrouter.cachestore import CheckpointStore, StoreConfig
from kvrouter.cachestore.payload import store_room
from kvrouter.router.cli import _store_flags_as_args, build_parser, store_config
from kvrouter.router.cluster import Cluster
from kvrouter.router.metrics import create_metrics, refresh_scrape_gauges
from kvrouter.router.worker_client import status_from_proto
from kvrouter.worker.sizing import (
    DISK_BUDGET_FLOOR_BYTES,
    DISK_BUDGET_STEP_BYTES,
    DISK_CHECKPOINTS,
    DISK_FRACTION,
    plan_disk_budget,
)
from kvrouter_proto import worker_pb2
from tests.support.fake_worker import FakeWorkerClient

MiB, GiB = 2**20, 2**30
SMOLLM = dict(kv_bytes_per_token=46080, context_length=8192)  # 135M default model, fp32 KV
LLAMA_8B = dict(kv_bytes_per_token=131072, context_length=8192)  # bf16, Llama-3-8B's 8K context
LONG_8B = dict(kv_bytes_per_token=131072, context_length=131072)  # a 128K-context 8B


def test_the_small_default_model_keeps_the_4096_mib_floor():
    plan = plan_disk_budget(**SMOLLM, cold_max_tokens=30000, free_bytes=60 * GiB)
    assert not plan.given and plan.checkpoint_tokens == 8192
    assert DISK_CHECKPOINTS * plan.checkpoint_bytes < DISK_BUDGET_FLOOR_BYTES  # 10 x 360 MiB
    assert plan.budget_bytes == DISK_BUDGET_FLOOR_BYTES == 4096 * MiB


def test_an_8b_model_gets_room_for_ten_long_checkpoints():
    plan = plan_disk_budget(**LONG_8B, cold_max_tokens=30000, free_bytes=2000 * GiB)
    # a checkpoint is the longest cold anchor (30000 tokens), not the 128K context: 3.66 GiB
    assert plan.checkpoint_tokens == 30000 and plan.checkpoint_bytes == 30000 * 131072
    want = DISK_CHECKPOINTS * 30000 * 131072
    assert want - DISK_BUDGET_STEP_BYTES < plan.budget_bytes <= want
    assert plan.budget_bytes % DISK_BUDGET_STEP_BYTES == 0
    assert plan.budget_bytes >= 8 * 4 * GiB * 0.9  # holds several 32K anchors, where 4096 MiB held one
    short = plan_disk_budget(**LLAMA_8B, cold_max_tokens=30000, free_bytes=2000 * GiB)
    assert short.checkpoint_tokens == 8192 and short.budget_bytes == 10 * GiB  # 10 x 8192 x 128 KiB


def test_the_disk_caps_it_and_the_store_s_own_payloads_count_as_room():
    plan = plan_disk_budget(**LONG_8B, cold_max_tokens=30000, free_bytes=20 * GiB)
    assert plan.budget_bytes == int(20 * GiB * DISK_FRACTION)  # 10 GiB, below the 36 GiB wanted
    # a restarted worker whose store already holds 6 GiB sees 14 GiB free: the same budget
    again = plan_disk_budget(**LONG_8B, cold_max_tokens=30000, free_bytes=14 * GiB, stored_bytes=6 * GiB)
    assert again.budget_bytes == plan.budget_bytes
    # below the floor when the disk is short, and never below one step
    assert plan_disk_budget(**SMOLLM, cold_max_tokens=30000, free_bytes=3 * GiB).budget_bytes == 1536 * MiB
    assert plan_disk_budget(**SMOLLM, cold_max_tokens=30000, free_bytes=0).budget_bytes == DISK_BUDGET_STEP_BYTES


def test_workers_that_see_slightly_different_free_space_agree():
    a = plan_disk_budget(**LONG_8B, cold_max_tokens=30000, free_bytes=20 * GiB + 3 * MiB)
    b = plan_disk_budget(**LONG_8B, cold_max_tokens=30000, free_bytes=20 * GiB + 90 * MiB)
    assert a.budget_bytes == b.budget_bytes


def test_a_given_budget_always_wins_and_bad_inputs_are_refused():
    plan = plan_disk_budget(**LONG_8B, cold_max_tokens=30000, free_bytes=1 * GiB, given_bytes=40000 * MiB)
    assert plan.given and plan.budget_bytes == 40000 * MiB
    assert "--kv-cache-disk-mb" in plan.describe() and "40000 MiB" in plan.describe()
    sized = plan_disk_budget(**SMOLLM, cold_max_tokens=30000, free_bytes=60 * GiB)
    assert "disk budget 4096 MiB" in sized.describe()
    for bad in (dict(kv_bytes_per_token=0), dict(context_length=0), dict(free_bytes=-1)):
        with pytest.raises(ValueError):
            plan_disk_budget(**{**SMOLLM, "cold_max_tokens": 30000, "free_bytes": GiB, **bad})
    with pytest.raises(ValueError):
        plan_disk_budget(**SMOLLM, cold_max_tokens=30000, free_bytes=GiB, given_bytes=0)


def test_the_cli_leaves_the_budget_to_the_worker_unless_given(tmp_path):
    ns = build_parser().parse_args(["serve", "--kv-cache-dir", str(tmp_path)])
    cfg = store_config(ns)
    assert cfg.disk_budget_bytes is None and not cfg.budget_given
    assert "--kv-cache-disk-mb" not in _store_flags_as_args(ns)  # workers size it themselves
    assert cfg.with_budget(5 * GiB).disk_budget_bytes == 5 * GiB
    ns = build_parser().parse_args(["serve", "--kv-cache-dir", str(tmp_path), "--kv-cache-disk-mb", "40000"])
    assert store_config(ns).disk_budget_bytes == 40000 * MiB and store_config(ns).budget_given
    args = _store_flags_as_args(ns)
    assert args[args.index("--kv-cache-disk-mb") + 1] == "40000"


def test_an_unsized_store_refuses_to_write(tmp_path):
    store = CheckpointStore(StoreConfig(directory=tmp_path / "kv", disk_budget_bytes=None, min_tokens=1))
    try:
        with pytest.raises(ValueError, match="not sized"):
            store.save("anchor", "m", "ns", [1, 2, 3], lambda p: Path(p).write_bytes(b"x"))
    finally:
        store.close()


def test_store_room_counts_finished_payloads_and_measures_a_missing_directory(tmp_path):
    free, stored = store_room(tmp_path / "not" / "yet")
    assert free > 0 and stored == 0
    (tmp_path / "payloads").mkdir()
    (tmp_path / "payloads" / "a.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "payloads" / "b.tmp123.safetensors").write_bytes(b"x" * 500)  # a writer's temp file
    assert store_room(tmp_path)[1] == 1000


def test_the_router_reads_the_budget_a_worker_applies():
    st = status_from_proto(worker_pb2.WorkerStatus(model_name="m", store_id="h:/kv", store_budget_bytes=5 * GiB))
    assert st.store_budget_bytes == 5 * GiB
    assert status_from_proto(worker_pb2.WorkerStatus(model_name="m")).store_budget_bytes == 0


async def test_the_gauge_shows_the_budget_the_local_workers_sized(tmp_path):
    def gauge(m) -> float:
        return m.registry.get_sample_value("kvrouter_store_budget_bytes")

    local = "host:/kv"
    workers = [FakeWorkerClient("w0", store_id=local, store_budget_bytes=36 * GiB),
               FakeWorkerClient("w1", store_id="other:/kv", store_budget_bytes=99 * GiB)]  # another host's store
    store = CheckpointStore(StoreConfig(directory=tmp_path / "kv", disk_budget_bytes=None))
    try:
        m = create_metrics()
        await refresh_scrape_gauges(m, Cluster(workers, store, local_store_id=local))
        assert gauge(m) == 36 * GiB
        given = CheckpointStore(StoreConfig(directory=tmp_path / "kv2", disk_budget_bytes=40000 * MiB))
        try:
            m = create_metrics()
            await refresh_scrape_gauges(m, Cluster(workers, given, local_store_id=local))
            assert gauge(m) == 40000 * MiB  # the flag given to the router
        finally:
            given.close()
    finally:
        store.close()
