"""The RAM tier: recently used checkpoints kept in host memory (on Apple silicon,
the GPU's unified memory), bounded by `--kv-cache-ram-mb`, least recently used
dropped first. Keyed by store entry id, so it never answers for a checkpoint the
disk index does not list (lookup always goes through the index)."""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx

from kvrouter.worker.kv_state import snapshot_bytes


class RamTier:
    """An LRU map entry id → snapshot arrays (see `kv_state.snapshot`), at most
    `max_bytes` bytes in total. `max_bytes` 0 disables it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, dict[str, mx.array]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._items

    def ids(self) -> list[str]:
        """Entry ids held, least recently used first."""
        return list(self._items)

    def get(self, entry_id: str) -> dict[str, mx.array] | None:
        """The snapshot for `entry_id`, marked most recently used, or None."""
        arrays = self._items.get(entry_id)
        if arrays is not None:
            self._items.move_to_end(entry_id)
        return arrays

    def put(self, entry_id: str, arrays: dict[str, mx.array]) -> None:
        """Keeps a snapshot, dropping the least recently used ones to fit; a
        snapshot larger than the whole tier is not kept."""
        size = snapshot_bytes(arrays)
        if size > self.max_bytes or entry_id in self._items:
            return
        while self.bytes + size > self.max_bytes and self._items:
            old, _ = self._items.popitem(last=False)
            self.bytes -= self._sizes.pop(old)
        self._items[entry_id] = arrays
        self._sizes[entry_id] = size
        self.bytes += size

    def discard(self, entry_id: str) -> None:
        if self._items.pop(entry_id, None) is not None:
            self.bytes -= self._sizes.pop(entry_id)
