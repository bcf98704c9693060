"""OpenTelemetry tracing: configured from the standard `OTEL_*` variables, off (and free) when none asks for it.

Tracing is ON in a process when an exporter is configured: `OTEL_TRACES_EXPORTER` is `otlp` or `console`, or it
is unset and `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED`
is not `true`). Otherwise nothing is set up at all: no server interceptor, no channel wrapper, and every `span()`
below returns one shared no-op context manager, so a suite without tracing pays a flag check per span site.

When on (`setup`): a TracerProvider whose resource names the service `clawhub-<service>` (or
`OTEL_SERVICE_NAME`), a BatchSpanProcessor exporting over OTLP/gRPC (the exporter reads the endpoint, headers,
timeout and TLS variables itself; the processor reads `OTEL_BSP_*`), and the sampler `OTEL_TRACES_SAMPLER` names,
else DEFAULT_SAMPLER: parent-based, 5% of the traces that start here. Parent-based means a call that arrives
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
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import INVALID_SPAN, NoOpTracer, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY

from services.runtime.errors import STATUS_DETAILS_KEY, HandlerWrappingInterceptor, ServiceError, error_info
from services.runtime.traceparent import new_traceparent
from services.runtime.wrapchannel import WrappingChannel

log = logging.getLogger("clawhub.tracing")

__all__ = ["new_traceparent"]  # re-exported for tests and callers that already import this module

# The default sampler's ratio of traces started here (a call without a sampled or unsampled parent). One call in
# twenty: at a few hundred calls per second that is still ten or more traces a second, enough to find any slow
# call's kind, while the cost stays within the 5% budget (a recorded invocation costs about a third more CPU
# than an unrecorded one in the Python SDK; bench/observability_cost.py).
DEFAULT_RATIO = 0.05
DEFAULT_SAMPLER = f"parentbased_traceidratio ({DEFAULT_RATIO})"

# Span attributes of our own (the rest follow OpenTelemetry's semantic conventions for RPC).
ERROR_REASON = "clawhub.error.reason"
GRPC_STATUS = "rpc.grpc.status_code"
TRACE_KEYS = frozenset({"traceparent", "tracestate"})
# Calls that are not traced: health checks and watches (balancers, `clawhub up`, the gateway's upstream checks and
# the deployer's per-digest watches make them all the time; they would bury the calls people look for) and
# reflection; and the executors' call streams (services/runtime/mux.py): each call on one is traced as its own
# Execute, with the metadata it carries.
UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/clawhub.executor.v1.ExecutorService/ExecuteStream")

_NOOP: AbstractContextManager[Span] = nullcontext(INVALID_SPAN)
# The SDK provider's spans, made by LeanTracer (services/runtime/leanspan.py: the same spans, for a fraction of
# the SDK tracer's cost); a no-op tracer when tracing is off.
_tracer: Any = NoOpTracer()  # a LeanTracer when on (imported with the SDK, in _install)
_lean = False  # _tracer is a LeanTracer
_provider: Any = None
_enabled = False
# The metadata keys the configured propagators read (OTEL_PROPAGATORS; W3C's by default).
_fields: frozenset[str] = frozenset(TRACE_KEYS)

# The fast path for calls that are not recorded (nine in ten with the default sampler). With a parent-based
# sampler (ours, or any `parentbased_*`), whether a call is recorded is decided once, where its trace starts, and
# every hop follows the `traceparent` flag. So a call that arrives with an unsampled `traceparent` is handled with
# no OpenTelemetry call at all: its trace entries are kept in _UNSAMPLED, passed on unchanged to the calls it
# makes, and every span site sees them and does nothing. Where a trace starts here (no `traceparent`), the root
# decision is made here too, at `_root_ratio` (the sampler's ratio; the SDK's sampler is then parent-based
# always-on, so it records exactly the roots chosen here); an unsampled root gets a fresh random trace id, so
# logs of one call still share an id across services. With a sampler that is not parent-based
# (`always_on`, `traceidratio`, …) none of this applies and the SDK decides every span.
_UNSAMPLED: ContextVar[tuple[tuple[str, str], ...] | None] = ContextVar("clawhub_unsampled_trace", default=None)
_parent_based = False
_root_ratio: float | None = None
_random = random.Random()

# The current context's variable, read directly: the API's `get_current_span()` is four calls deep, and a traced
# call looks up its span a dozen times. None when the runtime context is not the default contextvars one (then
# the API is used).
_CURRENT: Any = getattr(otel_context._RUNTIME_CONTEXT, "_current_context", None)  # noqa: SLF001


def _current() -> Span:
    """The current span (the API's `trace.get_current_span()`, for a fraction of its cost)."""
    if _CURRENT is None:
        return trace.get_current_span()
    found = _CURRENT.get().get(_SPAN_KEY)
    return found if found is not None else INVALID_SPAN


def attach(span: Span) -> Any:
    """Make `span` current (in a copy of the current context); returns the token for `detach`."""
    if _CURRENT is None:
        return otel_context.attach(otel_context.set_value(_SPAN_KEY, span))
    return _CURRENT.set(Context({**_CURRENT.get(), _SPAN_KEY: span}))  # what `set_value` makes


def detach(token: Any) -> None:
    """Undo `attach`."""
    if _CURRENT is None:
        otel_context.detach(token)
    else:
        _CURRENT.reset(token)


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
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    resource = Resource.create({"service.name": service_name(service),
                                "service.namespace": "clawhub",
                                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
    # Without OTEL_TRACES_SAMPLER the SDK would sample everything (parentbased_always_on): ours is the default.
    ratio = root_ratio(os.environ)
    sampler = ParentBased(ALWAYS_ON) if ratio is not None else None  # None: the SDK reads OTEL_TRACES_SAMPLER
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
            from services.runtime.spanexport import FastOTLPSpanExporter

            exporter = FastOTLPSpanExporter()  # the SDK's exporter, with a faster encoder (spanexport.py)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _install(provider, ratio)
    trace.set_tracer_provider(provider)
    log.info("tracing on: service %s, sampler %s", service_name(service),
             os.environ.get("OTEL_TRACES_SAMPLER", "").strip() or DEFAULT_SAMPLER)
    return True


def install_in_memory(exporter: Any = None, ratio: float = 1.0) -> Any:
    """Test hook: record spans into an InMemorySpanExporter, synchronously; returns it. Parent-based, recording
    `ratio` of the traces started here (all by default). Servers and channels built afterwards are traced."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    exporter = exporter or InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "clawhub-tests"}), sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _install(provider, ratio)
    return exporter


def uninstall() -> None:
    """Tracing off again (tests): servers and channels built afterwards are not traced."""
    global _tracer, _provider, _enabled, _lean
    provider, _provider, _tracer, _enabled = _provider, None, NoOpTracer(), False
    _lean = False
    if provider is not None:
        provider.shutdown()


def root_ratio(env: Mapping[str, str]) -> float | None:
    """The share of traces started here that are recorded, when the sampler is parent-based (ours by default);
    None for a sampler that is not (the SDK then decides every span)."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return DEFAULT_RATIO
    if name == "parentbased_always_on":
        return 1.0
    if name == "parentbased_always_off":
        return 0.0
    if name == "parentbased_traceidratio":
        try:
            return min(max(float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")), 0.0), 1.0)
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a ratio; recording every trace",
                        env.get("OTEL_TRACES_SAMPLER_ARG"))
            return 1.0
    return None


def _install(provider: Any, ratio: float | None) -> None:
    global _tracer, _provider, _enabled, _fields, _parent_based, _root_ratio, _lean
    from opentelemetry.sdk.trace import Tracer as SdkTracer

    from services.runtime.leanspan import LeanTracer

    _fields = frozenset(propagate.get_global_textmap().fields)
    _parent_based, _root_ratio = ratio is not None, ratio
    tracer = provider.get_tracer("clawhub")
    _provider, _enabled = provider, True
    _lean = isinstance(tracer, SdkTracer)
    _tracer = LeanTracer(tracer) if _lean else tracer


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
    if not _enabled or (_UNSAMPLED.get() is not None and context is None):
        return _NOOP
    parent = _current() if context is None else trace.get_current_span(context)
    if _unsampled(parent):
        return _NOOP
    if _root_ratio is not None and not parent.get_span_context().is_valid and not _root_sampled():
        # A trace that would start here (a release, a background task) and is not chosen: nothing inside it is
        # recorded either, and the calls it makes say so.
        return _unsampled_block()
    return _span(name, attributes, context, kind)


@contextmanager
def _unsampled_block() -> Iterator[Span]:
    marker = _UNSAMPLED.set(_new_unsampled())
    try:
        yield INVALID_SPAN
    finally:
        _UNSAMPLED.reset(marker)


def _unsampled(parent: Span) -> bool:
    """Whether `parent` belongs to a trace that is not recorded. Its children are not either (the sampler is
    parent-based), so nothing is made for them: an unsampled call costs a context lookup per span site, not a
    span object each (the default sampler leaves nine calls in ten unsampled)."""
    found = parent.get_span_context()
    return found.is_valid and not found.trace_flags.sampled


def _span(name: str, attributes: Mapping[str, Any] | None, context: Context | None,
          kind: SpanKind) -> AbstractContextManager[Span]:
    return _Block(_tracer.start_span(name, context=context, kind=kind, attributes=attributes))


class _Block:
    """A span around a block: current inside it, ended after it; an exception leaving it marks it failed
    (`record_error`). A class rather than a generator-based context manager: half the cost, on every span."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> Span:
        self._token = attach(self._span)
        return self._span

    def __exit__(self, kind: Any, exc: BaseException | None, traceback: Any) -> None:
        if exc is not None:
            record_error(self._span, exc)
        detach(self._token)
        self._span.end()


def child_span(name: str) -> AbstractContextManager[Span]:
    """`span(name)` only as the child of a recording span (a step of something traced, never a trace of its own:
    the sandbox's instantiation, which also runs outside any call)."""
    if not _enabled or not _current().is_recording():
        return _NOOP
    return _span(name, None, None, SpanKind.INTERNAL)


def start_span(name: str) -> Span | None:
    """A span the caller ends (`.end()`), child of the current span when that one is recording; else None (and
    when tracing is off). For hot paths where a `with` block does not fit."""
    return _tracer.start_span(name) if _enabled and _current().is_recording() else None


def recording() -> bool:
    """Whether the current span is recorded (this process traces and the call was sampled): checked before
    building attributes nobody would keep."""
    return _enabled and _current().is_recording()


def annotate(attributes: Mapping[str, Any]) -> None:
    """Attributes on the current span when it is recorded: for steps that take microseconds (authentication, a
    rate-limit bucket, the route choice, a hot module), which would cost more as spans of their own than they
    take."""
    if _enabled:
        current = _current()
        if current.is_recording():
            current.set_attributes(attributes)


def retro_span(name: str, start_ns: int, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span that began at `start_ns` and ends now, child of the current span when that one is recorded (a step
    only known to deserve a span once it is over: a module that was not hot). The caller may set more and must
    `.end()` it."""
    if not _enabled or not _current().is_recording():
        return None
    made: Span = _tracer.start_span(name, attributes=attributes, start_time=start_ns)
    return made


def unsampled_entries() -> tuple[tuple[str, str], ...] | None:
    """The trace entries of the call being handled when it is not recorded (the fast path), else None."""
    return _UNSAMPLED.get()


def _new_unsampled() -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{_random.getrandbits(128):032x}-{_random.getrandbits(64):016x}-00"),)


def _root_sampled() -> bool:
    """The root decision (`_root_ratio` is set)."""
    assert _root_ratio is not None
    return _root_ratio >= 1.0 or _random.random() < _root_ratio


def _unsampled_parent(metadata: Any) -> tuple[tuple[str, str], ...] | None:
    """The call's trace entries when its `traceparent` is valid and unsampled, with a parent-based sampler."""
    if not _parent_based:
        return None
    found: tuple[tuple[str, str], ...] | None = None
    for key, value in metadata or ():
        if key == "traceparent":
            if not (isinstance(value, str) and len(value) == 55 and value.startswith("00-")
                    and value.endswith("-00")):
                return None
            found = (("traceparent", value),)
    if found is None:
        return None
    state = tuple((k, v) for k, v in metadata if k == "tracestate" and isinstance(v, str))
    return found + state if state else found


def _fast_entries(metadata: Any) -> tuple[tuple[str, str], ...] | None:
    """The trace entries of a call that is not to be recorded (an unsampled parent, or a root not chosen), for
    the fast path; None when the call is recorded or the SDK decides."""
    entries = _unsampled_parent(metadata)
    if entries is None and _root_ratio is not None and not any(k == "traceparent" for k, _ in metadata or ()):
        entries = None if _root_sampled() else _new_unsampled()
    return entries


def fail(target: Span, description: str, reason: str = "") -> None:
    """Mark `target` failed (a result that is a failure without an exception: a skill's verdict)."""
    if target.is_recording():
        if reason:
            target.set_attribute(ERROR_REASON, reason)
        target.set_status(Status(StatusCode.ERROR, description))


def current_context() -> Context | None:
    """The context to hand to a worker thread (None when tracing is off)."""
    return otel_context.get_current() if _enabled and _current().is_recording() else None


def current_span() -> Span:
    return _current() if _enabled else INVALID_SPAN


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


# The default propagators (W3C trace context and baggage): with these, the W3C headers are read and written here
# directly, a few µs instead of the propagation API's tens (a call crosses it twice per hop).
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})


def extract(metadata: Any) -> Context:
    """The trace context a call's metadata carries (W3C `traceparent` / `tracestate`, and OTEL_PROPAGATORS')."""
    if not any(key in _fields for key, _ in metadata or ()):
        return _EMPTY  # the usual public call: nothing to parse
    if _fields <= _W3C_FIELDS:
        parent, state, other = None, None, False
        for key, value in metadata:
            if key == "traceparent":
                parent = value
            elif key == "tracestate":
                state = value
            elif key == "baggage":
                other = True
        fast = _parse_traceparent(parent, state) if not other else None
        if fast is not None:
            return fast
    return propagate.extract(metadata, getter=_GETTER)


def _server_parent(metadata: Any) -> tuple[trace.SpanContext | None, Context | None]:
    """A call's remote parent, read once: (its span context or None, None) when the W3C headers alone carry it
    (the usual case: no Context is made), else (the span context or None, the context the propagators
    extracted, for the sampler and for what the call makes current)."""
    if _fields <= _W3C_FIELDS:
        header = state = None
        for key, value in metadata or ():
            if key == "traceparent":
                header = value
            elif key == "tracestate":
                state = value
            elif key == "baggage":
                break
        else:
            if header is None:
                return None, None
            parsed = _parse_span_context(header, state)
            if parsed is not None:
                return parsed, None
    context = extract(metadata)
    found = trace.get_current_span(context).get_span_context()
    return (found if found.is_valid else None), context


def _context_of(parent: trace.SpanContext) -> Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(parent), _EMPTY)


def _parse_traceparent(header: Any, state: Any) -> Context | None:
    """The context of a well-formed version-00 `traceparent` (None for anything else: the API decides)."""
    parsed = _parse_span_context(header, state)
    return _context_of(parsed) if parsed is not None else None


def _parse_span_context(header: Any, state: Any) -> trace.SpanContext | None:
    """The remote span context of a well-formed version-00 `traceparent` (None for anything else)."""
    if not (isinstance(header, str) and len(header) == 55 and header[:3] == "00-" and header[35] == "-"
            and header[52] == "-"):
        return None
    try:
        trace_id, span_id, flags = int(header[3:35], 16), int(header[36:52], 16), int(header[53:], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    trace_state = None
    if isinstance(state, str) and state:
        from opentelemetry.trace import TraceState

        trace_state = TraceState.from_header([state])
    return trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags & 0xFF),
                             trace_state=trace_state)


def inject(metadata: Any, target: Span) -> tuple[tuple[str, Any], ...]:
    """`metadata` with its trace entries replaced by `target`'s context."""
    own = tuple(e for e in metadata or () if e[0] not in TRACE_KEYS)
    span_context = target.get_span_context()
    if _fields <= _W3C_FIELDS and span_context.is_valid and not otel_context.get_value("baggage"):
        entries: tuple[tuple[str, str], ...] = ((
            "traceparent", f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
                           f"{int(span_context.trace_flags):02x}"),)
        if span_context.trace_state:
            entries += (("tracestate", span_context.trace_state.to_header()),)
        return (*own, *entries)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(target))
    return (*own, *carrier.items())


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
                entries = _fast_entries(context.invocation_metadata())
                if entries is not None:
                    marker = _UNSAMPLED.set(entries)
                    try:
                        async for item in fn(request, context):
                            yield item
                    finally:
                        _UNSAMPLED.reset(marker)
                    return
                with _tracer.start_as_current_span(name, context=extract(context.invocation_metadata()),
                                                   kind=SpanKind.SERVER, attributes=attributes) as current:
                    try:
                        async for item in fn(request, context):
                            yield item
                    except BaseException as exc:
                        _finish_server(current, context, exc)
                        raise
                    _finish_server(current, context, None)

            return stream

        async def call(request: Any, context: Any) -> Any:
            if not _enabled:  # uninstalled (tests) while this server still runs
                return await fn(request, context)
            metadata = context.invocation_metadata()
            entries = _fast_entries(metadata) if _parent_based else None
            if entries is not None:
                # Not recorded (the fast path above): no OpenTelemetry call at all.
                marker = _UNSAMPLED.set(entries)
                try:
                    return await fn(request, context)
                finally:
                    _UNSAMPLED.reset(marker)
            parent, full = _server_parent(metadata)
            if parent is not None and not parent.trace_flags.sampled:
                # Not recorded: the caller's context is made current, only so the calls this one makes say so too.
                token = otel_context.attach(full if full is not None else _context_of(parent))
                try:
                    return await fn(request, context)
                finally:
                    otel_context.detach(token)
            if _lean:
                current = _tracer.start_child(name, parent, full, SpanKind.SERVER, attributes)
            else:
                current = _tracer.start_span(name, context=full if full is not None or parent is None
                                             else _context_of(parent), kind=SpanKind.SERVER, attributes=attributes)
            token = attach(current)
            try:
                result = await fn(request, context)
            except BaseException as exc:
                _finish_server(current, context, exc)
                raise
            else:
                _finish_server(current, context, None)
                return result
            finally:
                detach(token)
                current.end()

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


def outgoing_metadata(metadata: Any) -> Any:
    """`metadata` with the trace context a traced call made now would carry (as `_Traced` adds it), for a call
    that is not an RPC of its own: a call multiplexed on a stream (services/runtime/mux.py). No CLIENT span is
    made for it (the callee's SERVER span, child of this context, says what the call did)."""
    if not _enabled:
        return metadata
    entries = _UNSAMPLED.get()
    if entries is None:
        parent = _current()
        if parent.is_recording() or _unsampled(parent):
            return inject(metadata, parent)
        if _root_ratio is None or _root_sampled():
            return metadata  # outside any trace, and chosen: no span of its own to be the parent; none is made
        entries = _new_unsampled()
    return (*(e for e in metadata if e[0] not in TRACE_KEYS), *entries) if metadata else entries


def failed_call(method: str, started_ns: int, code: grpc.StatusCode, trailing: Any, cancelled: bool = False) -> None:
    """A call made without a traced multi-callable (a call multiplexed on a stream: services/runtime/mux.py) failed:
    the CLIENT span `_Traced` would have made for it (from its start, `time.time_ns()`), inside a recorded call."""
    if not _enabled:
        return
    parent = _current()
    if not parent.is_recording():
        return
    rpc_service, rpc_method = _split(method)
    attributes = {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method}
    current = _tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, start_time=started_ns,
                                 attributes=attributes)
    if cancelled:
        current.set_attribute("clawhub.cancelled", True)
    else:
        number = code.value[0]
        current.set_attribute(GRPC_STATUS, number)
        reason = _reason_of(trailing)
        if reason:
            current.set_attribute(ERROR_REASON, reason)
        current.set_status(Status(StatusCode.ERROR, f"{code.name} {reason}".strip()))
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
        entries = _UNSAMPLED.get()
        if entries is None:
            parent = _current()
            if not parent.is_recording():
                if _unsampled(parent):
                    return self._inner(*args, metadata=inject(metadata, parent), **kwargs)
                # A call outside any trace (a background report, a watch): it starts one, by the root decision.
                if _root_ratio is not None and not _root_sampled():
                    entries = _new_unsampled()
                else:
                    return self._root_call(args, metadata, kwargs)
        if entries is not None:
            own = (*(e for e in metadata if e[0] not in TRACE_KEYS), *entries) if metadata else entries
            return self._inner(*args, metadata=own, **kwargs)
        # Inside a recorded call: the callee's SERVER span is the child of the current span. A CLIENT span is made
        # only for a call that fails (from its start time, after the fact): a successful hop would cost a span
        # (tens of µs in the SDK) to say what the callee's own span says; a failed one says why the callee's span
        # is missing or what the caller saw.
        started = time.time_ns()
        call = self._inner(*args, metadata=inject(metadata, parent), **kwargs)
        call.add_done_callback(partial(_client_ended, self._name, self._attributes, otel_context.get_current(),
                                       started))
        return call

    def _root_call(self, args: Any, metadata: Any, kwargs: Any) -> Any:
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


def _client_ended(name: str, attributes: Mapping[str, Any], parent: Context, started: int, call: Any) -> None:
    """A traced call ended: a CLIENT span (from its start) only when it failed."""
    try:
        status = call._cython_call._status
        failed = call.cancelled() or (status is not None and int(status.code()) != 0)
    except Exception:  # noqa: BLE001 - a grpc without these internals: treat as failed, so nothing is hidden
        failed = True
    if failed:
        _end_client(_tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, attributes=attributes,
                                       start_time=started), call)


class TracedChannel(WrappingChannel):
    """An aio channel whose calls are traced (`_Traced`); what `channels.channel` returns when tracing is on."""

    def _wrap(self, method: str, callable_: Any, kind: str) -> Any:
        if method.startswith(UNTRACED):
            return callable_
        return _Traced(callable_, method)


def traced(channel: grpc.aio.Channel) -> grpc.aio.Channel:
    """`channel` traced when tracing is on; itself otherwise."""
    return TracedChannel(channel) if _enabled else channel


async def in_span(name: str, awaitable: Awaitable[Any], attributes: Mapping[str, Any] | None = None) -> Any:
    """`await awaitable` inside a span (a convenience for one-line phases)."""
    with span(name, attributes):
        return await awaitable


def remote_parent(traceparent: str) -> Context | None:
    """The context a W3C `traceparent` carried in a message (not in metadata) names, for a span's `context`:
    a route table names the deployer's push that made it (routing.proto). None when empty or tracing is off."""
    if not traceparent or not _enabled:
        return None
    return extract((("traceparent", traceparent),))
