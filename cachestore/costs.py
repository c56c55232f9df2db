"""The cost model that both sides of the gRPC contract use: a worker's measured
rates and the time to bring a reusable prefix onto it (load) or to compute it
(prefill).

The router ranks workers by it (`kvrouter.router.routing`); a worker decides
load-or-recompute by it (`should_load`). It lives in cachestore, the lowest
layer, so that neither side imports the other. Nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

# Priors until a worker has measured itself (Rates fields of 0).
DEFAULT_PREFILL_TPS = 500.0  # tokens/s
DEFAULT_DISK_BPS = 1.0e9  # bytes/s
DEFAULT_RAM_BPS = 20.0e9  # bytes/s
DEFAULT_DECODE_TPS = 20.0  # tokens/s

WARM_RESIDENT = 0.9  # a load whose file the page cache held at least this much of is "warm"
COLD_RESIDENT = 0.1  # at most this much: "cold" (in between: only the blended disk rate learns)


@dataclass(frozen=True)
class Rates:
    """A worker's measured speeds; 0 means unknown (the priors above apply).

    prefill_tps: prompt tokens per second, averaged over whatever lengths were
    prefilled; disk_bps / ram_bps: checkpoint load bandwidth from the store directory
    (all loads) / the RAM tier, bytes per second; decode_tps: generated tokens per
    second of one sequence.

    Position-aware prefill (`PrefillFit`, fitted on the worker's own prefills):
    prefilling prompt positions [p0, p1) takes `prefill_fixed_s + prefill_linear_s *
    (p1 - p0) + prefill_quad_s * (p1² - p0²)` seconds (attention makes a token cost
    more the later it sits); prefill_linear_s 0 = not fitted (prefill_tps applies).
    disk_cold_bps / disk_warm_bps: whole-load bandwidth (read, device copy, build) of
    disk loads whose payload the page cache did not / did hold, bytes per second.
    """

    prefill_tps: float = 0.0
    disk_bps: float = 0.0
    ram_bps: float = 0.0
    decode_tps: float = 0.0
    prefill_fixed_s: float = 0.0
    prefill_linear_s: float = 0.0
    prefill_quad_s: float = 0.0
    disk_cold_bps: float = 0.0
    disk_warm_bps: float = 0.0

    def prefill(self) -> float:
        return self.prefill_tps if self.prefill_tps > 0 else DEFAULT_PREFILL_TPS

    def disk(self) -> float:
        return self.disk_bps if self.disk_bps > 0 else DEFAULT_DISK_BPS

    def ram(self) -> float:
        return self.ram_bps if self.ram_bps > 0 else DEFAULT_RAM_BPS

    def decode(self) -> float:
        return self.decode_tps if self.decode_tps > 0 else DEFAULT_DECODE_TPS

    def disk_cold(self) -> float:
        """Cold disk-load bandwidth, bytes/s: measured, else the blended disk rate."""
        return self.disk_cold_bps if self.disk_cold_bps > 0 else self.disk()

    def disk_warm(self) -> float:
        """Page-cache disk-load bandwidth, bytes/s: measured, else the blended disk rate
        (never below the cold one)."""
        return self.disk_warm_bps if self.disk_warm_bps > 0 else max(self.disk(), self.disk_cold())


@dataclass(frozen=True)
class Reuse:
    """A prefix a worker could start from: `tokens` prompt tokens from `source`
    ("live", "ram" or "disk"), `bytes` to load (0 for live). resident: for "disk", the
    fraction (0..1) of the payload the page cache holds now, None when unknown (the
    router never knows it: the blended disk rate applies)."""

    source: str
    tokens: int
    bytes: int = 0
    resident: float | None = None


NO_REUSE = Reuse("none", 0)


def load_seconds(reuse: Reuse, rates: Rates) -> float:
    """Predicted time to bring `reuse` onto the worker, seconds: 0 live; bytes over the
    RAM-tier bandwidth; from disk, the resident part at the warm rate and the rest at the
    cold rate (the blended disk rate when residency is unknown)."""
    if reuse.source == "ram":
        return reuse.bytes / rates.ram()
    if reuse.source == "disk":
        if reuse.resident is None:
            return reuse.bytes / rates.disk()
        warm = min(1.0, max(0.0, reuse.resident))
        return reuse.bytes * (warm / rates.disk_warm() + (1 - warm) / rates.disk_cold())
    return 0.0


def prefill_seconds(tokens: int, rates: Rates) -> float:
    """Predicted time to prefill `tokens` tokens from position 0, seconds."""
    return prefill_span_seconds(0, tokens, rates)


def prefill_span_seconds(p0: int, p1: int, rates: Rates) -> float:
    """Predicted time to prefill prompt positions [p0, p1) on top of a state holding the
    first p0 tokens, seconds (0 when p1 <= p0): the fitted position model when the worker
    has one (see `Rates`), else (p1 - p0) / prefill_tps."""
    if p1 <= p0:
        return 0.0
    p0 = max(0, p0)
    if rates.prefill_linear_s > 0:
        return rates.prefill_fixed_s + rates.prefill_linear_s * (p1 - p0) + rates.prefill_quad_s * (p1 * p1 - p0 * p0)
    return (p1 - p0) / rates.prefill()


@dataclass(frozen=True)
class LoadDecision:
    """Load-or-recompute, with both predictions (seconds): `load` True when loading the
    checkpoint (load_s) is not slower than prefilling the tokens it adds (recompute_s)."""

    load: bool
    load_s: float
    recompute_s: float


def decide_load(reuse: Reuse, base_tokens: int, rates: Rates) -> LoadDecision:
    """Load-or-recompute for `reuse` when the worker holds `base_tokens` without it: the
    load's predicted time against prefilling positions [base_tokens, reuse.tokens). The
    prompt's remaining suffix costs the same either way and is left out. Nothing gained
    (reuse.tokens <= base_tokens) is never loaded."""
    gained = reuse.tokens - base_tokens
    load_s = load_seconds(reuse, rates)
    recompute_s = prefill_span_seconds(base_tokens, reuse.tokens, rates)
    return LoadDecision(gained > 0 and load_s <= recompute_s, load_s, recompute_s)


def should_load(reuse: Reuse, base_tokens: int, rates: Rates) -> bool:
    """Load-or-recompute: True when loading `reuse` is faster than prefilling the
    tokens it adds beyond `base_tokens` (what the worker has without loading)."""
    return decide_load(reuse, base_tokens, rates).load


def first_token_work_s(prompt_tokens: int, reuse: Reuse, rates: Rates) -> float:
    """Seconds of work before a `prompt_tokens` prompt's first token when it starts
    from `reuse`: loading it + prefilling positions [reuse.tokens, prompt_tokens)."""
    return load_seconds(reuse, rates) + prefill_span_seconds(reuse.tokens, prompt_tokens, rates)


# -- measuring: fits and averages the worker feeds with its own figures ---------------------------

EWMA_WEIGHT = 0.3  # weight of the newest measurement in `ewma`
FIT_SAMPLES = 48  # prefills a PrefillFit keeps (the newest)
FIT_OUTLIER_RATIO = 3.0  # a prefill this many times slower than the others' fit predicts is left out


def ewma(old: float, new: float, weight: float = EWMA_WEIGHT) -> float:
    """Exponential moving average: `new` alone when `old` is unknown (<= 0)."""
    return new if old <= 0 else (1 - weight) * old + weight * new


def learn_disk_load(rates: Rates, nbytes: int, seconds: float, resident: float | None) -> Rates:
    """`rates` after a disk load of `nbytes` bytes that took `seconds` (whole load), the
    page cache holding `resident` (0..1, None unknown) of it when its read began: the
    blended rate always learns; the warm or cold one when the load was clearly one."""
    if nbytes <= 0 or seconds <= 0:
        return rates
    bps = nbytes / seconds
    cold, warm = rates.disk_cold_bps, rates.disk_warm_bps
    if resident is not None and resident >= WARM_RESIDENT:
        warm = ewma(warm, bps)
    elif resident is not None and resident <= COLD_RESIDENT:
        cold = ewma(cold, bps)
    return replace(rates, disk_bps=ewma(rates.disk_bps, bps), disk_cold_bps=cold, disk_warm_bps=warm)


class PrefillFit:
    """Least-squares fit of prefill time against prompt position, from a worker's own
    prefills: seconds(p0, p1) = a + b·(p1 - p0) + c·(p1² - p0²), a, b, c >= 0, b > 0.

    `add(p0, p1, seconds)` records a prefill of positions [p0, p1) that ran alone (a
    batch shared with other requests' prefill would charge it their time). The newest
    `max_samples` are kept. `coefficients()` gives (a, b, c) or None until the samples
    determine b (at least two prefills). With one distinct length, or lengths too close
    to tell a curve, the terms that do not fit are dropped (0)."""

    def __init__(self, max_samples: int = FIT_SAMPLES):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=max_samples)

    def add(self, p0: int, p1: int, seconds: float) -> None:
        if p1 > p0 >= 0 and seconds > 0:
            self.samples.append((p0, p1, seconds))

    def coefficients(self) -> tuple[float, float, float] | None:
        """(a, b, c) of the fit, seconds, seconds/token, seconds/token²; None without one.

        Outliers: a prefill that took more than `FIT_OUTLIER_RATIO` times what the fit
        of the other samples predicts is left out (the worst first, while at least
        three samples remain). Only slow outliers exist: a GPU backend compiles its
        kernels during the first prefill of a new shape (about 20 s on the H200 for an
        8B model, against 0.5 s for the prefill itself), and a busy machine only slows
        a prefill down."""
        samples = list(self.samples)
        coef = _fit(samples)
        while coef is not None and len(samples) > 3:
            _, i = max((s / max(_predict(coef, p0, p1), 1e-12), i) for i, (p0, p1, s) in enumerate(samples))
            rest = samples[:i] + samples[i + 1:]  # the slowest against the fit, left out to see
            refit = _fit(rest)
            if refit is None or samples[i][2] <= FIT_OUTLIER_RATIO * _predict(refit, *samples[i][:2]):
                break  # not an outlier against the others' fit
            samples, coef = rest, refit
        return coef

    def apply(self, rates: Rates) -> Rates:
        """`rates` with the fitted coefficients (unchanged while there is no fit)."""
        coef = self.coefficients()
        if coef is None:
            return rates
        a, b, c = coef
        return replace(rates, prefill_fixed_s=a, prefill_linear_s=b, prefill_quad_s=c)


def _predict(coef: tuple[float, float, float], p0: int, p1: int) -> float:
    """Seconds the fit `coef` = (a, b, c) predicts for prefilling positions [p0, p1)."""
    a, b, c = coef
    return a + b * (p1 - p0) + c * (p1 * p1 - p0 * p0)


def _fit(samples: list[tuple[int, int, float]]) -> tuple[float, float, float] | None:
    """The least-squares (a, b, c) of `PrefillFit` for (p0, p1, seconds) samples, or
    None when they do not determine b (fewer than two)."""
    if len(samples) < 2:
        return None
    rows = [(1.0, float(p1 - p0), float(p1 * p1 - p0 * p0)) for p0, p1, _ in samples]
    ys = [s for _, _, s in samples]
    best = None
    for terms in ((0, 1, 2), (1, 2), (0, 1), (1,)):  # b always; drop a or c when they come out negative
        coef = _least_squares([[r[t] for t in terms] for r in rows], ys)
        if coef is None or any(c < 0 for c in coef) or coef[terms.index(1)] <= 0:
            continue
        full = [0.0, 0.0, 0.0]
        for t, c in zip(terms, coef):
            full[t] = c
        err = sum((full[0] + full[1] * r[1] + full[2] * r[2] - y) ** 2 for r, y in zip(rows, ys))
        if best is None or err < best[0] - 1e-15:
            best = (err, tuple(full))
    return None if best is None else best[1]


def _least_squares(x: list[list[float]], y: list[float]) -> list[float] | None:
    """The coefficients minimising |x·k - y|² (normal equations, Gaussian elimination
    with partial pivoting; columns scaled first), or None when they are not determined."""
    n = len(x[0])
    scale = [max(abs(r[j]) for r in x) or 1.0 for j in range(n)]
    xs = [[r[j] / scale[j] for j in range(n)] for r in x]
    a = [[sum(r[i] * r[j] for r in xs) for j in range(n)] + [sum(r[i] * v for r, v in zip(xs, y))]
         for i in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda i: abs(a[i][col]))
        if abs(a[piv][col]) < 1e-9 * max(1.0, max(abs(a[i][i]) for i in range(n))):
            return None
        a[col], a[piv] = a[piv], a[col]
        for i in range(n):
            if i != col:
                f = a[i][col] / a[col][col]
                a[i] = [u - f * v for u, v in zip(a[i], a[col])]
    return [a[i][n] / a[i][i] / scale[i] for i in range(n)]


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
