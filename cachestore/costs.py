"""The cost model that both sides of the gRPC contract use: a worker's measured
rates and the time to bring a reusable prefix onto it (load) or to compute it
(prefill).

The router ranks workers by it (`kvrouter.router.routing`); a worker decides
load-or-recompute by it (`should_load`). It lives in cachestore, the lowest
layer, so that neither side imports the other. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

# Priors until a worker has measured itself (Rates fields of 0).
DEFAULT_PREFILL_TPS = 500.0  # tokens/s
DEFAULT_DISK_BPS = 1.0e9  # bytes/s
DEFAULT_RAM_BPS = 20.0e9  # bytes/s
DEFAULT_DECODE_TPS = 20.0  # tokens/s


@dataclass(frozen=True)
class Rates:
    """A worker's measured speeds; 0 means unknown (the priors above apply).

    prefill_tps: prompt tokens per second; disk_bps / ram_bps: checkpoint load
    bandwidth from the store directory / the RAM tier, bytes per second;
    decode_tps: generated tokens per second.
    """

    prefill_tps: float = 0.0
    disk_bps: float = 0.0
    ram_bps: float = 0.0
    decode_tps: float = 0.0

    def prefill(self) -> float:
        return self.prefill_tps if self.prefill_tps > 0 else DEFAULT_PREFILL_TPS

    def disk(self) -> float:
        return self.disk_bps if self.disk_bps > 0 else DEFAULT_DISK_BPS

    def ram(self) -> float:
        return self.ram_bps if self.ram_bps > 0 else DEFAULT_RAM_BPS

    def decode(self) -> float:
        return self.decode_tps if self.decode_tps > 0 else DEFAULT_DECODE_TPS


@dataclass(frozen=True)
class Reuse:
    """A prefix a worker could start from: `tokens` prompt tokens from `source`
    ("live", "ram" or "disk"), `bytes` to load (0 for live)."""

    source: str
    tokens: int
    bytes: int = 0


NO_REUSE = Reuse("none", 0)


def load_seconds(reuse: Reuse, rates: Rates) -> float:
    """Time to bring `reuse` onto the worker: 0 live, bytes over RAM or disk bandwidth."""
    if reuse.source == "ram":
        return reuse.bytes / rates.ram()
    if reuse.source == "disk":
        return reuse.bytes / rates.disk()
    return 0.0


def prefill_seconds(tokens: int, rates: Rates) -> float:
    return max(0, tokens) / rates.prefill()


def should_load(reuse: Reuse, base_tokens: int, rates: Rates) -> bool:
    """Load-or-recompute: True when loading `reuse` is faster than prefilling the
    tokens it adds beyond `base_tokens` (what the worker has without loading)."""
    gained = reuse.tokens - base_tokens
    if gained <= 0:
        return False
    return load_seconds(reuse, rates) <= prefill_seconds(gained, rates)


def first_token_work_s(prompt_tokens: int, reuse: Reuse, rates: Rates) -> float:
    """Seconds of work before a `prompt_tokens` prompt's first token when it starts
    from `reuse`: loading it + prefilling the rest."""
    return load_seconds(reuse, rates) + prefill_seconds(prompt_tokens - reuse.tokens, rates)
