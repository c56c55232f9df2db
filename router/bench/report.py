"""Summaries, the side-by-side table and the PNG plots of `kvrouter bench`."""

from __future__ import annotations

import math
from pathlib import Path

from kvrouter.router.bench.client import RunResult


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def reuse_by_source(snapshots: list[str]) -> dict[str, float]:
    """Prompt tokens by source (computed, live, ram, disk) summed over /metrics snapshots
    (one per server process: counters restart from zero with the process)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for text in snapshots:
        for fam in text_string_to_metric_families(text):
            if fam.name == "kvrouter_prompt_tokens":
                for s in fam.samples:
                    if s.name.endswith("_total"):
                        out[s.labels["source"]] = out.get(s.labels["source"], 0.0) + s.value
    return out


def summarize(result: RunResult, oracle: int, workload_prompt_tokens: int) -> dict:
    """The figures of one run (times in seconds, counts in tokens)."""
    ok = [r for r in result.records if not r.error]
    ttft = [r.ttft for r in ok]
    prefilled = sum(r.prefilled_tokens for r in ok)
    summary = {
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "first_errors": sorted({r.error for r in result.records if r.error})[:3],
        "wall_seconds": round(result.wall_seconds, 2),
        "restarted": result.restarted,
        "restart_seconds": round(result.restart_seconds, 2),
        "ttft_p50": round(percentile(ttft, 50), 4),
        "ttft_p95": round(percentile(ttft, 95), 4),
        "ttft_p50_after_restart": round(percentile([r.ttft for r in ok if r.phase == 1], 50), 4),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "workload_prompt_tokens": workload_prompt_tokens,
        "prefilled_tokens": prefilled,
        "reused_tokens": sum(r.cached_tokens for r in ok),
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "oracle_prefilled_tokens": oracle,
        "prefilled_over_oracle": round(prefilled / oracle, 3) if oracle else None,
        "per_request": [r.as_dict() for r in result.records],
        "warmup_ttft": [round(r.ttft, 4) for r in result.warmup],
    }
    sources = reuse_by_source(result.metrics_snapshots)
    summary["reuse_by_source"] = sources or {"computed": prefilled, "cached (source not reported)":
                                             summary["reused_tokens"]}
    return summary


COMPARED = ("ttft_p50", "ttft_p95", "ttft_p50_after_restart", "prefilled_tokens", "reused_tokens",
            "prefilled_over_oracle", "wall_seconds", "errors")


def side_by_side(summaries: dict[str, dict], baseline: str) -> tuple[str, dict]:
    """A text table of each figure per program, with ratios to `baseline`, and the ratios."""
    names = list(summaries)
    ratios: dict[str, dict[str, float | None]] = {}
    width = max(len(n) for n in names) + 2
    lines = ["figure".ljust(24) + "".join(n.rjust(width) for n in names)]
    for key in COMPARED:
        row = key.ljust(24)
        for n in names:
            row += f"{summaries[n].get(key)!s:>{width}}"
        lines.append(row)
    base = summaries.get(baseline)
    if base:
        for n in names:
            if n == baseline:
                continue
            ratios[n] = {}
            for key in ("ttft_p50", "ttft_p95", "prefilled_tokens", "wall_seconds"):
                a, b = summaries[n].get(key), base.get(key)
                ratios[n][key] = round(a / b, 3) if a is not None and b and not math.isnan(b) else None
            lines.append(f"{n} / {baseline}: " + ", ".join(f"{k} x{v}" for k, v in ratios[n].items()))
    return "\n".join(lines), ratios


def plot(summaries: dict[str, dict], out_dir: Path) -> list[Path]:
    """ttft.png (TTFT of each request over the run) and reuse.png (prompt tokens by
    source, per program). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, s in summaries.items():
        recs = [r for r in s["per_request"] if not r["error"]]
        ax.plot([r["started"] for r in recs], [r["ttft"] for r in recs], "o-", ms=3, lw=0.8, label=name)
        restarts = [r["started"] for r in s["per_request"] if r["phase"] == 1]
        if restarts:
            ax.axvline(min(restarts), ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("request start, s since the run began (dotted: after the restart)")
    ax.set_ylabel("time to first token, s")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Time to first token over the run")
    fig.tight_layout()
    paths.append(out_dir / "ttft.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(summaries)
    sources = sorted({k for s in summaries.values() for k in s["reuse_by_source"]},
                     key=lambda k: (k != "computed", k))
    bottom = [0.0] * len(names)
    for src in sources:
        vals = [summaries[n]["reuse_by_source"].get(src, 0.0) for n in names]
        ax.bar(names, vals, bottom=bottom, label=src)
        bottom = [b + v for b, v in zip(bottom, vals)]
    oracle = next(iter(summaries.values()))["oracle_prefilled_tokens"]
    ax.axhline(oracle, ls="--", color="k", lw=0.8, label="oracle (distinct prefixes)")
    ax.set_ylabel("prompt tokens")
    ax.set_title("Prompt tokens: computed vs reused, by source")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "reuse.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
