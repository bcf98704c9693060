"""LeanTracer (services/runtime/leanspan.py) makes the spans the SDK's tracer makes: same sampling decisions, ids
from the same generator, same attribute rules and limits, same processor calls."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.runtime import tracing
from services.runtime.leanspan import LeanSpan, LeanTracer

SAMPLED = tracing.extract((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                           ("tracestate", "vendor=a")))
UNSAMPLED = tracing.extract((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),))


class _Calls(SpanProcessor):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.calls.append(("start", span.name))

    def _on_ending(self, span: Any) -> None:
        self.calls.append(("ending", span.name))

    def on_end(self, span: ReadableSpan) -> None:
        self.calls.append(("end", span.name))


def _both(sampler: Sampler | None = None, limits: SpanLimits | None = None) -> tuple[Any, Any, Any]:
    """An SDK tracer and a LeanTracer over one provider, and that provider's finished spans."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}), sampler=sampler, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    sdk = provider.get_tracer("clawhub")
    return sdk, LeanTracer(sdk), memory.get_finished_spans


def _view(span: Any) -> tuple[Any, ...]:
    """What an exporter reads of a span, ids aside."""
    return (span.name, span.kind, dict(span.attributes or {}), span.dropped_attributes, span.status.status_code,
            span.status.description, span.parent.span_id if span.parent else None,
            span.context.trace_flags, dict(span.context.trace_state or {}), span.context.is_remote,
            [(e.name, dict(e.attributes or {})) for e in span.events], len(span.links), span.resource,
            span.instrumentation_scope)


@pytest.mark.parametrize("sampler", [ALWAYS_ON, ALWAYS_OFF, DEFAULT_ON, DEFAULT_OFF, ParentBased(ALWAYS_OFF),
                                     ParentBased(TraceIdRatioBased(0.5)), TraceIdRatioBased(0.5), None],
                         ids=["always_on", "always_off", "parentbased_always_on", "parentbased_always_off",
                              "parentbased(always_off)", "parentbased_traceidratio", "traceidratio", "default"])
@pytest.mark.parametrize("parent", [None, SAMPLED, UNSAMPLED], ids=["root", "sampled parent", "unsampled parent"])
def test_a_lean_span_is_sampled_and_made_as_the_sdk_does(sampler: Sampler | None, parent: Any) -> None:
    sdk, lean, finished = _both(sampler)
    for tracer in (sdk, lean):
        for index in range(40):  # ratio samplers: a mix of decisions, both tracers alike on the same trace ids
            span = tracer.start_span(f"s{index}", context=parent, kind=SpanKind.SERVER, attributes={"a": "b"})
            span.set_attribute("n", index)
            span.end()
    spans = finished()
    made = [s for s in spans if not isinstance(s, LeanSpan)]
    lean_made = [s for s in spans if isinstance(s, LeanSpan)]
    if parent is not None:  # the trace id is the parent's: the same decisions, span for span
        assert [_view(s) for s in lean_made] == [_view(s) for s in made]
    else:  # fresh trace ids: the same kind of spans, and a ratio sampler records some and drops some
        assert all(s.kind is SpanKind.SERVER and dict(s.attributes or {})["a"] == "b" and s.parent is None
                   and s.context.trace_flags.sampled for s in lean_made)
        if sampler in (ALWAYS_ON, DEFAULT_ON, None):
            assert len(lean_made) == len(made) == 40
        if sampler in (ALWAYS_OFF, DEFAULT_OFF):
            assert not lean_made and not made


def test_a_lean_span_keeps_the_sdks_attribute_rules() -> None:
    sdk, lean, finished = _both(limits=SpanLimits(max_span_attributes=3, max_span_attribute_length=4))
    for tracer in (sdk, lean):
        span = tracer.start_span("limits", attributes={"first": "abcdefgh", "list": ["abcdefgh", "x"]})
        span.set_attributes({"set": object.__new__(_Odd), "": "no key", "n": 1})
        span.set_attribute("last", 2.5)
        span.set_status(Status(StatusCode.ERROR, "FAILED_PRECONDITION X"))
        span.add_event("e", {"k": "v"})
        span.end()
        span.set_attribute("after", "the end")  # ignored: the span has ended
        span.end()  # ended once
    made, lean_made = finished()
    assert _view(lean_made) == _view(made)
    assert dict(lean_made.attributes) == {"set": "odd", "n": 1, "last": 2.5}
    assert lean_made.dropped_attributes == made.dropped_attributes == 3
    assert '"name": "limits"' in lean_made.to_json()  # what the console exporter prints


class _Odd:
    def __str__(self) -> str:
        return "odd"


def test_processors_see_a_lean_span_start_end_and_end_once() -> None:
    calls = _Calls()
    provider = TracerProvider()
    provider.add_span_processor(calls)
    lean = LeanTracer(provider.get_tracer("clawhub"))
    with lean.start_as_current_span("outer", kind=SpanKind.SERVER) as outer:
        assert tracing._current() is outer and trace.get_current_span() is outer
        inner: Any = lean.start_span("inner")
        assert inner.parent.span_id == outer.get_span_context().span_id
        inner.end()
        inner.end()
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert calls.calls == [("start", "outer"), ("start", "inner"), ("ending", "inner"), ("end", "inner"),
                           ("ending", "outer"), ("end", "outer")]


def test_a_lean_span_is_not_built_but_by_its_tracer() -> None:
    with pytest.raises(TypeError):
        LeanSpan()
