"""The one read of a payload (cachestore/payload_read.py) and the store's checksum of
it (`open_read` / `finish_read`, case C11), on real files in tmp_path. No model."""

from __future__ import annotations

import json
import os
import struct

import pytest
import xxhash

from kvrouter.cachestore import PayloadError
from kvrouter.cachestore.payload_read import (
    PayloadReadError,
    SequentialRead,
    read_header,
    resident_fraction_of,
)
from tests.support.store_data import cfg, store, toks, writer  # noqa: F401  (cfg, store: fixtures)


def safetensors(tensors: dict[str, bytes], metadata: dict | None = None) -> bytes:
    """A safetensors file of U8 tensors, in the given order."""
    header, offset = {}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values())


def test_the_read_hands_every_byte_in_order_and_hashes_the_whole_file(tmp_path):
    data = os.urandom(3 * 4096 + 17)
    path = tmp_path / "p"
    path.write_bytes(data)
    read = SequentialRead(path, block_bytes=4096, ahead_bytes=4096)  # the thread waits for the consumer
    assert read.read(10) == data[:10]
    buf = bytearray(5000)
    read.readinto(buf)
    assert bytes(buf) == data[10:5010] and read.consumed == 5010
    read.skip(100)  # skipped bytes are hashed all the same
    assert read.read(7) == data[5110:5117]
    assert read.finish() == xxhash.xxh3_64(data).hexdigest()
    assert read.done and read.size == len(data) and read.read_seconds >= 0
    with pytest.raises(PayloadReadError):
        read.read(1)  # nothing past the end


def test_a_cancelled_read_fails_its_consumer(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(b"x" * 100_000)
    read = SequentialRead(path, block_bytes=4096, ahead_bytes=4096)
    read.read(10)
    read.cancel()
    with pytest.raises(PayloadReadError, match="cancelled"):
        read.finish()


def test_the_header_gives_tensors_in_file_order_and_refuses_a_bad_one(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(safetensors({"b": b"\x01" * 8, "a": b"\x02" * 3}, {"format": "x"}))
    read = SequentialRead(path)
    h = read_header(read)
    assert [(t.name, t.nbytes) for t in h.tensors] == [("b", 8), ("a", 3)] and h.metadata == {"format": "x"}
    assert h.tensors[0].start == h.data_start and read.consumed == h.data_start
    read.cancel()
    bad = tmp_path / "bad.safetensors"
    raw = json.dumps({"t": {"dtype": "U8", "shape": [9], "data_offsets": [0, 4]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)  # shape says 9 bytes, offsets 4
    with pytest.raises(PayloadReadError, match="do not match"):
        read_header(SequentialRead(bad))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(PayloadReadError, match="header length"):
        read_header(SequentialRead(huge))


def test_residency_is_a_fraction_of_the_file(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(os.urandom(1 << 20))
    path.read_bytes()
    resident = resident_fraction_of(path)
    assert resident is None or 0.0 <= resident <= 1.0


def test_c11_the_store_checks_the_checksum_of_the_one_read(store):
    prompt = toks(300)
    e = store.save("waypoint", "m", "ns", prompt, writer(b"good" * 5000))
    read = store.open_read(e)
    assert read.read(4) == b"good"
    store.finish_read(e, read)  # takes the rest, checks the checksum: fine
    assert store.get(e.id).quarantined == ""
    path = store.payload_dir / e.payload_name
    path.write_bytes(b"good" * 4999 + b"evil")  # same size, one bad word at the very end
    read = store.open_read(e)
    assert read.read(4) == b"good"
    with pytest.raises(PayloadError, match="checksum"):
        store.finish_read(e, read)
    assert store.get(e.id).quarantined.startswith("checksum_mismatch") and not path.exists()
    with pytest.raises(PayloadError):
        store.open_read(e)  # never read again
    assert store.save("waypoint", "m", "ns", prompt, writer(b"good" * 4999 + b"evil")) is None  # nor re-added
