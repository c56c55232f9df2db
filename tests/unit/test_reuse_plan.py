"""The worker's reuse choice (`worker.reuse.plan_restore`) and the reuse rules it
shares with the router (`cachestore.costs.reusable_tokens`, `lookup_span`), as pure
functions: how much a live state, a request in the batch or a stored checkpoint
can give a prompt, per kind of model state (full KV caches, sliding windows,
recurrent layers)."""

from __future__ import annotations

from types import SimpleNamespace

from kvrouter.cachestore import Entry, Hit
from kvrouter.cachestore.costs import CUT_ANY, Rates, ReuseRules, lookup_span, reusable_tokens
from kvrouter.worker.live_states import LiveState
from kvrouter.worker.reuse import MIN_SHARED_GAIN, InBatch, plan_restore

EXACT = ReuseRules(cut_any=False, window_tokens=0)  # recurrent layers
WINDOW = ReuseRules(cut_any=False, window_tokens=32)  # sliding window of 32 tokens


def live(tokens, prompt_tokens=None, ns=""):
    tokens = list(tokens)
    return LiveState(ns, tokens, [SimpleNamespace(nbytes=0)], len(tokens) if prompt_tokens is None else prompt_tokens,
                     live_id=len(tokens))


def hit(n, entry_id="e1", payload_bytes=1000):
    e = Entry(entry_id, "anchor", "", "m", n, entry_id + ".safetensors", payload_bytes, "0", 0.0, 0.0, 0)
    return Hit(e, n)


def test_reusable_tokens_per_rule():
    # A prompt that extends the whole state: every kind of state gives all it holds.
    for rules in (CUT_ANY, WINDOW, EXACT):
        assert reusable_tokens(100, 100, 150, rules) == 100
    # Diverging at 60: only states that can be cut back give the 60 shared tokens.
    assert reusable_tokens(100, 60, 150, CUT_ANY) == 60
    assert reusable_tokens(100, 60, 150, WINDOW) == 0  # its 32-token window has wrapped
    assert reusable_tokens(20, 10, 150, WINDOW) == 10  # not wrapped yet: it can be cut
    assert reusable_tokens(100, 60, 150, EXACT) == 0
    # The whole prompt held (case C6): the last token is fed again, so the state must be cut by one.
    assert reusable_tokens(150, 150, 150, CUT_ANY) == 149
    assert reusable_tokens(150, 150, 150, EXACT) == 0
    assert reusable_tokens(0, 0, 10, CUT_ANY) == 0 and reusable_tokens(5, 5, 1, CUT_ANY) == 0


def test_lookup_span_keeps_the_last_token_out_where_states_cannot_be_cut():
    assert lookup_span(100, CUT_ANY) == 100
    assert lookup_span(100, EXACT) == lookup_span(100, WINDOW) == 99


def test_a_continuing_request_takes_its_live_state_and_another_session_copies_a_prefix():
    state = live(range(100), prompt_tokens=90)
    plan = plan_restore(list(range(120)), "", [state], [], None, set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.live, plan.take) == ("live", 100, state, True)
    other = list(range(50)) + [999] * 30  # shares 50 tokens, diverges inside what the state's client sent
    plan = plan_restore(other, "", [state], [], None, set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.take) == ("live", 50, False)
    # The same divergence on a recurrent model: the state cannot be cut back to 50.
    assert plan_restore(other, "", [state], [], None, set(), None, EXACT).source == "none"
    # Another namespace never reuses it (case C9).
    assert plan_restore(list(range(120)), "other", [state], [], None, set(), None, CUT_ANY).source == "none"


def test_recurrent_state_is_reused_by_extension_or_from_a_checkpoint_below_the_divergence():
    state = live(range(100), prompt_tokens=90)
    ext = plan_restore(list(range(130)), "", [state], [], hit(64), set(), None, EXACT)
    assert (ext.source, ext.n_tokens, ext.take) == ("live", 100, True)
    diverged = list(range(80)) + [999] * 20
    plan = plan_restore(diverged, "", [state], [], hit(64), {"e1"}, None, EXACT)
    assert (plan.source, plan.n_tokens, plan.entry.id) == ("ram", 64, "e1")
    assert plan.fallback.source == "none"
    # A checkpoint of the whole prompt cannot be cut by one token on such a model.
    assert plan_restore(list(range(64)), "", [], [], hit(64), set(), None, EXACT).source == "none"
    assert plan_restore(list(range(64)), "", [], [], hit(64), set(), None, CUT_ANY).n_tokens == 63


def test_a_checkpoint_wins_only_when_it_reaches_further_and_loads_faster_than_prefill():
    state = live(range(50))
    prompt = list(range(300))
    plan = plan_restore(prompt, "", [state], [], hit(256), set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.stored_tokens) == ("disk", 256, 256)
    assert (plan.fallback.source, plan.fallback.n_tokens) == ("live", 50)
    slow_disk = Rates(prefill_tps=1e6, disk_bps=1.0)  # loading 1000 bytes: 1000 s; prefilling 206 tokens: ~0
    plan = plan_restore(prompt, "", [state], [], hit(256), set(), slow_disk, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.declined.id) == ("live", 50, "e1")
    shorter = plan_restore(prompt, "", [live(range(280))], [], hit(256), set(), None, CUT_ANY)
    assert (shorter.source, shorter.n_tokens, shorter.stored_tokens) == ("live", 280, 256)


def test_prefill_sharing_inside_the_batch_only_where_states_can_be_cut():
    prompt = list(range(400))
    running = InBatch(uid=7, namespace="", prompt=list(range(300)) + [5] * 10, pos=128)
    plan = plan_restore(prompt, "", [], [running], None, set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.uid, plan.wait) == ("batch", 300, 7, True)
    done = InBatch(uid=7, namespace="", prompt=running.prompt, pos=310)
    assert plan_restore(prompt, "", [], [done], None, set(), None, CUT_ANY).wait is False
    # Not worth it when a stored checkpoint nearly covers the same tokens.
    near = plan_restore(prompt, "", [], [done], hit(300 - MIN_SHARED_GAIN + 1), set(), None, CUT_ANY)
    assert near.source == "disk"
    for rules in (WINDOW, EXACT):
        assert plan_restore(prompt, "", [], [done], None, set(), None, rules).source == "none"


def test_a_declined_checkpoint_falls_back_to_sharing_the_batchs_prefill():
    """A longer stored checkpoint that is slower to load than to recompute: the request
    shares what a running request prefills anyway instead of recomputing it all."""
    prompt = list(range(400))
    running = InBatch(uid=3, namespace="", prompt=list(range(300)) + [9] * 50, pos=0)
    slow_disk = Rates(prefill_tps=1e6, disk_bps=1.0)
    plan = plan_restore(prompt, "", [], [running], hit(380), set(), slow_disk, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.uid, plan.wait, plan.declined.id) == ("batch", 300, 3, True, "e1")
    # the load wins when it is faster: the checkpoint, not the batch
    fast_disk = Rates(prefill_tps=1.0, disk_bps=1e12)
    assert plan_restore(prompt, "", [], [running], hit(380), set(), fast_disk, CUT_ANY).source == "disk"
    # a live state giving as much: no waiting on the batch
    assert plan_restore(prompt, "", [live(range(300))], [running], hit(380), set(), slow_disk,
                        CUT_ANY).source == "live"


def test_a_retry_after_a_failed_batch_runs_cold():
    plan = plan_restore(list(range(100)), "", [live(range(90))], [], hit(64), set(), None, CUT_ANY, cold=True)
    assert (plan.source, plan.n_tokens, plan.stored_tokens) == ("none", 0, 64)


def test_a_resent_reply_that_differs_resumes_where_the_client_sent_part_ended():
    """Recurrent state cannot be cut back into its generated tokens; the state kept where
    the prompt ended (`prompt_state`) gives everything the client sent before."""
    state = live(range(100), prompt_tokens=90)
    state.prompt_state = [SimpleNamespace(nbytes=0)]
    retold = list(range(90)) + [999] * 30  # the same prompt, then another rendering of the reply
    plan = plan_restore(retold, "", [state], [], None, set(), None, EXACT)
    assert (plan.source, plan.n_tokens, plan.take, plan.from_prompt_state) == ("live", 90, True, True)
    extends = plan_restore(list(range(120)), "", [state], [], None, set(), None, EXACT)
    assert (extends.n_tokens, extends.from_prompt_state) == (100, False)  # the whole state when it extends
    other = list(range(50)) + [999] * 30  # another session: inside the client-sent part
    assert plan_restore(other, "", [state], [], None, set(), None, EXACT).source == "none"


def test_a_snapshot_waiting_to_be_written_is_copied_never_taken_and_wins_over_a_shorter_checkpoint():
    """A session's next turn arriving while its evict checkpoint (300 tokens) waits in
    the writer's queue reuses the snapshot, a copy (the job still writes it), not the
    256-token checkpoint the store has; the same state as a live state proper is taken."""
    prompt = list(range(1, 301)) + [7, 8, 9]
    snapshot = LiveState("ns", list(range(1, 301)), [], 300, writing=object())
    plan = plan_restore(prompt, "ns", [snapshot], [], hit(256), set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.live, plan.take) == ("live", 300, snapshot, False)
    proper = LiveState("ns", list(range(1, 301)), [], 300)
    plan = plan_restore(prompt, "ns", [proper], [], hit(256), set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens, plan.take) == ("live", 300, True)
    # Sharing only part of it (another session's prompt), the snapshot counts as the
    # checkpoint it becomes: the store's lookup would not match it, so it is not used.
    other = list(range(1, 281)) + [999] * 30
    plan = plan_restore(other, "ns", [snapshot], [], hit(256), set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens) == ("disk", 256)
    plan = plan_restore(other, "ns", [live(range(1, 301), ns="ns")], [], hit(256), set(), None, CUT_ANY)
    assert (plan.source, plan.n_tokens) == ("live", 280)  # a live state proper is cut back
