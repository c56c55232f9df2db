"""The worker process: load the model, serve `kvrouter.worker.v1.Worker` and the
standard `grpc.health.v1` service over grpc.aio, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvrouter_proto import worker_pb2, worker_pb2_grpc
from worker.config import WorkerConfig

log = logging.getLogger("kvrouter.worker")

SERVICE_NAME = "kvrouter.worker.v1.Worker"
HEALTH_POLL_SECONDS = 0.5


def build_engine(config: WorkerConfig):
    """Loads the model and store and returns (engine, ModelInfo message).

    Raises the model loader's errors (ModelNotFoundError, ...) unchanged.
    """
    from cachestore import CheckpointStore
    from worker.blas import describe_blas
    from worker.checkpoints import CheckpointManager
    from worker.engine import Engine, EngineConfig
    from worker.models import build_hf_tokenizer, load_model
    import mlx.core as mx

    bundle = load_model(config.model, config.cache_dir)
    log.info(
        "model %s loaded (%s; device %s; BLAS %s)",
        bundle.name, bundle.kv_layout, mx.default_device(), describe_blas(),
    )
    hf_tok = build_hf_tokenizer(bundle.tokenizer_json, bundle.chat_template, bundle.eos_token_ids, bundle.bos_token_id)
    store = CheckpointStore(config.store) if config.store is not None else None
    if store is None:
        log.info("KV checkpoint store off (--no-kv-cache)")
    else:
        log.info("KV checkpoint store at %s", config.store.directory)
    from worker.ram_tier import RamTier

    checkpoints = CheckpointManager(bundle.model, bundle.identity, store, RamTier(config.ram_bytes))
    engine = Engine(bundle, hf_tok, checkpoints, EngineConfig(config.prefill_chunk_tokens))
    info = worker_pb2.ModelInfo(
        model_name=bundle.name,
        identity=bundle.identity,
        tokenizer_json=bundle.tokenizer_json,
        chat_template=bundle.chat_template or "",
        eos_token_ids=list(bundle.eos_token_ids),
        context_length=bundle.context_length,
        kv_layout=bundle.kv_layout,
    )
    if bundle.bos_token_id is not None:
        info.bos_token_id = bundle.bos_token_id
    return engine, info


def create_server(address: str, engine, model_info) -> tuple[grpc.aio.Server, int, "health.aio.HealthServicer"]:
    """Builds a grpc.aio server for `engine` bound to `address` ("HOST:PORT", port 0 = any).

    Returns (server, bound port, health servicer). Raises RuntimeError when the
    address cannot be bound.
    """
    from worker.servicer import WorkerServicer

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 2**20)])
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(engine, model_info), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, port, health_servicer


async def _watch_health(engine, health_servicer, parent_pid: int | None, stop: asyncio.Event) -> None:
    """Marks the service NOT_SERVING when the engine thread dies (case C15) and
    stops the worker when its parent process is gone."""
    serving = None
    while not stop.is_set():
        ok = engine.alive
        if ok != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)
            if serving is not None and not ok:
                log.error("generation thread died; reporting NOT_SERVING")
            serving = ok
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("parent process %d is gone; stopping", parent_pid)
            stop.set()
        try:
            await asyncio.wait_for(stop.wait(), HEALTH_POLL_SECONDS)
        except asyncio.TimeoutError:
            pass


async def serve(config: WorkerConfig) -> None:
    """Runs a worker until SIGTERM/SIGINT, then writes the shutdown checkpoint and exits."""
    engine, info = await asyncio.to_thread(build_engine, config)
    engine.start()
    server, port, health_servicer = create_server(config.listen, engine, info)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_health(engine, health_servicer, config.parent_pid, stop))
    host = config.listen.rsplit(":", 1)[0]
    log.info("worker %s serving %s on %s:%d (pid %d)", config.worker_name, info.model_name, host, port, os.getpid())
    if config.port_file is not None:
        tmp = Path(str(config.port_file) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(config.port_file)
    await stop.wait()
    log.info("stopping: finishing requests, writing the shutdown checkpoint")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
    await asyncio.to_thread(engine.stop)
    watcher.cancel()
    log.info("worker stopped")
