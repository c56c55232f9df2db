"""The store on a real full filesystem (a small tmpfs): a failed write is a skip with its
reason, the store keeps serving what it holds, and writes resume once space is freed
(issue 13, item 1). A first open on a full tmpfs, which used to kill the process with
SIGBUS, runs in a child process: tests/e2e/test_store_full_disk.py."""

from __future__ import annotations

import os

import pytest

from kvrouter.cachestore import CheckpointStore, StoreConfig
from kvrouter.cachestore import store as store_module
from tests.support.store_data import toks, writer
from tests.support.tmpfs import fill, small_tmpfs  # noqa: F401  (fixture)


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(store_module, "WRITE_BACKOFF_INITIAL_S", 0.0)


def test_a_write_that_fills_the_disk_is_a_skip(small_tmpfs, no_backoff):
    events = []
    cfg = StoreConfig(directory=small_tmpfs / "kv", min_tokens=1)
    with CheckpointStore(cfg, on_event=events.append) as store:
        kept = store.save("anchor", "m", "ns", toks(100), writer(b"k" * 1000))
        # no size hint: the free-space check passes and the real write hits ENOSPC
        assert store.save("anchor", "m", "ns", toks(200), writer(b"x" * (16 * 2**20))) is None
        assert [(e.action, e.reason) for e in events] == [("stored", ""), ("skipped", "disk_full")]
        assert sorted(os.listdir(store.payload_dir)) == [kept.payload_name]  # the temp file is gone
        assert store.lookup("m", "ns", toks(200)).entry.id == kept.id  # no row for the failed one
        assert store.payload_path(kept).read_bytes() == b"k" * 1000
        # a hint larger than the free space skips without writing a byte
        assert store.save("anchor", "m", "ns", toks(300), writer(b"y"), size_hint=16 * 2**20) is None
        assert events[-1].reason == "disk_full"
        assert store.save("anchor", "m", "ns", toks(400), writer(b"z" * 1000)) is not None


def test_reopened_on_a_full_disk_it_reads_and_stores_nothing(small_tmpfs, monkeypatch):
    cfg = StoreConfig(directory=small_tmpfs / "kv", min_tokens=1)
    with CheckpointStore(cfg) as store:
        kept = store.save("anchor", "m", "ns", toks(100), writer(b"k" * 1000))
    filler = fill(small_tmpfs)
    events = []
    with CheckpointStore(cfg, on_event=events.append) as store:
        assert not store.writable
        hit = store.lookup("m", "ns", toks(100) + [1])
        assert hit.entry.id == kept.id and store.payload_path(hit.entry).read_bytes() == b"k" * 1000
        store.touch(kept.id)  # skipped while writes are off: no exception
        assert store.save("anchor", "m", "ns", toks(300), writer(b"y")) is None
        assert events[-1].action == "skipped" and events[-1].reason in ("disk_full", "write_backoff")
        store.repair()  # raises nothing on a full disk with nothing to repair
        filler.unlink()
        monkeypatch.setattr(store_module, "WRITE_BACKOFF_INITIAL_S", 0.0)
        store._writes_succeeded()  # the backoff ends (its own test fakes the clock)
        assert store.save("anchor", "m", "ns", toks(300), writer(b"y")) is not None


def test_mlx_payload_writer_on_a_full_disk_is_a_skip(small_tmpfs, no_backoff):
    """The worker's payload writer (one tensor at a time, `worker.payload_write`) on a
    full disk: its OSError (ENOSPC) is a `disk_full` skip, and nothing is left behind.
    (mx.save_safetensors, used before, raised RuntimeError there: a `write_failed` skip.)"""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from kvrouter.worker import cache_state

    events = []
    layer = KVCache()
    layer.keys, layer.values, layer.offset = mx.zeros((1, 4, 4096, 256)), mx.zeros((1, 4, 4096, 256)), 4096  # 32 MiB
    with CheckpointStore(StoreConfig(directory=small_tmpfs / "kv", min_tokens=1), on_event=events.append) as store:
        assert store.save("anchor", "m", "ns", toks(4096), cache_state.payload_writer([layer], 4096, "m")) is None
        assert [(e.action, e.reason) for e in events] == [("skipped", "disk_full")]
        assert os.listdir(store.payload_dir) == [] and store.entries() == []
