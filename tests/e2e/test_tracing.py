"""Tracing end to end: `clawhub up` exporting over OTLP/gRPC (the standard OTEL_* variables) to a real OTLP
receiver run by the test; `clawhub invoke -v` prints a trace id, and the receiver gets that trace's spans from
the gateway, the dispatcher and the executor, with correct parent links, and a deploy's release phases."""

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

    services = {"clawhub-gateway", "clawhub-dispatcher", "clawhub-executor"}
    found = _wait_for(receiver[0], trace_id, services)
    assert services <= {service for service, _ in found}, (
        sorted({(s, span.name) for s, span in found}), "".join(traced_suite.log[-30:]))
    by_id = {span.span_id: (service, span) for service, span in found}
    servers = {service: span for service, span in found if span.kind == trace_pb2.Span.SPAN_KIND_SERVER}
    # The gateway's span is the child of the CLI's (which no collector has: the CLI exports nothing); each
    # further hop's server span is the child of the server span of the service before it.
    assert servers["clawhub-gateway"].name == "clawhub.gateway.v1.GatewayService/InvokeSkill"
    assert servers["clawhub-gateway"].parent_span_id not in by_id
    for callee, caller in (("clawhub-dispatcher", "clawhub-gateway"), ("clawhub-executor", "clawhub-dispatcher")):
        parent = by_id[servers[callee].parent_span_id]
        assert parent[0] == caller and parent[1].kind == trace_pb2.Span.SPAN_KIND_SERVER, (callee, parent)
    names = {span.name for _, span in found}
    assert "sandbox.run" in names, names
    route = {a.key: a.value for a in servers["clawhub-dispatcher"].attributes}
    assert route["clawhub.skill.version"].string_value == "1.0.0" and route["clawhub.route.weight"].int_value == 100
    run = next(span for _, span in found if span.name == "sandbox.run")
    attributes = {a.key: a.value for a in run.attributes}
    assert attributes["clawhub.skill"].string_value == "com.example.uppercase"
    assert attributes["clawhub.sandbox.verdict"].string_value == "ok"

    # The deploy's release was traced too (its phases are spans of the deployer).
    deployer = {span.name for service, span in receiver[0].spans if service == "clawhub-deployer"}
    assert {"deployer.release", "deployer.preload", "deployer.route_push",
            "deployer.acknowledgements"} <= deployer, deployer
