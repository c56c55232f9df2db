"""What every gRPC port a worker opens shares: who may call it and how its connections
are kept alive.

A port that binds anything but loopback requires the shared worker token
(`--worker-token`), checked on every call by `TokenInterceptor`, and may serve TLS
(`--tls-cert`/`--tls-key`). That holds for the kvrouter worker port and for SMG's
MlxEngine port (`--smg-listen`; SMG forwards its `--api-key` as the same bearer token).
"""

from __future__ import annotations

import hmac
import ipaddress

import grpc

KEEPALIVE_SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),  # the worker pings a silent router too (a dead one's streams end)
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),  # the router pings every 10 s (worker_client)
    ("grpc.http2.max_ping_strikes", 0),  # never close a router's connection for pinging
)
"""gRPC keepalive of a worker's servers, matched with the router's channels
(`router.worker_client.CHANNEL_OPTIONS`)."""


def is_loopback(address: str) -> bool:
    """True when "HOST:PORT" binds only the loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(address: str, token: str | None, flag: str = "--listen") -> None:
    """Raises ValueError when `address` is not loopback and no token guards it."""
    if not token and not is_loopback(address):
        raise ValueError(f"{flag} {address} is not loopback: give --worker-token (and --tls-cert/--tls-key)")


def bind(server: grpc.aio.Server, address: str, tls: tuple[bytes, bytes] | None) -> int:
    """Adds `address` to `server`, over TLS when `tls` is (certificate chain PEM, key PEM);
    returns the bound port. Raises RuntimeError when it cannot be bound."""
    if tls is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return port


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer TOKEN` metadata (UNAUTHENTICATED)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token")
            yield  # pragma: no cover

        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, handler_call_details):
        md = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(md.get("authorization", ""), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary
