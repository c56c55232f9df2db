"""CheckpointStore: payload files plus the LMDB index of one store directory.

Directory layout: ``<dir>/payloads/<entry id>.safetensors`` (KV state written by the caller)
and ``<dir>/index/`` (LMDB). Directories are 0o700, files 0o600. Several processes may open
the same directory at once.

Crash safety (cases C10, C12): a payload is written to a temp name, fsynced, checksummed,
renamed to a fresh name and the directory fsynced before its row is committed in one write
transaction; so a kill at any point leaves at most an orphan file, never a row pointing at a
missing or partial payload. Orphans and stale temp files older than ``ORPHAN_AGE_S`` are
removed at open (younger ones may belong to a writer in another process).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import lmdb

from . import keys, payload
from .config import KINDS, StoreConfig
from .entry import Entry, Hit, StoreEvent
from .index import Index, Txn
from .policy import eviction_victims

log = logging.getLogger("kvrouter.cachestore")

ORPHAN_AGE_S = 60.0
"""Temp and orphan payload files younger than this (seconds) are left alone at open."""

_MIB = float(1 << 20)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


class PayloadError(RuntimeError):
    """A payload file is missing or does not match its row (size or xxh3_64 checksum).

    The entry has been quarantined when this is raised (case C11); the caller should
    recompute cold.
    """


class CheckpointStore:
    """The on-disk store of KV checkpoints for one directory (see module docstring).

    Raises OSError from the constructor when the directory cannot be created or opened,
    and lmdb.Error when the index cannot be opened.
    """

    def __init__(self, config: StoreConfig, on_event: Callable[[StoreEvent], None] | None = None) -> None:
        """on_event: called (in the calling thread) for every store, skip, eviction,
        quarantine and removal, so a worker can count them, report them per request and
        tell a router which entries exist (events name the entry; stores carry its tokens)."""
        self.config = config
        self.on_event = on_event
        self.directory = config.directory
        self.payload_dir = self.directory / "payloads"
        for d in (self.directory, self.payload_dir):
            d.mkdir(mode=payload.DIR_MODE, parents=True, exist_ok=True)
            if (d.stat().st_mode & 0o777) != payload.DIR_MODE:
                os.chmod(d, payload.DIR_MODE)
        self._index = Index(self.directory / "index")
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._repair()

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
        with self._index.read() as txn:
            entry = txn.find_longest(model_id, namespace, packed)
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

    def total_bytes(self) -> int:
        """Sum of the payload sizes of usable rows, bytes (kept in the index, O(1))."""
        with self._index.read() as txn:
            return txn.live_bytes()

    def payload_path(self, entry: Entry) -> Path:
        """Path of the entry's payload after checking it exists and matches size and xxh3_64 checksum.

        A mismatch quarantines the entry (its bytes are remembered and never re-added) and
        raises PayloadError (C11); so does a row that is gone or quarantined. The checksum
        is computed once per file per process (payload names are never reused).
        """
        path = self.payload_dir / entry.payload_name
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
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._verified.get(entry.id) == stamp:
            return path
        try:
            actual = payload.checksum_file(path)
        except OSError as exc:
            self._quarantine(entry.id, f"unreadable {exc.strerror or exc}", None)
            raise PayloadError(f"payload of {entry.id} unreadable: {exc}") from exc
        if actual != current.checksum:
            self._quarantine(entry.id, f"checksum_mismatch {actual}!={current.checksum}", actual)
            raise PayloadError(f"payload of {entry.id} checksum {actual} != {current.checksum}")
        self._verified[entry.id] = stamp
        return path

    def verify(self) -> list[str]:
        """Problems found, one line each: rows without payload, size or checksum mismatches,
        orphan payload files and temp files left by dead writers. A temp file whose writer
        still runs, or an orphan younger than ORPHAN_AGE_S, may be a store in progress in
        another process and is not a problem. Reads every payload; changes nothing."""
        problems: list[str] = []
        rows = self.entries()
        live = {e.id for e in rows}
        for e in rows:
            path = self.payload_dir / e.payload_name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
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
        for name in sorted(os.listdir(self.payload_dir)):
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
    ) -> Entry | None:
        """Store a checkpoint of ``tokens`` whose payload ``write_payload(tmp_path)`` writes.

        Steps: skip when an identical entry (model, namespace, tokens) exists (nothing
        written); write to a temp file ending in ".safetensors"; fsync (F_FULLFSYNC on
        macOS); xxh3_64; rename to ``<id>.safetensors``; fsync the directory; then one LMDB
        write transaction evicts under ``disk_budget_bytes`` (anchors last, C4; never the new
        entry) and commits the row. A payload larger than the whole budget, or whose bytes
        were quarantined before (C11), is skipped.

        Returns the committed Entry, or None when skipped or on any OSError / lmdb.Error
        (ENOSPC, EIO...; C12): temp files are removed, no row is written, a warning is logged.
        Raises ValueError for an unknown kind or empty/invalid tokens; other exceptions from
        ``write_payload`` propagate after cleanup.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
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

        with self._index.read() as txn:
            if txn.find_exact(model_id, namespace, packed) is not None:
                skip("duplicate")
                return None

        entry_id = uuid.uuid4().hex
        tmp = self.payload_dir / payload.temp_name(entry_id)
        final = self.payload_dir / payload.final_name(entry_id)
        size = 0
        try:
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
        except (OSError, lmdb.Error) as exc:
            payload.unlink_quiet(tmp)
            payload.unlink_quiet(final)
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            skip(f"io_error {reason}: {exc}", size, logging.WARNING)
            return None
        except BaseException:
            payload.unlink_quiet(tmp)
            payload.unlink_quiet(final)
            raise

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

    def quarantine(self, entry_id: str, reason: str) -> None:
        """Mark a row so lookup never returns it again, delete its payload and log (C11).

        Use when restoring the payload failed: its checksum is remembered so the same
        bytes are never re-added. A missing id is a no-op (logged).
        """
        row = self.get(entry_id)
        self._quarantine(entry_id, reason, row.checksum if row is not None else None)

    def _quarantine(self, entry_id: str, reason: str, bad_checksum: str | None) -> None:
        marked = self._index.write(lambda txn: txn.quarantine_entry(entry_id, reason, bad_checksum))
        self._verified.pop(entry_id, None)
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
        """Record a hit: hits += 1, last_used = now (unix seconds). No-op for a missing or quarantined row."""
        now = time.time()

        def bump(txn: Txn) -> None:
            row = txn.row(entry_id)
            if row is not None and not row.quarantined:
                txn.update_row(Entry(**{**row.__dict__, "hits": row.hits + 1, "last_used": now}))

        self._index.write(bump)

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
        """Runs the open-time cleanup now (see `_repair`). Returns the number of files removed."""
        return self._repair()

    def _repair(self) -> int:
        """Open-time cleanup (C10): stale temp files, orphan payloads, rows without payload, byte counter.
        Returns the number of files removed."""
        now = time.time()
        removed_files = 0
        names = os.listdir(self.payload_dir)
        with self._index.read() as txn:
            rows = txn.rows()
            counted = txn.live_bytes()
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
        if not missing and not wrong_size and counted == sum(e.payload_bytes for e in live.values()):
            return removed_files

        def fix(txn: Txn) -> list[Entry]:
            dropped = []
            for e in missing:
                if not (self.payload_dir / e.payload_name).exists():
                    if txn.remove_entry(e.id) is not None:
                        dropped.append(e)
            txn.set_live_bytes(sum(r.payload_bytes for r in txn.rows() if not r.quarantined))
            return dropped

        for e in self._index.write(fix):
            log.warning("dropped row id=%s kind=%s tokens=%d reason=payload_missing", e.id, e.kind, e.n_tokens)
        for e in wrong_size:
            self._quarantine(e.id, "size_mismatch_at_open", None)
        return removed_files
