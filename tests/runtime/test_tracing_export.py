"""The fast OTLP encoder (services/runtime/spanexport.py): what a collector receives is message for message what the
SDK's encoder makes, and the exporter delivers it to a real OTLP/gRPC receiver."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.runtime import spanexport, tracing
from services.runtime.leanspan import LeanTracer

REMOTE_PARENT = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                 ("tracestate", "vendor=a,other=b"))


def _spans(lean: bool, limits: SpanLimits | None = None) -> list[ReadableSpan]:
    """Spans of every shape the services make, and some they do not (events, links, arrays, long strings)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "clawhub-test", "n": 3}),
                              span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    sdk = provider.get_tracer("clawhub")
    other = provider.get_tracer("other", "1.2", schema_url="https://opentelemetry.io/schemas/1.21.0")
    tracer: Any = LeanTracer(sdk) if lean else sdk
    parent = tracing.extract(REMOTE_PARENT)
    server = tracer.start_span("clawhub.gateway.v1.GatewayService/InvokeSkill", context=parent,
                               kind=SpanKind.SERVER,
                               attributes={"rpc.system": "grpc", "clawhub.service": "gateway", "flag": True,
                                           "negative": -5, "ratio": 0.25, "big": 2**62, "text": "é✓",
                                           "list": ["a", "b"], "ints": [1, 2]})
    server.set_attribute("rpc.grpc.status_code", 2)
    server.set_status(Status(StatusCode.ERROR, "RESOURCE_EXHAUSTED EXECUTOR_OVERLOADED"))
    with_events = other.start_span("sandbox.run", context=tracing._context_of(server.get_span_context()))
    with_events.add_event("exception", {"exception.type": "ValueError", "n": 1})
    with_events.add_link(server.get_span_context(), {"why": "retry"})
    with_events.set_attribute("long", "x" * 300)
    with_events.end()
    server.end()
    root = tracer.start_span("root", kind=SpanKind.CLIENT)
    root.set_status(Status(StatusCode.OK))
    root.end()
    return list(memory.get_finished_spans())


@pytest.mark.parametrize("lean", [False, True], ids=["sdk spans", "lean spans"])
@pytest.mark.parametrize("limits", [None, SpanLimits(max_span_attributes=4, max_span_attribute_length=8)],
                         ids=["no limits", "limits"])
def test_the_fast_encoder_makes_the_sdks_message(lean: bool, limits: SpanLimits | None) -> None:
    spans = _spans(lean, limits)
    assert len(spans) == 3
    expected = encode_spans(spans)
    got = ExportTraceServiceRequest.FromString(spanexport.encode_request(spans))
    assert got == expected
    # Again, from the caches (attribute bytes, names, resource and scope).
    assert ExportTraceServiceRequest.FromString(spanexport.encode_request(spans * 3)) == encode_spans(spans * 3)


def test_the_attribute_cache_is_bounded() -> None:
    provider = TracerProvider()
    tracer = LeanTracer(provider.get_tracer("clawhub"))
    spans: list[Any] = []
    for index in range(spanexport._CACHE_LIMIT + 10):
        span = tracer.start_span("s", attributes={"request": f"r{index}"})
        span.end()
        spans.append(span)
    spanexport.encode_request(spans)
    assert len(spanexport._kv_cache) <= spanexport._CACHE_LIMIT


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request: ExportTraceServiceRequest,  # noqa: N802 (the proto's name)
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[_Receiver, int]]:
    servicer = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(0)


def test_the_fast_exporter_delivers_the_sdks_request_to_an_otlp_receiver(receiver: tuple[_Receiver, int]) -> None:
    servicer, port = receiver
    spans = _spans(lean=True)
    exporter = spanexport.FastOTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert servicer.requests == [encode_spans(spans)]


def test_a_batch_the_fast_encoder_cannot_encode_goes_through_the_sdks(receiver: tuple[_Receiver, int],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, port = receiver
    spans = _spans(lean=False)

    def broken(_: Any) -> bytes:
        raise RuntimeError("a span the fast encoder does not know")

    monkeypatch.setattr(spanexport, "encode_request", broken)
    exporter = spanexport.FastOTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert servicer.requests == [encode_spans(spans)]
