"""OpenTelemetry tracing: configured from the standard `OTEL_*` variables, off (and free) when none asks for it.

Tracing is ON in a process when an exporter is configured: `OTEL_TRACES_EXPORTER` is `otlp` or `console`, or it
is unset and `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED`
is not `true`). Otherwise nothing is set up at all: no server interceptor, no channel wrapper, and every `span()`
below returns one shared no-op context manager, so a suite without tracing pays a flag check per span site.

When on (`setup`): a TracerProvider whose resource names the service `clawhub-<service>` (or
`OTEL_SERVICE_NAME`), a BatchSpanProcessor exporting over OTLP/gRPC (the exporter reads the endpoint, headers,
timeout and TLS variables itself; the processor reads `OTEL_BSP_*`), and the sampler `OTEL_TRACES_SAMPLER` names,
else DEFAULT_SAMPLER: parent-based, 10% of the traces that start here. Parent-based means a call that arrives
with a sampled `traceparent` (`clawhub invoke -v` sends one) is recorded in every service it reaches, and an
unsampled one nowhere: a trace is always whole.

Why not opentelemetry-instrumentation-grpc's aio interceptors: grpc.aio runs each client interceptor through an
extra task per call (about 5% of invoke throughput even for calls that are not sampled), and its server
interceptor cannot see the ErrorInfo reason of a status. Here the server side is one handler-wrapping
interceptor, outermost, that reads the status and its ErrorInfo as the call ends (`clawhub.error.reason`), and
the client side wraps the channel's multi-callables as TokenChannel does (services/runtime/channels.py): a CLIENT
span and the W3C `traceparent` / `tracestate` of that span in the call's metadata, for one function call.

Spans that run on worker threads (the sandbox) take the caller's context explicitly: `current_context()` on the
event loop, `span(..., context=...)` on the thread.

Tests install an in-memory exporter with `install_in_memory()` (before building the servers it should see) and
remove it with `uninstall()`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import INVALID_SPAN, NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer

from services.runtime.errors import STATUS_DETAILS_KEY, HandlerWrappingInterceptor, ServiceError, error_info
from services.runtime.traceparent import new_traceparent

log = logging.getLogger("clawhub.tracing")

__all__ = ["new_traceparent"]  # re-exported for tests and callers that already import this module

# The default sampler's ratio of traces started here (a call without a sampled or unsampled parent). One call in
# ten: at a few thousand calls per second that is still hundreds of traces a second, enough to find any slow
# call's kind, while the cost stays within a few percent of throughput (bench/observability_cost.py).
DEFAULT_RATIO = 0.1
DEFAULT_SAMPLER = f"parentbased_traceidratio ({DEFAULT_RATIO})"

# Span attributes of our own (the rest follow OpenTelemetry's semantic conventions for RPC).
ERROR_REASON = "clawhub.error.reason"
GRPC_STATUS = "rpc.grpc.status_code"
TRACE_KEYS = frozenset({"traceparent", "tracestate"})
# Calls that are not traced: health checks and watches (balancers, `clawhub up`, the gateway's upstream checks and
# the deployer's per-digest watches make them all the time; they would bury the calls people look for) and
# reflection.
UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_NOOP: AbstractContextManager[Span] = nullcontext(INVALID_SPAN)
_tracer: Tracer = NoOpTracer()
_provider: Any = None
_enabled = False
# The metadata keys the configured propagators read (OTEL_PROPAGATORS; W3C's by default).
_fields: frozenset[str] = frozenset(TRACE_KEYS)


def enabled() -> bool:
    """Whether this process traces (setup found an exporter, or a test installed one)."""
    return _enabled


def configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the `OTEL_*` variables in `env` (default: the process environment) ask for traces to be exported."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters:
        return bool(exporters - {"none"})
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())


def service_name(service: str, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("OTEL_SERVICE_NAME", "").strip() or f"clawhub-{service}"


def setup(service: str) -> bool:
    """Set up tracing for `service` from the environment; True when it is on. Idempotent; a no-op (and False)
    when no exporter is configured."""
    global _provider
    if _enabled or not configured():
        return _enabled
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    resource = Resource.create({"service.name": service_name(service),
                                "service.namespace": "clawhub",
                                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
    # Without OTEL_TRACES_SAMPLER the SDK would sample everything (parentbased_always_on): ours is the default.
    sampler = None if os.environ.get("OTEL_TRACES_SAMPLER", "").strip() else ParentBasedTraceIdRatio(DEFAULT_RATIO)
    provider = TracerProvider(resource=resource, sampler=sampler)
    exporters = {e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()}
    for name in sorted(exporters - {"none"}):
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter(service_name=service_name(service))
        else:
            if name != "otlp":
                log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; exporting with otlp (gRPC)", name)
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                                      os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")).strip().lower()
            if protocol not in ("", "grpc"):
                log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported here; exporting with OTLP over gRPC",
                            protocol)
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _install(provider)
    trace.set_tracer_provider(provider)
    log.info("tracing on: service %s, sampler %s", service_name(service),
             os.environ.get("OTEL_TRACES_SAMPLER", "").strip() or DEFAULT_SAMPLER)
    return True


def install_in_memory(exporter: Any = None) -> Any:
    """Test hook: record every span (always-on sampler) into an InMemorySpanExporter, synchronously; returns it.
    Servers and channels built afterwards are traced."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    exporter = exporter or InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "clawhub-tests"}), sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _install(provider)
    return exporter


def uninstall() -> None:
    """Tracing off again (tests): servers and channels built afterwards are not traced."""
    global _tracer, _provider, _enabled
    provider, _provider, _tracer, _enabled = _provider, None, NoOpTracer(), False
    if provider is not None:
        provider.shutdown()


def _install(provider: Any) -> None:
    global _tracer, _provider, _enabled, _fields
    _fields = frozenset(propagate.get_global_textmap().fields)
    _provider, _tracer, _enabled = provider, provider.get_tracer("clawhub"), True


def shutdown() -> None:
    """Export what is still buffered (a service stopping)."""
    if _provider is not None:
        _provider.force_flush(5_000)


# Spans in code.

def span(name: str, attributes: Mapping[str, Any] | None = None, *, context: Context | None = None,
         kind: SpanKind = SpanKind.INTERNAL) -> AbstractContextManager[Span]:
    """A span around a block, current inside it; a shared no-op when tracing is off. Build costly attributes
    only `if span.is_recording()`. An exception leaving the block marks the span failed with its gRPC code and
    ErrorInfo reason (a cancellation does not: it records `clawhub.cancelled`)."""
    if not _enabled or _unsampled(trace.get_current_span(context)):
        return _NOOP
    return _span(name, attributes, context, kind)


def _unsampled(parent: Span) -> bool:
    """Whether `parent` belongs to a trace that is not recorded. Its children are not either (the sampler is
    parent-based), so nothing is made for them: an unsampled call costs a context lookup per span site, not a
    span object each (the default sampler leaves nine calls in ten unsampled)."""
    found = parent.get_span_context()
    return found.is_valid and not found.trace_flags.sampled


@contextmanager
def _span(name: str, attributes: Mapping[str, Any] | None, context: Context | None,
          kind: SpanKind) -> Iterator[Span]:
    with _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes,
                                       record_exception=False, set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            record_error(current, exc)
            raise


def child_span(name: str) -> AbstractContextManager[Span]:
    """`span(name)` only as the child of a recording span (a step of something traced, never a trace of its own:
    the sandbox's instantiation, which also runs outside any call)."""
    if not _enabled or not trace.get_current_span().is_recording():
        return _NOOP
    return _span(name, None, None, SpanKind.INTERNAL)


def start_span(name: str) -> Span | None:
    """A span the caller ends (`.end()`), child of the current span when that one is recording; else None (and
    when tracing is off). For hot paths where a `with` block does not fit."""
    return _tracer.start_span(name) if _enabled and trace.get_current_span().is_recording() else None


def fail(target: Span, description: str, reason: str = "") -> None:
    """Mark `target` failed (a result that is a failure without an exception: a skill's verdict)."""
    if target.is_recording():
        if reason:
            target.set_attribute(ERROR_REASON, reason)
        target.set_status(Status(StatusCode.ERROR, description))


def current_context() -> Context | None:
    """The context to hand to a worker thread (None when tracing is off)."""
    return otel_context.get_current() if _enabled and trace.get_current_span().is_recording() else None


def current_span() -> Span:
    return trace.get_current_span() if _enabled else INVALID_SPAN


def record_error(target: Span, exc: BaseException) -> None:
    """Mark `target` failed by `exc`: its gRPC status code and ErrorInfo reason when it has them."""
    if not target.is_recording():
        return
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        target.set_attribute("clawhub.cancelled", True)
        return
    code: grpc.StatusCode | None = None
    reason = ""
    if isinstance(exc, ServiceError):
        code, reason = exc.code, str(exc.reason)
    elif isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code()
        info = error_info(exc)
        reason = info.reason if info is not None else ""
    if code is not None:
        target.set_attribute(GRPC_STATUS, code.value[0])
    if reason:
        target.set_attribute(ERROR_REASON, reason)
    text = reason or type(exc).__name__
    target.set_status(Status(StatusCode.ERROR, f"{code.name} {text}" if code is not None else text))


# Propagation over gRPC metadata.

class _MetadataGetter(Getter[Any]):
    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


_EMPTY = Context()


def extract(metadata: Any) -> Context:
    """The trace context a call's metadata carries (W3C `traceparent` / `tracestate`, and OTEL_PROPAGATORS')."""
    if not any(key in _fields for key, _ in metadata or ()):
        return _EMPTY  # the usual public call: nothing to parse
    return propagate.extract(metadata, getter=_GETTER)


def inject(metadata: Any, target: Span) -> tuple[tuple[str, Any], ...]:
    """`metadata` with its trace entries replaced by `target`'s context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(target))
    return (*(e for e in metadata or () if e[0] not in TRACE_KEYS), *carrier.items())


# Server side.

def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _reason_of(trailing: Any) -> str:
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # noqa: BLE001 - a status we cannot read names no reason
                return ""
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


def _finish_server(current: Span, context: Any, exc: BaseException | None) -> None:
    if not current.is_recording():
        return
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        record_error(current, exc)
        if isinstance(exc, asyncio.CancelledError):
            current.set_attribute(GRPC_STATUS, grpc.StatusCode.CANCELLED.value[0])
        return
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        number = code.value[0]
    else:
        number = int(code) if code is not None else (0 if exc is None else grpc.StatusCode.UNKNOWN.value[0])
    current.set_attribute(GRPC_STATUS, number)
    if number != 0:
        reason = _reason_of(context.trailing_metadata())
        if reason:
            current.set_attribute(ERROR_REASON, reason)
        name = next((c.name for c in grpc.StatusCode if c.value[0] == number), str(number))
        current.set_status(Status(StatusCode.ERROR, f"{name} {reason}".strip()))


class ServerTracingInterceptor(HandlerWrappingInterceptor):
    """A SERVER span per call, child of the caller's `traceparent`, current while the handler runs (so the
    handler's own spans and its calls to other services join the trace). Installed outermost by create_server,
    so it sees the status the error interceptor made: `rpc.grpc.status_code` and, on failure, the ErrorInfo
    reason (`clawhub.error.reason`)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith(UNTRACED):
            return handler
        rpc_service, rpc_method = _split(method)
        name = method.lstrip("/")
        attributes = {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method,
                      "clawhub.service": self._service}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            fn = getattr(handler, kind)
            if fn is not None:
                return handler._replace(**{kind: self._wrap_fn(fn, name, attributes)})
        return handler

    @staticmethod
    def _wrap_fn(fn: Callable[..., Any], name: str, attributes: Mapping[str, Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):
            async def stream(request: Any, context: Any) -> Any:
                with _tracer.start_as_current_span(name, context=extract(context.invocation_metadata()),
                                                   kind=SpanKind.SERVER, attributes=attributes,
                                                   record_exception=False, set_status_on_exception=False) as current:
                    try:
                        async for item in fn(request, context):
                            yield item
                    except BaseException as exc:
                        _finish_server(current, context, exc)
                        raise
                    _finish_server(current, context, None)

            return stream

        async def call(request: Any, context: Any) -> Any:
            parent = extract(context.invocation_metadata())
            if _unsampled(trace.get_current_span(parent)):
                # Not recorded: the caller's context is made current, only so the calls this one makes say so too.
                token = otel_context.attach(parent)
                try:
                    return await fn(request, context)
                finally:
                    otel_context.detach(token)
            with _tracer.start_as_current_span(name, context=parent,
                                               kind=SpanKind.SERVER, attributes=attributes,
                                               record_exception=False, set_status_on_exception=False) as current:
                try:
                    result = await fn(request, context)
                except BaseException as exc:
                    _finish_server(current, context, exc)
                    raise
                _finish_server(current, context, None)
                return result

        return call


def server_interceptor(service: str) -> ServerTracingInterceptor | None:
    """The interceptor create_server installs first; None when tracing is off (nothing is installed)."""
    return ServerTracingInterceptor(service) if _enabled else None


# Client side.

def _end_client(current: Span, call: Any) -> None:
    """A client call ended (a done callback): its status on its span, then the span ends."""
    try:
        status = call._cython_call._status  # set once the call is done; `call.code()` is a coroutine
        number = int(status.code()) if status is not None else None
        trailing = status.trailing_metadata() if status is not None else None
    except Exception:  # noqa: BLE001 - a grpc without these internals: no status on the span
        number, trailing = None, None
    if call.cancelled():
        current.set_attribute("clawhub.cancelled", True)
    elif number is not None:
        current.set_attribute(GRPC_STATUS, number)
        if number != 0:
            reason = _reason_of(trailing)
            if reason:
                current.set_attribute(ERROR_REASON, reason)
            name = next((c.name for c in grpc.StatusCode if c.value[0] == number), str(number))
            current.set_status(Status(StatusCode.ERROR, f"{name} {reason}".strip()))
    current.end()


class _Traced:
    """A multi-callable whose calls each get a CLIENT span, whose context travels in the call's metadata."""

    __slots__ = ("_inner", "_name", "_attributes")

    def __init__(self, inner: Any, method: str) -> None:
        self._inner = inner
        self._name = method.lstrip("/")
        rpc_service, rpc_method = _split(method)
        self._attributes = {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method}

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        parent = trace.get_current_span()
        if _unsampled(parent):
            return self._inner(*args, metadata=inject(metadata, parent), **kwargs)
        current = _tracer.start_span(self._name, kind=SpanKind.CLIENT, attributes=self._attributes)
        try:
            call = self._inner(*args, metadata=inject(metadata, current), **kwargs)
        except BaseException as exc:
            record_error(current, exc)
            current.end()
            raise
        if current.is_recording():
            call.add_done_callback(partial(_end_client, current))
        return call


class TracedChannel(grpc.aio.Channel):  # type: ignore[misc]
    """An aio channel whose calls are traced (`_Traced`); what `channels.channel` returns when tracing is on."""

    def __init__(self, inner: grpc.aio.Channel) -> None:
        self._inner = inner

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._inner.unary_unary(method, *args, **kwargs)
        return inner if method.startswith(UNTRACED) else _Traced(inner, method)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._inner.unary_stream(method, *args, **kwargs)
        return inner if method.startswith(UNTRACED) else _Traced(inner, method)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Traced(self._inner.stream_unary(method, *args, **kwargs), method)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Traced(self._inner.stream_stream(method, *args, **kwargs), method)

    async def close(self, grace: float | None = None) -> None:
        await self._inner.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()

    async def __aenter__(self) -> TracedChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close(None)


def traced(channel: grpc.aio.Channel) -> grpc.aio.Channel:
    """`channel` traced when tracing is on; itself otherwise."""
    return TracedChannel(channel) if _enabled else channel


async def in_span(name: str, awaitable: Awaitable[Any], attributes: Mapping[str, Any] | None = None) -> Any:
    """`await awaitable` inside a span (a convenience for one-line phases)."""
    with span(name, attributes):
        return await awaitable
