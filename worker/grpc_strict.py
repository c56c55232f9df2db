"""Malformed protobuf is the caller's error: INVALID_ARGUMENT, never UNKNOWN.

grpc's generated `add_XServicer_to_server` decodes each request with the message's
`FromString`; bytes that do not parse make grpc answer UNKNOWN, with the Python
exception class in the details. `add_servicer` registers the same handlers with a
decoder that turns a parse failure into a `Malformed` value, which the wrapped method
answers with INVALID_ARGUMENT ("the request is not a valid <message>") before the
servicer runs. Used for every gRPC service kvrouter serves (the workers' and the
router's public API); MLX-free, so the router imports it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as `message` (a protobuf type name)."""

    message: str
    error: str


def _decoder(deserialize):
    if deserialize is None:
        return None
    name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    message = name.full_name if name is not None else "request"

    def decode(raw: bytes):
        try:
            return deserialize(raw)
        except (DecodeError, ValueError, TypeError) as exc:  # protobuf's parse errors
            return Malformed(message, str(exc))

    return decode


def _wrap(behavior, streaming: bool):
    if streaming:
        async def stream(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.message}")
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.message}")
        return await behavior(request, context)

    return unary


def _strict(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    decode = _decoder(handler.request_deserializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_wrap(handler.unary_unary, False), decode,
                                                   handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap(handler.unary_stream, True), decode,
                                                    handler.response_serializer)
    return handler  # client-streaming methods: none in kvrouter's protos


class _Capture:
    """Stands in for a server while a generated `add_XServicer_to_server` registers."""

    def __init__(self) -> None:
        self.registered: tuple[str, dict] | None = None

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
        self.registered = (name, handlers)


def add_servicer(add_to_server, servicer, server: grpc.aio.Server) -> None:
    """`add_to_server(servicer, server)` (a generated `add_XServicer_to_server`), with
    INVALID_ARGUMENT for requests that are not valid protobuf."""
    capture = _Capture()
    add_to_server(servicer, capture)
    if capture.registered is None:  # an older grpcio generator: register as it does
        add_to_server(servicer, server)
        return
    name, handlers = capture.registered
    strict = {method: _strict(h) for method, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, strict),))
    server.add_registered_method_handlers(name, strict)
