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


@dataclass(frozen=True)
class ReuseRules:
    """How far back a model's state can be cut, decided by its layers' cache classes
    (the worker derives them from mlx-lm's caches and reports them in `ModelInfo.reuse`).

    cut_any: every layer keeps every token's keys and values (mlx-lm `KVCache`,
        `QuantizedKVCache`): a state of n tokens gives any shorter prefix.
    window_tokens: with cut_any False, a state can be cut back only while it holds
        fewer than this many tokens (sliding-window layers drop the oldest tokens once
        the window is full: mlx-lm `RotatingKVCache.is_trimmable`); 0: never
        (recurrent layers hold one state for all tokens so far, `ArraysCache`), so a
        state is reused only whole: by extension, or from a checkpoint taken exactly
        where it ends.
    """

    cut_any: bool = True
    window_tokens: int = 0

    def can_cut(self, held_tokens: int) -> bool:
        """True when a state holding `held_tokens` tokens can be cut back to a shorter prefix."""
        return self.cut_any or held_tokens < self.window_tokens

    @property
    def label(self) -> str:
        """"any", "window<N>" or "exact": for logs and the router's state JSON."""
        if self.cut_any:
            return "any"
        return f"window{self.window_tokens}" if self.window_tokens else "exact"


CUT_ANY = ReuseRules()


def reusable_tokens(held_tokens: int, shared_tokens: int, prompt_tokens: int, rules: ReuseRules) -> int:
    """Prompt tokens a state can give a prompt, under `rules`.

    held_tokens: tokens the state holds (a live state's tokens, or a checkpoint's length);
    shared_tokens: leading tokens it shares with the prompt; prompt_tokens: the prompt's
    length. At most `prompt_tokens - 1` are reused (the last prompt token is always
    fed, so the first token's logits come from a real forward pass: store case C6).
    The state gives all it holds when the prompt extends it; fewer (cut back to the
    first differing token, or to keep the last token out) only where
    `rules.can_cut(held_tokens)`; otherwise nothing. Returns tokens, >= 0.
    """
    n = min(held_tokens, shared_tokens, prompt_tokens - 1)
    if n <= 0:
        return 0
    if n == held_tokens or rules.can_cut(held_tokens):
        return n
    return 0


def lookup_span(prompt_tokens: int, rules: ReuseRules) -> int:
    """How many leading prompt tokens a store lookup should match, so that the
    longest checkpoint it finds is one the worker can use: the whole prompt when
    states can be cut (a checkpoint of the whole prompt is cut back by one token),
    else all but the last token (a checkpoint is used whole, and the last prompt
    token is always fed)."""
    return prompt_tokens if rules.cut_any else max(0, prompt_tokens - 1)
