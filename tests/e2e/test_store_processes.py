"""The checkpoint store across real processes: a writer killed mid-store (case C10),
two processes sharing one store directory, and a store used after fork."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest

from kvrouter.cachestore import CheckpointStore, StoreConfig
from kvrouter.cachestore import store as store_mod
from tests.support.store_data import cfg, store, toks, writer  # noqa: F401  (cfg, store: fixtures)


def _crash_child(directory: str, point: str, prompt: list[int]) -> None:
    from kvrouter.cachestore import index as index_mod

    store = CheckpointStore(StoreConfig(directory=Path(directory), min_tokens=1))

    def write(path: Path) -> None:
        path.write_bytes(b"k" * 5000)
        if point == "after_payload_write":
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "before_commit":  # payload renamed and synced; killed before the index txn runs
        index_mod.Index.write = lambda self, fn: os.kill(os.getpid(), signal.SIGKILL)
    store.save("anchor", "m", "ns", prompt, write)
    os._exit(3)


@pytest.mark.parametrize("point", ["after_payload_write", "before_commit"])
def test_c10_kill_mid_store_leaves_no_row(cfg: StoreConfig, monkeypatch, point):
    prompt = toks(300)
    with CheckpointStore(cfg) as store:
        old = store.save("waypoint", "m", "ns", prompt[:128], writer(b"old" * 100))
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_crash_child, args=(str(cfg.directory), point, prompt))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    leftovers = set(os.listdir(cfg.directory / "payloads")) - {old.payload_name}
    assert len(leftovers) == 1  # the killed writer's file
    with CheckpointStore(cfg) as store:
        if point == "after_payload_write":
            # a temp file names its writer's pid: verify reports a dead writer's file at once...
            assert store.verify() == [f"{name}: temp file of a dead writer" for name in leftovers]
            assert set(os.listdir(store.payload_dir)) - {old.payload_name} == leftovers  # ...and leaves it
            assert store.repair() == 1
            assert set(os.listdir(store.payload_dir)) == {old.payload_name}
            assert store.verify() == []
        else:
            # a young renamed orphan may belong to a writer about to commit: kept by repair
            assert store.verify() == [] and store.repair() == 0
            assert set(os.listdir(store.payload_dir)) - {old.payload_name} == leftovers
        assert store.lookup("m", "ns", prompt).entry.id == old.id
    monkeypatch.setattr(store_mod, "ORPHAN_AGE_S", 0.0)
    with CheckpointStore(cfg) as store:
        store.repair()
        assert os.listdir(store.payload_dir) == [old.payload_name]
        assert [e.id for e in store.entries()] == [old.id]
        assert store.lookup("m", "ns", prompt).entry.id == old.id
        assert store.verify() == [] and store.total_bytes() == 300
        assert store.payload_path(old).read_bytes() == b"old" * 100


def _worker(directory: str, worker: int, rounds: int) -> None:
    store = CheckpointStore(StoreConfig(directory=Path(directory), min_tokens=1))
    shared = toks(256, seed=999)
    for i in range(rounds):
        mine = shared + toks(64 + i, seed=worker * 1000 + i)
        e = store.save("waypoint", "m", "ns", mine, writer(bytes([worker]) * (100 + i)))
        assert e is not None
        hit = store.lookup("m", "ns", mine + [1, 2, 3])
        assert hit is not None and hit.entry.id == e.id, (worker, i)
        assert store.payload_path(hit.entry).read_bytes() == bytes([worker]) * (100 + i)
        store.touch(e.id)
        other = shared + toks(64 + i, seed=(1 - worker) * 1000 + i)
        found = store.lookup("m", "ns", other)
        assert found is None or found.n_tokens == len(other) or found.n_tokens == 256
    store.save("anchor", "m", "ns", shared, writer(b"s"))  # both race to store the same prefix
    store.close()


def test_two_processes_share_one_directory(cfg: StoreConfig):
    rounds = 25
    with CheckpointStore(cfg):
        pass  # create the directory and index first
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(cfg.directory), w, rounds)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with CheckpointStore(cfg) as store:
        entries = store.entries()
        assert len(entries) == 2 * rounds + 1  # the shared anchor exactly once
        assert sum(e.kind == "anchor" for e in entries) == 1
        assert all(e.hits == 1 for e in entries if e.kind == "waypoint")
        assert store.verify() == []
        shared = toks(256, seed=999)
        for w in (0, 1):
            mine = shared + toks(64 + 3, seed=w * 1000 + 3)
            assert store.lookup("m", "ns", mine).n_tokens == len(mine)
        assert store.lookup("m", "ns", shared + [7]).n_tokens == 256


def _forked_child(store: CheckpointStore, prompt: list[int], expect_id: str) -> None:
    # the LMDB handle inherited through fork must not be used: the index reopens it here
    assert store.lookup("m", "ns", prompt).entry.id == expect_id
    assert store.save("waypoint", "m", "ns", prompt + [5], writer(b"child")) is not None
    os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_store_used_after_fork_reopens_index(store: CheckpointStore):
    prompt = toks(200)
    e = store.save("anchor", "m", "ns", prompt, writer(b"parent"))
    p = mp.get_context("fork").Process(target=_forked_child, args=(store, prompt, e.id))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert store.lookup("m", "ns", prompt + [5, 6]).n_tokens == 201  # parent's handle still fine
    assert store.verify() == []
