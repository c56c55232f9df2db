"""Payload files: durable writes, checksums, names. No knowledge of what the bytes mean (no mlx)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import xxhash

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

PAYLOAD_SUFFIX = ".safetensors"
TEMP_MARK = ".tmp"
FILE_MODE = 0o600
DIR_MODE = 0o700
_CHUNK = 8 << 20


def final_name(entry_id: str) -> str:
    """``<entry id>.safetensors``: ids are fresh, so a name is never reused (case C10)."""
    return entry_id + PAYLOAD_SUFFIX


def temp_name(entry_id: str) -> str:
    """``<entry id>.tmp<pid>.safetensors``: ends with .safetensors (mx.save_safetensors would
    otherwise append it) and matches ``*.tmp*`` for open-time cleanup."""
    return f"{entry_id}{TEMP_MARK}{os.getpid()}{PAYLOAD_SUFFIX}"


def is_temp(name: str) -> bool:
    return TEMP_MARK in name


def writer_pid(name: str) -> int | None:
    """The process id a temp file's name records (see `temp_name`), or None."""
    if TEMP_MARK not in name:
        return None
    digits = name.split(TEMP_MARK, 1)[1].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def writer_alive(name: str) -> bool:
    """True when the temp file's writer process still runs on this host (it may
    be mid-store); False for a dead writer or a name without a pid."""
    pid = writer_pid(name)
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def entry_id_of(name: str) -> str | None:
    """Entry id of a final payload file name, else None."""
    if is_temp(name) or not name.endswith(PAYLOAD_SUFFIX):
        return None
    return name[: -len(PAYLOAD_SUFFIX)]


def fsync_file(path: Path) -> None:
    """Flush a file's data to stable storage; F_FULLFSYNC on macOS (plain fsync stops at the drive cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):
            try:
                fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
                return
            except OSError:
                pass  # filesystem without full sync support: fall back to fsync
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum_file(path: Path) -> str:
    """xxh3_64 hex digest of a whole file (read in 8 MiB chunks). Raises OSError."""
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def create_private(path: Path) -> None:
    """Create an empty file with mode 0o600, failing if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.close(fd)


def unlink_quiet(path: Path) -> bool:
    """Remove a file; False when it was already gone or could not be removed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False


def age_s(path: Path, now: float | None = None) -> float:
    """Seconds since the file was last modified (0 when it vanished)."""
    try:
        return (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def disk_space(directory: Path) -> tuple[int, int] | None:
    """(free bytes for an unprivileged writer, total bytes) of the filesystem holding
    `directory`; None when it cannot be read (e.g. the directory vanished)."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return None
    return usage.free, usage.total


def store_room(store_dir: Path) -> tuple[int, int]:
    """(free bytes on the filesystem that holds or will hold `store_dir`, bytes of the
    finished payload files already in its "payloads" folder): the room a store's disk
    budget is sized from. A missing directory is measured at its nearest existing parent
    (0 stored bytes); an unreadable one gives (0, 0)."""
    probe = Path(store_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    space = disk_space(probe)
    stored = 0
    try:
        with os.scandir(Path(store_dir) / "payloads") as it:
            for e in it:
                if e.name.endswith(PAYLOAD_SUFFIX) and not is_temp(e.name):
                    try:
                        stored += e.stat().st_size
                    except FileNotFoundError:  # evicted meanwhile
                        pass
    except OSError:  # no store there yet
        pass
    return (space[0] if space else 0), stored
