"""Pure store policy: what to checkpoint for a prompt and what to evict for a new payload.

Generalised from ds4's disk KV cache (cold anchors, continued waypoints, trim/align,
hit-weighted eviction) with the fixes of the store cases C1, C2 and C4. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .config import StoreConfig
from .entry import Entry


@dataclass(frozen=True)
class PlannedStore:
    """A checkpoint to write during this prefill: its length in tokens and kind ("anchor", "waypoint" or "hint")."""

    n_tokens: int
    kind: str


@dataclass(frozen=True)
class SkippedStore:
    """A checkpoint the policy considered and refused, for logging and counting (case C2: no silent skips).

    reason: "below_min_tokens", "over_cold_max", "anchor_past_prompt" or (hints) "hint_near_store",
    "hint_spacing".
    kind: the kind the store would have had ("anchor", "waypoint" or "hint").
    """

    n_tokens: int
    reason: str
    kind: str = "anchor"


@dataclass(frozen=True)
class StorePlan:
    """Result of ``plan_stores``: stores sorted by n_tokens (one per position) and the skips."""

    stores: tuple[PlannedStore, ...]
    skipped: tuple[SkippedStore, ...]


def align_down(n: int, align: int) -> int:
    """Largest multiple of ``align`` that is <= n (0 for n <= 0)."""
    return max(0, n) // align * align


def plan_stores(prompt_len: int, hit_len: int, anchor_len: int | None, cfg: StoreConfig,
                hints: Iterable[int] = ()) -> StorePlan:
    """Checkpoints to write while prefilling a prompt.

    Inputs (tokens): ``prompt_len`` the prompt length; ``hit_len`` the length of the reused
    prefix (0 = fully cold); ``anchor_len`` the stable chat prefix the router computed
    (everything before the last user turn preceding the first assistant turn), or None;
    ``hints`` positions where the client marked the end of a stable prefix (Anthropic
    ``cache_control`` breakpoints, placed on tokens by the router), in any order.

    Rules:
      - cold anchor (ds4), when hit_len == 0: at ``anchor_len`` when it is valid
        (min_tokens <= anchor_len <= prompt_len), else at
        ``align_down(prompt_len - trim, align)``; skipped below min_tokens, and skipped when
        the *anchor* exceeds cold_max_tokens (C2: never the prompt length).
      - anchor refresh (C1), when 0 < hit_len < anchor_len: the shorter hit proves the stored
        anchor no longer matches, so the anchor is planned again (same validity and cold_max
        limits). A hit at or past the anchor plans no anchor.
      - continued waypoints (ds4): every multiple of ``cfg.interval_tokens`` in
        (hit_len, prompt_len], kind "waypoint", not limited by cold_max; a waypoint at the
        position of the anchor is dropped (one store per position).
      - client hints (kind "hint"), after the rules above, in ascending order: a hint
        position p with hit_len < p <= prompt_len is stored when p >= min_tokens, no
        planned store lies within HINT_MERGE_TOKENS of it (either side), and p lies at
        least ``cfg.interval_tokens`` past the nearest of what already ends a stable
        prefix below it: the stored prefix ``hit_len`` (when > 0), the planned anchor,
        hints kept so far. At most one hint checkpoint per waypoint interval, so a
        breakpoint on the final user message of every request (Claude Code puts one
        there) does not mean a store per request; a hint before the anchor (the end of
        a stable block ahead of a volatile one) is kept. Waypoints do not count: their
        positions are multiples of the interval, not ends of blocks. Hints are not
        limited by cold_max (waypoints are not either).
    No store is ever planned past prompt_len (the caller keeps the last token out on restore).

    Returns a StorePlan. Raises ValueError when 0 <= hit_len <= prompt_len does not hold.
    """
    if prompt_len < 0 or not 0 <= hit_len <= prompt_len:
        raise ValueError(f"need 0 <= hit_len <= prompt_len, got hit_len={hit_len} prompt_len={prompt_len}")
    stores: dict[int, PlannedStore] = {}
    skipped: list[SkippedStore] = []

    anchor_ok = anchor_len is not None and cfg.min_tokens <= anchor_len <= prompt_len
    if anchor_len is not None and anchor_len > prompt_len:
        skipped.append(SkippedStore(anchor_len, "anchor_past_prompt"))

    target: int | None = None
    if hit_len == 0:
        target = anchor_len if anchor_ok else align_down(prompt_len - cfg.boundary_trim_tokens, cfg.boundary_align_tokens)
    elif anchor_len is not None and hit_len < anchor_len <= prompt_len:
        target = anchor_len
    if target is not None:
        if target < cfg.min_tokens:
            if target > 0:
                skipped.append(SkippedStore(target, "below_min_tokens"))
        elif target > cfg.cold_max_tokens:
            skipped.append(SkippedStore(target, "over_cold_max"))
        else:
            stores[target] = PlannedStore(target, "anchor")

    interval = cfg.interval_tokens
    for pos in range((hit_len // interval + 1) * interval, prompt_len + 1, interval):
        if pos in stores:
            continue
        if pos < cfg.min_tokens:
            skipped.append(SkippedStore(pos, "below_min_tokens", "waypoint"))
            continue
        stores[pos] = PlannedStore(pos, "waypoint")

    _plan_hints(stores, skipped, prompt_len, hit_len, hints, cfg)
    return StorePlan(
        stores=tuple(stores[k] for k in sorted(stores)),
        skipped=tuple(sorted(skipped, key=lambda s: s.n_tokens)),
    )


HINT_MERGE_TOKENS = 64
"""A hint this close to another planned store is that store's position for reuse purposes
(what it would save is recomputed in a fraction of one 256-token prefill chunk); e.g. the end
of a system block and the anchor just after the template's end-of-turn tokens."""


def _plan_hints(stores: dict[int, PlannedStore], skipped: list[SkippedStore], prompt_len: int, hit_len: int,
                hints: Iterable[int], cfg: StoreConfig) -> None:
    """Adds the client hints `plan_stores` keeps to `stores` (see its rules), the others to `skipped`."""
    interval = cfg.interval_tokens
    for pos in sorted(set(hints)):
        if not hit_len < pos <= prompt_len or pos in stores:
            continue  # already stored, past the prompt, or planned as another kind
        if pos < cfg.min_tokens:
            skipped.append(SkippedStore(pos, "below_min_tokens", "hint"))
            continue
        if any(abs(p - pos) <= HINT_MERGE_TOKENS for p in stores):
            skipped.append(SkippedStore(pos, "hint_near_store", "hint"))
            continue
        below = [p for p, s in stores.items() if p < pos and s.kind != "waypoint"] + ([hit_len] if hit_len else [])
        if below and pos - max(below) < interval:
            skipped.append(SkippedStore(pos, "hint_spacing", "hint"))
            continue
        stores[pos] = PlannedStore(pos, "hint")


def eviction_score(entry: Entry, now: float, half_life_s: float) -> float:
    """ds4's value of keeping an entry: (hits decayed by age of last use + 1) x tokens per byte.

    ``now`` and ``entry.last_used`` in unix seconds, ``half_life_s`` in seconds. Lower is evicted first.
    """
    age = max(0.0, now - entry.last_used)
    decayed = entry.hits * math.pow(0.5, age / half_life_s)
    return (decayed + 1.0) * entry.n_tokens / max(1, entry.payload_bytes)


def eviction_victims(
    entries: Iterable[Entry],
    needed_bytes: int,
    budget_bytes: int,
    now: float,
    half_life_s: float,
    protect_id: str | None = None,
) -> list[Entry]:
    """Entries to delete, in order, so that ``needed_bytes`` more fit within ``budget_bytes``.

    Order: non-anchor entries (waypoint, evict, shutdown) by ``eviction_score`` ascending,
    then anchors by score ascending only when nothing else is left (case C4: ds4's score
    alone evicts short anchors first). ``protect_id`` (the entry just written) and
    quarantined rows (no payload) are never victims. Ties go to the least recently used.
    Returns [] when everything already fits; when even evicting every candidate is not
    enough, returns every candidate (the caller decides whether to store at all).
    """
    live = [e for e in entries if not e.quarantined]
    total = sum(e.payload_bytes for e in live)
    excess = total + needed_bytes - budget_bytes
    if excess <= 0:
        return []
    candidates = [e for e in live if e.id != protect_id]
    candidates.sort(
        key=lambda e: (e.kind == "anchor", eviction_score(e, now, half_life_s), e.last_used, e.created, e.id)
    )
    victims: list[Entry] = []
    for e in candidates:
        if excess <= 0:
            break
        victims.append(e)
        excess -= e.payload_bytes
    return victims
