"""`kvrouter cache ls/show/verify` read a store without changing it, and `verify` reports
each kind of damage exactly as it finds it; `gc` repairs (issue 13, item 2)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from pathlib import Path

import pytest

from kvrouter.cachestore import CheckpointStore, StoreConfig
from kvrouter.router.cli import main
from kvrouter.worker.payload_format import FORMAT_TAG
from tests.support.store_data import toks, writer

DEAD_PID = 99_999_999  # above any pid_max: no such process


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every file under the store but LMDB's lock file (its reader table changes on any read),
    with its size, mtime and content hash."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "lock.mdb":
            st = path.stat()
            out[str(path.relative_to(directory))] = (st.st_size, st.st_mtime_ns,
                                                     hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def payload(data: bytes):
    """A payload writer of the current format (the tag `kvrouter cache verify` checks),
    with `data` as its tensor bytes; no mlx needed."""
    header = json.dumps({"__metadata__": {"0.format": FORMAT_TAG},
                         "x": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()

    def write(path: Path) -> None:
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)

    return write


@pytest.fixture
def damaged(tmp_path: Path):
    """A store with one healthy row and one of each kind of damage."""
    directory = tmp_path / "kv"
    with CheckpointStore(StoreConfig(directory=directory, min_tokens=1)) as store:
        healthy = store.save("anchor", "m", "ns", toks(100, 1), payload(b"healthy"))
        gone = store.save("anchor", "m", "ns", toks(100, 2), payload(b"gone"))
        flipped = store.save("waypoint", "m", "ns", toks(100, 3), payload(b"flipped"))
    (directory / "payloads" / gone.payload_name).unlink()
    path = directory / "payloads" / flipped.payload_name
    path.write_bytes(path.read_bytes()[:-7] + b"FLIPPED")  # same size, other bytes
    orphan = directory / "payloads" / f"{uuid.uuid4().hex}.safetensors"
    orphan.write_bytes(b"orphan")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    temp = directory / "payloads" / f"{uuid.uuid4().hex}.tmp{DEAD_PID}.safetensors"
    temp.write_bytes(b"half")
    return directory, {"healthy": healthy, "gone": gone, "flipped": flipped, "orphan": orphan, "temp": temp}


def cache(capsys, directory: Path, *args: str) -> tuple[int, str]:
    rc = main(["cache", *args, "--kv-cache-dir", str(directory)])
    return rc, capsys.readouterr().out


def test_verify_reports_every_damage_and_changes_nothing(damaged, capsys):
    directory, e = damaged
    before = snapshot(directory)
    rc, out = cache(capsys, directory, "verify")
    assert rc == 1
    lines = out.splitlines()
    assert f"{e['gone'].id}: row without payload file {e['gone'].payload_name}" in lines
    assert any(line.startswith(f"{e['flipped'].id}: checksum ") for line in lines)
    assert f"{e['orphan'].name}: orphan payload file (no row)" in lines
    assert f"{e['temp'].name}: temp file of a dead writer" in lines
    assert "4 problem(s)" in out
    rc, out = cache(capsys, directory, "ls", "--json")
    assert rc == 0 and {r["id"] for r in json.loads(out)} == {e[k].id for k in ("healthy", "gone", "flipped")}
    rc, out = cache(capsys, directory, "show", e["gone"].id[:10])
    assert rc == 0 and json.loads(out)["id"] == e["gone"].id
    assert snapshot(directory) == before  # verify, ls and show changed nothing

    rc, out = cache(capsys, directory, "gc")
    assert rc == 0
    rc, out = cache(capsys, directory, "verify")
    assert rc == 0, out
    rc, out = cache(capsys, directory, "ls", "--json", "--all")
    rows = {r["id"]: r for r in json.loads(out)}
    assert e["gone"].id not in rows
    assert rows[e["flipped"].id]["quarantined"].startswith("checksum_mismatch")
    assert not rows[e["healthy"].id]["quarantined"]
    assert not e["orphan"].exists() and not e["temp"].exists()


def test_verify_while_the_store_is_open_in_this_process(damaged, capsys):
    """A read-only open joins an environment this process already has open (py-lmdb's
    one-environment-per-process rule) and still repairs nothing."""
    directory, e = damaged
    with CheckpointStore(StoreConfig(directory=directory)) as store:
        rc, out = cache(capsys, directory, "verify")
        assert rc == 1 and "4 problem(s)" in out
        assert store.get(e["gone"].id) is not None and e["temp"].exists()


def test_read_only_commands_create_nothing(tmp_path: Path, capsys):
    missing = tmp_path / "nothing-here"
    for action in ("ls", "verify"):
        rc, out = cache(capsys, missing, action)
        assert rc == 0 and "no store" in out
    assert not missing.exists()
    (missing / "payloads").mkdir(parents=True)  # a directory a store never wrote
    rc, out = cache(capsys, missing, "verify")
    assert rc == 0 and "no index" in out and not (missing / "index").exists()


def test_a_read_only_store_refuses_writes(damaged):
    import lmdb

    directory, e = damaged
    with CheckpointStore(StoreConfig(directory=directory), read_only=True) as store:
        assert store.writes_off == "read_only" and not store.writable
        assert store.save("anchor", "m", "ns", toks(50), writer(b"x")) is None  # skipped, like a full disk
        with pytest.raises(lmdb.ReadonlyError):
            store.repair()
        assert store.lookup("m", "ns", toks(100, 1)).entry.id == e["healthy"].id
