"""The shared cost model (cachestore/costs.py): prefill time by position, disk loads
cold and warm, and the load-or-recompute decision with both predictions. No model."""

import random

import pytest

from kvrouter.cachestore.costs import (
    DEFAULT_DISK_BPS,
    PrefillFit,
    Rates,
    Reuse,
    decide_load,
    first_token_work_s,
    learn_disk_load,
    load_seconds,
    prefill_seconds,
    prefill_span_seconds,
)

# a worker whose prefill costs 10 ms + 1 ms/token + 2e-7 s/token² (attention growing with position)
A, B, C = 0.01, 1e-3, 2e-7
FITTED = Rates(prefill_tps=700, prefill_fixed_s=A, prefill_linear_s=B, prefill_quad_s=C)


def true_prefill(p0: int, p1: int) -> float:
    return A + B * (p1 - p0) + C * (p1 * p1 - p0 * p0)


def test_a_later_span_of_the_same_length_costs_more():
    early, late = prefill_span_seconds(0, 1000, FITTED), prefill_span_seconds(7000, 8000, FITTED)
    assert early == pytest.approx(true_prefill(0, 1000))
    assert late == pytest.approx(true_prefill(7000, 8000))
    assert late > 3 * early
    assert prefill_seconds(1000, FITTED) == early
    assert prefill_span_seconds(500, 500, FITTED) == 0.0 == prefill_span_seconds(600, 500, FITTED)


def test_without_a_fit_the_averaged_rate_applies():
    r = Rates(prefill_tps=500)
    assert prefill_span_seconds(7000, 8000, r) == pytest.approx(2.0)
    assert prefill_seconds(1000, Rates()) == pytest.approx(1000 / 500)  # the prior


def test_the_fit_recovers_a_quadratic_model_from_noisy_prefills():
    fit = PrefillFit()
    assert fit.coefficients() is None and fit.apply(Rates(prefill_tps=9)) == Rates(prefill_tps=9)
    rnd = random.Random(3)
    for _ in range(40):
        p0 = rnd.choice([0, 0, 256, 1024])
        p1 = p0 + rnd.randrange(64, 8000)
        fit.add(p0, p1, true_prefill(p0, p1) * rnd.uniform(0.97, 1.03))
    a, b, c = fit.coefficients()
    assert b == pytest.approx(B, rel=0.1) and c == pytest.approx(C, rel=0.2) and a >= 0
    fitted = fit.apply(Rates(prefill_tps=123))
    assert fitted.prefill_tps == 123
    for p0, p1 in ((0, 2048), (4096, 8192), (16000, 32000)):
        assert prefill_span_seconds(p0, p1, fitted) == pytest.approx(true_prefill(p0, p1), rel=0.1)


def test_kernel_compile_outliers_are_left_out_of_the_fit():
    """The first prefills of new shapes on a GPU include kernel compiles (~20 s against
    ~0.5 s on the H200): such outliers must not skew the predictions (they once made a
    remote RAM hit look slower than recomputing on another worker)."""
    rnd = random.Random(5)
    clean, skewed = PrefillFit(), PrefillFit()
    for i in range(24):
        p1 = rnd.randrange(256, 8000)
        t = true_prefill(0, p1) * rnd.uniform(0.97, 1.03)
        clean.add(0, p1, t)
        skewed.add(0, p1, t * (40 if i in (0, 7) else 1))  # two prefills paid for compiles
    for p0, p1 in ((0, 2048), (0, 8000)):
        assert prefill_span_seconds(p0, p1, skewed.apply(Rates())) == pytest.approx(
            prefill_span_seconds(p0, p1, clean.apply(Rates())), rel=0.05)
    # with three samples or fewer nothing is left out: nothing tells an outlier apart
    few = PrefillFit()
    for p1, t in ((1000, 1.0), (2000, 2.0), (3000, 30.0)):
        few.add(0, p1, t)
    assert prefill_span_seconds(0, 3000, few.apply(Rates())) > 10


def test_the_fit_never_goes_negative_and_keeps_only_the_newest_samples():
    fit = PrefillFit(max_samples=4)
    for n in (100, 200, 300, 400, 500, 600):
        fit.add(0, n, n / 1000)  # exactly linear: no fixed cost, no curve
    a, b, c = fit.coefficients()
    assert (a, c) == (pytest.approx(0, abs=1e-9), pytest.approx(0, abs=1e-12)) and b == pytest.approx(1e-3)
    assert [s[1] for s in fit.samples] == [300, 400, 500, 600]
    one_length = PrefillFit()
    one_length.add(0, 500, 0.5)
    assert one_length.coefficients() is None  # one prefill determines nothing
    one_length.add(0, 500, 0.6)
    a, b, c = one_length.coefficients()
    assert b * 500 + a + c * 500**2 == pytest.approx(0.55) and min(a, b, c) >= 0
    fit.add(10, 10, 1.0)
    fit.add(0, 10, 0.0)  # empty spans and zero times are not samples
    assert len(fit.samples) == 4


def test_disk_loads_learn_cold_and_warm_rates_apart():
    r = learn_disk_load(Rates(), 2_000_000_000, 2.0, resident=0.0)  # 1 GB/s cold
    assert (r.disk_cold_bps, r.disk_warm_bps, r.disk_bps) == (1e9, 0.0, 1e9)
    r = learn_disk_load(r, 2_000_000_000, 0.2, resident=1.0)  # 10 GB/s from the page cache
    assert r.disk_warm_bps == 1e10 and r.disk_cold_bps == 1e9
    assert 1e9 < r.disk_bps < 1e10  # the blend the router uses
    same = learn_disk_load(r, 2_000_000_000, 0.5, resident=0.5)  # neither: only the blend learns
    assert (same.disk_cold_bps, same.disk_warm_bps) == (r.disk_cold_bps, r.disk_warm_bps)
    assert learn_disk_load(r, 0, 1.0, 0.0) == r == learn_disk_load(r, 10, 0.0, 0.0)


def test_a_load_is_predicted_by_how_much_of_it_the_page_cache_holds():
    r = Rates(disk_bps=2e9, disk_cold_bps=1e9, disk_warm_bps=1e10)
    gb = 1_000_000_000
    assert load_seconds(Reuse("disk", 100, gb, resident=0.0), r) == pytest.approx(1.0)
    assert load_seconds(Reuse("disk", 100, gb, resident=1.0), r) == pytest.approx(0.1)
    assert load_seconds(Reuse("disk", 100, gb, resident=0.5), r) == pytest.approx(0.55)
    assert load_seconds(Reuse("disk", 100, gb), r) == pytest.approx(0.5)  # unknown: the blend
    assert load_seconds(Reuse("disk", 100, gb, resident=0.0), Rates()) == pytest.approx(gb / DEFAULT_DISK_BPS)
    assert load_seconds(Reuse("ram", 100, gb), Rates(ram_bps=1e10)) == pytest.approx(0.1)


def test_load_or_recompute_follows_the_position_and_reports_both_predictions():
    # 64 KB of KV per token, cold disk at 1 GB/s: loading n tokens costs 6.4e-5 s per token, while
    # prefilling them costs 1e-3 + 4e-7 * position: loading wins at every length here...
    r = Rates(disk_cold_bps=1e9, disk_warm_bps=1e10, prefill_fixed_s=A, prefill_linear_s=B, prefill_quad_s=C)
    kv = 64_000
    d = decide_load(Reuse("disk", 4096, 4096 * kv, resident=0.0), 0, r)
    assert d.load and d.load_s == pytest.approx(4096 * kv / 1e9) and d.recompute_s == pytest.approx(true_prefill(0, 4096))
    # ...but a slow disk loses at the start of a prompt and wins further in, where prefill is dearer
    slow = Rates(disk_cold_bps=50e6, prefill_fixed_s=0.0, prefill_linear_s=B, prefill_quad_s=C)
    short = decide_load(Reuse("disk", 1024, 1024 * kv, resident=0.0), 0, slow)
    deep = decide_load(Reuse("disk", 16384, 1024 * kv, resident=0.0), 15360, slow)  # a waypoint's last 1K tokens
    assert not short.load and short.load_s > short.recompute_s
    assert deep.load and deep.load_s < deep.recompute_s
    # nothing gained is never loaded, however cheap
    assert not decide_load(Reuse("ram", 100, 1), 100, Rates()).load


def test_first_token_work_prefills_the_suffix_at_its_position():
    r = Rates(prefill_fixed_s=A, prefill_linear_s=B, prefill_quad_s=C, ram_bps=1e10)
    work = first_token_work_s(9000, Reuse("ram", 8000, 10**9), r)
    assert work == pytest.approx(0.1 + true_prefill(8000, 9000))
