"""The one LMDB wrapper of the store: environment lifecycle, transactions and the on-disk layout.

Layout (named sub-databases of one environment at ``<store>/index/``):
  rows    entry id (ascii)            -> Entry as JSON (quarantined rows keep a ``quarantined`` reason)
  tokens  entry id (ascii)            -> the entry's token ids, packed little-endian uint32
  nodes   chain node c_k (16 bytes)   -> uint32 refcount + registrations (uint32 r, 16-byte tail hash, 32-byte id)
  meta    b"live_bytes"               -> int64 sum of payload bytes of usable rows
          b"qsum:" + checksum         -> reason: payload bytes that were quarantined and are never re-added

          b"n:" / b"b:" / b"t:" + kind -> int64 usable rows / payload bytes / tokens of that kind
          b"quarantined"               -> int64 quarantined rows
          b"counters"                  -> present once the counters above are exact (set at creation
                                          and by ``Txn.recount``; stores written before them lack it)

Process rules (py-lmdb docs): one environment per path per process, shared by every
``Index`` on that path in the process and opened lazily in the process that uses it; a
handle inherited through fork is closed in the child and reopened. Every transaction runs
in a ``with``; a write that fills the map doubles ``map_size`` and is retried; another
process having grown the map (MapResizedError) is adopted with ``set_mapsize(0)``.

Concurrency inside a process: read transactions run at once (LMDB readers never block);
write transactions take a mutex (one writer, as LMDB allows) and, like readers, the shared
side of a readers-writer lock whose exclusive side only resizing the map takes (LMDB
forbids ``set_mapsize`` while any transaction of the process is open). So a routing
lookup never waits for a scan or a commit.

Full filesystems: LMDB maps its lock file (``lock.mdb``) shared and writes it through the
mapping; on a filesystem that cannot allocate a page of it (a full tmpfs, where files are
sparse) the process dies of SIGBUS. Before opening, the lock file is therefore allocated
in full (``posix_fallocate``), and a store opened for the first time must find
``INDEX_SPACE_PROBE_BYTES`` of free space; either failing raises OSError (ENOSPC), which
the store turns into "serve without a store" instead of a crash.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lmdb

from . import keys
from .config import KINDS
from .entry import Entry
from .rwlock import RWLock

log = logging.getLogger("kvrouter.cachestore")

T = TypeVar("T")

INITIAL_MAP_SIZE = 1 << 30
"""Starting map size, bytes (address space, not disk); doubled on MapFullError."""

MAX_MAP_SIZE = 1 << 40
_MAX_RETRIES = 16

INDEX_SPACE_PROBE_BYTES = 1 << 20
"""Free space, bytes, that a store's first open must be able to allocate: LMDB's lock
file (16 KiB with 254 readers) and first data pages, with a wide margin."""

DB_NAMES = (b"rows", b"tokens", b"nodes", b"meta")

# Every flag of lmdb.open, with the reason it has this value.
ENV_FLAGS: dict[str, object] = {
    "subdir": True,  # data.mdb + lock.mdb live in <store>/index/, apart from payloads/
    "create": True,  # the first process to open a store directory creates the index
    "readonly": False,  # workers write; a CLI that only lists still takes the same env
    "lock": True,  # several workers, the router and the CLI share the env at once
    "sync": True,  # a committed row survives power loss (its payload was fsynced first, C10)
    "metasync": True,  # same: no window where the last commit can be lost
    "map_async": False,  # only meaningful with writemap
    "writemap": False,  # a stray write through a pointer cannot corrupt the file; map grows safely on macOS
    "readahead": False,  # point reads of a few pages per lookup; read-ahead only evicts payload pages
    "meminit": True,  # unused page bytes are zeroed: no leftover heap memory written to disk
    "max_dbs": len(DB_NAMES) + 4,  # the named sub-databases above, with room for later ones
    "max_readers": 254,  # one slot per concurrent reader thread across all processes on the host
    "max_spare_txns": 0,  # a cached read txn holds a reader slot; nothing to inherit across fork
    "mode": 0o600,  # index files private to the user (the directory itself is created 0o700 by us)
}

_NODE_HEAD = struct.Struct("<I")
_REG = struct.Struct("<I16s32s")
_I64 = struct.Struct("<q")
_LIVE_BYTES = b"live_bytes"
_QSUM = b"qsum:"
_QUARANTINED = b"quarantined"
_COUNTERS = b"counters"
_COUNT, _BYTES, _TOKENS = b"n:", b"b:", b"t:"


@dataclass(frozen=True)
class IndexStats:
    """What the index holds, from its counters (O(1)).

    entries / payload_bytes / tokens: usable rows, their payload bytes and their tokens,
    by kind (every kind of ``KINDS`` present, 0 when none); quarantined: quarantined rows.
    """

    entries: dict[str, int]
    payload_bytes: dict[str, int]
    tokens: dict[str, int]
    quarantined: int

    @property
    def total_entries(self) -> int:
        return sum(self.entries.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.payload_bytes.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


@dataclass
class _EnvHandle:
    env: lmdb.Environment
    dbs: dict[bytes, object]
    pid: int
    readonly: bool = False
    lock_fd: int | None = None  # keeps lock.mdb's allocation check's fd open (closing it would drop LMDB's locks)
    rw: RWLock = field(default_factory=RWLock)  # shared: any transaction; exclusive: map resize
    write_lock: threading.Lock = field(default_factory=threading.Lock)  # one write transaction at a time
    refs: int = 0

    def close(self) -> None:
        try:
            self.env.close()
        finally:
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None


_REGISTRY: dict[str, _EnvHandle] = {}
_REGISTRY_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _allocate(fd: int) -> None:
    """Allocates every block of the file behind `fd` up to its size (no size change)."""
    size = os.fstat(fd).st_size
    if size and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


def _check_space_before_open(path: Path) -> None:
    """Raises OSError(ENOSPC) when opening the environment at `path` could crash the
    process with SIGBUS (see the module docstring): an existing lock file whose blocks
    cannot all be allocated, or a first open without INDEX_SPACE_PROBE_BYTES free."""
    lock = path / "lock.mdb"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        fd = None
    if fd is not None:  # this process does not have the environment open: closing fd drops no lock of ours
        try:
            _allocate(fd)
        finally:
            os.close(fd)
        return
    if not hasattr(os, "posix_fallocate"):
        return
    probe = path / f"space-probe.{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, INDEX_SPACE_PROBE_BYTES)
    finally:
        os.close(fd)
        os.unlink(probe)


def _open_env(path: Path, readonly: bool = False) -> _EnvHandle:
    """Opens the environment at `path` (read-only: never creates or writes anything).

    Raises OSError when the files cannot be created or allocated (ENOSPC, EACCES, EROFS)
    and lmdb.Error when LMDB cannot open them (a read-only open of a store that has no
    index yet raises lmdb.Error too)."""
    if readonly:
        env = lmdb.open(str(path), map_size=INITIAL_MAP_SIZE,
                        **{**ENV_FLAGS, "readonly": True, "create": False})
        try:
            # without txn=: py-lmdb commits the read transaction that opens each handle, so
            # the handles outlive it (a `with env.begin()` read transaction aborts, closing them)
            dbs: dict[bytes, object] = {name: env.open_db(name, create=False) for name in DB_NAMES}
        except BaseException:
            env.close()
            raise
        return _EnvHandle(env=env, dbs=dbs, pid=os.getpid(), readonly=True)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_space_before_open(path)
    env = lmdb.open(str(path), map_size=INITIAL_MAP_SIZE, **ENV_FLAGS)
    lock_fd = None
    try:
        # LMDB may have just created or extended lock.mdb (sparse): allocate it now, and keep
        # the fd open until the environment closes (closing it would release LMDB's fcntl locks).
        lock_fd = os.open(path / "lock.mdb", os.O_RDWR)
        _allocate(lock_fd)
        cleared = env.reader_check()  # free reader slots of processes that died (kill -9) holding a read txn
        if cleared:
            log.info("index reader_check cleared %d stale readers path=%s", cleared, path)
        dbs = {}
        with env.begin(write=True) as txn:
            for name in DB_NAMES:
                dbs[name] = env.open_db(name, txn=txn)
            rows = txn.stat(dbs[b"rows"])["entries"]
            if rows == 0 and txn.get(_COUNTERS, db=dbs[b"meta"]) is None:
                txn.put(_COUNTERS, b"1", db=dbs[b"meta"])  # a new index: every counter starts exact at 0
    except BaseException:
        env.close()
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return _EnvHandle(env=env, dbs=dbs, pid=os.getpid(), lock_fd=lock_fd)


def stats_of(rows: list[Entry]) -> IndexStats:
    """The counters' values computed from rows (a scan's result)."""
    entries = {k: 0 for k in KINDS}
    size = {k: 0 for k in KINDS}
    tokens = {k: 0 for k in KINDS}
    quarantined = 0
    for e in rows:
        if e.quarantined:
            quarantined += 1
        elif e.kind in entries:
            entries[e.kind] += 1
            size[e.kind] += e.payload_bytes
            tokens[e.kind] += e.n_tokens
    return IndexStats(entries, size, tokens, quarantined)


class Txn:
    """A transaction bound to the store's sub-databases; counts point reads for the lookup-cost test."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[bytes, object], index: "Index") -> None:
        self._txn = txn
        self._dbs = dbs
        self._index = index

    def get(self, db: bytes, key: bytes) -> bytes | None:
        self._index.point_reads += 1
        return self._txn.get(key, db=self._dbs[db])

    def put(self, db: bytes, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._dbs[db])

    def delete(self, db: bytes, key: bytes) -> bool:
        return self._txn.delete(key, db=self._dbs[db])

    def items(self, db: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Full scan of a sub-database (listing, eviction, open-time repair; never lookup)."""
        self._index.scans += 1
        with self._txn.cursor(db=self._dbs[db]) as cur:
            for k, v in cur:
                yield bytes(k), bytes(v)

    # ---- layout helpers -------------------------------------------------------------

    def row(self, entry_id: str) -> Entry | None:
        raw = self.get(b"rows", entry_id.encode())
        return Entry.from_json(raw) if raw is not None else None

    def rows(self) -> list[Entry]:
        return [Entry.from_json(v) for _, v in self.items(b"rows")]

    def tokens(self, entry_id: str) -> bytes | None:
        return self.get(b"tokens", entry_id.encode())

    def live_bytes(self) -> int:
        raw = self.get(b"meta", _LIVE_BYTES)
        return _I64.unpack(raw)[0] if raw is not None else 0

    def _add_live_bytes(self, delta: int) -> None:
        self.put(b"meta", _LIVE_BYTES, _I64.pack(max(0, self.live_bytes() + delta)))

    def set_live_bytes(self, value: int) -> None:
        self.put(b"meta", _LIVE_BYTES, _I64.pack(value))

    def _meta_int(self, key: bytes) -> int:
        raw = self.get(b"meta", key)
        return _I64.unpack(raw)[0] if raw is not None else 0

    def _add_meta_int(self, key: bytes, delta: int) -> None:
        self.put(b"meta", key, _I64.pack(max(0, self._meta_int(key) + delta)))

    def _count(self, entry: Entry, sign: int) -> None:
        """Adds (sign 1) or takes away (sign -1) a usable row from the per-kind counters."""
        kind = entry.kind.encode()
        self._add_meta_int(_COUNT + kind, sign)
        self._add_meta_int(_BYTES + kind, sign * entry.payload_bytes)
        self._add_meta_int(_TOKENS + kind, sign * entry.n_tokens)

    def stats(self) -> IndexStats | None:
        """The counters (a few point reads), or None for an index written before they
        existed and not recounted since (``recount`` fixes that)."""
        if self.get(b"meta", _COUNTERS) is None:
            return None
        get = self._meta_int
        return IndexStats(
            entries={k: get(_COUNT + k.encode()) for k in KINDS},
            payload_bytes={k: get(_BYTES + k.encode()) for k in KINDS},
            tokens={k: get(_TOKENS + k.encode()) for k in KINDS},
            quarantined=get(_QUARANTINED),
        )

    def recount(self) -> IndexStats:
        """Sets every counter (and ``live_bytes``) from a scan of the rows; returns them."""
        rows = self.rows()
        stats = stats_of(rows)
        for k in KINDS:
            self.put(b"meta", _COUNT + k.encode(), _I64.pack(stats.entries[k]))
            self.put(b"meta", _BYTES + k.encode(), _I64.pack(stats.payload_bytes[k]))
            self.put(b"meta", _TOKENS + k.encode(), _I64.pack(stats.tokens[k]))
        self.put(b"meta", _QUARANTINED, _I64.pack(stats.quarantined))
        self.set_live_bytes(stats.total_bytes)
        self.put(b"meta", _COUNTERS, b"1")
        return stats

    def quarantined_checksum(self, checksum: str) -> str | None:
        raw = self.get(b"meta", _QSUM + checksum.encode())
        return raw.decode() if raw is not None else None

    def node(self, node: bytes) -> tuple[int, list[tuple[int, bytes, str]]] | None:
        raw = self.get(b"nodes", node)
        if raw is None:
            return None
        (refs,) = _NODE_HEAD.unpack_from(raw)
        regs = [
            (r, th, eid.decode())
            for r, th, eid in _REG.iter_unpack(raw[_NODE_HEAD.size :])
        ]
        return refs, regs

    def _put_node(self, node: bytes, refs: int, regs: list[tuple[int, bytes, str]]) -> None:
        if refs <= 0 and not regs:
            self.delete(b"nodes", node)
            return
        body = b"".join(_REG.pack(r, th, eid.encode()) for r, th, eid in regs)
        self.put(b"nodes", node, _NODE_HEAD.pack(refs) + body)

    def add_entry(self, entry: Entry, packed: bytes) -> None:
        """Insert a usable row: row, tokens, refcounts on c_0..c_q and the registration at c_q."""
        root = keys.root_key(entry.model_id, entry.namespace)
        path = keys.path_nodes(root, packed)
        q, r = keys.split(entry.n_tokens)
        for k, node in enumerate(path):
            refs, regs = self.node(node) or (0, [])
            if k == q:
                regs.append((r, keys.tail_hash(node, packed[q * keys.BLOCK_TOKENS * 4 :]), entry.id))
            self._put_node(node, refs + 1, regs)
        self.put(b"rows", entry.id.encode(), entry.to_json())
        self.put(b"tokens", entry.id.encode(), packed)
        self._add_live_bytes(entry.payload_bytes)
        self._count(entry, 1)

    def _unregister(self, entry: Entry) -> None:
        packed = self.tokens(entry.id)
        if packed is None:
            return
        root = keys.root_key(entry.model_id, entry.namespace)
        path = keys.path_nodes(root, packed)
        q, _ = keys.split(entry.n_tokens)
        for k, node in enumerate(path):
            found = self.node(node)
            if found is None:
                continue
            refs, regs = found
            if k == q:
                regs = [reg for reg in regs if reg[2] != entry.id]
            self._put_node(node, refs - 1, regs)
        self.delete(b"tokens", entry.id.encode())
        self._add_live_bytes(-entry.payload_bytes)
        self._count(entry, -1)

    def remove_entry(self, entry_id: str) -> Entry | None:
        """Delete a row (usable or quarantined) and its keys; returns the removed row."""
        entry = self.row(entry_id)
        if entry is None:
            return None
        if not entry.quarantined:
            self._unregister(entry)
        else:
            self._add_meta_int(_QUARANTINED, -1)
        self.delete(b"tokens", entry_id.encode())
        self.delete(b"rows", entry_id.encode())
        return entry

    def quarantine_entry(self, entry_id: str, reason: str, bad_checksum: str | None) -> Entry | None:
        """Unregister a row's keys, keep the row with its reason, and remember the bad payload checksum."""
        if bad_checksum:
            self.put(b"meta", _QSUM + bad_checksum.encode(), reason.encode())
        entry = self.row(entry_id)
        if entry is None or entry.quarantined:
            return entry
        self._unregister(entry)
        self._add_meta_int(_QUARANTINED, 1)
        marked = Entry(**{**entry.__dict__, "quarantined": reason or "unspecified"})
        self.put(b"rows", entry_id.encode(), marked.to_json())
        return marked

    def update_row(self, entry: Entry) -> None:
        self.put(b"rows", entry.id.encode(), entry.to_json())

    def find_exact(self, model_id: str, namespace: str, packed: bytes) -> Entry | None:
        """The usable row holding exactly these tokens, or None (one node read plus the confirmation reads)."""
        n = len(packed) // 4
        q, r = keys.split(n)
        node = keys.path_nodes(keys.root_key(model_id, namespace), packed)[q]
        found = self.node(node)
        if found is None:
            return None
        th = keys.tail_hash(node, packed[q * keys.BLOCK_TOKENS * 4 :])
        for rr, tth, eid in found[1]:
            if rr == r and tth == th:
                entry = self._confirm(eid, model_id, namespace, packed, n)
                if entry is not None:
                    return entry
        return None

    def find_longest(self, model_id: str, namespace: str, packed: bytes) -> Entry | None:
        """Longest usable row whose tokens are exactly a prefix of ``packed``.

        Every node on a stored entry's path exists, so along the prompt's chain
        c_0, c_1, ... the present nodes form a prefix: a binary search finds the
        deepest one in log2(len/64) + 1 reads. Registrations are then searched from
        that node back; a node without a matching registration costs one more read.
        """
        root = keys.root_key(model_id, namespace)
        first = self.node(root)
        if first is None:
            return None
        chain = keys.path_nodes(root, packed)
        found: dict[int, list[tuple[int, bytes, str]]] = {0: first[1]}
        lo, hi = 0, len(chain) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            got = self.node(chain[mid])
            if got is None:
                hi = mid - 1
            else:
                lo = mid
                found[mid] = got[1]

        def regs_at(k: int):
            if k in found:
                return found[k]
            got = self.node(chain[k])
            return got[1] if got is not None else []

        return keys.search_registrations(
            chain, lo, packed, regs_at, lambda eid, n: self._confirm(eid, model_id, namespace, packed, n))

    def _confirm(self, eid: str, model_id: str, namespace: str, packed: bytes, n: int) -> Entry | None:
        entry = self.row(eid)
        if (
            entry is None
            or entry.quarantined
            or entry.model_id != model_id
            or entry.namespace != namespace
            or entry.n_tokens != n
        ):
            return None
        stored = self.tokens(eid)
        if stored is None or stored != packed[: 4 * n]:
            return None
        return entry


class Index:
    """LMDB index of one store directory (``path`` is the environment directory).

    readonly: open the environment read-only (``kvrouter cache ls/show/verify``): nothing
    is created or written, ``write`` raises lmdb.ReadonlyError, and a missing index raises
    lmdb.Error on first use. Within one process every ``Index`` of a path shares one
    environment (py-lmdb's rule); a read-only one reuses a read-write environment already
    open, and a read-write one cannot join a read-only environment (lmdb.ReadonlyError).

    ``point_reads`` / ``scans`` count ``Txn.get`` calls and full sub-database scans made
    through this object (a cheap way for tests to assert that lookup never scans).
    """

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.point_reads = 0
        self.scans = 0
        self._handle: _EnvHandle | None = None

    # ---- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        """Opens (or joins) the environment now rather than at the first transaction, so
        that errors show where the caller expects them. Raises OSError or lmdb.Error."""
        self._acquire()

    def _acquire(self) -> _EnvHandle:
        pid = os.getpid()
        handle = self._handle
        if handle is not None and handle.pid == pid:
            return handle
        key = os.path.realpath(self.path)
        with _REGISTRY_LOCK:
            shared = _REGISTRY.get(key)
            if shared is not None and shared.pid != pid:
                # Inherited through fork: LMDB handles must not be used in the child. Closing
                # it here is safe (fcntl locks are not inherited) and lets us reopen.
                try:
                    shared.close()
                except (lmdb.Error, OSError):
                    pass
                del _REGISTRY[key]
                shared = None
            if shared is not None and shared.readonly and not self.readonly:
                raise lmdb.ReadonlyError(f"{self.path} is open read-only in this process")
            if shared is None:
                shared = _open_env(self.path, readonly=self.readonly)
                _REGISTRY[key] = shared
            shared.refs += 1
            self._handle = shared
            return shared

    def close(self) -> None:
        """Drop this object's share of the environment; the last share in the process closes it."""
        handle, self._handle = self._handle, None
        if handle is None or handle.pid != os.getpid():
            return
        key = os.path.realpath(self.path)
        with _REGISTRY_LOCK:
            handle.refs -= 1
            if handle.refs <= 0:
                with handle.rw.exclusive():
                    handle.close()
                if _REGISTRY.get(key) is handle:
                    del _REGISTRY[key]

    # ---- transactions -----------------------------------------------------------------

    @staticmethod
    def _adopt_map_size(handle: _EnvHandle) -> None:
        """Another process grew the map (MapResizedError): adopt its size, alone in the process."""
        with handle.rw.exclusive():
            handle.env.set_mapsize(0)

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A read transaction (consistent snapshot); runs concurrently with other reads and
        with a write of this or any process."""
        handle = self._acquire()
        for attempt in range(_MAX_RETRIES):
            with handle.rw.shared():
                try:
                    txn = handle.env.begin(write=False)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    with txn:
                        yield Txn(txn, handle.dbs, self)
                    return
            self._adopt_map_size(handle)
        raise lmdb.MapResizedError("map resized repeatedly while beginning a read transaction")

    def write(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in one write transaction and commit; retried after growing the map when full.

        ``fn`` may run more than once, so it must only touch the transaction. Raises the
        lmdb.Error of any other failure (the transaction is aborted): lmdb.DiskError or
        lmdb.Error with ENOSPC on a full disk, lmdb.ReadonlyError on a read-only index.
        """
        handle = self._acquire()
        if handle.readonly:
            raise lmdb.ReadonlyError(f"index {self.path} is open read-only")
        with handle.write_lock:
            for attempt in range(_MAX_RETRIES):
                grow_to = 0
                with handle.rw.shared():
                    try:
                        with handle.env.begin(write=True) as txn:
                            return fn(Txn(txn, handle.dbs, self))
                    except lmdb.MapResizedError:
                        pass
                    except lmdb.MapFullError:
                        size = handle.env.info()["map_size"]
                        if size >= MAX_MAP_SIZE:
                            raise
                        grow_to = size * 2
                if grow_to:
                    with handle.rw.exclusive():
                        handle.env.set_mapsize(grow_to)
                    log.info("index map grown to %d MiB path=%s", grow_to >> 20, self.path)
                else:
                    self._adopt_map_size(handle)
            raise lmdb.MapFullError("index write retried too many times")
