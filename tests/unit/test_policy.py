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
