"""`kvrouter bench`: the command line (registered by router.cli)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from kvrouter.router.extras import require_extra

log = logging.getLogger("kvrouter.bench")

TARGETS = ("kvrouter", "kvrouter-no-kv-cache", "mlx_lm.server", "smg+kvrouter", "smg+mlx")
SMG_TARGETS = ("smg+kvrouter", "smg+mlx")


def parse_targets(value: str) -> list[str]:
    """--targets: comma-separated names from TARGETS, in the order given, no repeats."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(bad) or '(none)'}; "
                                         f"choose from {', '.join(TARGETS)}")
    return list(dict.fromkeys(names))


def add_parser(sub, default_cache_dir: Path) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="replay a seeded agent-session workload and measure it",
        description="Replay a seeded agent-session workload (shared system block, environment block rewritten "
                    "every K sessions, T turns per session, C at once) against an OpenAI-compatible endpoint and "
                    "write summary.json and PNG plots. Without --endpoint it starts kvrouter itself and restarts "
                    "it once in the middle; --compare also runs kvrouter --no-kv-cache, mlx_lm.server and SMG "
                    "(in front of kvrouter workers, and of its own MLX workers) on the same float32 weights. "
                    "--routing runs the routing micro-benchmark instead.")
    p.add_argument("--endpoint", default=None, help="base URL of a running server (e.g. http://127.0.0.1:8000); "
                                                    "it is not restarted (summary says restarted: false)")
    p.add_argument("--model-name", default=None, help="`model` to send (default: the first of /v1/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sessions", type=int, default=None,
                   help="sessions (default 12: more than a 10-entry cache; with --memory, 50 distinct ones)")
    p.add_argument("--concurrency", type=int, default=3, help="requests at once (default 3)")
    p.add_argument("--turns", type=int, default=3, help="requests per session (default 3)")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--env-every", type=int, default=4, help="sessions per environment-block rewrite (default 4)")
    p.add_argument("--system-words", type=int, default=480, help="words in the shared block (default 480, "
                                                                 "about 600 tokens)")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens per request (default 8)")
    p.add_argument("--output", type=Path, default=Path("bench-out"), help="output directory (default bench-out)")
    p.add_argument("--compare", action="store_true",
                   help="run kvrouter, kvrouter --no-kv-cache, mlx_lm.server, and smg+kvrouter and smg+mlx when "
                        "their programs are installed (skipped otherwise, with the reason)")
    p.add_argument("--targets", type=parse_targets, default=None, metavar="NAME[,NAME...]",
                   help=f"with --compare: which programs, in order ({', '.join(TARGETS)}); SMG programs named "
                        "here are installed into venvs of their own under --cache-dir when missing")
    p.add_argument("--no-restart", action="store_true", help="do not restart started servers mid-run")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="requests of unrelated text (about --system-words words each) sent at once before the "
                        "measured ones and again after the restart, left out of the figures, so kernel compiles "
                        "and first allocations are not measured (default: --concurrency; 0: none)")
    p.add_argument("--model", default=None, help="model for the servers the bench starts: a .gguf or an mlx-lm "
                                              "model directory (default: the default model)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir)
    p.add_argument("--routing", action="store_true", help="run the routing micro-benchmark (32K-token prompt, "
                                                          "10,000 stored checkpoints) instead")
    p.add_argument("--overhead", action="store_true",
                   help="measure what the router adds over calling a worker directly (time to first token, "
                        "p50; target: under 3 ms)")
    p.add_argument("--loop-stall", action="store_true",
                   help="measure how long routing decisions wait while /metrics and /v1/router/state are scraped "
                        "every second, with 10,000 stored checkpoints (target: no decision waits over 5 ms)")
    p.add_argument("--memory", action="store_true",
                   help="start kvrouter (one worker), send --sessions distinct sessions at once (default here 50) and "
                        "print the worker's RSS at start, peak, after the burst and idle, against its memory plan")
    p.add_argument("--soak", action="store_true",
                   help="load-and-kill soak: --concurrency streaming clients for --soak-seconds against 2 workers, "
                        "one killed every --kill-every seconds; prints completed, clean errors, hung, corrupted, "
                        "p50/p99 and RSS over time")
    p.add_argument("--soak-seconds", type=float, default=120.0, help="length of the soak (default 120)")
    p.add_argument("--kill-every", type=float, default=30.0, help="seconds between worker kills (default 30)")
    p.add_argument("--server-flags", default="", metavar="'FLAGS'",
                   help="with --memory / --soak / --compare: extra `kvrouter serve` flags, one string (e.g. "
                        "'--running-kv-mb 512'); with --compare they go to the kvrouter targets only")
    p.add_argument("--routing-checkpoints", type=int, default=10_000, help=argparse.SUPPRESS)
    p.add_argument("--routing-prompt-tokens", type=int, default=32_768, help=argparse.SUPPRESS)
    return p


def _model_name(base_url: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=10) as r:
            return json.load(r)["data"][0]["id"]
    except Exception:
        return "default_model"


def run(ns: argparse.Namespace) -> int:
    require_extra("bench", "kvrouter bench")
    if ns.overhead:
        from kvrouter.router.bench.overhead import run_overhead_bench

        ns.output.mkdir(parents=True, exist_ok=True)
        result = run_overhead_bench(200, ns.cache_dir)
        (ns.output / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0 if result["router_adds_p50_ms"] < 3.0 else 1
    if ns.memory or ns.soak:
        import shlex

        ns.output.mkdir(parents=True, exist_ok=True)
        flags = tuple(shlex.split(ns.server_flags))
        if ns.memory:
            from kvrouter.router.bench.memory import run_memory_bench

            result = run_memory_bench(ns.cache_dir, sessions=ns.sessions or 50, max_tokens=ns.max_tokens,
                                      extra_flags=flags)
            name = "memory.json"
        else:
            from kvrouter.router.bench.soak import run_soak_bench

            result = run_soak_bench(ns.cache_dir, seconds=ns.soak_seconds, concurrency=ns.concurrency,
                                    kill_every_s=ns.kill_every, max_tokens=ns.max_tokens, seed=ns.seed,
                                    extra_flags=flags)
            name = "soak.json"
        (ns.output / name).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    if ns.loop_stall:
        from kvrouter.router.bench.loop_stall import run_loop_stall_bench

        ns.output.mkdir(parents=True, exist_ok=True)
        result = run_loop_stall_bench(ns.routing_checkpoints, ns.routing_prompt_tokens)
        (ns.output / "loop_stall.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0 if result["target_met"] else 1
    if ns.routing:
        from kvrouter.router.bench.routing import run_routing_bench

        ns.output.mkdir(parents=True, exist_ok=True)
        result = run_routing_bench(ns.routing_checkpoints, ns.routing_prompt_tokens, ns.cache_dir, ns.model)
        (ns.output / "routing.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0 if result["decision_p99_ms"] < 2.0 else 1
    return asyncio.run(_run(ns))


async def _run(ns: argparse.Namespace) -> int:
    from kvrouter.router.bench import report, servers
    from kvrouter.router.bench.client import run_workload
    from kvrouter.router.bench.workload import WorkloadSpec, distinct_prefixes, make_workload, warmup_requests

    from kvrouter.router.usage import flag_errors

    with flag_errors():
        spec = WorkloadSpec(seed=ns.seed, sessions=ns.sessions or 12, users=ns.users, turns=ns.turns,
                            env_every=ns.env_every, system_words=ns.system_words)
    sessions = make_workload(spec)
    from kvrouter.router.bench.tokenize import chat_tokenizer

    encode = chat_tokenizer(ns.model, ns.cache_dir)
    prompts = [encode(r.messages) for reqs in sessions for r in reqs]
    oracle = distinct_prefixes(prompts)
    total_prompt = sum(len(p) for p in prompts)
    print(f"workload: {sum(len(s) for s in sessions)} requests, {total_prompt} prompt tokens, "
          f"oracle {oracle} distinct prefixes (seed {ns.seed})", file=sys.stderr)
    ns.output.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    skipped: dict[str, str] = {}  # target -> why it did not run

    async def measure(name: str, base_url: str, model: str, server=None) -> None:
        restart = snapshot = None
        if server is not None and not ns.no_restart:  # SMG: the gateway and its workers
            async def restart():
                await asyncio.to_thread(server.restart)
        if server is not None and name.startswith("kvrouter"):
            async def snapshot():
                return await asyncio.to_thread(server.metrics_text)
        n_warm = ns.concurrency if ns.warmup is None else max(0, ns.warmup)
        result = await run_workload(base_url, model, sessions, ns.concurrency, ns.max_tokens,
                                    restart=restart, snapshot=snapshot, label=name,
                                    warmup=lambda round_: warmup_requests(spec, n_warm, round_))
        s = report.summarize(result, oracle, total_prompt)
        s["endpoint"] = base_url
        if server is not None:
            s["server_start_seconds"] = [round(x, 2) for x in server.start_seconds]
        if hasattr(server, "commands"):
            s["commands"] = server.commands
        summaries[name] = s

    started_at = time.time()
    if ns.endpoint:
        await measure("endpoint", ns.endpoint, ns.model_name or _model_name(ns.endpoint))
    else:
        from kvrouter.router.bench import smg

        explicit = ns.targets is not None
        targets = (ns.targets or list(TARGETS)) if ns.compare or explicit else ["kvrouter"]
        work = Path(tempfile.mkdtemp(prefix="kvrouter-bench-"))
        model_dir = None

        def exported() -> Path:
            """The model as an mlx-lm directory: `--model` itself when it is one, else exported."""
            nonlocal model_dir
            if model_dir is None and ns.model and Path(ns.model).expanduser().is_dir():
                model_dir = Path(ns.model).expanduser()
            if model_dir is None:
                from kvrouter.router.export_mlx import export_mlx_model

                model_dir = export_mlx_model(ns.model, ns.cache_dir, work / "mlx-model")
            return model_dir

        import shlex

        server_flags = shlex.split(ns.server_flags)
        for name in targets:
            extra = ["--model", ns.model] if ns.model else []
            try:
                if name == "mlx_lm.server":
                    server = servers.mlx_lm_server(exported(), work)
                elif name == "smg+kvrouter":  # installs smg only when named in --targets
                    server = await asyncio.to_thread(smg.smg_kvrouter, work, ns.cache_dir, extra, explicit)
                elif name == "smg+mlx":
                    server = await asyncio.to_thread(smg.smg_mlx, work, ns.cache_dir, exported(), explicit)
                else:
                    extra = (["--no-kv-cache"] if name == "kvrouter-no-kv-cache" else []) + extra + server_flags
                    server = servers.kvrouter_server(name, work, ns.cache_dir, extra)
                print(f"starting {name} (log: {server.log_path})", file=sys.stderr)
                await asyncio.to_thread(server.start)
            except (smg.SmgUnavailable, RuntimeError) as exc:
                if name not in SMG_TARGETS:
                    raise
                skipped[name] = str(exc)
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            try:
                model = (server.model if name in ("mlx_lm.server", *SMG_TARGETS)
                         else ns.model_name or _model_name(server.base_url))
                await measure(name, server.base_url, model, server)
            finally:
                await asyncio.to_thread(server.stop)
    out = {
        "workload": {**spec.__dict__, "concurrency": ns.concurrency, "max_tokens": ns.max_tokens,
                     "requests": sum(len(s) for s in sessions), "prompt_tokens": total_prompt,
                     "oracle_prefilled_tokens": oracle},
        "started": started_at,
        "results": summaries,
    }
    if skipped:
        out["skipped"] = skipped
    if not summaries:
        (ns.output / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"nothing measured; wrote {ns.output / 'summary.json'}", file=sys.stderr)
        return 1
    first = next(iter(summaries.values()))
    out["prefilled_over_oracle"] = first["prefilled_over_oracle"]
    if len(summaries) > 1:
        table, ratios = report.side_by_side(
            {k: {f: v for f, v in s.items() if f != "per_request"} for k, s in summaries.items()},
            "mlx_lm.server" if "mlx_lm.server" in summaries else next(iter(summaries)))
        out["ratios"] = ratios
        print(table)
    else:
        s = first
        print(f"ttft p50 {s['ttft_p50']} s, p95 {s['ttft_p95']} s; prefilled {s['prefilled_tokens']} "
              f"(oracle {oracle}, x{s['prefilled_over_oracle']}); reused {s['reused_tokens']}; "
              f"wall {s['wall_seconds']} s; restarted {s['restarted']}; errors {s['errors']}")
    (ns.output / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    for p in report.plot(summaries, ns.output):
        print(f"wrote {p}", file=sys.stderr)
    print(f"wrote {ns.output / 'summary.json'}", file=sys.stderr)
    ok = all(s["errors"] == 0 for s in summaries.values())
    return 0 if ok and not (ns.targets and set(skipped) & set(ns.targets)) else 1
