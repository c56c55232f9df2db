"""The worker's reuse choice, in one pure function: where a request's reused
prefix comes from.

`plan_restore` takes the prompt, the worker's idle live states, the requests in
its batch, the one store lookup's hit, the RAM tier's entry ids, the measured
rates and the model's reuse rules, and returns a `RestorePlan`; the engine
carries it out (`Engine._restore`) and falls back to `plan.fallback` when a
checkpoint turns out unusable. Nothing here reads MLX state, the store or the
clock.

Sources, cheapest first:

- a live state (a finished request's state, kept in its batch slot), or a
  checkpoint's snapshot the writer has not written yet (copied only, and only
  when the prompt starts with all of it, as a lookup matches it once written: a
  session's next turn arriving before its `evict` checkpoint is written still
  reuses all of it, instead of a shorter stored prefix): the
  request continues it (its prompt extends what the state's client sent: the
  state moves into the batch, cut back in place where needed), or shares only
  a prefix with it (another session: a copy of the prefix, the state stays);
  where states cannot be cut back, a continuing request that diverges inside
  the generated part resumes from the state's `prompt_state` (the state where
  the client-sent part ended);
- a request in the batch whose prompt shares a longer prefix (prefill sharing
  inside the worker): a copy of its state once its prefill has passed the
  shared tokens (only where states can be cut back at any point); also when a
  longer stored checkpoint is declined because recomputing is faster than
  loading it (a burst after a restart on a fast GPU then prefills the shared
  prefix once, not once per request);
- the longest stored checkpoint (one lookup), from the RAM tier or disk, when
  loading it is faster than prefilling what it adds
  (`cachestore.costs.decide_load`, the router's cost model too: the load's
  predicted time, by bytes and how much of the payload the page cache holds,
  against prefilling those positions, by the worker's fitted prefill model).

How much a state gives is `cachestore.costs.reusable_tokens`: at most
`len(prompt) - 1` tokens (the last prompt token is always fed: store case C6),
and a state is cut back to the first differing token only where every layer
can be cut that far (`ReuseRules`); otherwise it is reused whole (the prompt
extends it) or not at all. Reuse never reaches past the first differing token
(case C7), and loading never skips a checkpoint for its length (case C3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from kvrouter.cachestore import Entry, Hit
from kvrouter.cachestore.costs import LoadDecision, Rates, Reuse, ReuseRules, decide_load, reusable_tokens
from kvrouter.cachestore.keys import common_prefix_length
from kvrouter.worker.live_states import LiveState

# A request sharing at least this many more prompt tokens with a request in the batch
# than any live state or checkpoint offers waits for that request's prefill to pass them
# and starts from a copy of its state (prefill sharing inside one worker).
MIN_SHARED_GAIN = 32  # tokens


@dataclass(frozen=True)
class InBatch:
    """A request in the batch, as a possible source: its batch uid, namespace,
    prompt tokens, and `pos`, the prompt tokens its state holds now."""

    uid: int
    namespace: str
    prompt: Sequence[int]
    pos: int


@dataclass(frozen=True)
class RestorePlan:
    """Where the reused prefix of a request comes from.

    source: "none", "live" (an idle live state), "batch" (a copy of a running
    request's state), "ram" or "disk" (a stored checkpoint).
    n_tokens: prompt tokens reused (0 for "none").
    stored_tokens: length of the longest stored checkpoint the lookup matched,
        whatever source wins (the store policy's input), tokens.
    live: the live state (source "live"); take: the request continues it, so
        the state moves into the batch (cut back in place to n_tokens) instead
        of being copied. from_prompt_state: the tokens come from the live state's
        `prompt_state` (its client-sent part), not its whole state.
    uid / wait: source "batch": the running request to copy from, and whether
        its prefill has not reached n_tokens yet (the request waits; nothing to do now).
    entry: source "ram"/"disk": the checkpoint (its whole n_tokens are loaded,
        then cut to this plan's n_tokens where needed).
    declined: a stored checkpoint that reached further but loading it was slower
        than prefilling its tokens (for the log), else None.
    decision: the load-or-recompute decision about the stored checkpoint, with both
        predictions (for the log), else None (no checkpoint weighed, or no rates).
    fallback: what to do when the checkpoint turns out unusable (source "live" or "none").
    """

    source: str
    n_tokens: int
    stored_tokens: int = 0
    live: LiveState | None = None
    take: bool = False
    from_prompt_state: bool = False
    uid: int | None = None
    wait: bool = False
    entry: Entry | None = None
    declined: Entry | None = None
    fallback: "RestorePlan | None" = None
    decision: LoadDecision | None = None


def plan_restore(prompt: Sequence[int], namespace: str, lives: Iterable[LiveState], batch: Iterable[InBatch],
                 hit: Hit | None, ram_ids, rates: Rates | None, rules: ReuseRules,
                 cold: bool = False, resident: float | None = None) -> RestorePlan:
    """The restore plan of `prompt` (token ids) in `namespace`.

    lives: the idle live states (and snapshots not written yet); batch: the requests
    in the batch; hit: the store lookup's answer for this prompt (None: miss or no
    store); ram_ids: entry ids in
    the RAM tier (supports `in`); rates: the worker's measurements (None: always
    load a checkpoint that reaches further); rules: the model's reuse rules;
    cold: start from nothing (a retry after a failed batch); resident: fraction
    (0..1) of the hit's payload the page cache holds (None: unknown).
    """
    stored = hit.n_tokens if hit is not None else 0
    if cold:
        return RestorePlan("none", 0, stored)
    total = len(prompt)
    live_plan = _best_live(prompt, namespace, lives, rules, stored)
    shared = _best_in_batch(prompt, namespace, batch, rules)
    batch_plan = None  # sharing a running request's prefill, where it gives more than a live state
    if shared is not None:
        uid, n, pos = shared
        if n >= live_plan.n_tokens + MIN_SHARED_GAIN:
            batch_plan = RestorePlan("batch", n, stored, uid=uid, wait=pos < n)
            if n >= stored + MIN_SHARED_GAIN:
                return batch_plan
    if hit is not None:
        n = reusable_tokens(hit.n_tokens, hit.n_tokens, total, rules)
        if n > live_plan.n_tokens:
            source = "ram" if hit.entry.id in ram_ids else "disk"
            if rates is None:
                return RestorePlan(source, n, stored, entry=hit.entry, fallback=live_plan)
            reuse = Reuse(source, n, hit.entry.payload_bytes, resident if source == "disk" else None)
            decision = decide_load(reuse, live_plan.n_tokens, rates)
            if decision.load:
                return RestorePlan(source, n, stored, entry=hit.entry, fallback=live_plan, decision=decision)
            # Recomputing beats loading: better still, share what a running request prefills anyway.
            return replace(batch_plan or live_plan, declined=hit.entry, decision=decision)
    return live_plan


def _best_live(prompt, namespace, lives, rules: ReuseRules, stored: int) -> RestorePlan:
    """The live state giving the most tokens (ties: one the request continues, then
    its whole state over its prompt state). A snapshot the checkpoint writer has not
    written yet (`LiveState.writing`) is copied, never taken, and only where the
    prompt starts with all of it, as the store's lookup will match the checkpoint
    once written: the reuse does not depend on how far the writer has got."""
    best, best_key = None, (0, False, False)
    for live in lives:
        if live.namespace != namespace:
            continue
        shared = common_prefix_length(live.tokens, prompt)
        if live.writing is not None and shared < live.held:
            continue  # a snapshot being written counts as the checkpoint it becomes: whole or not at all
        continues = shared >= live.prompt_tokens  # it extends what this state's client sent
        options = [(reusable_tokens(live.held, shared, len(prompt), rules), continues, True)]
        if live.prompt_state is not None and continues:
            pt = live.prompt_tokens
            options.append((reusable_tokens(pt, pt, len(prompt), rules), continues, False))
        for key in options:
            if key[0] > 0 and key > best_key:
                best, best_key = live, key
    if best is None:
        return RestorePlan("none", 0, stored)
    n, take, whole = best_key
    return RestorePlan("live", n, stored, best, take=take and best.writing is None, from_prompt_state=not whole)


def _best_in_batch(prompt, namespace, batch, rules: ReuseRules) -> tuple[int, int, int] | None:
    """(uid, shared tokens, its position) of the running request sharing the longest
    prefix, or None. Only where states can be cut back anywhere: a running request's
    state is read where its prefill happens to stop, which is rarely exactly the
    shared length."""
    if not rules.cut_any:
        return None
    best = None
    for run in batch:
        if run.namespace != namespace:
            continue
        n = min(common_prefix_length(run.prompt, prompt), len(prompt) - 1)
        if n > 0 and (best is None or n > best[1]):
            best = (run.uid, n, run.pos)
    return best
