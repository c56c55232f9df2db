"""Reading a payload file once: every byte front to back, in large blocks, on a
thread of its own, hashed (xxh3_64) as it goes, so a checkpoint is verified from
the very bytes that are loaded (no separate checksum pass over the file).

Also what tells a cold read from a page-cache read: `resident_fraction` (how
much of a file the page cache holds, by mincore(2) over a read-only mapping) and
`probe_cold_read_bps` (a read that bypasses the page cache: O_DIRECT on Linux,
F_NOCACHE on macOS).

Payloads are safetensors files (`read_header` parses the layout: an 8-byte
little-endian header length, a JSON header, then the tensors' bytes). Nothing
here knows MLX: the worker (`kvrouter.worker.checkpoint_load`) pulls each
tensor's bytes from a `SequentialRead` in file order and builds arrays from them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import xxhash

BLOCK_BYTES = 8 << 20
"""One read(2) of a payload, bytes: large sequential blocks (hashed as each arrives)."""

AHEAD_BYTES = 64 << 20
"""How far a read runs ahead of its consumer by default, bytes (a prefetch reads the
whole file ahead instead: `ahead_bytes=size`)."""

HEADER_LIMIT = 100_000_000  # bytes: safetensors' own cap on the JSON header

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}
"""Bytes per element of each safetensors dtype name."""


class PayloadReadError(RuntimeError):
    """A payload could not be read to the end (an I/O error, a file that shrank, or a
    read cancelled), or its header does not describe the file."""


@dataclass(frozen=True)
class TensorSpan:
    """One tensor of a payload: its name, safetensors dtype name ("BF16", "F32", ...),
    shape, and where its bytes lie in the file [start, end), absolute offsets in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PayloadHeader:
    """A payload's layout: `data_start` (bytes before the first tensor: 8 + the JSON
    header), `metadata` (the header's `__metadata__`, str to str) and the tensors in
    file order."""

    data_start: int
    metadata: dict
    tensors: tuple[TensorSpan, ...]


class SequentialRead:
    """The one read of a payload file: a thread reads it front to back in
    `block_bytes` blocks, hashing each block, and queues the blocks; the consumer
    takes the bytes in the same order (`read`, `readinto`, `skip`), and `finish`
    returns the xxh3_64 hex digest of the whole file.

    ahead_bytes: how many bytes the thread may hold that the consumer has not taken
    (it waits past that). Blocks the consumer has emptied are reused, so a read holds
    about ahead_bytes + one block of memory.

    Opening raises OSError (missing or unreadable file). Errors of the read itself
    (I/O, a file that shrank) surface in the consumer's next call as PayloadReadError.

    Figures, set as the read goes: `size` (bytes), `resident` (fraction of the file
    the page cache held when the read began, None if unknown), `read_seconds` (from
    the first block to the last, the thread's time spent waiting for the consumer
    excluded), `wait_seconds` (consumer time spent waiting for bytes), `started`
    (time.perf_counter() when the read began).
    """

    def __init__(self, path, *, block_bytes: int = BLOCK_BYTES, ahead_bytes: int = AHEAD_BYTES):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by the thread
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self.resident = resident_fraction(self._file.fileno(), self.size)
        except BaseException:
            self._file.close()
            raise
        self.block_bytes = max(4096, block_bytes)
        self.ahead_bytes = max(self.block_bytes, ahead_bytes)
        self.started = time.perf_counter()
        self.read_seconds = 0.0
        self.wait_seconds = 0.0
        self._cond = threading.Condition()
        self._blocks: deque[memoryview] = deque()  # filled, not yet taken (the head may be partly taken)
        self._free: list[bytearray] = []
        self._queued = 0  # bytes in _blocks
        self._consumed = 0
        self._done = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._digest: str | None = None
        self._thread = threading.Thread(target=self._run, name="payload-read", daemon=True)
        self._thread.start()

    # -- the reading thread ----------------------------------------------------------
    def _run(self) -> None:
        h = xxhash.xxh3_64()
        busy = 0.0
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            left = self.size
            while left > 0:
                with self._cond:
                    while self._queued >= self.ahead_bytes and not self._cancelled:
                        self._cond.wait()
                    if self._cancelled:
                        return
                    buf = self._free.pop() if self._free else None
                t0 = time.perf_counter()
                if buf is None:
                    buf = bytearray(self.block_bytes)
                view = memoryview(buf)[: min(self.block_bytes, left)]
                got = 0
                while got < len(view):
                    n = self._file.readinto(view[got:])
                    if not n:
                        raise PayloadReadError(f"{os.path.basename(self.path)} ended at byte "
                                               f"{self.size - left + got} of {self.size}")
                    got += n
                h.update(view)
                busy += time.perf_counter() - t0
                left -= got
                with self._cond:
                    self._blocks.append(view)
                    self._queued += got
                    self._cond.notify_all()
            self._digest = h.hexdigest()
        except BaseException as exc:  # handed to the consumer
            self._error = exc
        finally:
            self.read_seconds = busy
            self._file.close()
            with self._cond:
                self._done = True
                self._cond.notify_all()

    # -- the consumer --------------------------------------------------------------------
    def readinto(self, out) -> int:
        """Fills `out` (a writable buffer) with the next len(out) bytes of the file, waiting
        for the thread as needed. Returns len(out). Raises PayloadReadError when the file
        ends first or the read failed or was cancelled."""
        out = memoryview(out).cast("B")
        filled = 0
        while filled < len(out):
            with self._cond:
                if not self._blocks:
                    t0 = time.perf_counter()
                    while not self._blocks and not self._done and not self._cancelled:
                        self._cond.wait()
                    self.wait_seconds += time.perf_counter() - t0
                    if not self._blocks:
                        raise self._failure()
                head = self._blocks[0]
            n = min(len(head), len(out) - filled)
            out[filled: filled + n] = head[:n]  # a memcpy, outside the lock
            filled += n
            with self._cond:
                self._queued -= n
                if n == len(head):
                    self._blocks.popleft()
                    self._free.append(head.obj)
                else:
                    self._blocks[0] = head[n:]
                self._cond.notify_all()
        self._consumed += filled
        return filled

    def read(self, n: int) -> bytes:
        """The next `n` bytes. Raises PayloadReadError as `readinto` does."""
        buf = bytearray(n)
        self.readinto(buf)
        return bytes(buf)

    def skip(self, n: int) -> None:
        """Takes the next `n` bytes without keeping them (they are hashed all the same)."""
        left = n
        scratch = bytearray(min(n, self.block_bytes)) if n else b""
        while left > 0:
            step = min(left, len(scratch))
            self.readinto(memoryview(scratch)[:step])
            left -= step

    @property
    def consumed(self) -> int:
        """Bytes the consumer has taken so far."""
        return self._consumed

    def finish(self) -> str:
        """Takes what the consumer left, waits for the thread and returns the xxh3_64 hex
        digest of the whole file. Raises PayloadReadError when the read failed."""
        self.skip(self.size - self._consumed)
        self._thread.join()
        if self._digest is None:
            raise self._failure()
        return self._digest

    def cancel(self) -> None:
        """Stops the thread and frees its blocks; later calls raise PayloadReadError."""
        with self._cond:
            self._cancelled = True
            self._blocks.clear()
            self._free.clear()
            self._queued = 0
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        """True once the thread has read the whole file (or stopped)."""
        return self._done

    def _failure(self) -> PayloadReadError:
        if self._cancelled:
            return PayloadReadError(f"read of {os.path.basename(self.path)} was cancelled")
        if isinstance(self._error, PayloadReadError):
            return self._error
        if self._error is not None:
            err = PayloadReadError(f"reading {os.path.basename(self.path)} failed: {self._error}")
            err.__cause__ = self._error
            return err
        return PayloadReadError(f"{os.path.basename(self.path)} ended after {self._consumed} bytes")


def read_header(read: SequentialRead) -> PayloadHeader:
    """Takes a safetensors header from the start of `read` and returns the layout it
    describes, tensors sorted by offset. Raises PayloadReadError when the header is not
    valid JSON of the safetensors form, or its tensors overlap or lie outside the file."""
    (length,) = struct.unpack("<Q", read.read(8))
    if not 0 < length < HEADER_LIMIT or 8 + length > read.size:
        raise PayloadReadError(f"header length {length} does not fit a {read.size}-byte file")
    try:
        raw = json.loads(read.read(length))
        if not isinstance(raw, dict):
            raise ValueError("the header is not a JSON object")
        metadata = raw.pop("__metadata__", None) or {}
        data_start = 8 + length
        tensors = []
        for name, info in raw.items():
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            count = 1
            for d in shape:
                count *= d
            if end - begin != count * DTYPE_BYTES[info["dtype"]] or begin < 0:
                raise ValueError(f"tensor {name}: offsets {begin}-{end} do not match {info['dtype']} {shape}")
            tensors.append(TensorSpan(name, info["dtype"], shape, data_start + begin, data_start + end))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise PayloadReadError(f"bad safetensors header in {os.path.basename(read.path)}: {exc}") from exc
    tensors.sort(key=lambda t: (t.start, t.end))  # empty tensors first where several share an offset
    pos = data_start
    for t in tensors:
        if t.start < pos or t.end > read.size:
            raise PayloadReadError(f"tensor {t.name} at bytes {t.start}-{t.end} overlaps another or lies past "
                                   f"the end of the {read.size}-byte file")
        pos = t.end
    return PayloadHeader(data_start, dict(metadata), tuple(tensors))


# -- the page cache ---------------------------------------------------------------------------

_libc = None


def _c():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


_RESIDENT_BIT = bytes(i & 1 for i in range(256))  # mincore's low bit: the page is resident


def resident_fraction(fd: int, size: int) -> float | None:
    """Fraction (0..1) of a file's first `size` bytes that the page cache holds now:
    mincore(2) over a read-only shared mapping of the open file `fd` (nothing is read).
    None where mincore is unavailable or fails."""
    if size <= 0:
        return 1.0
    try:
        libc = _c()
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    pages = -(-size // page)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            return None
        return bytes(vec).translate(_RESIDENT_BIT).count(1) / pages
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)


def resident_fraction_of(path) -> float | None:
    """`resident_fraction` of the whole file at `path`. Raises OSError when it cannot be opened."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        return resident_fraction(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


PROBE_BYTES = 32 << 20  # how much a cold-read probe reads, bytes
_PROBE_BLOCK = 4 << 20


def probe_cold_read_bps(path, max_bytes: int = PROBE_BYTES) -> float | None:
    """Read bandwidth of the disk under `path` with the page cache bypassed (O_DIRECT on
    Linux, F_NOCACHE on macOS), bytes per second, from reading up to `max_bytes` of the
    file (a plain read would measure the page cache). None where the filesystem refuses
    such reads (tmpfs, some overlays), the file is under 1 MiB, or it cannot be read."""
    direct = getattr(os, "O_DIRECT", 0)
    nocache = sys.platform == "darwin"
    if not direct and not nocache:
        return None
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | direct)
    except OSError:
        return None
    try:
        if nocache:
            import fcntl

            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
        size = os.fstat(fd).st_size
        want = min(size, max_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if want < (1 << 20):
            return None
        buf = mmap.mmap(-1, _PROBE_BLOCK)  # page-aligned, as O_DIRECT needs
        got, t0 = 0, time.perf_counter()
        while got < want:
            n = os.preadv(fd, [memoryview(buf)[: min(_PROBE_BLOCK, want - got)]], got)
            if n <= 0:
                break
            got += n
        seconds = time.perf_counter() - t0
        buf.close()
        return got / seconds if got >= (1 << 20) and seconds > 0 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def drop_from_page_cache(path) -> None:
    """Asks the kernel to drop a file's clean pages from the page cache
    (posix_fadvise DONTNEED; benchmarks use it to measure cold reads). A no-op where
    unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
