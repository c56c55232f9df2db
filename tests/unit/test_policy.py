"""Pure policy: plan_stores (ds4 cold anchor / waypoints, C1, C2) and eviction order (C4)."""

from __future__ import annotations

import pytest

from kvrouter.cachestore import Entry, PlannedStore, SkippedStore, StoreConfig, eviction_victims, plan_stores

CFG = StoreConfig(directory="/nonexistent", min_tokens=512, cold_max_tokens=30000,
                  continued_interval_tokens=10000, boundary_trim_tokens=32, boundary_align_tokens=2048)


def positions(plan):
    return [(s.n_tokens, s.kind) for s in plan.stores]


def test_interval_rounds_up_to_align():
    assert CFG.interval_tokens == 10240
    assert StoreConfig(directory="/x", continued_interval_tokens=2048).interval_tokens == 2048
    assert StoreConfig(directory="/x", continued_interval_tokens=1, boundary_align_tokens=1).interval_tokens == 1


@pytest.mark.parametrize("field,value", [("min_tokens", 0), ("disk_budget_bytes", -1), ("boundary_align_tokens", 0),
                                         ("boundary_trim_tokens", -1), ("hit_half_life_s", 0), ("cold_max_tokens", 1.5)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        StoreConfig(directory="/x", **{field: value})


def test_cold_anchor_at_router_anchor():
    plan = plan_stores(prompt_len=5000, hit_len=0, anchor_len=3001, cfg=CFG)
    assert positions(plan) == [(3001, "anchor")]
    assert plan.skipped == ()


def test_cold_fallback_trims_and_aligns_down():
    # no anchor: align_down(5000 - 32, 2048) = 4096
    assert positions(plan_stores(5000, 0, None, CFG)) == [(4096, "anchor")]
    # anchor below min_tokens falls back too
    assert positions(plan_stores(5000, 0, 100, CFG)) == [(4096, "anchor")]
    # trim pushes an exact multiple down: align_down(4096 - 32) = 2048
    assert positions(plan_stores(4096, 0, None, CFG)) == [(2048, "anchor")]


def test_min_tokens_skip_is_reported():
    plan = plan_stores(2000, 0, None, CFG)  # align_down(1968, 2048) = 0: nothing to store
    assert plan.stores == ()
    cfg = StoreConfig(directory="/x", min_tokens=3000, boundary_align_tokens=256)
    plan = plan_stores(2900, 0, None, cfg)  # align_down(2868, 256) = 2816 < 3000
    assert plan.stores == ()
    assert plan.skipped == (SkippedStore(2816, "below_min_tokens"),)


def test_c2_cold_max_checked_against_anchor_not_prompt():
    plan = plan_stores(prompt_len=30246, hit_len=0, anchor_len=27005, cfg=CFG)
    assert PlannedStore(27005, "anchor") in plan.stores
    assert all(s.reason != "over_cold_max" for s in plan.skipped)
    assert positions(plan) == [(10240, "waypoint"), (20480, "waypoint"), (27005, "anchor")]


def test_cold_max_skips_long_anchor_with_reason():
    plan = plan_stores(prompt_len=45000, hit_len=0, anchor_len=31000, cfg=CFG)
    assert SkippedStore(31000, "over_cold_max") in plan.skipped
    assert all(s.kind == "waypoint" for s in plan.stores)  # waypoints are not limited by cold_max
    assert [s.n_tokens for s in plan.stores] == [10240, 20480, 30720, 40960]


def test_c1_anchor_refresh_when_hit_is_shorter_than_anchor():
    plan = plan_stores(prompt_len=30246, hit_len=20480, anchor_len=27005, cfg=CFG)
    assert positions(plan) == [(27005, "anchor")]  # no waypoint in (20480, 30246]: next is 30720
    for hit in (27005, 28000):
        plan = plan_stores(prompt_len=30246, hit_len=hit, anchor_len=27005, cfg=CFG)
        assert all(s.kind != "anchor" for s in plan.stores)


def test_refresh_respects_limits():
    plan = plan_stores(prompt_len=45000, hit_len=20480, anchor_len=31000, cfg=CFG)
    assert SkippedStore(31000, "over_cold_max") in plan.skipped
    assert positions(plan) == [(30720, "waypoint"), (40960, "waypoint")]
    plan = plan_stores(prompt_len=20000, hit_len=100, anchor_len=25000, cfg=CFG)  # anchor past prompt
    assert SkippedStore(25000, "anchor_past_prompt") in plan.skipped
    assert all(s.n_tokens <= 20000 for s in plan.stores)


def test_waypoints_strictly_after_hit_and_within_prompt():
    plan = plan_stores(prompt_len=30720, hit_len=10240, anchor_len=None, cfg=CFG)
    assert positions(plan) == [(20480, "waypoint"), (30720, "waypoint")]
    plan = plan_stores(prompt_len=30719, hit_len=10239, anchor_len=None, cfg=CFG)
    assert positions(plan) == [(10240, "waypoint"), (20480, "waypoint")]


def test_cold_store_suppresses_duplicate_waypoint():
    plan = plan_stores(prompt_len=25000, hit_len=0, anchor_len=20480, cfg=CFG)
    assert positions(plan) == [(10240, "waypoint"), (20480, "anchor")]
    plan = plan_stores(prompt_len=20600, hit_len=0, anchor_len=None, cfg=CFG)  # fallback lands on 20480
    assert positions(plan) == [(10240, "waypoint"), (20480, "anchor")]


def test_never_past_prompt_and_input_checks():
    for prompt in range(0, 70000, 997):
        for hit in (0, prompt // 2, prompt):
            plan = plan_stores(prompt, hit, prompt // 3 or None, CFG)
            assert all(0 < s.n_tokens <= prompt for s in plan.stores)
            ns = [s.n_tokens for s in plan.stores]
            assert ns == sorted(set(ns))
    with pytest.raises(ValueError):
        plan_stores(100, 200, None, CFG)


def _entry(eid, kind, n_tokens, size, hits=0, last_used=1000.0):
    return Entry(id=eid, kind=kind, namespace="ns", model_id="m", n_tokens=n_tokens, payload_name=eid + ".safetensors",
                 payload_bytes=size, checksum="0", created=last_used, last_used=last_used, hits=hits)


def test_c4_eviction_protects_anchor_and_new_entry():
    # the anchor has the fewest tokens per byte: ds4's score alone would evict it first
    anchor = _entry("anchor", "anchor", 4088, 100)
    others = [_entry(f"w{i}", "waypoint", 8192, 100) for i in range(2)]
    new = _entry("new", "waypoint", 8192, 100)
    victims = eviction_victims([anchor, *others, new], needed_bytes=0, budget_bytes=300, now=2000.0,
                               half_life_s=3600, protect_id="new")
    assert [v.id for v in victims] == ["w0"]
    # only anchors left besides the protected entry: then the anchor goes, never the new one
    victims = eviction_victims([anchor, new], needed_bytes=100, budget_bytes=150, now=2000.0,
                               half_life_s=3600, protect_id="new")
    assert [v.id for v in victims] == ["anchor"]
    assert eviction_victims([anchor], needed_bytes=50, budget_bytes=150, now=0, half_life_s=1) == []


def test_eviction_score_orders_by_decayed_hits_then_tokens_per_byte():
    cold = _entry("cold", "waypoint", 1000, 100)
    hot = _entry("hot", "waypoint", 1000, 100, hits=5, last_used=1000.0)
    stale = _entry("stale", "waypoint", 1000, 100, hits=5, last_used=1000.0 - 10 * 3600)  # 5 hits decayed to ~0.005
    dense = _entry("dense", "evict", 4000, 100)
    victims = eviction_victims([hot, dense, cold, stale], needed_bytes=300, budget_bytes=400, now=1000.0,
                               half_life_s=3600)
    assert [v.id for v in victims] == ["cold", "stale", "dense"]


# -- client hints (Anthropic cache_control breakpoints placed on tokens) ----------------------

def test_hint_before_the_anchor_is_stored_on_a_cold_prompt():
    # tools first: the end of the tools and the stable system block (17,215) sits before the
    # environment block; the anchor (18,676) includes it
    plan = plan_stores(prompt_len=20280, hit_len=0, anchor_len=18676, cfg=CFG, hints=[17215, 18674, 18766])
    assert positions(plan) == [(10240, "waypoint"), (17215, "hint"), (18676, "anchor")]
    assert SkippedStore(18674, "hint_near_store", "hint") in plan.skipped  # the anchor's position, nearly
    assert SkippedStore(18766, "hint_spacing", "hint") in plan.skipped  # 90 tokens past the anchor


def test_hint_on_the_final_user_message_is_not_a_store_per_request():
    # a conversation grows by a few hundred tokens a turn; its last message carries a breakpoint
    stored = 1480  # the anchor, stored on the first request
    stores = []
    for prompt_len in range(1700, 30000, 400):
        plan = plan_stores(prompt_len, stored, 1480, CFG, hints=[prompt_len - 6])
        hints = [s.n_tokens for s in plan.stores if s.kind == "hint"]
        stores += hints
        stored = max([stored] + [s.n_tokens for s in plan.stores])
    # at most one hint checkpoint per interval of growth (here the waypoints keep up, so none)
    assert all(b - a >= CFG.interval_tokens for a, b in zip([1480] + stores, stores))
    assert len(stores) <= (30000 - 1480) // CFG.interval_tokens
    assert stored == 20480  # what was stored along the way: the anchor and two waypoints


def test_hints_below_min_tokens_past_the_prompt_or_already_stored_are_not_planned():
    plan = plan_stores(3000, 2000, None, CFG, hints=[19, 1500, 2000, 3001])
    assert plan.stores == ()
    assert plan.skipped == ()  # 19 is below the stored prefix (2000): nothing to decide
    plan = plan_stores(3000, 0, 1480, CFG, hints=[19])
    assert SkippedStore(19, "below_min_tokens", "hint") in plan.skipped


def test_hint_spacing_counts_from_the_stored_prefix_the_anchor_and_other_hints():
    # within one interval of the stored prefix: not stored (the waypoint is planned anyway)
    assert positions(plan_stores(20000, 5000, None, CFG, hints=[15000])) == [(10240, "waypoint")]
    # an interval or more past it: stored, even just past a waypoint of the same prefill
    assert positions(plan_stores(20000, 5000, None, CFG, hints=[15300])) == [(10240, "waypoint"), (15300, "hint")]
    assert positions(plan_stores(20000, 5000, None, CFG, hints=[10250])) == [(10240, "waypoint")]  # merged
    # two hints: the second an interval past the first, or not at all
    assert positions(plan_stores(30000, 0, None, CFG, hints=[3000, 9000, 14000])) == [
        (3000, "hint"), (10240, "waypoint"), (14000, "hint"), (20480, "waypoint"), (28672, "anchor")]
    far = StoreConfig(directory="/x", min_tokens=100, continued_interval_tokens=100000, boundary_align_tokens=100)
    assert positions(plan_stores(5000, 1000, None, far, hints=[4000])) == []  # within one interval of the hit
    assert positions(plan_stores(5000, 0, 1000, far, hints=[4000])) == [(1000, "anchor")]  # ... of the anchor
    assert positions(plan_stores(5000, 0, 4500, far, hints=[4000])) == [(4000, "hint"), (4500, "anchor")]
