"""The aiohttp application factory: routes, the error middleware, and the
cleanup contexts that own the worker pool and the store index."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.config import RouterConfig
from router.dispatch import Dispatcher
from router.errors import ApiError, NotFound, PayloadTooLarge
from router.keys import DISPATCHER, METRICS, POOL, ROUTER_CONFIG
from router.metrics import create_metrics
from router.pool import WorkerPool
from router.views import openai

log = logging.getLogger("kvrouter.router")


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Maps every failure to an OpenAI-format error response; nothing escapes as a bare 500."""
    metrics = request.app[METRICS]
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = web.json_response(exc.openai_body(), status=exc.status)
    except web.HTTPRequestEntityTooLarge:
        exc = PayloadTooLarge(f"request body exceeds {request.app[ROUTER_CONFIG].max_body_bytes} bytes")
        resp = web.json_response(exc.openai_body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status == 404:
            err = NotFound(f"no route for {request.method} {request.path}")
        else:
            err = ApiError(exc.reason)
            err.status, err.type = exc.status, "invalid_request_error" if exc.status < 500 else "api_error"
        resp = web.json_response(err.openai_body(), status=err.status)
    except (ConnectionResetError, OSError) as exc:
        log.info("client went away: %s", exc)
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        err = ApiError("internal error; the server keeps serving")
        resp = web.json_response(err.openai_body(), status=500)
    metrics.requests.labels(request.path, str(resp.status)).inc()
    return resp


async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    workers = {c.name: c.healthy for c in pool.clients}
    ok = any(workers.values())
    return web.json_response({"status": "ok" if ok else "unavailable", "workers": workers}, status=200 if ok else 503)


async def metrics_view(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    for c in request.app[POOL].clients:
        m.worker_healthy.labels(c.name).set(1 if c.healthy else 0)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: RouterConfig, pool: WorkerPool | None = None) -> web.Application:
    """The gateway for `config`. `pool` defaults to gRPC clients for
    `config.worker_addresses`; it is connected on startup and closed on cleanup."""
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    app[ROUTER_CONFIG] = config
    app[METRICS] = create_metrics()
    store = None
    if pool is None:
        if config.store is not None:
            from cachestore import CheckpointStore

            store = CheckpointStore(config.store)
        pool = WorkerPool.from_addresses(config.worker_addresses, store)
    app[POOL] = pool
    app[DISPATCHER] = Dispatcher(pool, app[METRICS])

    async def pool_ctx(app: web.Application):
        await pool.connect(config.worker_ready_timeout_s)
        yield
        await pool.close()
        if pool.store is not None:
            pool.store.close()

    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_get("/v1/models", openai.list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_view)
    return app
