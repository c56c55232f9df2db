"""CheckpointStore on a real LMDB environment in tmp_path (cases C7, C9, C10, C11, C12, C4)."""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
import time
from pathlib import Path

import lmdb
import pytest

from kvrouter import cachestore
from kvrouter.cachestore import store as store_module
from kvrouter.cachestore import CheckpointStore, Entry, PayloadError, StoreConfig, keys


from tests.support.store_data import cfg, store, toks, writer  # noqa: F401  (cfg, store: fixtures)


def test_public_api():
    assert set(cachestore.__all__) == {
        "KINDS", "StoreConfig", "Entry", "Hit", "StoreEvent", "CheckpointStore", "PayloadError", "PlannedStore", "SkippedStore",
        "StoreUnavailableError", "IndexStats",
        "StorePlan", "align_down", "eviction_score", "eviction_victims", "plan_stores",
    }
    assert cachestore.KINDS == ("anchor", "waypoint", "evict", "shutdown", "hint")
    assert issubclass(PayloadError, RuntimeError)


def test_layout_is_private(store: CheckpointStore, cfg: StoreConfig):
    e = store.save("anchor", "m", "ns", toks(100), writer(b"abc"), text_preview="x" * 200)
    assert stat.S_IMODE(cfg.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.payload_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((store.payload_dir / e.payload_name).stat().st_mode) == 0o600
    assert e.payload_name == f"{e.id}.safetensors" and len(e.text_preview) == 80


def test_save_lookup_longest_exact_prefix(store: CheckpointStore):
    prompt = toks(1000)
    saved = {n: store.save("waypoint", "m", "ns", prompt[:n], writer(bytes([n % 256]) * n)) for n in (1, 63, 64, 65, 300, 512)}
    assert all(saved.values())
    assert store.get(saved[512].id) == saved[512]
    hit = store.lookup("m", "ns", prompt)
    assert hit.n_tokens == 512 and hit.entry.id == saved[512].id
    for n, want in [(512, 512), (511, 300), (300, 300), (299, 65), (64, 64), (63, 63), (62, 1), (1, 1)]:
        assert store.lookup("m", "ns", prompt[:n]).n_tokens == want, n
    assert store.lookup("m", "ns", []) is None
    assert store.tokens_of(saved[300].id) == prompt[:300]
    assert store.total_bytes() == sum((1, 63, 64, 65, 300, 512))
    assert store.payload_path(hit.entry).read_bytes() == bytes([0]) * 512


def test_c7_divergent_token_stops_reuse_there(store: CheckpointStore):
    prompt = toks(800, seed=1)
    for n in (128, 300, 700):
        store.save("waypoint", "m", "ns", prompt[:n], writer(b"p" * n))
    for pos, want in [(0, None), (127, None), (128, 128), (200, 128), (299, 128), (300, 300), (699, 300), (700, 700)]:
        other = list(prompt)
        other[pos] = (other[pos] + 1) % 150_000
        # a retokenised boundary: two tokens replaced by one shifts everything after it
        merged = prompt[:pos] + [999_999] + prompt[pos + 2 :]
        for variant in (other, merged):
            hit = store.lookup("m", "ns", variant)
            assert (hit.n_tokens if hit else None) == want, (pos, variant is merged)
            if hit:
                assert store.tokens_of(hit.entry.id) == variant[: hit.n_tokens]


def test_identical_save_writes_nothing(store: CheckpointStore):
    t = toks(200)
    assert store.save("anchor", "m", "ns", t, writer(b"a")) is not None
    called = []
    assert store.save("anchor", "m", "ns", t, lambda p: called.append(p)) is None
    assert called == [] and len(store.entries()) == 1 and len(os.listdir(store.payload_dir)) == 1


def test_c9_namespaces_and_models_isolated(store: CheckpointStore):
    prompt = toks(500, seed=2)
    a = store.save("anchor", "m", "a", prompt[:256], writer(b"a"))
    assert store.lookup("m", "b", prompt) is None
    b = store.save("anchor", "m", "b", prompt[:256], writer(b"b"))  # same prompt: not a duplicate across namespaces
    assert b is not None and b.id != a.id
    assert store.lookup("m", "a", prompt).entry.id == a.id  # positive control
    assert store.lookup("m", "b", prompt).entry.id == b.id
    assert store.lookup("m2", "a", prompt) is None  # model identity is part of the key too
    assert store.remove_namespace("a") == 1
    assert store.lookup("m", "a", prompt) is None and store.lookup("m", "b", prompt).entry.id == b.id


@pytest.mark.parametrize(
    "victim,forged",
    [
        (("m", "a"), ("m", "ans")),
        (("xns", "y"), ("x", "nsy")),  # naive concat: "model"+"xns"+"ns"+"y" == "model"+"x"+"ns"+"nsy"
        (("m", ""), ("m", "ns")),
        (("m", "a"), ("ma", "")),
        (("m", "a\x00"), ("m", "a")),
        (("m", "x"), ("m", "x" + "\x00" * 8)),
    ],
)
def test_c9_forged_namespace_collides_with_nothing(store: CheckpointStore, victim, forged):
    prompt = toks(300, seed=3)
    assert keys.root_key(*victim) != keys.root_key(*forged)
    store.save("anchor", *victim, prompt, writer(b"v"))
    assert store.lookup(*forged, prompt) is None
    store.save("anchor", *forged, prompt, writer(b"f"))
    assert store.lookup(*victim, prompt).entry.namespace == victim[1]
    assert store.lookup(*forged, prompt).entry.namespace == forged[1]


@pytest.fixture
def no_backoff(monkeypatch):
    """Writes resume at once after a failure (the backoff has its own test)."""
    monkeypatch.setattr(store_module, "WRITE_BACKOFF_INITIAL_S", 0.0)


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "disk_full"), (errno.EIO, "io_error")])
@pytest.mark.parametrize("after_bytes", [0, 4096])
def test_c12_failed_store_never_visible(cfg: StoreConfig, caplog, code, reason, after_bytes, no_backoff):
    prompt = toks(300)
    events = []

    def failing(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(b"z" * after_bytes)
        raise OSError(code, os.strerror(code))

    with CheckpointStore(cfg, on_event=events.append) as store:
        with caplog.at_level(logging.WARNING, logger="kvrouter.cachestore"):
            assert store.save("anchor", "m", "ns", prompt, failing) is None
        assert f"reason={reason}" in caplog.text and os.strerror(code) in caplog.text
        assert [(e.action, e.reason) for e in events] == [("skipped", reason)]
        assert store.lookup("m", "ns", prompt) is None
        assert store.entries() == [] and os.listdir(store.payload_dir) == [] and store.total_bytes() == 0
        # the request goes on and a later store of the same prefix succeeds
        assert store.save("anchor", "m", "ns", prompt, writer(b"ok")) is not None


@pytest.mark.parametrize("exc,reason", [
    (RuntimeError("[write] Unable to write 86933 bytes to file."), "write_failed"),  # what mx.save_safetensors raises
    (lmdb.DiskError("mdb_txn_commit: No space left on device"), "index_error"),
])
def test_mlx_and_lmdb_write_errors_are_skips(cfg: StoreConfig, exc, reason, no_backoff):
    events = []

    def boom(path: Path) -> None:
        path.write_bytes(b"half")
        raise exc

    with CheckpointStore(cfg, on_event=events.append) as store:
        assert store.save("anchor", "m", "ns", toks(10), boom) is None
        assert [(e.action, e.reason) for e in events] == [("skipped", reason)]
        assert os.listdir(store.payload_dir) == [] and store.entries() == []


def test_a_failing_commit_is_a_skip(store: CheckpointStore, monkeypatch, no_backoff):
    def full(fn):
        raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL")

    monkeypatch.setattr(store.index, "write", full)
    assert store.save("anchor", "m", "ns", toks(10), writer(b"x")) is None
    assert os.listdir(store.payload_dir) == [] and store.entries() == []


def test_programming_errors_propagate_after_cleanup(store: CheckpointStore):
    def boom(path: Path) -> None:
        path.write_bytes(b"half")
        raise TypeError("bug")

    with pytest.raises(TypeError):
        store.save("anchor", "m", "ns", toks(10), boom)
    assert os.listdir(store.payload_dir) == [] and store.entries() == []


def test_writes_back_off_after_a_failure_then_recheck_free_space(cfg: StoreConfig, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    free = [10 * 2**30]
    monkeypatch.setattr(store_module.payload, "disk_space", lambda d: (free[0], 100 * 2**30))
    events, calls = [], []

    def full(path: Path) -> None:
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    with CheckpointStore(cfg, on_event=events.append) as store:
        assert store.save("anchor", "m", "ns", toks(10), full) is None
        assert not store.writable
        # during the backoff nothing is written: a full disk costs later requests nothing
        assert store.save("anchor", "m", "ns", toks(20), full) is None
        assert len(calls) == 1 and events[-1].reason == "write_backoff"
        clock[0] += store_module.WRITE_BACKOFF_INITIAL_S + 0.1
        free[0] = 2**20  # still full when the backoff ends: checked before writing
        assert store.save("anchor", "m", "ns", toks(30), full, size_hint=4096) is None
        assert len(calls) == 1 and events[-1].reason == "disk_full"
        clock[0] += store_module.WRITE_BACKOFF_MAX_S
        free[0] = 10 * 2**30
        assert store.save("anchor", "m", "ns", toks(40), writer(b"ok")) is not None
        assert store.writable and [e.action for e in events] == ["skipped"] * 3 + ["stored"]


def test_hit_counter_and_quarantine_failures_are_dropped(store: CheckpointStore, monkeypatch, caplog):
    e = store.save("anchor", "m", "ns", toks(100), writer(b"x"))
    real_write = store.index.write

    def disk_error(fn):
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(store.index, "write", disk_error)
    with caplog.at_level(logging.WARNING, logger="kvrouter.cachestore"):
        store.touch(e.id)  # no exception
        store.quarantine(e.id, "load failed")  # no exception
    assert "hit counter" in caplog.text and "not recorded" in caplog.text
    monkeypatch.setattr(store.index, "write", real_write)
    # this process never loads it again, and its payload is gone for the others
    assert store.lookup("m", "ns", toks(100)) is None
    with pytest.raises(PayloadError):
        store.payload_path(e)
    assert not (store.payload_dir / e.payload_name).exists()


def test_lookup_on_a_broken_index_is_a_miss(store: CheckpointStore, monkeypatch):
    store.save("anchor", "m", "ns", toks(100), writer(b"x"))

    def broken():
        raise lmdb.CorruptedError("mdb_txn_begin: MDB_CORRUPTED")

    monkeypatch.setattr(store.index, "read", broken)
    assert store.lookup("m", "ns", toks(100)) is None


def test_c11_checksum_mismatch_quarantines(store: CheckpointStore, caplog):
    prompt = toks(400)
    short = store.save("waypoint", "m", "ns", prompt[:100], writer(b"s" * 10))
    e = store.save("waypoint", "m", "ns", prompt[:300], writer(b"good" * 10))
    path = store.payload_dir / e.payload_name
    assert store.payload_path(e) == path
    path.write_bytes(b"evil" * 10)  # same size, different bytes
    store._verified.clear()  # as a new process would
    with caplog.at_level(logging.WARNING, logger="kvrouter.cachestore"), pytest.raises(PayloadError):
        store.payload_path(e)
    assert "quarantined" in caplog.text and "checksum_mismatch" in caplog.text
    assert store.lookup("m", "ns", prompt).entry.id == short.id  # falls back, never the poisoned one
    assert not path.exists() and store.get(e.id).quarantined.startswith("checksum_mismatch")
    assert store.total_bytes() == 10 and [x.id for x in store.entries()] == [short.id]
    with pytest.raises(PayloadError):
        store.payload_path(e)
    # the corrupted bytes are never re-added; good bytes for the same prefix are
    assert store.save("waypoint", "m", "ns", prompt[:300], writer(b"evil" * 10)) is None
    assert store.save("waypoint", "m", "ns", prompt[:300], writer(b"good" * 10)) is not None


def test_c11_caller_quarantine_after_failed_restore(store: CheckpointStore):
    prompt = toks(400)
    e = store.save("anchor", "m", "ns", prompt, writer(b"poison"))
    store.quarantine(e.id, "restore failed: prefill raised")
    assert store.lookup("m", "ns", prompt) is None
    assert store.save("anchor", "m", "ns", prompt, writer(b"poison")) is None  # same bytes: never again
    fresh = store.save("anchor", "m", "ns", prompt, writer(b"cold recompute"))
    assert store.lookup("m", "ns", prompt).entry.id == fresh.id
    assert store.verify() == []
    store.quarantine("nope", "missing")  # no-op


def test_missing_or_resized_payload(store: CheckpointStore):
    e1 = store.save("anchor", "m", "ns", toks(100, 1), writer(b"1" * 10))
    e2 = store.save("anchor", "m", "ns", toks(100, 2), writer(b"2" * 10))
    (store.payload_dir / e1.payload_name).unlink()
    (store.payload_dir / e2.payload_name).write_bytes(b"2" * 11)
    assert len(store.verify()) == 2
    for e, seed in ((e1, 1), (e2, 2)):
        with pytest.raises(PayloadError):
            store.payload_path(e)
        assert store.lookup("m", "ns", toks(100, seed)) is None
    assert store.entries() == [] and store.verify() == []


def test_budget_eviction_keeps_anchor_c4(tmp_path: Path, caplog):
    size = 1000
    cfg = StoreConfig(directory=tmp_path / "s", disk_budget_bytes=int(3.5 * size), min_tokens=1)
    with CheckpointStore(cfg) as store, caplog.at_level(logging.INFO, logger="kvrouter.cachestore"):
        anchor = store.save("anchor", "m", "ns", toks(4088 // 8, 100), writer(b"a" * size))
        written = []
        for i in range(5):  # five unrelated long sessions, more tokens per byte than the anchor
            e = store.save("waypoint", "m", "ns", toks(1000, 200 + i), writer(b"w" * size))
            assert e is not None and store.get(e.id) is not None  # never evicts what it just wrote
            written.append(e)
            assert store.total_bytes() <= cfg.disk_budget_bytes
        ids = {e.id for e in store.entries()}
        assert anchor.id in ids and written[-1].id in ids and len(ids) == 3
        assert len(os.listdir(store.payload_dir)) == 3
        assert "evicted" in caplog.text and "reason=budget" in caplog.text
        # a payload larger than the whole budget is skipped, nothing evicted
        assert store.save("waypoint", "m", "ns", toks(50, 9), writer(b"x" * (4 * size))) is None
        assert "payload_over_budget" in caplog.text and {e.id for e in store.entries()} == ids
        assert os.listdir(store.payload_dir).__len__() == 3 and store.verify() == []


def test_touch_remove_entries(store: CheckpointStore):
    e = store.save("evict", "m", "ns", toks(70), writer(b"e"))
    store.touch(e.id)
    store.touch(e.id)
    got = store.get(e.id)
    assert got.hits == 2 and got.last_used >= e.last_used
    assert store.remove(e.id) and not store.remove(e.id)
    assert store.entries() == [] and os.listdir(store.payload_dir) == [] and store.total_bytes() == 0
    with pytest.raises(KeyError):
        store.tokens_of(e.id)


def test_repair_drops_rows_without_payload_open_does_not(cfg: StoreConfig):
    with CheckpointStore(cfg) as store:
        e = store.save("anchor", "m", "ns", toks(100), writer(b"x"))
        keep = store.save("anchor", "m", "ns", toks(100, 5), writer(b"y"))
    (cfg.directory / "payloads" / e.payload_name).unlink()
    with CheckpointStore(cfg) as store:
        assert len(store.entries()) == 2  # opening changes nothing
        assert store.repair() == 0
        assert [x.id for x in store.entries()] == [keep.id]
        assert store.lookup("m", "ns", toks(100)) is None and store.total_bytes() == 1
        assert store.stats().entries["anchor"] == 1 and store.stats().payload_bytes["anchor"] == 1


# ---- lookup cost ----------------------------------------------------------------------------


def test_lookup_reads_o_prompt_over_64_keys_with_10k_entries(store: CheckpointStore):
    prompt = toks(32 * 1024, seed=7)
    rng = random.Random(11)
    now = time.time()

    def bulk(txn):
        # 10,000 rows inserted through the index layout directly (one txn; payload files are
        # irrelevant to lookup). Half share the prompt's first blocks and then diverge, so the
        # walk meets many registrations along its path.
        for i in range(10_000):
            if i % 2:
                cut = rng.randrange(64, 30_000)
                t = prompt[:cut] + [150_001 + i] + toks(rng.randrange(0, 100), seed=i)
            else:
                t = toks(rng.randrange(64, 600), seed=10_000 + i)
            packed = keys.pack_tokens(t)
            eid = f"{i:032x}"
            txn.add_entry(Entry(id=eid, kind="waypoint", namespace="ns", model_id="m", n_tokens=len(t),
                                payload_name=eid + ".safetensors", payload_bytes=1, checksum="0",
                                created=now, last_used=now, hits=0), packed)

    store.index.write(bulk)
    best = store.save("waypoint", "m", "ns", prompt[:30_000 + 17], writer(b"best"))
    store.save("waypoint", "m", "ns", prompt[:20_480], writer(b"mid"))
    reads0, scans0 = store.index.point_reads, store.index.scans
    t0 = time.perf_counter()
    hit = store.lookup("m", "ns", prompt)
    elapsed = time.perf_counter() - t0
    reads = store.index.point_reads - reads0
    assert hit.entry.id == best.id
    assert store.index.scans == scans0
    assert reads <= len(prompt) // 64 + 1 + 4, reads  # chain walk + confirmation of the winner
    # a miss in another namespace stops at the root
    reads0 = store.index.point_reads
    assert store.lookup("m", "other", prompt) is None
    assert store.index.point_reads - reads0 == 1
    print(f"lookup of {len(prompt)} tokens over 10k rows: {reads} reads, {elapsed * 1000:.1f} ms")


def test_index_map_grows_on_map_full(tmp_path: Path, monkeypatch):
    from kvrouter.cachestore import index as index_mod

    monkeypatch.setattr(index_mod, "INITIAL_MAP_SIZE", 1 << 20)
    cfg = StoreConfig(directory=tmp_path / "small", min_tokens=1)
    with CheckpointStore(cfg) as store:
        saved = [store.save("waypoint", "m", "ns", toks(100_000, seed=i), writer(b"p")) for i in range(8)]
        assert all(saved)  # 8 x 400 KB of token ids do not fit in 1 MiB: the map doubled
        assert store.index._handle.env.info()["map_size"] > 1 << 20
        assert store.lookup("m", "ns", toks(100_000, seed=3)).entry.id == saved[3].id
    assert stat.S_IMODE((cfg.directory / "index").stat().st_mode) == 0o700
    assert stat.S_IMODE((cfg.directory / "index" / "data.mdb").stat().st_mode) == 0o600


def test_store_events_report_stores_skips_and_evictions(cfg: StoreConfig):
    events = []
    small = StoreConfig(**{**cfg.__dict__, "disk_budget_bytes": 2500})
    with CheckpointStore(small, on_event=events.append) as store:
        store.save("waypoint", "m", "ns", toks(100), writer(b"x" * 1000))
        store.save("waypoint", "m", "ns", toks(100), writer(b"x" * 1000))  # duplicate
        store.save("waypoint", "m", "ns", toks(200), writer(b"y" * 1000))
        store.save("anchor", "m", "ns", toks(300), writer(b"z" * 1000))  # over budget: evicts the oldest waypoint
    actions = [(e.action, e.kind, e.n_tokens, e.reason) for e in events]
    assert actions[0] == ("stored", "waypoint", 100, "")
    assert actions[1] == ("skipped", "waypoint", 100, "duplicate")
    assert ("evicted", "waypoint", 100, "budget") in actions
    assert actions[-1][:3] == ("stored", "anchor", 300)


def test_store_events_name_the_entry_and_stores_carry_its_tokens(cfg: StoreConfig):
    """What a worker needs to tell a router which entries exist: ids on every
    store, eviction, quarantine and removal; token ids on stores only."""
    events = []
    small = StoreConfig(**{**cfg.__dict__, "disk_budget_bytes": 2500})
    with CheckpointStore(small, on_event=events.append) as store:
        a = store.save("waypoint", "m", "ns", toks(100), writer(b"x" * 1000))
        b = store.save("waypoint", "m", "ns2", toks(200), writer(b"y" * 1000))
        c = store.save("anchor", "m2", "ns", toks(300), writer(b"z" * 1000))  # evicts a
        store.quarantine(b.id, "load failed: bad")
        store.remove(c.id)
    by_action = {e.action: e for e in events}
    stored = [e for e in events if e.action == "stored"]
    assert [(e.entry_id, e.namespace, e.model_id, e.token_ids) for e in stored] == [
        (a.id, "ns", "m", tuple(toks(100))), (b.id, "ns2", "m", tuple(toks(200))),
        (c.id, "ns", "m2", tuple(toks(300)))]
    ev = by_action["evicted"]
    assert (ev.entry_id, ev.namespace, ev.model_id, ev.n_tokens, ev.n_bytes, ev.token_ids) == (
        a.id, "ns", "m", 100, 1000, ())
    q = by_action["quarantined"]
    assert (q.entry_id, q.namespace, q.model_id, q.reason, q.token_ids) == (b.id, "ns2", "m", "load failed", ())
    r = by_action["removed"]
    assert (r.entry_id, r.namespace, r.model_id, r.n_tokens) == (c.id, "ns", "m2", 300)


def test_failed_store_leaves_the_schedule_for_a_later_try(store: CheckpointStore, no_backoff):
    """Policy rule 1: the plan is derived from what the index holds, so a store
    that failed (ENOSPC) is planned again by the next request, and succeeds then."""
    from kvrouter.cachestore import plan_stores

    prompt = toks(900)
    cfg = StoreConfig(directory=store.directory, min_tokens=128, boundary_align_tokens=128,
                      continued_interval_tokens=512)

    def full_disk(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    first = plan_stores(len(prompt), 0, 700, cfg).stores
    assert [(p.kind, p.n_tokens) for p in first] == [("waypoint", 512), ("anchor", 700)]
    assert store.save("anchor", "m", "ns", prompt[:700], full_disk) is None
    hit = store.lookup("m", "ns", prompt)
    again = plan_stores(len(prompt), hit.n_tokens if hit else 0, 700, cfg).stores
    assert again == first
    assert store.save("anchor", "m", "ns", prompt[:700], writer(b"a" * 10)) is not None
    hit = store.lookup("m", "ns", prompt)
    assert hit.n_tokens == 700
    assert plan_stores(len(prompt), hit.n_tokens, 700, cfg).stores == ()


# ---- concurrency inside a process -----------------------------------------------------------


def test_reads_and_writes_never_wait_for_a_long_read(store: CheckpointStore):
    """Issue 13: a scan (the metrics scrape, a listing) holds a read transaction; routing
    lookups and stores go on meanwhile (an ordering: they finish while it is still open)."""
    import threading

    e = store.save("anchor", "m", "ns", toks(300), writer(b"a"))
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def long_read() -> None:
        with store.index.read() as txn:
            txn.rows()
            inside.set()
            release.wait(30)
        done.set()

    t = threading.Thread(target=long_read)
    t.start()
    assert inside.wait(10)
    try:
        assert store.lookup("m", "ns", toks(300) + [1]).entry.id == e.id
        assert store.save("waypoint", "m", "ns", toks(500, 9), writer(b"w")) is not None
        store.touch(e.id)
        assert store.stats().entries == {"anchor": 1, "waypoint": 1, "evict": 0, "shutdown": 0, "hint": 0}
        assert not done.is_set()
    finally:
        release.set()
        t.join(10)


def test_map_growth_waits_for_open_reads(tmp_path: Path, monkeypatch):
    """Resizing the map is the one thing that must not overlap a transaction of the process."""
    import threading

    from kvrouter.cachestore import index as index_mod

    monkeypatch.setattr(index_mod, "INITIAL_MAP_SIZE", 64 * 1024)
    with CheckpointStore(StoreConfig(directory=tmp_path / "s", min_tokens=1)) as s:
        inside, release = threading.Event(), threading.Event()

        def long_read() -> None:
            with s.index.read() as txn:
                txn.rows()
                inside.set()
                release.wait(30)

        t = threading.Thread(target=long_read)
        t.start()
        assert inside.wait(10)
        writer_done = threading.Event()

        def fill() -> None:
            for i in range(40):
                s.save("waypoint", "m", "ns", toks(2000, i), writer(b"x"))
            writer_done.set()

        w = threading.Thread(target=fill)
        w.start()
        assert not writer_done.wait(1)  # the growth waits for the open read
        release.set()
        t.join(10)
        assert writer_done.wait(60)
        w.join()
        assert len(s.entries()) == 40
        assert s.index._handle.env.info()["map_size"] > 64 * 1024


def _safetensors_writer(metadata: dict):
    """Writes a one-tensor safetensors file with `metadata` (no mlx needed)."""
    import json
    import struct

    header = json.dumps({"__metadata__": metadata,
                         "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()

    def write(path: Path) -> None:
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)

    return write


def test_payloads_of_an_older_format_are_reported_by_verify_and_removed_by_gc(store: CheckpointStore, capsys):
    """Version-1 payloads (hand-sliced KV tensors, format tag at the top level) are
    never looked up (the format is part of the model identity); `kvrouter cache verify`
    reports them and `kvrouter cache gc` removes them. Current ones stay."""
    from types import SimpleNamespace

    from kvrouter.router import cache_cli
    from kvrouter.worker.payload_format import FORMAT_TAG, read_format_tag

    old = store.save("anchor", "m1", "", toks(64), _safetensors_writer({"format": "kvrouter-kv-1"}))
    new = store.save("anchor", "m2", "", toks(64), _safetensors_writer({"0.format": FORMAT_TAG}))
    assert read_format_tag(store.payload_dir / new.payload_name) == FORMAT_TAG
    assert [(e.id, tag) for e, tag in cache_cli.outdated(store)] == [(old.id, "kvrouter-kv-1")]
    assert cache_cli._verify(store, SimpleNamespace()) == 1
    assert f"{old.id}: payload format kvrouter-kv-1" in capsys.readouterr().out
    assert cache_cli._gc(store, SimpleNamespace()) == 0
    assert [e.id for e in store.entries()] == [new.id]
    assert cache_cli._verify(store, SimpleNamespace()) == 0
