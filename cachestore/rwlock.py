"""A readers-writer lock for the threads of one process (writer-preferring).

The LMDB index uses it so that read transactions run concurrently, as LMDB allows,
while the one thing that must not overlap any transaction of this process, resizing
the memory map (`mdb_env_set_mapsize`), takes it exclusively.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Many holders of `shared()` at once, or one holder of `exclusive()`.

    A thread waiting for `exclusive()` stops new `shared()` holders from entering, so a
    stream of readers cannot starve it. Not reentrant: a thread holding `shared()` must
    release it before asking for `exclusive()` (and the other way round).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Held by any number of threads at once while no thread holds or awaits `exclusive()`."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held by one thread, while no other holds `shared()` or `exclusive()`."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
