"""The `kvrouter` command line: `serve` (router + local workers) and `worker`
(one worker process alone). Flags are parsed here, at the edge, into frozen
config dataclasses; nothing below reads argparse namespaces."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from kvrouter.router import __version__
from kvrouter.worker.config import (
    DEFAULT_DECODE_CONCURRENCY,
    DEFAULT_LONG_PREFILL_TOKENS,
    DEFAULT_PLAIN_ATTENTION_TOKENS,
    DEFAULT_PROMPT_CONCURRENCY,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_WRITER_ITEMS,
    KV_BITS,
    KV_GROUP_SIZES,
    KvQuantization,
    default_cache_dir,
)
from kvrouter.router.config import DEFAULT_STALL_TIMEOUT_S
from kvrouter.router.extras import MissingExtra, require_extra
from kvrouter.router.usage import UsageError, flag_errors
from kvrouter.worker.launch import module_command

DESCRIPTION = """\
kvrouter: a cache-aware router for local LLM inference on MLX.

It serves the OpenAI API, tokenizes each prompt, and reuses stored KV
checkpoints (cold anchors and continued waypoints) so that a long shared
prefix (system prompt, tool definitions, project context) is prefilled once
and loaded from disk afterwards, across sessions, processes and restarts.
"""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    value = _int_at_least(text, 0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
    return value


def add_kv_cache_flags(p: argparse.ArgumentParser) -> None:
    """The store's policy knobs. Names follow ds4's disk KV cache; its
    --kv-disk-dir and --kv-disk-space-mb are accepted as aliases."""
    g = p.add_argument_group("KV checkpoint store (on by default)")
    g.add_argument("--kv-cache-dir", "--kv-disk-dir", type=Path, default=None,
                   help="store directory (default: a 'kv' folder in the cache directory)")
    g.add_argument("--kv-cache-disk-mb", "--kv-disk-space-mb", type=positive_int, default=None,
                   help="disk budget of the store in MiB; the lowest-value checkpoints are evicted past it (default: "
                        "sized by each worker from the model, printed at start: room for 10 checkpoints of "
                        "min(context, --kv-cache-cold-max-tokens) tokens, at least 4096, at most half of the "
                        "store disk's free space plus what the store holds; give it when several models share "
                        "one store)")
    g.add_argument("--kv-cache-min-tokens", type=positive_int, default=512,
                   help="do not store checkpoints shorter than this many tokens (default 512)")
    g.add_argument("--kv-cache-cold-max-tokens", type=positive_int, default=30000,
                   help="longest cold anchor to store, in tokens (default 30000)")
    g.add_argument("--kv-cache-continued-interval-tokens", type=positive_int, default=10000,
                   help="store a continued waypoint every this many tokens, rounded up to the alignment (default 10000)")
    g.add_argument("--kv-cache-boundary-trim-tokens", type=nonneg_int, default=32,
                   help="tokens dropped from the end of a cold store without an anchor (default 32)")
    g.add_argument("--kv-cache-boundary-align-tokens", type=positive_int, default=2048,
                   help="cold stores without an anchor are aligned down to a multiple of this (default 2048)")
    g.add_argument("--kv-cache-ram-mb", type=nonneg_int, default=None,
                   help="RAM tier: recently used checkpoints kept in memory per worker, MiB (default: sized from "
                        "the model and the machine's memory, printed at start; on Apple silicon this is GPU memory)")
    g.add_argument("--kv-cache-warm-mb", type=nonneg_int, default=None,
                   help="after a start, stored checkpoints loaded into the RAM tier while the worker is idle, MiB: "
                        "the most reused first, anchors before other kinds; a request arriving stops a load "
                        "between tensors (default: the whole RAM tier; 0: off)")
    g.add_argument("--no-kv-cache", action="store_true", help="turn the disk checkpoint store off")


def add_memory_flags(p: argparse.ArgumentParser) -> None:
    """A worker's memory bounds. Unset ones are sized from the model's KV bytes per token,
    its weights and the machine's memory (`kvrouter.worker.sizing`) and printed at start."""
    m = p.add_argument_group("worker memory (defaults sized from the model and the machine, printed at start)")
    m.add_argument("--running-kv-mb", type=positive_int, default=None,
                   help="KV memory the requests in a worker's batch may hold together, MiB; past it new requests "
                        "wait for admission instead of over-committing (default: sized)")
    m.add_argument("--mlx-cache-limit-mb", type=nonneg_int, default=None,
                   help="MLX's buffer cache limit per worker, MiB: freed memory past it goes back to the system "
                        "(default: sized, 128-2048)")
    m.add_argument("--checkpoint-writer-mb", type=positive_int, default=None,
                   help="KV snapshots waiting for the checkpoint writer, MiB; past it lower-value stores are "
                        "skipped (default: sized)")
    m.add_argument("--checkpoint-writer-items", type=positive_int, default=DEFAULT_WRITER_ITEMS,
                   help=f"checkpoints waiting for the writer (default {DEFAULT_WRITER_ITEMS})")
    m.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
                   help="time a stopping worker gives its shutdown checkpoints (written in parallel); the rest are "
                        f"skipped and reported (default {DEFAULT_SHUTDOWN_TIMEOUT_S:g})")


def memory_config(ns: argparse.Namespace, workers_on_host: int = 1):
    """A worker.config.MemoryConfig from the flags. Raises ValueError naming a bad value."""
    from kvrouter.worker.config import MemoryConfig

    if ns.shutdown_timeout < 0:
        raise ValueError("--shutdown-timeout must be >= 0")
    mib = lambda v: None if v is None else v * 2**20  # noqa: E731
    return MemoryConfig(running_kv_bytes=mib(ns.running_kv_mb), mlx_cache_limit_bytes=mib(ns.mlx_cache_limit_mb),
                        writer_queue_bytes=mib(ns.checkpoint_writer_mb), writer_max_items=ns.checkpoint_writer_items,
                        shutdown_timeout_s=ns.shutdown_timeout,
                        workers_on_host=getattr(ns, "workers_on_host", None) or workers_on_host)


def kv_quant(ns: argparse.Namespace) -> KvQuantization | None:
    """The quantized KV cache the flags ask for, or None."""
    return KvQuantization(ns.kv_bits, ns.kv_group_size) if ns.kv_bits is not None else None


def kv_flags_as_args(ns: argparse.Namespace) -> list[str]:
    """The KV flags of `ns` (store and quantization) as command-line arguments, to pass
    on to worker processes."""
    quant = kv_quant(ns)
    return (quant.as_args() if quant is not None else []) + _store_flags_as_args(ns)


def _store_flags_as_args(ns: argparse.Namespace) -> list[str]:
    if ns.no_kv_cache:
        return ["--no-kv-cache"]
    return [
        "--kv-cache-dir", str(store_dir(ns)),
        "--kv-cache-min-tokens", str(ns.kv_cache_min_tokens),
        "--kv-cache-cold-max-tokens", str(ns.kv_cache_cold_max_tokens),
        "--kv-cache-continued-interval-tokens", str(ns.kv_cache_continued_interval_tokens),
        "--kv-cache-boundary-trim-tokens", str(ns.kv_cache_boundary_trim_tokens),
        "--kv-cache-boundary-align-tokens", str(ns.kv_cache_boundary_align_tokens),
        *(["--kv-cache-disk-mb", str(ns.kv_cache_disk_mb)] if ns.kv_cache_disk_mb is not None else []),
        *(["--kv-cache-ram-mb", str(ns.kv_cache_ram_mb)] if ns.kv_cache_ram_mb is not None else []),
        *(["--kv-cache-warm-mb", str(ns.kv_cache_warm_mb)] if ns.kv_cache_warm_mb is not None else []),
    ]


def store_dir(ns: argparse.Namespace) -> Path:
    return ns.kv_cache_dir or (ns.cache_dir / "kv")


def store_config(ns: argparse.Namespace):
    """A cachestore.StoreConfig from the flags, or None with --no-kv-cache. Its disk budget
    is None when --kv-cache-disk-mb is not given: each worker sizes it once its model is
    loaded (`worker.sizing.plan_disk_budget`). Raises ValueError with a message naming
    the bad flag value."""
    if ns.no_kv_cache:
        return None
    from kvrouter.cachestore import StoreConfig

    return StoreConfig(
        directory=store_dir(ns),
        disk_budget_bytes=None if ns.kv_cache_disk_mb is None else ns.kv_cache_disk_mb * 2**20,
        min_tokens=ns.kv_cache_min_tokens,
        cold_max_tokens=ns.kv_cache_cold_max_tokens,
        continued_interval_tokens=ns.kv_cache_continued_interval_tokens,
        boundary_trim_tokens=ns.kv_cache_boundary_trim_tokens,
        boundary_align_tokens=ns.kv_cache_boundary_align_tokens,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrouter", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvrouter {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("KVROUTER_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser, many_models: bool = False) -> None:
        p.add_argument("--model", default=None, action="append" if many_models else "store",
                       help="a GGUF file, an mlx-lm model directory, or a Hugging Face repo id already in the "
                            "local cache (default: SmolLM2-135M-Instruct, fetched on first start)"
                            + ("; repeat it to serve several models (--workers each)" if many_models else ""))
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                       help=f"where models and the default store live (default: {default_cache_dir()})")
        p.add_argument("--prefill-chunk-tokens", type=positive_int, default=None,
                       help="prefill chunk size in tokens; chunks end at its multiples (default 256 on the CPU, "
                            "2048 on a GPU)")
        b = p.add_argument_group("continuous batching (mlx_lm.server's flag names)")
        b.add_argument("--decode-concurrency", type=positive_int, default=DEFAULT_DECODE_CONCURRENCY,
                       help="sequences each worker decodes together; also its batch slots, shared by running "
                            f"requests and kept live states (default {DEFAULT_DECODE_CONCURRENCY})")
        b.add_argument("--prompt-concurrency", type=positive_int, default=DEFAULT_PROMPT_CONCURRENCY,
                       help=f"prompts each worker prefills together (default {DEFAULT_PROMPT_CONCURRENCY})")
        b.add_argument("--long-prefill-tokens", type=nonneg_int, default=DEFAULT_LONG_PREFILL_TOKENS,
                       help="prompts at least this long (tokens) are prefilled outside the batch, one at a time, "
                            "by a plain per-sequence loop (mlx-lm's causal mask; the batch's array mask made a "
                            "32K prefill 4x slower on a GPU), then join the batch to decode "
                            f"(default {DEFAULT_LONG_PREFILL_TOKENS}; 0 = every prompt in the batch)")
        b.add_argument("--plain-attention-tokens", type=nonneg_int, default=DEFAULT_PLAIN_ATTENTION_TOKENS,
                       help="on MLX's CUDA backend, prefill chunks of up to this many tokens use plain attention "
                            "operations instead of cuDNN's fused attention, which builds a graph for every new "
                            "(chunk, cache) shape: tens of milliseconds per hit; longer chunks stay fused "
                            f"(default {DEFAULT_PLAIN_ATTENTION_TOKENS}; 0 = always fused; no effect on Metal "
                            "or the CPU)")
        b.add_argument("--live-state-mb", type=nonneg_int, default=None,
                       help="memory a worker may keep in idle live states (the KV state of finished requests, "
                            "reused by their next turn) in MiB; past it the oldest is dropped after its evict "
                            "checkpoint (default: sized from the model and the machine; 0 = no bound besides "
                            "the slots)")
        add_memory_flags(p)
        q = p.add_argument_group("quantized KV cache (mlx_lm.server's flag names)")
        q.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                       help="keep keys and values quantized to this many bits from the first token (mlx-lm's "
                            "QuantizedKVCache): smaller live states, RAM tier and checkpoints; only for models "
                            "whose every layer is a plain KV cache (others are refused at start); requests then "
                            "run one at a time, as in mlx_lm.server (default: not quantized)")
        q.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=64,
                       help="quantization group size of --kv-bits (default 64)")
        add_kv_cache_flags(p)

    serve = sub.add_parser("serve", help="run the gateway and its local worker processes",
                           description="Start the OpenAI-compatible gateway and N local worker processes; "
                                       "Ctrl-C or SIGTERM stops them all.")
    common(serve, many_models=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--workers", type=nonneg_int, default=1,
                       help="local worker processes per model (default 1; 0 with --remote-worker only)")
    serve.add_argument("--max-tokens-default", type=positive_int, default=512,
                       help="max_tokens when a request gives none (default 512)")
    rt = serve.add_argument_group("routing")
    rt.add_argument("--max-queue", type=nonneg_int, default=32,
                    help="requests in flight per worker; past it clients get 429 (Anthropic: 529) with Retry-After "
                         "(default 32; 0 = no limit)")
    rt.add_argument("--remote-worker", action="append", default=[], metavar="HOST:PORT",
                    help="a worker on another host (`kvrouter worker --listen HOST:PORT`); repeatable")
    rt.add_argument("--worker-token", default=os.environ.get("KVROUTER_WORKER_TOKEN"),
                    help="shared token of the remote workers (default: $KVROUTER_WORKER_TOKEN)")
    rt.add_argument("--worker-tls-ca", type=Path, default=None,
                    help="PEM root certificate(s) to verify remote workers that use TLS (default: plaintext)")
    rt.add_argument("--no-coalesce", action="store_true",
                    help="do not make requests that share a new prefix wait for the one prefilling it")
    rt.add_argument("--worker-stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S, metavar="SECONDS",
                    help="a worker that holds requests and makes no progress (no prefill chunk, no token) this long "
                         "leaves routing until it moves again; its requests without a token go to another worker "
                         f"(default {DEFAULT_STALL_TIMEOUT_S:g})")
    api = serve.add_argument_group("client API")
    api.add_argument("--api-keys-file", type=Path, default=None,
                     help="require API keys: one key per line, an optional name after whitespace, '#' comments; "
                          "each key's requests get their own cache namespace (default: no auth)")
    api.add_argument("--admin-keys", default="", metavar="NAME[,NAME...]",
                     help="names (from --api-keys-file) of keys that see every tenant in /v1/router/state; other "
                          "keys see their own namespaces only (default: none)")
    api.add_argument("--max-body-mb", type=float, default=8,
                     help="largest request body in MiB; larger ones get 413 (default 8)")
    api.add_argument("--body-read-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="a request body must arrive within this; slower clients get 408 (default 30)")
    api.add_argument("--max-tokens-limit", type=positive_int, default=None,
                     help="cap every request's max_tokens at this many tokens (default: no cap)")
    api.add_argument("--grpc-port", type=port_number, default=None,
                     help="also serve the public gRPC API (kvrouter.router.v1.Router) on this port; 0 picks one "
                          "(default: off)")
    api.add_argument("--chat-template", type=Path, default=None,
                     help="a Jinja chat template FILE that replaces the model's own (e.g. one with tool-call syntax)")
    api.add_argument("--stream-keepalive-s", type=positive_float, default=10.0,
                     help="while a stream has nothing to send (a long prefill before the first token), send a "
                          "keep-alive this often: an SSE comment, and an Anthropic `ping` event (default 10)")
    api.add_argument("--stream-idle-delta-s", type=positive_float, default=60.0,
                     help="an Anthropic stream that has sent nothing but pings for this many seconds also gets an "
                          "empty text delta: Claude Code's stream watchdog ignores pings and aborts after 300 s "
                          "(default 60)")
    agents = serve.add_argument_group("agent clients (Claude Code, Codex CLI)")
    agents.add_argument("--keep-billing-header", action="store_true",
                        help="keep Claude Code's `x-anthropic-billing-header:` line in the prompt (default: removed; "
                             "it changes with every first prompt and would end reuse across sessions at its 24th "
                             "token; `x-kvrouter-route` says `normalised=billing-header` when it was removed)")
    agents.add_argument("--tools-before-system", action="store_true",
                        help="render tool definitions before the system text where the chat template can (ChatML/"
                             "Qwen-style templates list them after it): a changed system text (Claude Code's git "
                             "status) then keeps the tools' KV state reusable (default off: the model's own order)")

    worker = sub.add_parser("worker", help="run one worker process alone (gRPC)",
                            description="Serve one model over gRPC (kvrouter.worker.v1.Worker + grpc.health.v1).")
    common(worker)
    worker.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT for gRPC (default 127.0.0.1:50051)")
    worker.add_argument("--name", default="w0", help="worker name in logs (default w0)")
    worker.add_argument("--max-queue", type=nonneg_int, default=0,
                        help="requests waiting plus running it accepts; more get RESOURCE_EXHAUSTED (default 0: "
                             "no limit)")
    worker.add_argument("--worker-token", default=os.environ.get("KVROUTER_WORKER_TOKEN"),
                        help="require this shared token on every call (required when --listen is not loopback; "
                             "default: $KVROUTER_WORKER_TOKEN)")
    worker.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve gRPC over TLS")
    worker.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    worker.add_argument("--smg-listen", default=None, metavar="HOST:PORT",
                        help="also serve SMG's mlx.grpc.engine.MlxEngine protocol on this address, for "
                             "`smg launch --worker-urls grpc://HOST:PORT` (default off)")
    worker.add_argument("--port-file", type=Path, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--workers-on-host", type=positive_int, default=None, help=argparse.SUPPRESS)
    from kvrouter.router import cache_cli

    cache_cli.add_parser(sub)
    from kvrouter.router import ops_cli

    ops_cli.add_parsers(sub, default_cache_dir())
    return parser


def setup_logging(level: str, name: str | None = None) -> None:
    tag = f"[{name}] " if name else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def read_flag_file(path: Path, flag: str) -> bytes:
    """The bytes of the file a flag names. Raises ValueError naming the flag."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from exc


def api_config(ns: argparse.Namespace) -> dict:
    """RouterConfig fields of the client API flags. Raises ValueError naming a bad flag value."""
    from kvrouter.router.auth import ApiKeys, check_admin_keys

    if ns.max_body_mb <= 0:
        raise ValueError("--max-body-mb must be positive")
    template = read_flag_file(ns.chat_template, "--chat-template").decode() if ns.chat_template else None
    if not ns.body_read_timeout > 0:
        raise ValueError("--body-read-timeout must be positive")
    keys = ApiKeys.load(ns.api_keys_file) if ns.api_keys_file else None
    admins = tuple(n.strip() for n in ns.admin_keys.split(",") if n.strip())
    return {
        "api_keys": keys,
        "admin_keys": check_admin_keys(keys, admins),
        "body_read_timeout_s": ns.body_read_timeout,
        "max_body_bytes": int(ns.max_body_mb * 2**20),
        "max_tokens_limit": ns.max_tokens_limit,
        "grpc_port": ns.grpc_port,
        "grpc_host": ns.host,
        "chat_template": template,
        "keep_billing_header": ns.keep_billing_header,
        "tools_before_system": ns.tools_before_system,
        "stream_keepalive_s": ns.stream_keepalive_s,
        "stream_idle_delta_s": ns.stream_idle_delta_s,
    }


def stall_timeout(ns: argparse.Namespace) -> float:
    """--worker-stall-timeout, checked. Raises ValueError."""
    if not ns.worker_stall_timeout > 0:
        raise ValueError("--worker-stall-timeout must be positive")
    return ns.worker_stall_timeout


def batching_config(ns: argparse.Namespace):
    from kvrouter.worker.config import BatchingConfig

    return BatchingConfig(ns.decode_concurrency, ns.prompt_concurrency,
                          None if ns.live_state_mb is None else ns.live_state_mb * 2**20,
                          ns.long_prefill_tokens, ns.plain_attention_tokens)


def _serve(ns: argparse.Namespace) -> int:
    from kvrouter.router.supervisor import run_serve

    setup_logging(ns.log_level)
    with flag_errors():
        cfg = serve_config(ns)
    return asyncio.run(run_serve(cfg, kv_flags_as_args(ns)))


def serve_config(ns: argparse.Namespace):
    """The ServeConfig of `kvrouter serve`'s flags. Raises ValueError naming a bad flag."""
    from kvrouter.router.config import RouterConfig, ServeConfig

    if ns.workers == 0 and not ns.remote_worker:
        raise ValueError("--workers must be at least 1 (or 0 with --remote-worker)")
    api = api_config(ns)
    tls_ca = read_flag_file(ns.worker_tls_ca, "--worker-tls-ca") if ns.worker_tls_ca else None
    models = tuple(ns.model) if ns.model else (None,)
    return ServeConfig(
        router=RouterConfig(host=ns.host, port=ns.port, store=store_config(ns),
                            default_max_tokens=ns.max_tokens_default,
                            remote_workers=tuple(ns.remote_worker), worker_token=ns.worker_token,
                            worker_tls_ca=tls_ca, max_queue=ns.max_queue, coalesce=not ns.no_coalesce,
                            stall_timeout_s=stall_timeout(ns), **api),
        model=models[0],
        models=models,
        workers=ns.workers,
        cache_dir=ns.cache_dir,
        prefill_chunk_tokens=ns.prefill_chunk_tokens,
        batching=batching_config(ns),
        memory=memory_config(ns),
    )


def _worker(ns: argparse.Namespace) -> int:
    from kvrouter.worker.blas import reexec_with_preload

    if ns.smg_listen is not None:
        require_extra("smg", "kvrouter worker --smg-listen")
    reexec_with_preload([*module_command("kvrouter.router.cli"), *sys.argv[1:]])
    from kvrouter.worker.server import serve

    setup_logging(ns.log_level, ns.name)
    with flag_errors():
        cfg = worker_config(ns)
    return asyncio.run(serve(cfg))


def worker_config(ns: argparse.Namespace):
    """The WorkerConfig of `kvrouter worker`'s flags. Raises ValueError naming a bad flag."""
    from kvrouter.worker.config import WorkerConfig
    from kvrouter.worker.grpc_security import check_exposure

    check_exposure(ns.listen, ns.worker_token)
    if ns.smg_listen is not None:
        check_exposure(ns.smg_listen, ns.worker_token, "--smg-listen")
    if (ns.tls_cert is None) != (ns.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return WorkerConfig(
        model=ns.model,
        listen=ns.listen,
        store=store_config(ns),
        cache_dir=ns.cache_dir,
        prefill_chunk_tokens=ns.prefill_chunk_tokens,
        batching=batching_config(ns),
        ram_bytes=0 if ns.no_kv_cache else None if ns.kv_cache_ram_mb is None else ns.kv_cache_ram_mb * 2**20,
        warm_bytes=0 if ns.no_kv_cache else None if ns.kv_cache_warm_mb is None else ns.kv_cache_warm_mb * 2**20,
        memory=memory_config(ns),
        port_file=ns.port_file,
        parent_pid=ns.parent_pid,
        worker_name=ns.name,
        smg_listen=ns.smg_listen,
        max_queue=ns.max_queue,
        worker_token=ns.worker_token,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        kv_quant=kv_quant(ns),
    )


def _cache(ns: argparse.Namespace) -> int:
    from kvrouter.router import cache_cli

    setup_logging("WARNING")
    directory = Path(ns.kv_cache_dir) if ns.kv_cache_dir else default_cache_dir() / "kv"
    return cache_cli.run(ns, directory)


def _ops_commands() -> dict:
    from kvrouter.router import ops_cli

    return ops_cli.COMMANDS


def main(argv: list[str] | None = None) -> int:
    # transformers (used only for chat templates) warns at import that PyTorch is
    # missing; kvrouter never needs PyTorch, so keep that line out of the logs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        return {"serve": _serve, "worker": _worker, "cache": _cache, **_ops_commands()}[ns.command](ns)
    except UsageError as exc:
        parser.error(str(exc))
    except MissingExtra as exc:
        print(f"kvrouter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
