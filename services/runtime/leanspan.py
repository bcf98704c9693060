"""Recorded spans for the hot path, made for a fraction of the SDK's cost (tracing.py's tracer when tracing is on).

The OpenTelemetry SDK's `Tracer.start_span` + `Span.end` cost about 30 µs a span in CPython: a generator-based
context manager, a lock per attribute write, every attribute value cleaned through `isinstance` chains, bounded
containers (each with a lock) for events and links that a span almost never has, a `ReadableSpan` copy made at
`end`, tracer self-metrics. An invocation records four spans on the services' event loops and worker threads, so at
100% sampling this, and the garbage it leaves, was most of what tracing cost (bench/observability_cost.py).

`LeanTracer` makes spans that are SDK spans (`opentelemetry.sdk.trace.Span`, so every exporter, processor and test
reads them as usual) and keeps the SDK's semantics where they matter:

- the provider's sampler decides each span (`should_sample`, with the same arguments), its id generator makes the
  ids, its span processors see `on_start`, `_on_ending` and `on_end` in that order;
- the span limits apply (`OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT`, `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`, …): the oldest
  attribute is dropped and counted when a span is full, long strings are cut;
- attribute values of the plain types (str, bool, int, float) are stored as they are, and any other value is
  cleaned by the SDK's own function (sequences become tuples, unknown types strings or None); a write after `end`
  is ignored.

What it leaves out: the SDK's tracer self-metrics (`otel.sdk.span.*`, off unless a meter provider is given to the
tracer provider, which tracing.py never does), and a lock around attribute writes (a span here is written by one
thread at a time: the handler's, or the worker thread's that runs the sandbox); `end` is still idempotent.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Mapping
from time import time_ns
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import _clean_attribute_value
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased, StaticSampler
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.runtime.tracing import _current as current_span
from services.runtime.tracing import attach, detach

_PLAIN = frozenset({str, bool, int, float})
_random = random.Random()  # the SDK's RandomIdGenerator draws from `random` the same way
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
_NOT_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.DEFAULT)
_RANDOM_TRACE_ID = getattr(trace_api.TraceFlags, "RANDOM_TRACE_ID", 0)

def _always(sampler: Any, decision: Decision) -> bool:
    return sampler is (ALWAYS_ON if decision is Decision.RECORD_AND_SAMPLE else ALWAYS_OFF) or (
        type(sampler) is StaticSampler and sampler._decision is decision)  # noqa: SLF001


def _sampler_kind(sampler: Any) -> str:
    """`always` (ALWAYS_ON), `parent` (ParentBased(ALWAYS_ON) with its default delegates: a span is recorded
    exactly when its parent is sampled, or it has none) or `sdk` (anything else: `should_sample` decides)."""
    on, off = Decision.RECORD_AND_SAMPLE, Decision.DROP
    if _always(sampler, on):
        return "always"
    if type(sampler) is ParentBased:
        try:
            if (_always(sampler._root, on) and _always(sampler._remote_parent_sampled, on)  # noqa: SLF001
                    and _always(sampler._local_parent_sampled, on)  # noqa: SLF001
                    and _always(sampler._remote_parent_not_sampled, off)  # noqa: SLF001
                    and _always(sampler._local_parent_not_sampled, off)):  # noqa: SLF001
                return "parent"
        except AttributeError:  # another SDK's ParentBased: ask it
            return "sdk"
    return "sdk"


class LeanSpan(SdkSpan):
    """An SDK span made by `LeanTracer` (its `__init__` is not run: the tracer sets the fields)."""

    # Fields every span of this kind shares (an SDK span sets each of them per instance).
    _attributes: Any  # a plain dict while the span is written (the SDK's is a BoundedAttributes)
    _trace_config = None
    _record_exception = False
    _set_status_on_exception = False
    _record_end_metrics = None
    _instrumentation_info: Any = None
    _events: Any = ()
    _links: Any = ()
    _status = _UNSET
    _end_time: int | None = None
    _dropped = 0
    _lock = threading.Lock()  # only for SDK methods that take it (not on the hot path)
    _max_count: int = sys.maxsize
    _max_length: int | None = None

    def __init__(self) -> None:  # noqa: D107 - see the class docstring
        """Not called (`LeanTracer` uses `object.__new__`); here so that nothing else builds one half-made."""
        raise TypeError("LeanSpan is made by LeanTracer")

    @property
    def dropped_attributes(self) -> int:
        return self._dropped

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end_time is not None:
            return
        attributes = self._attributes
        if (type(value) in _PLAIN and type(key) is str and key and self._max_length is None
                and (len(attributes) < self._max_count or key in attributes)):
            attributes[key] = value
        else:
            self._set_slowly(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._end_time is not None:
            return
        own = self._attributes
        plain = self._max_length is None
        for key, value in attributes.items():
            if (plain and type(value) in _PLAIN and type(key) is str and key
                    and (len(own) < self._max_count or key in own)):
                own[key] = value
            else:
                self._set_slowly(key, value)

    def _set_slowly(self, key: Any, value: Any) -> None:
        """The SDK's rules (BoundedAttributes): a key must be a non-empty string, the value is cleaned, a full
        span drops its oldest attribute (counted)."""
        if not key or not isinstance(key, str):
            self._dropped += 1
            return
        attributes = self._attributes
        if self._max_count == 0:
            self._dropped += 1
            return
        value = _clean_attribute_value(value, self._max_length)
        attributes.pop(key, None)
        if len(attributes) >= self._max_count:
            del attributes[next(iter(attributes))]
            self._dropped += 1
        attributes[key] = value

    def _add_event(self, event: Any) -> None:
        if self._end_time is not None:
            return
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(self._limits.max_events)
        self._events.append(event)

    def _add_link(self, link: Any) -> None:
        if self._end_time is not None:
            return
        if not isinstance(self._links, BoundedList):
            self._links = BoundedList(self._limits.max_links)
        self._links.append(link)

    def is_recording(self) -> bool:
        return self._end_time is None

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time_ns()
        processor = self._span_processor
        processor._on_ending(self)  # noqa: SLF001 - the SDK's own hook, called as its Span.end does
        processor.on_end(self)  # the span is its own read-only view from here on: writes are ignored


class LeanTracer:
    """Makes `LeanSpan`s for an SDK tracer's provider (its sampler, ids, limits, resource, scope, processors).
    The two methods tracing.py uses, with the SDK's signatures (links are not supported: no caller has any)."""

    def __init__(self, tracer: trace_api.Tracer) -> None:
        if not isinstance(tracer, SdkTracer):
            raise TypeError(f"LeanTracer needs the SDK's tracer, not {type(tracer).__name__}")
        self._sampler = tracer.sampler
        self._resource = tracer.resource
        self._processor = tracer.span_processor
        self._ids = tracer.id_generator
        self._scope = tracer._instrumentation_scope  # noqa: SLF001 - what an SDK span carries
        self._info = tracer.instrumentation_info
        limits = tracer._span_limits  # noqa: SLF001
        self._limits = limits
        count = limits.max_span_attributes
        self._max_count = sys.maxsize if count is None else count
        self._max_length = limits.max_span_attribute_length
        self._kind = _sampler_kind(self._sampler)
        self._random_ids = type(self._ids) is RandomIdGenerator

    def start_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Mapping[str, Any] | None = None, start_time: int | None = None) -> trace_api.Span:
        """A started span, child of the span in `context` (default: the current one), as the SDK's tracer."""
        if context is None:
            parent = current_span().get_span_context()
        else:
            parent = trace_api.get_current_span(context).get_span_context()
        return self.start_child(name, parent if parent.is_valid else None, context, kind, attributes, start_time)

    def start_child(self, name: str, parent: trace_api.SpanContext | None, context: Context | None,
                    kind: SpanKind, attributes: Mapping[str, Any] | None,
                    start_time: int | None = None) -> trace_api.Span:
        """`start_span` with the parent's span context already at hand (valid, or None for a root); `context`
        is what the sampler sees when it is not one of the two known here (made from `parent` when None)."""
        random_bits = self._random_ids
        if parent is not None:
            trace_id = parent.trace_id
            random_id = parent.trace_flags & _RANDOM_TRACE_ID
        else:
            trace_id = _random.getrandbits(128) or 1 if random_bits else self._ids.generate_trace_id()
            random_id = _RANDOM_TRACE_ID if _RANDOM_TRACE_ID and self._ids.is_trace_id_random() else 0
        if self._kind == "always" or (self._kind == "parent" and (parent is None or parent.trace_flags.sampled)):
            trace_state = parent.trace_state if parent is not None else None
        elif self._kind == "parent":  # an unsampled parent: nothing recorded
            assert parent is not None
            return trace_api.NonRecordingSpan(trace_api.SpanContext(
                trace_id, self._span_id(), is_remote=False, trace_flags=_NOT_SAMPLED, trace_state=parent.trace_state))
        else:
            if context is None and parent is not None:
                context = trace_api.set_span_in_context(trace_api.NonRecordingSpan(parent))
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, ())
            flags = _SAMPLED if result.decision is Decision.RECORD_AND_SAMPLE else _NOT_SAMPLED
            if random_id:
                flags = trace_api.TraceFlags(flags | random_id)
            span_context = trace_api.SpanContext(trace_id, self._span_id(), is_remote=False, trace_flags=flags,
                                                 trace_state=result.trace_state)
            if result.decision is Decision.DROP:
                return trace_api.NonRecordingSpan(span_context)
            return self._make(name, span_context, parent, context, kind, result.attributes, start_time)
        flags = trace_api.TraceFlags(_SAMPLED | random_id) if random_id else _SAMPLED
        span_context = trace_api.SpanContext(trace_id, self._span_id(), is_remote=False, trace_flags=flags,
                                             trace_state=trace_state)
        return self._make(name, span_context, parent, context, kind, attributes, start_time)

    def _span_id(self) -> int:
        return (_random.getrandbits(64) or 1) if self._random_ids else self._ids.generate_span_id()

    def _make(self, name: str, span_context: trace_api.SpanContext, parent: trace_api.SpanContext | None,
              context: Context | None, kind: SpanKind, attributes: Mapping[str, Any] | None,
              start_time: int | None) -> LeanSpan:
        span: LeanSpan = object.__new__(LeanSpan)
        span._name = name
        span._context = span_context
        span._kind = kind
        span._parent = parent
        span._resource = self._resource
        span._instrumentation_scope = self._scope
        span._instrumentation_info = self._info
        span._span_processor = self._processor
        span._sampler = self._sampler
        span._limits = self._limits
        span._attributes = {}
        if self._max_count != sys.maxsize or self._max_length is not None:
            span._max_count, span._max_length = self._max_count, self._max_length
        if attributes:
            span.set_attributes(attributes)
        span._start_time = start_time if start_time is not None else time_ns()
        self._processor.on_start(span, parent_context=context)
        return span

    def start_as_current_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes: Mapping[str, Any] | None = None) -> Current:
        """`start_span`, current inside a `with` block and ended at its end (an exception is not recorded: the
        callers record failures themselves, with their gRPC code and reason)."""
        return Current(self.start_span(name, context, kind, attributes))


class Current:
    """A span made current for a `with` block, then ended (the SDK's `use_span` without its generator)."""

    __slots__ = ("span", "_token")

    def __init__(self, span: trace_api.Span) -> None:
        self.span = span

    def __enter__(self) -> trace_api.Span:
        self._token = attach(self.span)
        return self.span

    def __exit__(self, *_: object) -> None:
        detach(self._token)
        self.span.end()


__all__ = ["Current", "LeanSpan", "LeanTracer"]
