"""Tracing end to end: `clawhub up` exporting over OTLP/gRPC (the standard OTEL_* variables) to a real OTLP
receiver run by the test; `clawhub invoke -v` prints a trace id, and the receiver gets that trace's spans from
the gateway and the executor it called (the dispatcher is off the call path: docs/routing.md; the path through
it is traced in tests/runtime/test_tracing.py), with correct parent links, and a deploy's release phases down
to the dispatcher and the gateway applying the new routes."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.e2e.conftest import ROOT, Suite, start_up, stop_up, suite_env

UPPERCASE = ROOT / "examples" / "skills" / "uppercase"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver (what a collector serves on 4317): keeps every span with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[tuple[str, trace_pb2.Span]]:
        with self._lock:
            return [(s, span) for s, span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced_suite(receiver: tuple[Receiver, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    env = suite_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver[1]}",
                    OTEL_TRACES_SAMPLER="always_on",
                    # Export within a fifth of a second rather than the default five.
                    OTEL_BSP_SCHEDULE_DELAY="200")
    for name in ("OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        env.pop(name, None)
    running = start_up(tmp_path_factory.mktemp("tracing") / "data", executors=1, env=env)
    try:
        yield running
    finally:
        stop_up(running)


def _wait_for(receiver: Receiver, trace_id: str, services: set[str],
              timeout: float = 20.0) -> list[tuple[str, trace_pb2.Span]]:
    deadline = time.monotonic() + timeout
    while True:
        found = receiver.of_trace(trace_id)
        if services <= {service for service, _ in found} or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_invoke_v_prints_a_trace_id_the_receiver_has_spans_of_every_hop_for(
        traced_suite: Suite, receiver: tuple[Receiver, int], tmp_path: Path) -> None:
    published = traced_suite.cli("publish", str(UPPERCASE))
    assert published.returncode == 0, published.stderr
    deployed = traced_suite.cli("deploy", "com.example.uppercase@1.0.0")
    assert deployed.returncode == 0, deployed.stderr + "".join(traced_suite.log[-30:])

    result = traced_suite.cli("invoke", "com.example.uppercase", "--input", '"traced"', "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '"TRACED"'
    printed = re.search(r"^trace id: ([0-9a-f]{32})$", result.stderr, re.MULTILINE)
    assert printed, result.stderr
    trace_id = printed.group(1)

    services = {"clawhub-gateway", "clawhub-executor"}
    found = _wait_for(receiver[0], trace_id, services)
    assert services <= {service for service, _ in found}, (
        sorted({(s, span.name) for s, span in found}), "".join(traced_suite.log[-30:]))
    by_id = {span.span_id: (service, span) for service, span in found}
    servers = {service: span for service, span in found if span.kind == trace_pb2.Span.SPAN_KIND_SERVER}
    # The gateway's span is the child of the CLI's (which no collector has: the CLI exports nothing); the
    # executor's server span is the child of the gateway's, which routed the call.
    assert servers["clawhub-gateway"].name == "clawhub.gateway.v1.GatewayService/InvokeSkill"
    assert servers["clawhub-gateway"].parent_span_id not in by_id
    parent = by_id[servers["clawhub-executor"].parent_span_id]
    assert parent[0] == "clawhub-gateway" and parent[1].kind == trace_pb2.Span.SPAN_KIND_SERVER, parent
    assert "clawhub-dispatcher" not in {service for service, _ in found}
    names = {span.name for _, span in found}
    assert "sandbox.run" in names, names
    route = {a.key: a.value for a in servers["clawhub-gateway"].attributes}
    assert route["clawhub.skill.version"].string_value == "1.0.0" and route["clawhub.route.weight"].int_value == 100
    run = next(span for _, span in found if span.name == "sandbox.run")
    attributes = {a.key: a.value for a in run.attributes}
    assert attributes["clawhub.skill"].string_value == "com.example.uppercase"
    assert attributes["clawhub.sandbox.verdict"].string_value == "ok"

    # The deploy's release was traced too (its phases are spans of the deployer).
    deployer = {span.name for service, span in receiver[0].spans if service == "clawhub-deployer"}
    assert {"deployer.release", "deployer.preload", "deployer.route_push",
            "deployer.acknowledgements"} <= deployer, deployer
    # Each route push reaches the dispatcher and the gateway in the release's trace: their spans of applying
    # the generation are children of the push (the table carries its traceparent).
    def applied() -> bool:
        with receiver[0]._lock:
            spans = list(receiver[0].spans)
        pushes = {span.span_id: span for service, span in spans if span.name == "deployer.route_push"}
        children = {(service, span.name) for service, span in spans
                    if span.name.endswith(".route_apply") and span.parent_span_id in pushes
                    and span.trace_id == pushes[span.parent_span_id].trace_id}
        wanted = {("clawhub-dispatcher", "dispatcher.route_apply"), ("clawhub-gateway", "gateway.route_apply")}
        return wanted <= children

    deadline = time.monotonic() + 15
    while not applied():
        assert time.monotonic() < deadline, sorted({(s, span.name) for s, span in receiver[0].spans})
        time.sleep(0.2)
