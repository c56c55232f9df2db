"""The RAM tier: recently stored or loaded checkpoints kept in host memory (on
Apple silicon, the GPU's unified memory), bounded by `--kv-cache-ram-mb`, least
recently used dropped first (`cachetools.LRUCache` sized in bytes). Keyed by
store entry id, so it never answers for a checkpoint the disk index does not
list (lookup always goes through the index)."""

from __future__ import annotations

from cachetools import LRUCache

from kvrouter.worker.cache_state import nbytes


class RamTier:
    """An LRU map entry id → checkpoint state (a list of mlx-lm caches holding
    exactly the entry's tokens; `worker.cache_state`), at most `max_bytes` bytes in
    total. `max_bytes` 0 disables it. The states it holds are never written to:
    a restore takes a copy (`cache_state.cut`)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lru: LRUCache = LRUCache(maxsize=max(0, max_bytes), getsizeof=nbytes)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._lru

    @property
    def bytes(self) -> int:
        """Bytes held."""
        return int(self._lru.currsize)

    def ids(self) -> list[str]:
        """Entry ids held."""
        return list(self._lru.keys())

    def get(self, entry_id: str) -> list | None:
        """The state for `entry_id`, marked most recently used, or None."""
        return self._lru.get(entry_id)

    def touch(self, entry_ids) -> None:
        """Marks the held ones of `entry_ids` most recently used, in that order (the
        last one ends most recent); ids not held are ignored."""
        for entry_id in entry_ids:
            self._lru.get(entry_id)

    def put(self, entry_id: str, caches: list) -> None:
        """Keeps a state, dropping the least recently used ones to fit; a state larger
        than the whole tier is not kept, nor one already held."""
        if entry_id in self._lru:
            return
        try:
            self._lru[entry_id] = caches
        except ValueError:  # larger than max_bytes
            pass

    def discard(self, entry_id: str) -> None:
        self._lru.pop(entry_id, None)
