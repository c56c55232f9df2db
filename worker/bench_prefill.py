"""Benchmark: prefill speed of a model on this machine's MLX backend, alone and
through the worker's engine.

    python -P -m kvrouter.worker.bench_prefill [--model DIR] [--tokens 512] [--repeat 3]
    python -P -m kvrouter.worker.bench_prefill [--model DIR] --through-engine --tokens 2048,8192
                                               [--repeat 2] [--json FILE]

Without `--through-engine`: one forward pass over the whole prompt; prints tokens
per second and the BLAS in use.

With `--through-engine`, per prompt length, the time to the first token (seconds)
of a greedy request of that many tokens:
- `plain`: the plain in-process loop (`model(chunk, cache=...)` on one sequence's
  own caches, chunks of `--prefill-chunk-tokens`, then the last token and its
  argmax): what mlx-lm's single-sequence generation pays;
- `worker`: the worker's engine (`worker.engine.Engine`, no store), with its
  default `--long-prefill-tokens`: a long prompt is prefilled outside the batch
  (`worker.long_prefill`);
- `worker_batch`: the same engine with `--long-prefill-tokens 0`, every prompt
  prefilled in mlx-lm's `BatchGenerator` (its array mask): the path before.
Each repeat sends a prompt of new tokens (no reuse). Prints the best time of each
and the ratios to `plain`; `--json FILE` also writes them (see `measure`).

Run from the command line it re-executes itself with OpenBLAS preloaded, as a
worker does (unless KVROUTER_NO_BLAS_PRELOAD=1); `measure` and `main` called from
another module (e.g. the GPU driver) do not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from kvrouter.worker.launch import module_command

MODES = ("plain", "worker", "worker_batch")


def _prompt(n: int, seed: int) -> list[int]:
    """n token ids in [100, 40100), distinct for each seed."""
    return [(seed * 104729 + i * 7919) % 40000 + 100 for i in range(n)]


def plain_ttft(model, prompt: list[int], chunk: int) -> float:
    """Seconds to the first token of `prompt` by the plain single-sequence loop:
    chunks of `chunk` tokens through `model` on fresh mlx-lm caches (mlx-lm's causal
    mask), then the last token and its greedy argmax."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    tic = time.perf_counter()
    cache = make_prompt_cache(model)
    for i in range(0, len(prompt) - 1, chunk):
        model(mx.array(prompt[i: min(i + chunk, len(prompt) - 1)], dtype=mx.int32)[None], cache=cache)
        mx.eval([c.state for c in cache])
    token = mx.argmax(model(mx.array(prompt[-1:], dtype=mx.int32)[None], cache=cache)[0, -1])
    mx.eval(token)
    return time.perf_counter() - tic


def engine_ttft(engine, prompt: list[int]) -> tuple[float, float]:
    """(seconds from submit to the first token, the engine's own prefill seconds from
    the request's usage) for one greedy request of `prompt` with max_tokens 1.
    Raises RuntimeError when the request fails."""
    from kvrouter.worker.events import FinishEvent, GenerationRequest, SamplingConfig, TokenEvent

    done = threading.Event()
    out: dict = {}
    tic = time.perf_counter()

    def emit(ev) -> None:
        if isinstance(ev, TokenEvent):
            out.setdefault("first", time.perf_counter() - tic)
            return
        out.setdefault("first", time.perf_counter() - tic)  # e.g. the stop token first: no token event
        out["final"] = ev
        done.set()

    engine.submit(GenerationRequest("bench", tuple(prompt), SamplingConfig(0.0, 1.0, 1)), emit)
    done.wait()
    if not isinstance(out["final"], FinishEvent):
        raise RuntimeError(f"request failed: {out['final']}")
    return out["first"], out["final"].usage.prefill_seconds


def _engine(bundle, hf_tok, plan, long_prefill_tokens: int):
    from kvrouter.worker.checkpoints import CheckpointManager
    from kvrouter.worker.config import BatchingConfig
    from kvrouter.worker.engine import Engine, EngineConfig

    b = BatchingConfig()
    # live_state_bytes 1: a finished request's state is dropped at once (each run is a new
    # prompt; long states would only fill memory)
    engine = Engine(bundle, hf_tok, CheckpointManager(bundle.identity, bundle.state, None), EngineConfig(
        plan.prefill_chunk_tokens, 0, b.decode_concurrency, b.prompt_concurrency, 1,
        running_kv_bytes=plan.running_kv_bytes, kv_bytes_per_token=plan.kv_bytes_per_token,
        long_prefill_tokens=long_prefill_tokens))
    engine.start()
    return engine


def measure(model: str | None = None, lengths=(2048, 8192), repeat: int = 2, chunk: int | None = None,
            modes=MODES, cache_dir: Path | None = None, long_prefill_tokens: int | None = None, log=print) -> dict:
    """Times to first token of `lengths`-token prompts (tokens) through each of `modes`
    (see the module docstring), `repeat` times each, the modes taking turns, after one
    short warm-up request each.

    model: an mlx-lm directory, GGUF path or None for the default model. chunk: the
    prefill chunk, tokens (None: the worker's default for this backend,
    `worker.sizing`). long_prefill_tokens: the `worker` mode's --long-prefill-tokens
    (None: the worker's default). log: called with one line per figure.
    Returns a JSON-able dict: {"device", "model", "prefill_chunk_tokens",
    "long_prefill_tokens", "lengths": [{"tokens", "<mode>_s": best seconds,
    "<mode>_all_s": [seconds...], "<mode>_prefill_s": the engine's prefill seconds
    (best), "<mode>_vs_plain": best / plain best}]}.
    Raises ValueError for an unknown mode and the loader's errors unchanged."""
    import mlx.core as mx

    from kvrouter.worker.config import DEFAULT_LONG_PREFILL_TOKENS, BatchingConfig, WorkerConfig, default_cache_dir
    from kvrouter.worker.models import build_hf_tokenizer, load_model
    from kvrouter.worker.server import memory_plan

    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    cache_dir = cache_dir or default_cache_dir()
    bundle = load_model(model, cache_dir)
    hf_tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids,
                                bundle.bos_token_id)
    plan = memory_plan(WorkerConfig(model, "127.0.0.1:0", None, cache_dir, chunk, BatchingConfig()), bundle.model)
    chunk = plan.prefill_chunk_tokens
    if long_prefill_tokens is None:
        long_prefill_tokens = DEFAULT_LONG_PREFILL_TOKENS
    report = {"device": str(mx.default_device()), "model": bundle.name, "prefill_chunk_tokens": chunk,
              "long_prefill_tokens": long_prefill_tokens, "lengths": []}
    rows = {n: {"tokens": n} for n in lengths}
    engines = {m: _engine(bundle, hf_tok, plan, long_prefill_tokens if m == "worker" else 0)
               for m in modes if m != "plain"}
    seed = 1
    try:
        for mode in modes:  # warm-up: buffers, kernels, the engine thread
            seed += 1
            _run(mode, bundle.model, engines.get(mode), _prompt(2 * chunk + 1, seed), chunk)
        for n in lengths:
            # modes take turns within each repeat, so a busy machine slows them alike
            times: dict[str, list[float]] = {m: [] for m in modes}
            prefill: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(repeat):
                for mode in modes:
                    seed += 1
                    t, p = _run(mode, bundle.model, engines.get(mode), _prompt(n, seed), chunk)
                    times[mode].append(t)
                    prefill[mode].append(p)
            for mode in modes:
                row, ts = rows[n], times[mode]
                row[f"{mode}_s"], row[f"{mode}_all_s"] = min(ts), ts
                if mode in engines:
                    row[f"{mode}_prefill_s"] = min(prefill[mode])
                log(f"{mode:>12} {n:>6} tokens: best {min(ts):7.3f} s, median {statistics.median(ts):7.3f} s "
                    f"({n / min(ts):7.1f} tok/s)")
    finally:
        for engine in engines.values():
            engine.stop(shutdown_checkpoint=False)
    for n in lengths:
        row = rows[n]
        if "plain_s" in row:
            for mode in modes:
                if mode != "plain":
                    row[f"{mode}_vs_plain"] = row[f"{mode}_s"] / row["plain_s"]
        report["lengths"].append(row)
    return report


def _run(mode: str, model, engine, prompt: list[int], chunk: int) -> tuple[float, float | None]:
    if engine is None:
        return plain_ttft(model, prompt, chunk), None
    return engine_ttft(engine, prompt)


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("token counts must be at least 2")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -P -m kvrouter.worker.bench_prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="an mlx-lm model directory, a GGUF file or a cached HF repo id (default: the default model)")
    p.add_argument("--tokens", type=_lengths, default=None,
                   help="prompt length(s) in tokens, comma-separated (default 512; with --through-engine 2048,8192)")
    p.add_argument("--repeat", type=int, default=None,
                   help="measured runs per length and mode (default 3; with --through-engine 2)")
    p.add_argument("--through-engine", action="store_true",
                   help="time to first token through the worker's engine (long-prefill path and batch path) "
                        "against the plain in-process loop")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"with --through-engine: which to run, comma-separated (default {','.join(MODES)})")
    p.add_argument("--prefill-chunk-tokens", type=int, default=None,
                   help="prefill chunk, tokens (default: the worker's for this backend: 256 CPU, 2048 GPU)")
    p.add_argument("--long-prefill-tokens", type=int, default=None,
                   help="with --through-engine: the `worker` mode's --long-prefill-tokens (default: the worker's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark for `argv` (default sys.argv[1:]), prints it and returns the
    figures (the dict `--json` writes). Does not re-execute the process."""
    args = build_parser().parse_args(argv)
    import mlx.core as mx

    from kvrouter.worker.blas import describe_blas

    print(f"device: {mx.default_device()}  BLAS: {describe_blas()}", flush=True)
    if args.through_engine:
        report = measure(args.model, args.tokens or [2048, 8192], args.repeat or 2, args.prefill_chunk_tokens,
                         tuple(m for m in args.modes.split(",") if m),
                         long_prefill_tokens=args.long_prefill_tokens, log=lambda s: print(s, flush=True))
        print(f"model {report['model']}, prefill chunk {report['prefill_chunk_tokens']} tokens, "
              f"--long-prefill-tokens {report['long_prefill_tokens']}")
        for row in report["lengths"]:
            ratios = ", ".join(f"{k[:-9]} {v:.2f}x" for k, v in row.items() if k.endswith("_vs_plain"))
            best = ", ".join(f"{m} {row[m + '_s']:.3f} s" for m in MODES if m + "_s" in row)
            print(f"{row['tokens']:>6} tokens: {best}" + (f"; vs plain: {ratios}" if ratios else ""))
    else:
        report = _forward_rates(args.model, args.tokens or [512], args.repeat or 3)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _forward_rates(model: str | None, lengths: list[int], repeat: int) -> dict:
    """One forward pass over each whole prompt, `repeat` times: tokens per second."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from kvrouter.worker.config import default_cache_dir
    from kvrouter.worker.models import load_model

    bundle = load_model(model, default_cache_dir())
    report = {"device": str(mx.default_device()), "model": bundle.name, "lengths": []}
    for n in lengths:
        ids = mx.array([_prompt(n, 0)], dtype=mx.int32)
        mx.eval(bundle.model(ids[:, :16], cache=make_prompt_cache(bundle.model)))  # warm-up
        rates = []
        for _ in range(repeat):
            start = time.perf_counter()
            mx.eval(bundle.model(ids, cache=make_prompt_cache(bundle.model)))
            rates.append(n / (time.perf_counter() - start))
        print(f"prefill {n} tokens ({bundle.kv_layout}): best {max(rates):.1f} tok/s, "
              f"median {statistics.median(rates):.1f} tok/s over {repeat} runs")
        report["lengths"].append({"tokens": n, "best_tps": max(rates), "median_tps": statistics.median(rates)})
    return report


if __name__ == "__main__":
    from kvrouter.worker.blas import reexec_with_preload

    reexec_with_preload([*module_command("kvrouter.worker.bench_prefill"), *sys.argv[1:]])
    main()
    # A process that ran an engine aborts in MLX's native teardown at interpreter exit
    # ("terminate called without an active exception", status 134; bench_batching does the
    # same): the figures are out, so leave at once with the true status for the driver.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
