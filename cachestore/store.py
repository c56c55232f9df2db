"""CheckpointStore: payload files plus the LMDB index of one store directory.

Directory layout: ``<dir>/payloads/<entry id>.safetensors`` (KV state written by the caller)
and ``<dir>/index/`` (LMDB). Directories are 0o700, files 0o600. Several processes may open
the same directory at once.

Crash safety (cases C10, C12): a payload is written to a temp name, fsynced, checksummed,
renamed to a fresh name and the directory fsynced before its row is committed in one write
transaction; so a kill at any point leaves at most an orphan file, never a row pointing at a
missing or partial payload. ``repair`` (run by a worker at start and by ``kvrouter cache gc``)
removes orphans and stale temp files older than ``ORPHAN_AGE_S`` (younger ones may belong to
a writer in another process) and rows without payload; opening a store changes nothing.

Failures never reach the caller of a store, hit or quarantine (the request goes on from live
state or by recomputing): every exception of writing a payload or committing a row (OSError,
MLX's RuntimeError, lmdb.Error) becomes a ``skipped`` event with its reason and one log line,
and writes then pause for a backoff (doubling from ``WRITE_BACKOFF_INITIAL_S`` to
``WRITE_BACKOFF_MAX_S``), after which free space is checked again before the next write. A
hit counter or quarantine that cannot be written is logged and dropped. A store directory
that is full or unwritable when it is opened is served read-only (or, when even its index
cannot be opened safely, the constructor raises ``StoreUnavailableError`` and the caller
runs without a store).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import lmdb

from . import keys, payload
from .config import KINDS, StoreConfig
from .entry import Entry, Hit, StoreEvent
from .index import Index, IndexStats, Txn, stats_of
from .payload_read import AHEAD_BYTES, PayloadReadError, SequentialRead
from .policy import eviction_victims

log = logging.getLogger("kvrouter.cachestore")

ORPHAN_AGE_S = 60.0
"""Temp and orphan payload files younger than this (seconds) are left alone by repair and verify."""

FREE_SPACE_RESERVE_BYTES = 16 * 2**20
"""Free disk space, bytes, a payload write leaves untouched (index pages, other writers),
or 1/20 of the filesystem when that is less; a store whose payload (its size hint) would
eat into it is skipped as ``disk_full``."""


def _reserve_shortfall(directory: Path, size_hint: int) -> tuple[int, int] | None:
    """(free bytes, bytes needed) when writing `size_hint` bytes would eat into the reserve."""
    space = payload.disk_space(directory)
    if space is None:
        return None
    free, total = space
    needed = size_hint + min(FREE_SPACE_RESERVE_BYTES, total // 20)
    return (free, needed) if free < needed else None

WRITE_BACKOFF_INITIAL_S = 1.0
WRITE_BACKOFF_MAX_S = 60.0
"""After a failed write, writes pause this long (seconds), doubling per consecutive failure."""

_MIB = float(1 << 20)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _failure_reason(exc: BaseException) -> str:
    """The skip reason of a failed store: ``disk_full`` (ENOSPC, EDQUOT), ``io_error`` (other
    OSError), ``index_error`` (lmdb.Error) or ``write_failed`` (RuntimeError: MLX's writer)."""
    if isinstance(exc, lmdb.Error):
        return "index_error"
    if isinstance(exc, OSError):
        return "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
    return "write_failed"


class PayloadError(RuntimeError):
    """A payload file is missing or does not match its row (size or xxh3_64 checksum).

    The entry has been quarantined when this is raised (case C11); the caller should
    recompute cold.
    """


class StoreUnavailableError(OSError):
    """The store directory can be neither written nor read safely (e.g. a full filesystem
    on which its index was never created): run without a disk store."""


class CheckpointStore:
    """The on-disk store of KV checkpoints for one directory (see module docstring).

    read_only: open for reading only (``kvrouter cache ls/show/verify``): nothing is
    created, repaired or written; every write method raises lmdb.ReadonlyError, and a
    directory without an index raises lmdb.Error.

    Otherwise a directory that cannot be written (full, read-only, no permission) is
    opened read-only when its index exists (``writes_off`` says why; stores are skipped
    with that reason), and the constructor raises StoreUnavailableError when it does not.
    Opening never repairs: call ``repair``.
    """

    def __init__(self, config: StoreConfig, on_event: Callable[[StoreEvent], None] | None = None,
                 *, read_only: bool = False) -> None:
        """on_event: called (in the calling thread) for every store, skip, eviction,
        quarantine and removal, so a worker can count them, report them per request and
        tell a router which entries exist (events name the entry; stores carry its tokens)."""
        self.config = config
        self.on_event = on_event
        self.directory = config.directory
        self.payload_dir = self.directory / "payloads"
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._bad_ids: set[str] = set()  # quarantined by this process, even when the index could not record it
        self._write_lock = threading.Lock()  # guards the backoff state below
        self._backoff_until = 0.0  # time.monotonic() before which writes are skipped
        self._backoff_s = 0.0
        self.writes_off = ""  # why this store never writes ("" : it does)
        index_dir = self.directory / "index"
        if read_only:
            self._index = Index(index_dir, readonly=True)
            self._index.open()
            self.writes_off = "read_only"
            return
        try:
            for d in (self.directory, self.payload_dir):
                d.mkdir(mode=payload.DIR_MODE, parents=True, exist_ok=True)
                if (d.stat().st_mode & 0o777) != payload.DIR_MODE:
                    os.chmod(d, payload.DIR_MODE)
            self._index = Index(index_dir)
            self._index.open()
        except (OSError, lmdb.Error) as exc:
            self._index = Index(index_dir, readonly=True)
            try:
                self._index.open()
            except (OSError, lmdb.Error):
                raise StoreUnavailableError(
                    getattr(exc, "errno", None) or errno.EIO,
                    f"store {self.directory} is unusable: {exc}") from exc
            self.writes_off = "disk_full" if getattr(exc, "errno", None) == errno.ENOSPC else "unwritable"
            log.warning("store %s cannot be written (%s: %s); serving its checkpoints read-only, storing nothing "
                        "until a restart", self.directory, self.writes_off, exc)
            return
        short = _reserve_shortfall(self.payload_dir, 0)
        if short is not None:
            self._back_off("disk_full")
            log.warning("store %s has %.1f MiB free (its reserve is %.1f MiB): storing nothing until space is freed",
                        self.directory, short[0] / _MIB, short[1] / _MIB)

    # ---- context manager -------------------------------------------------------------

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release this store's share of the LMDB environment. Safe to call twice."""
        self._index.close()

    def _emit(self, event: StoreEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a listener must never break a store
                log.exception("store event listener failed")

    @property
    def index(self) -> Index:
        """The LMDB wrapper (exposed for diagnostics and tests: ``point_reads``, ``scans``)."""
        return self._index

    # ---- reads -----------------------------------------------------------------------

    def lookup(self, model_id: str, namespace: str, tokens: Sequence[int]) -> Hit | None:
        """Longest usable checkpoint whose token ids are exactly a prefix of ``tokens``.

        Same ``model_id`` and ``namespace`` only (C9); quarantined rows never match (C11); a
        differing token stops reuse there (C7). Cost: about len(tokens)/64 + 1 point reads
        and no scan (chained block hashes, see ``keys``). Entry length <= len(tokens).
        Returns None on a miss. Raises ValueError for token ids outside uint32.
        """
        packed = keys.pack_tokens(tokens)
        try:
            with self._index.read() as txn:
                entry = txn.find_longest(model_id, namespace, packed)
        except lmdb.Error as exc:  # a broken index: serve from live state and recompute
            log.warning("store lookup failed, treating it as a miss: %s", exc)
            return None
        if entry is not None and entry.id in self._bad_ids:
            return None
        return Hit(entry, entry.n_tokens) if entry is not None else None

    def get(self, entry_id: str) -> Entry | None:
        """The row with this id (quarantined rows included, with ``quarantined`` set), or None."""
        with self._index.read() as txn:
            return txn.row(entry_id)

    def tokens_of(self, entry_id: str) -> list[int]:
        """Token ids of a usable entry. Raises KeyError when absent or quarantined."""
        with self._index.read() as txn:
            raw = txn.tokens(entry_id)
        if raw is None:
            raise KeyError(entry_id)
        return keys.unpack_tokens(raw)

    def entries(self, include_quarantined: bool = False) -> list[Entry]:
        """All rows, oldest first (a scan: for listing and admin, never on the request path)."""
        with self._index.read() as txn:
            rows = txn.rows()
        if not include_quarantined:
            rows = [e for e in rows if not e.quarantined]
        return sorted(rows, key=lambda e: (e.created, e.id))

    def largest_bytes_per_token(self, exclude_model: str = "") -> float:
        """The most payload bytes per token of any model with usable rows here (its
        largest row's bytes / tokens, so header overhead barely counts), other than
        `exclude_model`; 0.0 when there is none. A scan: for sizing at start (several
        models sharing one store directory size one budget, the largest model's)."""
        best: dict[str, tuple[int, int]] = {}
        for e in self.entries():
            if e.model_id != exclude_model and e.n_tokens > 0 and e.n_tokens > best.get(e.model_id, (0, 0))[0]:
                best[e.model_id] = (e.n_tokens, e.payload_bytes)
        return max((b / n for n, b in best.values()), default=0.0)

    def set_disk_budget(self, budget_bytes: int) -> None:
        """Sets the budget later saves evict under, bytes (>= 1; ValueError otherwise)."""
        if budget_bytes < 1:
            raise ValueError(f"budget_bytes must be >= 1, got {budget_bytes}")
        self.config = self.config.with_budget(budget_bytes)

    def total_bytes(self) -> int:
        """Sum of the payload sizes of usable rows, bytes (kept in the index, O(1))."""
        with self._index.read() as txn:
            return txn.live_bytes()

    def stats(self) -> IndexStats:
        """Usable entries, payload bytes and tokens by kind, and quarantined rows: from the
        index's counters, O(1); one scan instead for an index written before the counters
        existed and not repaired since. Raises lmdb.Error when the index cannot be read."""
        with self._index.read() as txn:
            stats = txn.stats()
            if stats is None:
                stats = stats_of(txn.rows())
        return stats

    def _checked_payload(self, entry: Entry) -> tuple[Path, Entry, tuple[int, int, int]]:
        """(path, current row, (size, mtime_ns, inode)) of an entry's payload after checking
        that the row is usable and the file exists with the row's size; quarantines and
        raises PayloadError otherwise."""
        path = self.payload_dir / entry.payload_name
        if entry.id in self._bad_ids:
            raise PayloadError(f"entry {entry.id} was quarantined by this process")
        current = self.get(entry.id)
        if current is None or current.quarantined:
            raise PayloadError(f"entry {entry.id} is not in the index ({current.quarantined if current else 'removed'})")
        try:
            st = path.stat()
        except FileNotFoundError:
            self._quarantine(entry.id, "payload_missing", None)
            raise PayloadError(f"payload of {entry.id} is missing") from None
        if st.st_size != current.payload_bytes:
            self._quarantine(entry.id, f"size_mismatch {st.st_size}!={current.payload_bytes}", None)
            raise PayloadError(f"payload of {entry.id} has {st.st_size} bytes, row says {current.payload_bytes}")
        return path, current, (st.st_size, st.st_mtime_ns, st.st_ino)

    def payload_path(self, entry: Entry) -> Path:
        """Path of the entry's payload after checking it exists and matches size and xxh3_64 checksum
        (a whole read of the file: `kvrouter cache verify/gc`; a worker's load uses `open_read`).

        A mismatch quarantines the entry (its bytes are remembered and never re-added) and
        raises PayloadError (C11); so does a row that is gone or quarantined. The checksum
        is computed once per file per process (payload names are never reused).
        """
        path, current, stamp = self._checked_payload(entry)
        if self._verified.get(entry.id) == stamp:
            return path
        try:
            actual = payload.checksum_file(path)
        except OSError as exc:
            self._quarantine(entry.id, f"unreadable {exc.strerror or exc}", None)
            raise PayloadError(f"payload of {entry.id} unreadable: {exc}") from exc
        self._check_digest(entry.id, current, actual)
        self._verified[entry.id] = stamp
        return path

    def open_read(self, entry: Entry, ahead_bytes: int = AHEAD_BYTES) -> SequentialRead:
        """Starts the one read of an entry's payload (`payload_read.SequentialRead`: a thread
        reads the file front to back, hashing it as it goes; `ahead_bytes` bounds how far it
        runs ahead of the consumer). Checks the row and the file's size first, as
        `payload_path` does, but reads nothing twice: after taking the bytes, call
        `finish_read`, which checks the checksum. Raises PayloadError (the entry quarantined)
        for a missing, short or unopenable file, or a row that is gone or quarantined."""
        path, _, _ = self._checked_payload(entry)
        try:
            return SequentialRead(path, ahead_bytes=ahead_bytes)
        except OSError as exc:
            self._quarantine(entry.id, f"unreadable {exc.strerror or exc}", None)
            raise PayloadError(f"payload of {entry.id} unreadable: {exc}") from exc

    def finish_read(self, entry: Entry, read: SequentialRead) -> None:
        """Ends a read from `open_read`: takes any bytes the consumer left, then compares the
        xxh3_64 of everything read with the row's checksum. A mismatch or a failed read
        quarantines the entry (a mismatch also remembers the bad bytes' checksum, so they are
        never re-added: C11) and raises PayloadError."""
        try:
            actual = read.finish()
        except PayloadReadError as exc:
            self._quarantine(entry.id, f"unreadable {exc}", None)
            raise PayloadError(f"payload of {entry.id} unreadable: {exc}") from exc
        current = self.get(entry.id)
        if current is None or current.quarantined:
            raise PayloadError(f"entry {entry.id} left the index while it was read")
        self._check_digest(entry.id, current, actual)

    def _check_digest(self, entry_id: str, current: Entry, actual: str) -> None:
        if actual != current.checksum:
            self._quarantine(entry_id, f"checksum_mismatch {actual}!={current.checksum}", actual)
            raise PayloadError(f"payload of {entry_id} checksum {actual} != {current.checksum}")

    def verify(self) -> list[str]:
        """Problems found, one line each: rows without payload, size or checksum mismatches,
        orphan payload files and temp files left by dead writers. A temp file whose writer
        still runs, or an orphan younger than ORPHAN_AGE_S, may be a store in progress in
        another process and is not a problem; so is a row removed while verify runs.
        Also reports index counters that disagree with the rows. Reads every payload;
        changes nothing (works on a store opened read-only)."""
        problems: list[str] = []
        with self._index.read() as txn:
            all_rows = txn.rows()
            counters = txn.stats()
            counted = txn.live_bytes()
        rows = sorted((e for e in all_rows if not e.quarantined), key=lambda e: (e.created, e.id))
        live = {e.id for e in rows}
        exact = stats_of(all_rows)
        if counted != exact.total_bytes:
            problems.append(f"index: byte counter {counted} != {exact.total_bytes}, the sum of its rows")
        if counters is not None and counters != exact:
            problems.append("index: entry counters disagree with its rows")
        for e in rows:
            path = self.payload_dir / e.payload_name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                if self.get(e.id) is not None:  # not removed meanwhile by a running worker
                    problems.append(f"{e.id}: row without payload file {e.payload_name}")
                continue
            if size != e.payload_bytes:
                problems.append(f"{e.id}: size {size} != {e.payload_bytes}")
                continue
            try:
                actual = payload.checksum_file(path)
            except OSError as exc:
                problems.append(f"{e.id}: unreadable payload: {exc}")
                continue
            if actual != e.checksum:
                problems.append(f"{e.id}: checksum {actual} != {e.checksum}")
        now = time.time()
        names = sorted(os.listdir(self.payload_dir)) if self.payload_dir.is_dir() else []
        for name in names:
            if payload.is_temp(name):
                if not payload.writer_alive(name):
                    problems.append(f"{name}: temp file of a dead writer")
            elif payload.entry_id_of(name) not in live:
                if payload.age_s(self.payload_dir / name, now) >= ORPHAN_AGE_S:
                    problems.append(f"{name}: orphan payload file (no row)")
        return problems

    # ---- writes ----------------------------------------------------------------------

    def save(
        self,
        kind: str,
        model_id: str,
        namespace: str,
        tokens: Sequence[int],
        write_payload: Callable[[Path], None],
        text_preview: str = "",
        size_hint: int = 0,
    ) -> Entry | None:
        """Store a checkpoint of ``tokens`` whose payload ``write_payload(tmp_path)`` writes.

        Steps: skip while writes are off or backing off after a failure, or when the disk
        has less than ``size_hint`` (the expected payload size, bytes; 0: unknown) plus
        FREE_SPACE_RESERVE_BYTES free; skip when an identical entry (model, namespace,
        tokens) exists (nothing written); write to a temp file ending in ".safetensors";
        fsync (F_FULLFSYNC on macOS); xxh3_64; rename to ``<id>.safetensors``; fsync the
        directory; then one LMDB write transaction evicts under ``disk_budget_bytes``
        (anchors last, C4; never the new entry) and commits the row. A payload larger than
        the whole budget, or whose bytes were quarantined before (C11), is skipped.

        Returns the committed Entry, or None when skipped, including on any OSError,
        RuntimeError (what MLX raises when a write fails) or lmdb.Error (ENOSPC, EIO...;
        C12): temp files are removed, no row is written, one warning is logged, a
        ``skipped`` event carries the reason and writes back off. Raises ValueError for an
        unsized budget (``disk_budget_bytes`` None: the worker sizes it first), an
        unknown kind or empty/invalid tokens; other exceptions from ``write_payload``
        (programming errors) propagate after cleanup.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if self.config.disk_budget_bytes is None:
            raise ValueError("the store's disk budget is not sized (StoreConfig.with_budget)")
        packed = keys.pack_tokens(tokens)
        n = len(packed) // 4
        if n == 0:
            raise ValueError("cannot store an empty token sequence")
        t0 = time.monotonic()
        budget = self.config.disk_budget_bytes

        def skip(reason: str, size: int = 0, level: int = logging.INFO) -> None:
            log.log(
                level,
                "store skipped kind=%s tokens=%d mib=%.1f ms=%.0f namespace=%r reason=%s",
                kind, n, size / _MIB, (time.monotonic() - t0) * 1000, namespace, reason,
            )
            self._emit(StoreEvent("skipped", kind, n, size, time.monotonic() - t0, reason.split()[0]))

        blocked = self._write_blocked(size_hint)
        if blocked:
            skip(blocked, size_hint)
            return None

        entry_id = uuid.uuid4().hex
        tmp = self.payload_dir / payload.temp_name(entry_id)
        final = self.payload_dir / payload.final_name(entry_id)
        size = 0
        try:
            with self._index.read() as txn:
                if txn.find_exact(model_id, namespace, packed) is not None:
                    skip("duplicate")
                    return None
            payload.create_private(tmp)
            write_payload(tmp)
            os.chmod(tmp, payload.FILE_MODE)
            payload.fsync_file(tmp)
            size = tmp.stat().st_size
            if size > budget:
                payload.unlink_quiet(tmp)
                skip(f"payload_over_budget budget_mib={budget / _MIB:.1f}", size)
                return None
            checksum = payload.checksum_file(tmp)
            with self._index.read() as txn:
                bad = txn.quarantined_checksum(checksum)
            if bad is not None:
                payload.unlink_quiet(tmp)
                skip(f"quarantined_payload ({bad})", size)
                return None
            os.rename(tmp, final)
            payload.fsync_dir(self.payload_dir)
            now = time.time()
            entry = Entry(
                id=entry_id, kind=kind, namespace=namespace, model_id=model_id, n_tokens=n,
                payload_name=final.name, payload_bytes=size, checksum=checksum,
                created=now, last_used=now, hits=0, text_preview=text_preview[:80],
            )

            def commit(txn: Txn) -> tuple[bool, list[Entry]]:
                if txn.find_exact(model_id, namespace, packed) is not None:
                    return False, []  # another process stored the same prefix meanwhile
                victims: list[Entry] = []
                if txn.live_bytes() + size > budget:
                    victims = eviction_victims(
                        txn.rows(), size, budget, now, self.config.hit_half_life_s, protect_id=entry_id
                    )
                    for victim in victims:
                        txn.remove_entry(victim.id)
                txn.add_entry(entry, packed)
                return True, victims

            committed, victims = self._index.write(commit)
        except (OSError, RuntimeError, lmdb.Error) as exc:
            payload.unlink_quiet(tmp)
            payload.unlink_quiet(final)
            reason = _failure_reason(exc)
            self._back_off(reason)
            detail = getattr(exc, "strerror", None) or type(exc).__name__
            skip(f"{reason} {detail}: {exc} (writes pause {self._backoff_s:.0f} s)", size, logging.WARNING)
            return None
        except BaseException:
            payload.unlink_quiet(tmp)
            payload.unlink_quiet(final)
            raise
        self._writes_succeeded()

        if not committed:
            payload.unlink_quiet(final)
            skip("duplicate", size)
            return None
        for victim in victims:
            payload.unlink_quiet(self.payload_dir / victim.payload_name)
            self._verified.pop(victim.id, None)
            log.info(
                "evicted id=%s kind=%s tokens=%d mib=%.1f hits=%d age_s=%.0f reason=budget for=%s",
                victim.id, victim.kind, victim.n_tokens, victim.payload_bytes / _MIB, victim.hits,
                now - victim.created, entry_id,
            )
            self._emit(StoreEvent("evicted", victim.kind, victim.n_tokens, victim.payload_bytes, 0.0, "budget",
                                  victim.id, victim.namespace, victim.model_id))
        log.info(
            "stored id=%s kind=%s tokens=%d mib=%.1f ms=%.0f evicted=%d namespace=%r",
            entry_id, kind, n, size / _MIB, (time.monotonic() - t0) * 1000, len(victims), namespace,
        )
        self._emit(StoreEvent("stored", kind, n, size, time.monotonic() - t0, "", entry_id, namespace, model_id,
                              packed))
        return entry

    # ---- write backoff ---------------------------------------------------------------

    def _write_blocked(self, size_hint: int) -> str:
        """Why a write should not be tried now ("" : try it): writes off, a backoff running,
        or too little free space (which starts a backoff)."""
        if self.writes_off:
            return self.writes_off
        with self._write_lock:
            left = self._backoff_until - time.monotonic()
        if left > 0:
            return f"write_backoff {left:.1f} s left"
        short = _reserve_shortfall(self.payload_dir, size_hint)
        if short is not None:
            self._back_off("disk_full")
            return (f"disk_full free_mib={short[0] / _MIB:.1f} needed_mib={short[1] / _MIB:.1f} "
                    f"(writes pause {self._backoff_s:.0f} s)")
        return ""

    def _back_off(self, reason: str) -> None:
        with self._write_lock:
            self._backoff_s = min(WRITE_BACKOFF_MAX_S, max(WRITE_BACKOFF_INITIAL_S, self._backoff_s * 2))
            self._backoff_until = time.monotonic() + self._backoff_s

    def _writes_succeeded(self) -> None:
        with self._write_lock:
            self._backoff_s = 0.0
            self._backoff_until = 0.0

    @property
    def writable(self) -> bool:
        """False while writes are off for good or backing off after a failure."""
        if self.writes_off:
            return False
        with self._write_lock:
            return time.monotonic() >= self._backoff_until

    # ---- hits and quarantine (never raise) -------------------------------------------

    def quarantine(self, entry_id: str, reason: str) -> None:
        """Mark a row so lookup never returns it again, delete its payload and log (C11).

        Use when restoring the payload failed: its checksum is remembered so the same
        bytes are never re-added. A missing id is a no-op (logged). Never raises: when the
        index cannot record it, this process still never loads the entry again and its
        payload is deleted (other processes then find it missing; `repair` drops the row).
        """
        try:
            row = self.get(entry_id)
        except lmdb.Error:
            row = None
        self._quarantine(entry_id, reason, row.checksum if row is not None else None)

    def _quarantine(self, entry_id: str, reason: str, bad_checksum: str | None) -> None:
        self._verified.pop(entry_id, None)
        self._bad_ids.add(entry_id)
        try:
            marked = self._index.write(lambda txn: txn.quarantine_entry(entry_id, reason, bad_checksum))
        except (OSError, lmdb.Error) as exc:
            try:
                row = self.get(entry_id)
            except lmdb.Error:
                row = None
            if row is not None:
                payload.unlink_quiet(self.payload_dir / row.payload_name)
            log.warning("quarantine id=%s reason=%s not recorded in the index (%s); payload deleted, "
                        "never loaded again by this process", entry_id, reason, exc)
            return
        if marked is None:
            log.warning("quarantine id=%s reason=%s: no such row", entry_id, reason)
            return
        payload.unlink_quiet(self.payload_dir / marked.payload_name)
        log.warning(
            "quarantined id=%s kind=%s tokens=%d mib=%.1f namespace=%r reason=%s",
            entry_id, marked.kind, marked.n_tokens, marked.payload_bytes / _MIB, marked.namespace, reason,
        )
        self._emit(StoreEvent("quarantined", marked.kind, marked.n_tokens, marked.payload_bytes, 0.0,
                              reason.split(":")[0], marked.id, marked.namespace, marked.model_id))

    def touch(self, entry_id: str) -> None:
        """Record a hit: hits += 1, last_used = now (unix seconds). No-op for a missing or
        quarantined row, and while writes are off or backing off. Never raises: a failed
        write is logged and the hit is not counted."""
        if not self.writable:
            return
        now = time.time()

        def bump(txn: Txn) -> None:
            row = txn.row(entry_id)
            if row is not None and not row.quarantined:
                txn.update_row(Entry(**{**row.__dict__, "hits": row.hits + 1, "last_used": now}))

        try:
            self._index.write(bump)
        except (OSError, lmdb.Error) as exc:
            self._back_off("index_error")
            log.warning("hit counter of id=%s not recorded (writes pause %.0f s): %s", entry_id, self._backoff_s, exc)

    def remove(self, entry_id: str) -> bool:
        """Delete a row (usable or quarantined) and its payload. Returns whether a row existed."""
        removed = self._index.write(lambda txn: txn.remove_entry(entry_id))
        if removed is None:
            return False
        self._drop_files([removed], "removed")
        return True

    def remove_namespace(self, namespace: str) -> int:
        """Delete every row of a namespace (a scan; admin path). Returns the number of rows removed."""

        def drop(txn: Txn) -> list[Entry]:
            return [e for e in txn.rows() if e.namespace == namespace and txn.remove_entry(e.id)]

        removed = self._index.write(drop)
        self._drop_files(removed, f"namespace {namespace!r} removed")
        return len(removed)

    # ---- internals -------------------------------------------------------------------

    def _drop_files(self, removed: list[Entry], reason: str) -> None:
        for e in removed:
            payload.unlink_quiet(self.payload_dir / e.payload_name)
            self._verified.pop(e.id, None)
            log.info("removed id=%s kind=%s tokens=%d mib=%.1f reason=%s",
                     e.id, e.kind, e.n_tokens, e.payload_bytes / _MIB, reason)
            if not e.quarantined:  # a quarantined row left the index's keys already
                self._emit(StoreEvent("removed", e.kind, e.n_tokens, e.payload_bytes, 0.0, reason.split()[0],
                                      e.id, e.namespace, e.model_id))

    def collect_garbage(self) -> int:
        """What `kvrouter cache gc` runs: `repair` with every checksum checked. Returns the
        number of files removed."""
        return self.repair(verify_checksums=True)

    def repair(self, verify_checksums: bool = False) -> int:
        """The cleanup a worker runs at start and `kvrouter cache gc` runs on demand (C10):
        removes temp files of dead writers and orphan payloads older than ORPHAN_AGE_S,
        drops rows without payload, quarantines rows whose payload has the wrong size (and,
        with `verify_checksums`, the wrong xxh3_64: reads every payload), and recounts the
        index's counters when they are missing or wrong. Returns the number of files
        removed. Raises OSError / lmdb.Error (e.g. on a full disk); the store stays usable."""
        if self.writes_off:
            raise lmdb.ReadonlyError(f"store {self.directory} is not writable ({self.writes_off})")
        now = time.time()
        removed_files = 0
        names = os.listdir(self.payload_dir)
        with self._index.read() as txn:
            rows = txn.rows()
            counted = txn.live_bytes()
            counters = txn.stats()
        live = {e.id: e for e in rows if not e.quarantined}
        for name in names:
            path = self.payload_dir / name
            eid = payload.entry_id_of(name)
            if eid is not None and eid in live:
                continue
            if eid is None and payload.is_temp(name):
                if payload.writer_alive(name):
                    continue  # a store in progress in another process
            elif payload.age_s(path, now) < ORPHAN_AGE_S:
                continue  # may be a writer in another process between rename and commit
            if eid is not None:
                with self._index.read() as txn:
                    row = txn.row(eid)
                if row is not None and not row.quarantined:
                    continue  # committed since our snapshot
            if payload.unlink_quiet(path):
                removed_files += 1
                log.info("removed stale file=%s reason=%s", name, "temp" if eid is None else "orphan_payload")

        present = set(os.listdir(self.payload_dir))
        missing = [e for e in live.values() if e.payload_name not in present]
        wrong_size = [
            e for e in live.values()
            if e.payload_name in present and _size(self.payload_dir / e.payload_name) not in (None, e.payload_bytes)
        ]
        if verify_checksums:
            for e in live.values():
                if e.payload_name in present and e not in wrong_size:
                    try:
                        self.payload_path(e)  # quarantines a mismatch
                    except PayloadError:
                        pass
        exact = stats_of(rows)
        if not missing and not wrong_size and counted == exact.total_bytes and counters == exact:
            return removed_files

        def fix(txn: Txn) -> list[Entry]:
            dropped = []
            for e in missing:
                if not (self.payload_dir / e.payload_name).exists():
                    if txn.remove_entry(e.id) is not None:
                        dropped.append(e)
            txn.recount()
            return dropped

        for e in self._index.write(fix):
            log.warning("dropped row id=%s kind=%s tokens=%d reason=payload_missing", e.id, e.kind, e.n_tokens)
        for e in wrong_size:
            self._quarantine(e.id, "size_mismatch_at_open", None)
        return removed_files
