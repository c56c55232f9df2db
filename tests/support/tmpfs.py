"""A small real tmpfs for full-disk tests (mounted with mount(2) through ctypes, so no
subprocess; needs root with CAP_SYS_ADMIN, else the fixture skips and the fault-injection
tests in tests/unit/test_cachestore.py cover the same code)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

import pytest

MNT_DETACH = 2


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_tmpfs(target: Path, size_bytes: int) -> None:
    """Mounts a tmpfs of `size_bytes` on `target`. Raises OSError (EPERM when not allowed)."""
    rc = _libc().mount(b"tmpfs", str(target).encode(), b"tmpfs", 0, f"size={size_bytes},mode=0700".encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def unmount(target: Path) -> None:
    _libc().umount2(str(target).encode(), MNT_DETACH)


def fill(directory: Path, name: str = "filler") -> Path:
    """Writes zeros into `directory/name` until the filesystem is full; returns the file."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 512:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return path


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A fresh 8 MiB tmpfs; skips where it cannot be mounted."""
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs mounts need Linux")
    target = tmp_path / "tmpfs"
    target.mkdir()
    try:
        mount_tmpfs(target, 8 * 2**20)
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        yield target
    finally:
        unmount(target)
