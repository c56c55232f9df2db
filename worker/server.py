"""The worker process: load the model, serve `kvrouter.worker.v1.Worker` and the
standard `grpc.health.v1` service over grpc.aio, stop cleanly on SIGTERM.

Security: a worker binds loopback by default. Listening on any other address
requires a shared token (`--worker-token`; every call must carry it as
`authorization: Bearer TOKEN` metadata, checked by `TokenInterceptor`) and may
use TLS (`--tls-cert`, `--tls-key`).

When the generation thread dies the worker reports NOT_SERVING, ends the streams
in progress with an error, and exits with status 3 so that `kvrouter serve` (or
any process manager) restarts it (case C15).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvrouter_proto import worker_pb2, worker_pb2_grpc
from kvrouter.cachestore.config import store_id_of
from kvrouter.worker.grpc_security import KEEPALIVE_SERVER_OPTIONS, TokenInterceptor, bind, check_exposure, is_loopback
from kvrouter.worker.grpc_strict import add_servicer
from kvrouter.worker.config import DEFAULT_RAM_WARM_FRACTION, WorkerConfig

log = logging.getLogger("kvrouter.worker")

SERVICE_NAME = "kvrouter.worker.v1.Worker"

HEALTH_POLL_SECONDS = 0.5
ENGINE_DEATH_EXIT_STATUS = 3
ENGINE_DEATH_GRACE_S = 2.0  # streams in progress get their error before the process exits


def die_with_parent(parent_pid: int) -> None:
    """Linux: asks the kernel to send this process SIGTERM when its parent dies
    (PR_SET_PDEATHSIG; kept across exec). Called by the worker itself at start:
    running Python between fork and exec (`preexec_fn`) in the router, whose gRPC
    threads are busy, crashed restarted workers with SIGSEGV. The worker also
    polls its parent pid, which covers other platforms and a parent that died
    before this call."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def open_store(config, on_event=None):
    """The worker's CheckpointStore for a `cachestore.StoreConfig` (None: --no-kv-cache),
    with its `on_event` listener, repaired (orphans, dead writers' temp files, rows
    without payload, counters).

    Never refuses to start over the store: a directory that is full or unwritable is
    served read-only (the store logs why), one that cannot even be read safely gives
    None (live-state reuse only) with a warning, and a repair that fails is logged."""
    import lmdb

    from kvrouter.cachestore import CheckpointStore, StoreUnavailableError

    if config is None:
        log.info("KV checkpoint store off (--no-kv-cache)")
        return None
    try:
        store = CheckpointStore(config, on_event=on_event)
    except StoreUnavailableError as exc:
        log.warning("KV checkpoint store off: %s (serving from live state, recomputing the rest)", exc)
        return None
    if not store.writes_off:
        try:
            removed = store.repair()
            if removed:
                log.info("store repair removed %d orphan or temp file(s)", removed)
        except (OSError, lmdb.Error) as exc:
            log.warning("store repair at start failed (serving anyway): %s", exc)
    log.info("KV checkpoint store at %s%s", config.directory,
             f" (read-only: {store.writes_off})" if store.writes_off else "")
    return store


def memory_plan(config: WorkerConfig, model, context_length: int | None = None):
    """The worker's memory budgets (`worker.sizing.plan_memory`) from the loaded model, the
    machine and the flags given, and with a store (`config.store`) and `context_length`
    (tokens) its disk budget (`sized_store_config`: `plan.disk`, `plan.store_config`);
    logged in one line. Also sets MLX's buffer cache limit from it and hands back what
    loading left in MLX's cache."""
    import gc

    import mlx.core as mx

    from kvrouter.worker.sizing import machine_memory_bytes, measure_model, plan_memory

    kv_per_token, weights = measure_model(model)
    machine, backend = machine_memory_bytes()
    m = config.memory
    plan = plan_memory(
        kv_bytes_per_token=kv_per_token, weights_bytes=weights, machine_bytes=machine,
        workers_on_host=m.workers_on_host, backend=backend, prompt_concurrency=config.batching.prompt_concurrency,
        prefill_chunk_tokens=config.prefill_chunk_tokens, running_kv_bytes=m.running_kv_bytes,
        live_state_bytes=config.batching.live_state_bytes, ram_tier_bytes=config.ram_bytes,
        writer_queue_bytes=m.writer_queue_bytes, mlx_cache_limit_bytes=m.mlx_cache_limit_bytes)
    gc.collect()  # the loader's temporaries (GGUF dequantization) ...
    mx.set_cache_limit(plan.mlx_cache_limit_bytes)
    mx.clear_cache()  # ... and MLX's freed buffers go back to the system now
    if config.store is not None:  # unknown context: the longest cold anchor bounds a checkpoint
        disk, store_config = sized_store_config(config.store, kv_per_token,
                                                context_length or config.store.cold_max_tokens)
        plan = dataclasses.replace(plan, disk=disk, store_config=store_config)
    log.info("%s (machine %.1f GiB, %s, %d worker(s) on it)", plan.describe(), machine / 2**30, backend,
             m.workers_on_host)
    return plan


def sized_store_config(store_config, kv_bytes_per_token: int, context_length: int):
    """(DiskPlan, `store_config` with its disk budget set): the budget given
    (`--kv-cache-disk-mb`), or `worker.sizing.plan_disk_budget` from the model's KV bytes per
    token, its context length (tokens) and the store directory's free disk plus the
    payloads it holds (`cachestore.payload.store_room`)."""
    from kvrouter.cachestore.payload import store_room
    from kvrouter.worker.sizing import plan_disk_budget

    free, stored = store_room(store_config.directory)
    disk = plan_disk_budget(kv_bytes_per_token=kv_bytes_per_token, context_length=context_length,
                            cold_max_tokens=store_config.cold_max_tokens, free_bytes=free, stored_bytes=stored,
                            given_bytes=store_config.disk_budget_bytes)
    return disk, (store_config if disk.given else store_config.with_budget(disk.budget_bytes))


SHARED_STORE_MARGIN = 1.1  # another model's bytes per token must pass ours by this much to resize


def size_for_shared_store(plan, store, config: WorkerConfig, identity: str, context_length: int | None):
    """`plan` with its disk budget sized from the largest model's KV bytes per token in
    `store` (`CheckpointStore.largest_bytes_per_token`) when another model's checkpoints
    there are larger than this one's: every worker sharing the directory then sizes the
    same budget (the store evicts under the budget of whichever worker writes). The
    store's budget is set to it. A given `--kv-cache-disk-mb` is kept."""
    if plan.disk.given:
        return plan
    widest = store.largest_bytes_per_token(exclude_model=identity)
    if widest <= plan.kv_bytes_per_token * SHARED_STORE_MARGIN:
        return plan
    disk, store_config = sized_store_config(config.store, int(widest), context_length or config.store.cold_max_tokens)
    store.set_disk_budget(store_config.disk_budget_bytes)
    log.info("%s, for the largest model sharing the store (%.1f KiB/token against this one's %.1f)",
             disk.describe(), widest / 1024, plan.kv_bytes_per_token / 1024)
    return dataclasses.replace(plan, disk=disk, store_config=store_config)


def build_engine(config: WorkerConfig):
    """Loads the model and store and returns (engine, ModelInfo message).

    The store's one `on_event` listener (`cache_events.StoreListeners`) is set
    here: it passes store events to the engine (per-request reports); `serve`
    adds the cache event hub to it. A model whose caches cannot be checkpointed
    (a cache class `load_prompt_cache` does not know) runs without the store.

    Raises the model loader's errors (ModelNotFoundError, ...) unchanged, and
    ValueError for `--kv-bits` on a model that is not all plain KVCache layers.
    """
    from kvrouter.worker.blas import describe_blas
    from kvrouter.worker.cache_events import StoreListeners
    from kvrouter.worker.checkpoints import CheckpointManager
    from kvrouter.worker.engine import Engine, EngineConfig
    from kvrouter.worker import cuda_attention
    from kvrouter.worker.models import build_hf_tokenizer, load_model
    from kvrouter.worker.models.tool_parser import tool_parser_for
    from kvrouter.worker.ram_tier import RamTier
    from kvrouter.worker.servicer import reuse_rules_message
    import mlx.core as mx

    bundle = load_model(config.model, config.cache_dir, kv_quant=config.kv_quant)
    spec = bundle.state
    log.info(
        "model %s loaded (%s; device %s; BLAS %s)",
        bundle.name, bundle.kv_layout, mx.default_device(), describe_blas(),
    )
    batching = (f"continuous batching, up to {config.batching.decode_concurrency} sequences" if spec.batchable
                else "one request at a time (a cache layer mlx-lm cannot batch: no merge)")
    log.info("model %s: caches %s; states cut back: %s; %s", bundle.name, spec.layout, spec.rules.label, batching)
    cuda_attention.install(config.batching.plain_attention_tokens)
    hf_tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids, bundle.bos_token_id)
    plan = memory_plan(config, bundle.model, bundle.context_length)
    listeners = StoreListeners()
    store = None
    if config.store is not None and not spec.serializable:
        log.warning("KV checkpoint store off: mlx-lm cannot save and load this model's caches (%s)", spec.layout)
    else:
        store = open_store(plan.store_config, listeners)
        if store is not None and plan.disk is not None:
            plan = size_for_shared_store(plan, store, config, bundle.identity, bundle.context_length)
    checkpoints = CheckpointManager(bundle.identity, spec, store, RamTier(plan.ram_tier_bytes), listeners,
                                    prefetch_bytes=plan.prefetch_bytes)
    engine = Engine(bundle, hf_tok, checkpoints, EngineConfig(
        plan.prefill_chunk_tokens, config.max_queue, config.batching.decode_concurrency,
        config.batching.prompt_concurrency, plan.live_state_bytes,
        writer_max_items=config.memory.writer_max_items, writer_max_bytes=plan.writer_queue_bytes,
        shutdown_timeout_s=config.memory.shutdown_timeout_s, running_kv_bytes=plan.running_kv_bytes,
        kv_bytes_per_token=plan.kv_bytes_per_token, long_prefill_tokens=config.batching.long_prefill_tokens,
        ram_warmup_bytes=(int(plan.ram_tier_bytes * DEFAULT_RAM_WARM_FRACTION) if config.warm_bytes is None
                          else config.warm_bytes)))
    listeners.add(engine.on_store_event)
    info = worker_pb2.ModelInfo(
        model_name=bundle.name,
        identity=bundle.identity,
        tokenizer_json=bundle.tokenizer_json,
        chat_template=bundle.chat_template or "",
        eos_token_ids=list(bundle.eos_token_ids),
        context_length=bundle.context_length,
        reuse=reuse_rules_message(spec.rules),
        tool_parser=tool_parser_for(hf_tok, declared=bundle.tool_parser),
    )
    if bundle.bos_token_id is not None:
        info.bos_token_id = bundle.bos_token_id
    return engine, info


def create_server(address: str, engine, model_info, *, token: str | None = None,
                  tls: tuple[bytes, bytes] | None = None, store_id: str = "", worker_name: str = "",
                  hub=None, store=None) -> tuple[grpc.aio.Server, int, "health.aio.HealthServicer"]:
    """Builds a grpc.aio server for `engine` bound to `address` ("HOST:PORT", port 0 = any).

    token: required `authorization: Bearer` metadata (None: none; then the address
    must be loopback). tls: (certificate chain PEM, private key PEM) or None.
    store: the CheckpointStore the engine reads (ListCheckpoints lists it; None: none).
    Returns (server, bound port, health servicer). Raises RuntimeError when the
    address cannot be bound, ValueError for a non-loopback address without a token.
    """
    from kvrouter.worker.servicer import WorkerServicer

    check_exposure(address, token)
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 2**20), *KEEPALIVE_SERVER_OPTIONS],
                             interceptors=interceptors)
    servicer = WorkerServicer(engine, model_info, store_id=store_id, worker_name=worker_name, hub=hub, store=store)
    add_servicer(worker_pb2_grpc.add_WorkerServicer_to_server, servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, bind(server, address, tls), health_servicer


async def _watch_health(engine, health_servicer, parent_pid: int | None, stop: asyncio.Event,
                        died: asyncio.Event | None = None, extra: tuple = ()) -> None:
    """Marks the service NOT_SERVING when the engine thread dies (case C15), then
    sets `died` and `stop` after a short grace (the process exits for a restart);
    stops the worker when its parent process is gone.

    extra: more (health servicer, service name) pairs kept in step, e.g. the SMG port's.
    """
    targets = [(health_servicer, ""), (health_servicer, SERVICE_NAME), *extra]
    serving = None
    while not stop.is_set():
        ok = engine.alive
        if ok != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for servicer, name in targets:
                await servicer.set(name, status)
            if serving is not None and not ok:
                log.error("generation thread died; reporting NOT_SERVING and exiting for a restart")
                await asyncio.sleep(ENGINE_DEATH_GRACE_S)  # streams in progress end with an error first
                if died is not None:
                    died.set()
                stop.set()
                return
            serving = ok
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("parent process %d is gone; stopping", parent_pid)
            stop.set()
        try:
            await asyncio.wait_for(stop.wait(), HEALTH_POLL_SECONDS)
        except asyncio.TimeoutError:
            pass


def _read_tls(config: WorkerConfig) -> tuple[bytes, bytes] | None:
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return Path(config.tls_cert).read_bytes(), Path(config.tls_key).read_bytes()


async def serve(config: WorkerConfig) -> int:
    """Runs a worker until SIGTERM/SIGINT, then writes the shutdown checkpoint and exits.
    Returns the process exit status (ENGINE_DEATH_EXIT_STATUS when the engine thread died)."""
    from kvrouter.worker.servicer import CacheEventHub

    check_exposure(config.listen, config.worker_token)
    if config.smg_listen is not None:
        check_exposure(config.smg_listen, config.worker_token, "--smg-listen")
    if config.parent_pid is not None:
        die_with_parent(config.parent_pid)
    tls = _read_tls(config)
    engine, info = await asyncio.to_thread(build_engine, config)
    hub = CacheEventHub(asyncio.get_running_loop())
    engine.on_cache_event = hub.publish_threadsafe
    engine.checkpoints.store_listeners.add(hub.publish_store_event)  # checkpoints stored and removed
    store = engine.checkpoints.store
    engine.start()
    store_id = store_id_of(config.store.directory) if config.store is not None else ""
    server, port, health_servicer = create_server(config.listen, engine, info, token=config.worker_token, tls=tls,
                                                  store_id=store_id, worker_name=config.worker_name, hub=hub,
                                                  store=store)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    died = asyncio.Event()
    host = config.listen.rsplit(":", 1)[0]
    log.info("worker %s serving %s on %s:%d (pid %d)", config.worker_name, info.model_name, host, port, os.getpid())
    smg = None
    smg_health: tuple = ()
    if config.smg_listen is not None:  # SMG's MlxEngine protocol on a second port (worker/smg_servicer.py)
        from kvrouter.worker.smg_servicer import SMG_SERVICE_NAME, create_smg_server, model_directory, model_source

        smg = create_smg_server(config.smg_listen, engine, model_source(config.model, config.cache_dir),
                                model_directory(config.model), token=config.worker_token, tls=tls)
        await smg[0].start()
        smg_health = ((smg[3], ""), (smg[3], SMG_SERVICE_NAME))
        log.info("worker %s serving SMG's mlx.grpc.engine.MlxEngine on %s:%d",
                 config.worker_name, config.smg_listen.rsplit(":", 1)[0], smg[1])
    watcher = asyncio.create_task(_watch_health(engine, health_servicer, config.parent_pid, stop, died, smg_health))
    if config.port_file is not None:
        tmp = Path(str(config.port_file) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(config.port_file)
    await stop.wait()
    log.info("stopping: finishing requests, writing the shutdown checkpoint")
    await health_servicer.enter_graceful_shutdown()
    hub.close()
    if smg is not None:
        smg[2].shutting_down = True
        await smg[3].enter_graceful_shutdown()
        await smg[0].stop(grace=5)
    # After an engine death the streams in progress have ended already; the router's
    # health and event watches would only hold the full grace.
    await server.stop(grace=0.5 if died.is_set() else 5)
    await asyncio.to_thread(engine.stop)
    watcher.cancel()
    log.info("worker stopped")
    return ENGINE_DEATH_EXIT_STATUS if died.is_set() else 0
