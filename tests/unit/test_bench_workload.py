"""The benchmark's workload generator, schedule, oracle and report (pure functions),
and the routing micro-benchmark on a small index."""

from __future__ import annotations

import json

import pytest

from kvrouter.router.bench.client import RequestRecord, RunResult
from kvrouter.router.bench.report import percentile, reuse_by_source, side_by_side, summarize
from kvrouter.router.bench.workload import (
    WorkloadSpec,
    distinct_prefixes,
    env_block,
    make_workload,
    schedule_order,
    system_block,
)


def brute_force_prefixes(prompts) -> int:
    return len({tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)})


def test_distinct_prefixes_matches_a_brute_force_count():
    import random

    rng = random.Random(3)
    prompts = []
    for _ in range(40):
        base = [1, 2, 3] if rng.random() < 0.5 else [rng.randrange(4)]
        prompts.append(base + [rng.randrange(3) for _ in range(rng.randrange(8))])
    prompts += [prompts[0], prompts[1][:2]]  # duplicates and prefixes of other prompts
    assert distinct_prefixes(prompts) == brute_force_prefixes(prompts)
    assert distinct_prefixes([]) == 0
    assert distinct_prefixes([[5, 6], [5, 6, 7]]) == 3


def test_workload_is_seeded_and_shaped_like_an_agent_team():
    spec = WorkloadSpec(seed=7, sessions=12, turns=3, env_every=4)
    a, b = make_workload(spec), make_workload(spec)
    assert a == b
    assert make_workload(WorkloadSpec(seed=8)) != a
    assert len(a) == 12 and all(len(s) == 3 for s in a)
    system = system_block(spec)
    for session in a:
        assert session[0].messages[0] == {"role": "system", "content": system}
        # each turn extends the previous conversation (append-only, like an agent client)
        for prev, cur in zip(session, session[1:]):
            assert cur.messages[: len(prev.messages)] == prev.messages
            assert cur.messages[-1]["role"] == "user" and cur.messages[-2]["role"] == "assistant"
    # the environment block is rewritten every env_every sessions
    firsts = [s[0].messages[1]["content"] for s in a]
    assert all(f.startswith(env_block(spec, i // 4)) for i, f in enumerate(firsts))
    assert env_block(spec, 0) != env_block(spec, 1)
    assert len({s[0].user for s in a}) == spec.users


def test_schedule_visits_every_session_before_any_returns():
    sessions = make_workload(WorkloadSpec(sessions=12, turns=3))
    order = schedule_order(sessions)
    assert [(r.turn, r.session) for r in order[:13]] == [(0, s) for s in range(12)] + [(1, 0)]
    # more sessions alive between two turns of one session than a 10-entry prompt cache holds
    pos = {(r.session, r.turn): i for i, r in enumerate(order)}
    assert all(pos[(s, 1)] - pos[(s, 0)] > 10 for s in range(12))




def record(ttft, prompt, cached, phase=0, error=""):
    return RequestRecord(0, 0, phase, 0.0, ttft, ttft + 1, prompt, cached, 4, error)


def test_summary_figures_and_side_by_side_ratios():
    from prometheus_client import generate_latest

    from kvrouter.router.metrics import create_metrics

    m = create_metrics()  # a real router registry, as /metrics serves it
    m.prompt_tokens.labels("m", "computed").inc(300)
    m.prompt_tokens.labels("m", "disk").inc(700)
    metrics = generate_latest(m.registry).decode()
    run = RunResult([record(1.0, 1000, 700), record(3.0, 1000, 0, phase=1), record(0, 0, 0, error="boom")],
                    12.0, True, 2.0, [metrics, metrics])
    s = summarize(run, oracle=1000, workload_prompt_tokens=2000)
    assert s["prefilled_tokens"] == 1300 and s["reused_tokens"] == 700
    assert s["prefilled_over_oracle"] == 1.3
    assert s["errors"] == 1 and s["ttft_p50"] == 2.0 and s["ttft_p50_after_restart"] == 3.0
    assert s["reuse_by_source"] == {"computed": 600.0, "disk": 1400.0}  # one snapshot per process, summed
    json.dumps(s)  # summary.json must serialise
    base = {**s, "ttft_p50": 4.0}
    table, ratios = side_by_side({"kvrouter": s, "mlx_lm.server": base}, "mlx_lm.server")
    assert ratios["kvrouter"]["ttft_p50"] == 0.5
    assert "prefilled_over_oracle" in table and "kvrouter / mlx_lm.server" in table
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert reuse_by_source([]) == {}


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from kvrouter.router.bench.report import plot

    run = RunResult([record(1.0, 1000, 700), record(3.0, 1000, 0, phase=1)], 5.0, True, 1.0, [])
    s = summarize(run, oracle=900, workload_prompt_tokens=2000)
    paths = plot({"a": s, "b": s}, tmp_path)
    assert [p.name for p in paths] == ["ttft.png", "reuse.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_routing_micro_benchmark_finds_the_live_worker_and_the_stored_prefix():
    from kvrouter.router.bench.routing import run_routing_bench

    r = run_routing_bench(checkpoints=300, prompt_tokens=6144, cache_dir=None, iterations=50)
    assert r["route"]["worker"] == "w0" and r["route"]["reason"] == "live_prefix"
    assert r["route"]["predicted_cached"] == 4096  # the longest waypoint on the prompt's path (every 2048)
    assert 0 < r["decision_p50_ms"] <= r["decision_p99_ms"] <= r["decision_max_ms"]
    assert r["tokenize_ms"] is None
