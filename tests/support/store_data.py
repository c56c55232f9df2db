"""Store test data: payload writers, seeded token lists, and a store on tmp_path."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvrouter.cachestore import CheckpointStore, StoreConfig


def writer(data: bytes):
    """A payload writer (what `CheckpointStore.save` calls) that writes `data`."""
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def toks(n: int, seed: int = 0) -> list[int]:
    """`n` seeded pseudo-random token ids below 150,000."""
    rng = random.Random(seed)
    return [rng.randrange(0, 150_000) for _ in range(n)]


@pytest.fixture
def cfg(tmp_path: Path) -> StoreConfig:
    return StoreConfig(directory=tmp_path / "store", disk_budget_bytes=1 << 30, min_tokens=1)


@pytest.fixture
def store(cfg: StoreConfig):
    with CheckpointStore(cfg) as s:
        yield s
