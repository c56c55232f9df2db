"""The aiohttp application factory: routes, the error middleware, and the
cleanup contexts that own the cluster (worker clients) and the store index.

The request path has three parts: `router.cluster` (what is known of the
workers, and the routing snapshot), `router.leases` (the load each request
puts on its worker) and `router.worker_client` (the wire); `router.dispatch`
ties them together for every protocol view."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvrouter.router.auth import identify
from kvrouter.router.cluster import Cluster
from kvrouter.router.config import RouterConfig
from kvrouter.router.dispatch import Dispatcher
from kvrouter.router.errors import ApiError, NotFound, PayloadTooLarge, RequestTimeout
from kvrouter.router.keys import CLUSTER, DISPATCHER, LEASES, METRICS, ROUTER_CONFIG
from kvrouter.router.leases import Leases
from kvrouter.router.metrics import count_errors_middleware, create_metrics, refresh_scrape_gauges
from kvrouter.router.views import anthropic, completions, openai, openapi, responses
from kvrouter.router.stalls import StallWatch
from kvrouter.router.views.common import ARRIVED_KEY, KEY_NAME_KEY, NAMESPACE_KEY
from kvrouter.router.views.state import router_state_view

log = logging.getLogger("kvrouter.router")


def is_anthropic_path(path: str) -> bool:
    """Paths whose clients expect Anthropic's error format."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_response(request: web.Request, err: ApiError) -> web.Response:
    """`err` in the format of the protocol the request's path belongs to."""
    if is_anthropic_path(request.path):
        return web.json_response(err.anthropic_body(), status=err.anthropic_status, headers=err.headers())
    return web.json_response(err.openai_body(), status=err.status, headers=err.headers())


def route_label(request: web.Request) -> str:
    """The matched route's path template for metric labels ("unmatched" for
    unknown paths), so clients cannot create one series per URL."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None or request.match_info.http_exception is not None:
        return "unmatched"
    return resource.canonical


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Maps every failure to an error response in the protocol's format (OpenAI,
    or Anthropic under /v1/messages); nothing escapes as a bare 500."""
    metrics = request.app[METRICS]
    request[ARRIVED_KEY] = time.perf_counter()
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = error_response(request, exc)
    except web.HTTPRequestEntityTooLarge:
        exc = PayloadTooLarge(f"request body exceeds {request.app[ROUTER_CONFIG].max_body_bytes} bytes")
        resp = error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            err = NotFound(f"no route for {request.method} {request.path}")
        else:
            err = ApiError(exc.reason)
            err.status, err.type = exc.status, "invalid_request_error" if exc.status < 500 else "api_error"
        resp = error_response(request, err)
    except (ConnectionResetError, OSError) as exc:
        # The client closed the connection (its generation is already cancelled):
        # nothing can be sent; aiohttp drops this response quietly.
        log.info("client went away during %s %s: %s", request.method, request.path, exc)
        return web.Response(status=499)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        err = ApiError("internal error; the server keeps serving")
        resp = error_response(request, err)
    metrics.requests.labels(route_label(request), str(resp.status)).inc()
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Checks the API key of /v1 requests (when keys are configured) and sets the
    request's cache namespace (router.auth)."""
    if request.path.startswith("/v1/"):
        request[NAMESPACE_KEY], request[KEY_NAME_KEY] = identify(request.app[ROUTER_CONFIG].api_keys,
                                                                 request.headers)
    return await handler(request)


@web.middleware
async def body_timeout_middleware(request: web.Request, handler):
    """Reads a request's whole body within --body-read-timeout (aiohttp keeps it for the
    handler), so a client that trickles its body cannot hold a connection: past the
    timeout it gets 408 and the connection closes."""
    if request.body_exists:
        timeout = request.app[ROUTER_CONFIG].body_read_timeout_s
        try:
            await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:
            log.info("request body of %s %s not received in %.0f s; 408", request.method, request.path, timeout)
            raise RequestTimeout(f"the request body did not arrive within {timeout:g} seconds") from None
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    workers = {c.name: cluster.serving(c) for c in cluster.clients}
    ok = any(workers.values())
    return web.json_response({"status": "ok" if ok else "unavailable", "workers": workers}, status=200 if ok else 503)


async def metrics_view(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    await refresh_scrape_gauges(m, request.app[CLUSTER])
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: RouterConfig, cluster: Cluster | None = None) -> web.Application:
    """The gateway for `config`. `cluster` defaults to gRPC clients for
    `config.worker_addresses`; it is connected on startup and closed on cleanup."""
    metrics = create_metrics()
    # count_errors_middleware is inner: it sees each exception before error_middleware maps it.
    app = web.Application(middlewares=[error_middleware, count_errors_middleware(metrics), auth_middleware,
                                       body_timeout_middleware],
                          client_max_size=config.max_body_bytes)
    app[ROUTER_CONFIG] = config
    app[METRICS] = metrics
    store = None
    if cluster is None:
        if config.store is not None:
            from kvrouter.cachestore import CheckpointStore, StoreUnavailableError

            try:
                store = CheckpointStore(config.store)
            except StoreUnavailableError as exc:
                log.warning("routing without the store's index: %s", exc)
        from kvrouter.cachestore.config import store_id_of

        cluster = Cluster.from_addresses(
            config.worker_addresses, store, remote=config.remote_workers, token=config.worker_token,
            tls_ca=config.worker_tls_ca, local_store_id=store_id_of(config.store.directory) if store else "",
            max_queue=config.max_queue, chat_template=config.chat_template)
    app[CLUSTER] = cluster
    app[LEASES] = Leases(metrics.in_flight)
    app[DISPATCHER] = Dispatcher(cluster, app[LEASES], metrics, coalesce=config.coalesce,
                                 affinity_max_in_flight=config.affinity_max_in_flight)

    async def cluster_ctx(app: web.Application):
        await cluster.connect(config.worker_ready_timeout_s)
        yield
        await cluster.close()
        if cluster.store is not None:
            cluster.store.close()

    app.cleanup_ctx.append(cluster_ctx)

    async def stall_ctx(app: web.Application):
        """Takes workers that hold requests without progress out of routing (router.stalls)."""
        task = asyncio.create_task(StallWatch(cluster, app[LEASES], config.stall_timeout_s).run())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(stall_ctx)
    if config.grpc_port is not None:
        from kvrouter.router.grpc_api import grpc_ctx

        app.cleanup_ctx.append(grpc_ctx)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/completions", completions.completions)
    app.router.add_post("/v1/responses", responses.create_response)
    app.router.add_get("/v1/models", openai.list_models)
    app.router.add_get("/v1/models/{model:.+}", openai.retrieve_model)
    app.router.add_get("/v1/router/state", router_state_view)
    app.router.add_post("/v1/messages", anthropic.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic.count_tokens)
    app.router.add_get("/openapi.json", openapi.openapi_json)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_view)
    return app
