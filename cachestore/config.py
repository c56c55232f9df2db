"""Store configuration: one frozen, validated value object built at the edge from CLI flags."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path

KINDS = ("anchor", "waypoint", "evict", "shutdown", "hint")
"""Checkpoint kinds (ds4 vocabulary): cold anchor, continued waypoint, evict-time and shutdown-time
stores; and `hint`, a position the client marked as the end of a stable prefix (Anthropic
`cache_control`)."""


DEFAULT_DISK_BUDGET_BYTES = 4096 * 2**20
"""Budget of a StoreConfig built without one (tools, tests); the CLI passes None instead
when ``--kv-cache-disk-mb`` is not given, and the worker sizes it."""


@dataclass(frozen=True)
class StoreConfig:
    """Settings of one store directory.

    Fields (units in the name or noted):
      directory: store root; created with mode 0o700 if missing.
      disk_budget_bytes: upper bound on the sum of payload sizes, bytes (``--kv-cache-disk-mb``);
        None: not given, to be sized by the worker once its model is loaded
        (``kvrouter.worker.sizing.plan_disk_budget``; ``with_budget`` sets it). A store
        with None stores nothing (``CheckpointStore.save`` raises ValueError).
      min_tokens: no checkpoint shorter than this is planned, tokens (``--kv-cache-min-tokens``).
      cold_max_tokens: a cold anchor longer than this is skipped, tokens; checked against the
        anchor, never the prompt (store case C2) and never on load (C3).
      continued_interval_tokens: waypoint spacing, tokens; rounded UP to a multiple of
        ``boundary_align_tokens`` (see ``interval_tokens``).
      boundary_trim_tokens: tokens dropped from the end of a cold prompt without an anchor
        before aligning down (ds4: the last BPE tokens change when text is appended).
      boundary_align_tokens: alignment of trimmed cold stores and of waypoints, tokens (>= 1).
      hit_half_life_s: half-life of the hit count in the eviction score, seconds.

    Raises ValueError on a non-positive or non-integer count, a negative trim or a
    non-positive half-life.
    """

    directory: Path
    disk_budget_bytes: int | None = DEFAULT_DISK_BUDGET_BYTES
    min_tokens: int = 512
    cold_max_tokens: int = 30000
    continued_interval_tokens: int = 10000
    boundary_trim_tokens: int = 32
    boundary_align_tokens: int = 2048
    hit_half_life_s: float = 6 * 3600

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        positive = (
            "disk_budget_bytes",
            "min_tokens",
            "cold_max_tokens",
            "continued_interval_tokens",
            "boundary_align_tokens",
        )
        for name in positive + ("boundary_trim_tokens",):
            value = getattr(self, name)
            if name == "disk_budget_bytes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"StoreConfig.{name} must be an int, got {value!r}")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"StoreConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.boundary_trim_tokens < 0:
            raise ValueError(f"StoreConfig.boundary_trim_tokens must be >= 0, got {self.boundary_trim_tokens}")
        if not self.hit_half_life_s > 0:
            raise ValueError(f"StoreConfig.hit_half_life_s must be > 0 seconds, got {self.hit_half_life_s!r}")

    @property
    def budget_given(self) -> bool:
        """True when the disk budget was given (a flag, a caller); False: to be sized."""
        return self.disk_budget_bytes is not None

    def with_budget(self, budget_bytes: int) -> "StoreConfig":
        """This config with ``disk_budget_bytes`` set (bytes, >= 1; ValueError otherwise)."""
        return dataclasses.replace(self, disk_budget_bytes=budget_bytes)

    @property
    def interval_tokens(self) -> int:
        """Waypoint interval in tokens: ``continued_interval_tokens`` rounded up to a multiple of the alignment."""
        align = self.boundary_align_tokens
        return -(-self.continued_interval_tokens // align) * align


def store_id_of(directory) -> str:
    """Which store a process reads: "hostname:/real/path" (stores are per host, one
    LMDB environment per directory)."""
    return f"{socket.gethostname()}:{os.path.realpath(directory)}"
