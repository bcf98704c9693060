"""Forwarding of whole gRPC services (registry, deployer) through the gateway, as raw bytes.

The gateway does not decode forwarded messages: it relays bytes, so it never drifts from the contracts and
costs one hop. It relays only the public services: the calls internal to the platform (the route-table and
stats feeds, blob downloads) are separate services (DeployerInternalService, RegistryInternalService) that
the gateway neither relays nor describes; it refuses them UNIMPLEMENTED / METHOD_NOT_EXPOSED.

A relayed response stream holds at most one message in the relay: the error interceptor writes each with
backpressure (services/runtime/errors.py), so a caller that stops reading stops the relay, and the relay
stops reading its upstream, once the HTTP/2 windows are full. A caller that goes away cancels the upstream
call at once (the relay's `finally`), instead of leaving it to garbage collection or its deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.runtime.channels import PEER_METADATA, peer_host
from services.runtime.errors import Reason, ServiceError, upstream_error

# Metadata the transport owns; everything else (traceparent, request ids, credentials) is forwarded.
_HOP_BY_HOP = {"content-type", "te", "user-agent", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout"}


def forwarded_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata for the next hop, and `x-clawhub-peer` naming the caller (never the caller's own
    claim of it)."""
    return (*((k, v) for k, v in context.invocation_metadata() or ()
              if not k.startswith(":") and k not in _HOP_BY_HOP and k != PEER_METADATA),
            (PEER_METADATA, peer_host(str(context.peer() or ""))))


def _timeout(context: grpc.aio.ServicerContext[Any, Any], default: float) -> float:
    remaining = context.time_remaining()
    return default if remaining is None else max(remaining, 0.0)


def proxy_handler(
    service: ServiceDescriptor,
    channel: grpc.aio.Channel,
    *,
    upstream: str,
    address: str,
    default_timeout: float,
) -> grpc.GenericRpcHandler:
    """A generic handler serving every method of `service` by relaying it over `channel`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        handlers[method.name] = _relay(channel, path, method.client_streaming, method.server_streaming,
                                       default_timeout, _Upstream(upstream, address))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def refusing_handler(service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """A generic handler answering every method of `service`, a service internal to the platform, with
    UNIMPLEMENTED / METHOD_NOT_EXPOSED: the port does not serve it, and says why rather than `Method not found`."""
    return grpc.method_handlers_generic_handler(service.full_name, {
        method.name: _refusing(method.client_streaming, method.server_streaming,
                               f"/{service.full_name}/{method.name}")
        for method in service.methods})


def _refusing(client_streaming: bool, server_streaming: bool, path: str) -> grpc.RpcMethodHandler:
    error = ServiceError(grpc.StatusCode.UNIMPLEMENTED, Reason.METHOD_NOT_EXPOSED,
                         f"{path} is internal to the platform and not served on the public port",
                         metadata={"method": path})

    async def refuse_unary(request: Any, context: Any) -> bytes:
        raise error

    async def refuse_stream(request: Any, context: Any) -> AsyncIterator[bytes]:
        raise error
        yield b""  # pragma: no cover - makes this an async generator

    if server_streaming:
        maker: Callable[..., grpc.RpcMethodHandler] = (
            grpc.stream_stream_rpc_method_handler if client_streaming
            else grpc.unary_stream_rpc_method_handler)
        return maker(refuse_stream)
    maker = (grpc.stream_unary_rpc_method_handler if client_streaming
             else grpc.unary_unary_rpc_method_handler)
    return maker(refuse_unary)


class _Upstream:
    """Names the relayed service in errors that carry no status of their own (it is down, unreachable)."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            raise upstream_error(exc, self.name, self.address) from None


def _relay(channel: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool,
           default_timeout: float, upstream: _Upstream) -> grpc.RpcMethodHandler:
    # No serializers: requests and responses stay raw bytes end to end.
    if not client_streaming and not server_streaming:
        unary_unary = channel.unary_unary(path)

        async def relay_unary_unary(request: bytes, context: Any) -> bytes:
            with upstream:
                result: bytes = await unary_unary(request, timeout=_timeout(context, default_timeout),
                                                  metadata=forwarded_metadata(context))
            return result

        return grpc.unary_unary_rpc_method_handler(relay_unary_unary)
    if client_streaming and not server_streaming:
        stream_unary = channel.stream_unary(path)

        async def relay_stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
            with upstream:
                result: bytes = await stream_unary(requests, timeout=_timeout(context, default_timeout),
                                                   metadata=forwarded_metadata(context))
            return result

        return grpc.stream_unary_rpc_method_handler(relay_stream_unary)
    if not client_streaming:
        unary_stream = channel.unary_stream(path)

        async def relay_unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            call = unary_stream(request, timeout=_timeout(context, default_timeout),
                                metadata=forwarded_metadata(context))
            try:
                with upstream:
                    async for response in call:
                        yield response
            finally:
                call.cancel()  # a no-op once the call is over; stops the upstream when our caller went away

        return grpc.unary_stream_rpc_method_handler(relay_unary_stream)
    stream_stream = channel.stream_stream(path)

    async def relay_stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        call = stream_stream(requests, timeout=_timeout(context, default_timeout),
                             metadata=forwarded_metadata(context))
        try:
            with upstream:
                async for response in call:
                    yield response
        finally:
            call.cancel()

    return grpc.stream_stream_rpc_method_handler(relay_stream_stream)
