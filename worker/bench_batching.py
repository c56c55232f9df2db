"""Benchmark: what continuous batching gives a worker on this machine.

    python -m kvrouter.worker.bench_batching [--requests 8] [--prompt-tokens 200] [--max-tokens 48]
                                    [--concurrency 1,8]

Runs the worker's engine in-process on the default model (no store), once per
`--concurrency` value (its `--decode-concurrency`; `--prompt-concurrency` is
the same, at most 8): submits `--requests` requests with distinct prompts at
once, greedy, and waits for them all. Prints, per setting, the wall time,
aggregate generated tokens per second, and the time to first token (p50, max)
in seconds. Concurrency 1 is a worker that serves one request at a time.
Re-executes itself with OpenBLAS preloaded, as a worker does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from kvrouter.worker.launch import module_command


def run(bundle, hf_tok, concurrency: int, requests: int, prompt_tokens: int, max_tokens: int) -> dict:
    """Serves `requests` concurrent requests on a fresh engine; returns the figures
    (seconds, tokens per second)."""
    from kvrouter.worker.checkpoints import CheckpointManager
    from kvrouter.worker.engine import Engine, EngineConfig
    from kvrouter.worker.events import FinishEvent, GenerationRequest, SamplingConfig, TokenEvent

    engine = Engine(bundle, hf_tok, CheckpointManager(bundle.identity, bundle.state, None),
                    EngineConfig(decode_concurrency=concurrency, prompt_concurrency=min(8, concurrency)))
    engine.start()
    done = threading.Semaphore(0)
    first: dict[int, float] = {}
    generated = [0] * requests
    t0 = time.perf_counter()

    def emitter(i: int):
        def emit(ev):
            if isinstance(ev, TokenEvent) and ev.token_ids:
                first.setdefault(i, time.perf_counter() - t0)
                generated[i] += len(ev.token_ids)
            elif not isinstance(ev, TokenEvent):
                if not isinstance(ev, FinishEvent):
                    print(f"request {i} failed: {ev}", file=sys.stderr)
                done.release()
        return emit

    for i in range(requests):
        prompt = tuple((i * 104729 + j * 7919) % 40000 + 100 for j in range(prompt_tokens))
        engine.submit(GenerationRequest(f"r{i}", prompt, SamplingConfig(max_tokens=max_tokens)), emitter(i))
    for _ in range(requests):
        done.acquire()
    wall = time.perf_counter() - t0
    engine.stop(shutdown_checkpoint=False)
    ttfts = sorted(first.values())
    return {"concurrency": concurrency, "wall_s": wall, "generated": sum(generated),
            "tokens_per_s": sum(generated) / wall, "ttft_p50_s": statistics.median(ttfts) if ttfts else 0.0,
            "ttft_max_s": ttfts[-1] if ttfts else 0.0}


def main(argv: list[str] | None = None) -> None:
    from kvrouter.worker.blas import describe_blas, reexec_with_preload

    reexec_with_preload([*module_command("kvrouter.worker.bench_batching"), *sys.argv[1:]])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8, help="concurrent requests (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="tokens per prompt (default 200)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request (default 48)")
    p.add_argument("--concurrency", default="1,8", help="decode concurrencies to compare (default 1,8)")
    args = p.parse_args(argv)

    import mlx.core as mx

    from kvrouter.worker.config import default_cache_dir
    from kvrouter.worker.models import build_hf_tokenizer, load_model

    bundle = load_model(None, default_cache_dir())
    hf_tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids,
                                bundle.bos_token_id)
    print(f"device: {mx.default_device()}  BLAS: {describe_blas()}  model: {bundle.name} ({bundle.kv_layout})")
    print(f"{args.requests} requests at once, {args.prompt_tokens} prompt tokens, up to {args.max_tokens} "
          "generated each (fewer when the model emits its stop token)")
    for c in (int(x) for x in args.concurrency.split(",")):
        r = run(bundle, hf_tok, c, args.requests, args.prompt_tokens, args.max_tokens)
        print(f"decode-concurrency {r['concurrency']:>3}: wall {r['wall_s']:6.2f} s, {r['generated']} tokens, "
              f"{r['tokens_per_s']:6.1f} tok/s aggregate, TTFT p50 {r['ttft_p50_s']:.2f} s, "
              f"max {r['ttft_max_s']:.2f} s")


if __name__ == "__main__":
    main()
