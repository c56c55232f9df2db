"""kvrouter cachestore: the shared on-disk store of KV checkpoints (payload files + LMDB index).

Public API (pinned by tests/unit/test_cachestore.py::test_public_api):
  KINDS, StoreConfig, Entry, Hit, CheckpointStore, PayloadError, StoreUnavailableError, IndexStats,
  PlannedStore, SkippedStore, StorePlan, plan_stores, eviction_victims, eviction_score.
This package never imports mlx: payload bytes come from a caller-supplied function.
"""

from .config import KINDS, StoreConfig
from .entry import Entry, Hit, StoreEvent
from .policy import (
    PlannedStore,
    SkippedStore,
    StorePlan,
    align_down,
    eviction_score,
    eviction_victims,
    plan_stores,
)
from .index import IndexStats
from .store import CheckpointStore, PayloadError, StoreUnavailableError

__all__ = [
    "KINDS",
    "StoreConfig",
    "Entry",
    "Hit",
    "StoreEvent",
    "CheckpointStore",
    "PayloadError",
    "StoreUnavailableError",
    "IndexStats",
    "PlannedStore",
    "SkippedStore",
    "StorePlan",
    "align_down",
    "eviction_score",
    "eviction_victims",
    "plan_stores",
]
