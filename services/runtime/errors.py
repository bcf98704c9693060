"""Structured gRPC errors: every non-OK status carries a google.rpc.Status with an ErrorInfo.

All reasons live in `Reason` below (documented in docs/errors.md). A servicer raises `ServiceError`; the
`ErrorInterceptor` installed by the bootstrap turns it into a status with details, passes statuses from
downstream services through unchanged, and turns anything unexpected into INTERNAL (logged, never leaked).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger("clawhub.errors")

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# gRPC refuses trailing metadata over 16 KiB, and the status travels there: keep every part of it small so
# an error about a huge input still reaches the caller (instead of RESOURCE_EXHAUSTED with no details).
MAX_MESSAGE_CHARS = 2048
MAX_DETAIL_CHARS = 512
MAX_VIOLATIONS = 20


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` shortened to `limit` characters, saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


class Reason(StrEnum):
    """Every ErrorInfo reason clawhub returns. Stable: clients may branch on them."""

    # Requests that are malformed.
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INVALID_NAME = "INVALID_NAME"
    INVALID_VERSION = "INVALID_VERSION"
    INVALID_DIGEST = "INVALID_DIGEST"
    INVALID_MANIFEST = "INVALID_MANIFEST"
    INVALID_INPUT = "INVALID_INPUT"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    # Uploads.
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    SIZE_MISMATCH = "SIZE_MISMATCH"
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"
    VERIFICATION_FAILED = "VERIFICATION_FAILED"
    VERSION_EXISTS = "VERSION_EXISTS"
    # Lookups.
    SKILL_NOT_FOUND = "SKILL_NOT_FOUND"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
    BLOB_NOT_FOUND = "BLOB_NOT_FOUND"
    TAG_NOT_FOUND = "TAG_NOT_FOUND"
    DEPLOYMENT_NOT_FOUND = "DEPLOYMENT_NOT_FOUND"
    # Release state.
    VERSION_NOT_READY = "VERSION_NOT_READY"
    DEPLOYMENT_IN_PROGRESS = "DEPLOYMENT_IN_PROGRESS"
    NO_PREVIOUS_VERSION = "NO_PREVIOUS_VERSION"
    SKILL_NOT_DEPLOYED = "SKILL_NOT_DEPLOYED"
    ILLEGAL_TRANSITION = "ILLEGAL_TRANSITION"
    SMOKE_TEST_FAILED = "SMOKE_TEST_FAILED"
    DEPENDENCY_CONFLICT = "DEPENDENCY_CONFLICT"
    DEPLOYMENT_CIRCUIT_OPEN = "DEPLOYMENT_CIRCUIT_OPEN"
    DEPENDENCY_LINK_FAILED = "DEPENDENCY_LINK_FAILED"
    NOT_DEPLOYABLE = "NOT_DEPLOYABLE"
    # Running a skill.
    MODULE_INVALID = "MODULE_INVALID"
    SKILL_TRAPPED = "SKILL_TRAPPED"
    SKILL_EXIT_NONZERO = "SKILL_EXIT_NONZERO"
    SKILL_TIMEOUT = "SKILL_TIMEOUT"
    MEMORY_LIMIT_EXCEEDED = "MEMORY_LIMIT_EXCEEDED"
    OUTPUT_LIMIT_EXCEEDED = "OUTPUT_LIMIT_EXCEEDED"
    STDERR_LIMIT_EXCEEDED = "STDERR_LIMIT_EXCEEDED"
    INPUT_TOO_LARGE = "INPUT_TOO_LARGE"
    EXECUTOR_OVERLOADED = "EXECUTOR_OVERLOADED"
    FUEL_EXHAUSTED = "FUEL_EXHAUSTED"
    # Trust: publishers, namespaces, signatures (registry) and provenance re-checks (executor).
    INVALID_TOKEN = "INVALID_TOKEN"
    ADMIN_REQUIRED = "ADMIN_REQUIRED"
    ADMIN_TOKEN_NOT_CONFIGURED = "ADMIN_TOKEN_NOT_CONFIGURED"
    PUBLISHER_EXISTS = "PUBLISHER_EXISTS"
    PUBLISHER_NOT_FOUND = "PUBLISHER_NOT_FOUND"
    NAMESPACE_NOT_OWNED = "NAMESPACE_NOT_OWNED"
    NAMESPACE_REQUIRED = "NAMESPACE_REQUIRED"
    NAMESPACE_EXISTS = "NAMESPACE_EXISTS"
    NAMESPACE_OVERLAP = "NAMESPACE_OVERLAP"
    NAMESPACE_NOT_FOUND = "NAMESPACE_NOT_FOUND"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    SIGNATURE_REQUIRED = "SIGNATURE_REQUIRED"
    SIGNER_NOT_TRUSTED = "SIGNER_NOT_TRUSTED"
    PROVENANCE_MISMATCH = "PROVENANCE_MISMATCH"
    # Platform.
    METHOD_NOT_EXPOSED = "METHOD_NOT_EXPOSED"
    NO_EXECUTOR_AVAILABLE = "NO_EXECUTOR_AVAILABLE"
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"


@dataclass
class ServiceError(Exception):
    """An error a servicer raises; the interceptor sends it as a structured status."""

    code: grpc.StatusCode
    reason: Reason
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    # (field, description) pairs for a google.rpc.BadRequest.
    field_violations: Iterable[tuple[str, str]] = ()
    retry_after_seconds: float | None = None
    domain: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self, default_domain: str) -> status_pb2.Status:
        details = [
            error_details_pb2.ErrorInfo(
                reason=str(self.reason),
                domain=self.domain or default_domain,
                metadata={clip(k, 128): clip(str(v)) for k, v in list(self.metadata.items())[:MAX_VIOLATIONS]},
            )
        ]
        violations = list(self.field_violations)[:MAX_VIOLATIONS]
        if violations:
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=clip(f, 128), description=clip(d))
                for f, d in violations
            ]))
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=self.code.value[0], message=clip(self.message, MAX_MESSAGE_CHARS),
                                 details=packed)


def invalid(reason: Reason, field_name: str, problem: str) -> ServiceError:
    """INVALID_ARGUMENT about one field, with a BadRequest naming it."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, problem,
                        metadata={"field": field_name}, field_violations=[(field_name, problem)])


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError, domain: str) -> None:
    status = error.to_status(domain)
    await context.abort(error.code, status.message,
                        trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),))


async def abort_passthrough(context: grpc.aio.ServicerContext[Any, Any], err: grpc.aio.AioRpcError) -> None:
    """Re-raise a downstream status unchanged: code, message and structured details."""
    trailing = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if k == STATUS_DETAILS_KEY)
    await context.abort(err.code(), err.details() or "", trailing_metadata=trailing)


def upstream_error(err: grpc.aio.AioRpcError, upstream: str, address: str = "") -> Exception:
    """What to raise for a failed call to another service.

    A status that carries structured details comes from a clawhub service and passes through unchanged;
    a bare transport failure (peer down, our own deadline) gets an ErrorInfo naming the upstream.
    """
    if status_of(err) is not None:
        passthrough: Exception = err
        return passthrough
    code = err.code()
    reason = {grpc.StatusCode.UNAVAILABLE: Reason.UPSTREAM_UNAVAILABLE,
              grpc.StatusCode.DEADLINE_EXCEEDED: Reason.DEADLINE_EXCEEDED}.get(code, Reason.INTERNAL)
    where = f"{upstream} at {address}" if address else upstream
    return ServiceError(code, reason, f"{where}: {err.details() or code.name}",
                        metadata={"upstream": upstream, "address": address})


def status_of(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status carried by an RPC error, if any (client side)."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of an RPC error, if any (client side)."""
    status = status_of(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def bad_request(err: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    status = status_of(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            return request
    return None


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns exceptions raised by servicers into structured statuses."""

    def __init__(self, domain: str) -> None:
        self._domain = domain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_client_stream(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))
        return handler

    async def _handle(self, exc: Exception, context: Any, method: str) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, ServiceError):
            await abort_with(context, exc, self._domain)
        if isinstance(exc, grpc.aio.AioRpcError):
            translated = upstream_error(exc, "a service this one calls")
            if isinstance(translated, ServiceError):
                # A bare transport failure of a call this service made: still a structured error.
                await abort_with(context, translated, self._domain)
            await abort_passthrough(context, exc)
        log.exception("unexpected error in %s", method, exc_info=exc)
        await abort_with(context, ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL,
                                               f"internal error in {method}; see the service log"),
                         self._domain)

    def _wrap_unary(self, fn: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: Any) -> Any:
            try:
                return await fn(request, context)
            except Exception as exc:  # noqa: BLE001 - translated into a status
                await self._handle(exc, context, method)

        return wrapper

    def _wrap_client_stream(self, fn: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def wrapper(requests: Any, context: Any) -> Any:
            try:
                return await fn(requests, context)
            except Exception as exc:  # noqa: BLE001 - translated into a status
                if not isinstance(exc, grpc.aio.AbortError):
                    await _drain(requests)
                await self._handle(exc, context, method)

        return wrapper

    def _wrap_stream(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(fn):
            # A handler that writes with context.write (grpc_health's Watch) is a plain coroutine.
            return self._wrap_unary(fn, method)

        async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - translated into a status
                await self._handle(exc, context, method)

        return wrapper


# Bounds on reading what a client still sends after its stream was refused.
DRAIN_BYTES = 8 * 1024 * 1024
DRAIN_SECONDS = 2.0


async def _drain(requests: Any) -> None:
    """Read (and drop) what the client is still sending, within bounds, before the error status goes out.

    A server that finishes a client-streaming call while the client is still writing races the client's
    writes: the client then sometimes sees INTERNAL ("Internal error from Core") instead of the real status.
    """
    async def consume() -> None:
        received = 0
        async for message in requests:
            received += message.ByteSize() if hasattr(message, "ByteSize") else len(message)
            if received > DRAIN_BYTES:
                return

    try:
        await asyncio.wait_for(consume(), DRAIN_SECONDS)
    except Exception:  # noqa: BLE001 - best effort: the status is what matters
        return
