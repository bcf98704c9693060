"""Tracing through real servers (services/runtime/tracing.py): one invocation through gateway → dispatcher →
executor is one trace with correct parent links, and failed calls record their status and ErrorInfo reason."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.runtime import channels, tracing
from services.runtime.errors import error_info
from tests.conftest import Starter
from tests.deployer.fakes import eventually
from tests.gateway.support import ECHO_SKILL, Chain, start_chain

GATEWAY = "clawhub.gateway.v1.GatewayService/InvokeSkill"
DISPATCHER = "clawhub.dispatcher.v1.DispatcherService/Dispatch"
EXECUTOR = "clawhub.executor.v1.ExecutorService/Execute"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.install_in_memory()
    try:
        yield exporter
    finally:
        tracing.uninstall()


@pytest.fixture
async def chain(spans: InMemorySpanExporter, start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    """Every call through the dispatcher's Dispatch (CLAWHUB_GATEWAY_ROUTING=dispatcher): the three services of
    the path that has the most hops; the direct path (gateway → executor) has its own test below."""
    chain = await start_chain(start_service, tmp_path, routing="dispatcher")
    yield chain
    await chain.channel.close()


async def test_a_directly_routed_invocation_is_one_trace_of_the_gateway_and_the_executor(
        spans: InMemorySpanExporter, start_service: Starter, tmp_path: Path) -> None:
    chain = await start_chain(start_service, tmp_path)
    try:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"warm"), timeout=10)
        spans.clear()
        traceparent, trace_id = tracing.new_traceparent()
        response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"hi"),
                                                timeout=10, metadata=(("traceparent", traceparent),))
        assert response.raw_output == b"hi"
        found = [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]
        gateway = _one(found, GATEWAY, SpanKind.SERVER)
        executor = _one(found, EXECUTOR, SpanKind.SERVER)
        assert _parent_of(executor, found) is gateway
        assert not [s for s in found if s.name == DISPATCHER]
        # The route choice is made by the gateway now: its attributes are on the gateway's span.
        assert _attrs(gateway)["clawhub.skill.version"] == "1.0.0" and _attrs(gateway)["clawhub.executor"]
        assert sorted(s.name for s in found if s.kind != SpanKind.CLIENT) == sorted(
            [GATEWAY, EXECUTOR, "sandbox.run"])
    finally:
        await chain.channel.close()


def _one(found: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    matching = [s for s in found if s.name == name and s.kind == kind]
    assert len(matching) == 1, [(s.name, s.kind) for s in found]
    return matching[0]


def _parent_of(span: ReadableSpan, found: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, span.name
    parents = [s for s in found if s.context.span_id == span.parent.span_id]
    assert len(parents) == 1, (span.name, [(s.name, s.kind) for s in found])
    return parents[0]


def _trace_of(spans: InMemorySpanExporter, root: str) -> list[ReadableSpan]:
    """The spans of the one trace whose gateway server span is named `root`."""
    finished = list(spans.get_finished_spans())
    roots = [s for s in finished if s.name == root and s.kind == SpanKind.SERVER]
    assert len(roots) == 1, [(s.name, s.kind) for s in finished]
    trace_id = roots[0].context.trace_id
    return [s for s in finished if s.context.trace_id == trace_id]


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_one_invocation_is_one_trace_across_the_three_services(chain: Chain,
                                                                     spans: InMemorySpanExporter) -> None:
    spans.clear()
    traceparent, trace_id = tracing.new_traceparent()
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"hi"), timeout=10,
                                            metadata=(("traceparent", traceparent),))
    assert response.raw_output == b"hi"
    found = _trace_of(spans, GATEWAY)
    gateway = _one(found, GATEWAY, SpanKind.SERVER)
    # The caller's trace: its trace id, and the gateway's span is a child of the caller's span.
    assert f"{gateway.context.trace_id:032x}" == trace_id
    assert gateway.parent is not None and f"{gateway.parent.span_id:016x}" == traceparent.split("-")[2]
    dispatcher = _one(found, DISPATCHER, SpanKind.SERVER)
    executor = _one(found, EXECUTOR, SpanKind.SERVER)
    # Each hop's server span is the child of the caller's server span (a successful hop makes no CLIENT span: the
    # callee's own span says all it would).
    assert _parent_of(dispatcher, found) is gateway
    assert _parent_of(executor, found) is dispatcher
    assert not [s.name for s in found if s.kind == SpanKind.CLIENT and s.name in (DISPATCHER, EXECUTOR)]
    for server in (gateway, dispatcher, executor):
        assert _attrs(server)[tracing.GRPC_STATUS] == 0
        assert server.status.status_code != StatusCode.ERROR
    # Steps that take microseconds are attributes of their call's span: authentication and rate limits at the
    # gateway (when on), the route choice at the dispatcher, a hot module at the executor.
    assert _attrs(dispatcher)["clawhub.skill.version"] == "1.0.0"
    assert _attrs(dispatcher)["clawhub.route.weight"] == 100
    assert _attrs(dispatcher)["clawhub.executor"]
    run = _one(found, "sandbox.run", SpanKind.INTERNAL)
    assert _parent_of(run, found) is executor
    attrs = _attrs(run)
    assert attrs["clawhub.skill"] == ECHO_SKILL and attrs["clawhub.sandbox.verdict"] == "ok"
    assert attrs["clawhub.sandbox.peak_memory_bytes"] > 0 and attrs["clawhub.sandbox.instantiate_ms"] >= 0
    # The run happened on a worker thread: it still joins the executor's span.
    assert run.context.trace_id == gateway.context.trace_id
    # The module was loaded by the chain's first calls or now: a load span with its tier, or `hot` on the span.
    loads = [s for s in found if s.name == "executor.module_load"]
    if loads:
        assert _attrs(loads[0])["clawhub.module.tier"] in ("warm", "cold")
    else:
        assert _attrs(executor)["clawhub.module.tier"] == "hot"
    # Four spans per invocation in the steady state: what one sampled call costs (bench/observability_cost.py).
    await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"again"), timeout=10,
                                 metadata=(("traceparent", tracing.new_traceparent()[0]),))
    spans.clear()
    again, again_id = tracing.new_traceparent()
    await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"again"), timeout=10,
                                 metadata=(("traceparent", again),))
    steady = [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == again_id
              and s.kind != SpanKind.CLIENT]  # (the executor's provenance check may ask about a namespace: NOT_FOUND)
    assert sorted(s.name for s in steady) == sorted([GATEWAY, DISPATCHER, EXECUTOR, "sandbox.run"]), steady


async def test_a_call_without_traceparent_starts_its_own_trace(chain: Chain, spans: InMemorySpanExporter) -> None:
    spans.clear()
    await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"x"), timeout=10)
    found = _trace_of(spans, GATEWAY)
    gateway = _one(found, GATEWAY, SpanKind.SERVER)
    assert gateway.parent is None
    assert {s.name for s in found} >= {DISPATCHER, EXECUTOR}


async def test_a_failed_call_records_its_status_and_reason(chain: Chain, spans: InMemorySpanExporter) -> None:
    spans.clear()
    missing = "com.example.not-deployed"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=missing, raw_input=b"x"), timeout=10)
    info = error_info(raised.value)
    assert info is not None
    found = _trace_of(spans, GATEWAY)
    # The gateway's span records what its caller got.
    gateway = _one(found, GATEWAY, SpanKind.SERVER)
    assert _attrs(gateway)[tracing.GRPC_STATUS] == raised.value.code().value[0]
    assert _attrs(gateway)[tracing.ERROR_REASON] == info.reason
    # The dispatcher's refusal, as it sent it and as the gateway received it (the gateway tells its public
    # callers NOT_FOUND for a skill that is not deployed): a failed hop gets a CLIENT span, from its start.
    sent, received = _one(found, DISPATCHER, SpanKind.SERVER), _one(found, DISPATCHER, SpanKind.CLIENT)
    assert received.start_time <= sent.start_time and _parent_of(sent, found) is gateway
    assert _attrs(sent)[tracing.GRPC_STATUS] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert _attrs(sent)[tracing.ERROR_REASON] == "SKILL_NOT_DEPLOYED"
    for span in (gateway, sent, received):
        attrs = _attrs(span)
        if span is received:
            assert (attrs[tracing.GRPC_STATUS], attrs[tracing.ERROR_REASON]) == (
                _attrs(sent)[tracing.GRPC_STATUS], _attrs(sent)[tracing.ERROR_REASON])
        assert span.status.status_code == StatusCode.ERROR
        assert attrs[tracing.ERROR_REASON] in (span.status.description or "")


async def test_a_skill_failure_is_recorded_on_every_hop_and_on_the_sandbox_run(
        chain: Chain, spans: InMemorySpanExporter) -> None:
    """A fuel budget of one unit: the run fails in the executor's sandbox (FUEL_EXHAUSTED), and the sandbox run,
    the executor's span and every span on the way back record it."""
    assert chain.routes is not None
    table = routing_pb2.RouteTable()
    table.CopyFrom(chain.routes.table)
    table.generation = 2
    table.routes[0].targets[0].limits.fuel = 1
    chain.routes.set_table(table)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.dispatcher.port}") as channel:
        stub = dispatcher_grpc.DispatcherServiceStub(channel)

        async def routed() -> bool:
            response = await stub.GetRouteTable(dispatcher_pb.GetRouteTableRequest(), timeout=5)
            return bool(response.route_table.generation == 2)

        await eventually(routed)
    spans.clear()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"hello"), timeout=10)
    info = error_info(raised.value)
    assert info is not None and info.reason == "FUEL_EXHAUSTED"
    found = _trace_of(spans, GATEWAY)
    for name, kind in ((GATEWAY, SpanKind.SERVER), (DISPATCHER, SpanKind.SERVER), (EXECUTOR, SpanKind.CLIENT),
                       (EXECUTOR, SpanKind.SERVER)):
        attrs = _attrs(_one(found, name, kind))
        assert attrs[tracing.ERROR_REASON] == "FUEL_EXHAUSTED", (name, kind, attrs)
        assert attrs[tracing.GRPC_STATUS] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], (name, kind, attrs)
    run = _one(found, "sandbox.run", SpanKind.INTERNAL)
    assert _attrs(run)["clawhub.sandbox.verdict"] == "fuel_exhausted" and _attrs(run)["clawhub.sandbox.fuel"] == 1
    assert run.status.status_code == StatusCode.ERROR
    # The metered module was not loaded before: the executor compiled it (cold) or read its artifact (warm).
    load = _one(found, "executor.module_load", SpanKind.INTERNAL)
    assert _attrs(load)["clawhub.module.tier"] in ("cold", "warm")


async def test_tracing_off_installs_nothing(start_service: Starter, tmp_path: Path) -> None:
    """Without an exporter configured, servers get no tracing interceptor and channels no wrapper."""
    assert not tracing.enabled()
    assert tracing.server_interceptor("gateway") is None
    assert not tracing.configured({})
    assert not tracing.configured({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"})
    assert tracing.configured({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.configured({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
    with tracing.span("anything") as span:
        assert not span.is_recording()
    channel = channels.channel("127.0.0.1:1")
    try:
        assert not isinstance(channel, tracing.TracedChannel)
    finally:
        await channel.close()
    chain = await start_chain(start_service, tmp_path)
    # Recording from now on: servers and channels built while tracing was off make no spans of their own.
    exporter = tracing.install_in_memory()
    try:
        # A traceparent still passes through untouched (for tracing done elsewhere, such as a mesh).
        response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"x"), timeout=10,
                                                metadata=(("traceparent", tracing.new_traceparent()[0]),))
        assert response.raw_output == b"x"
        kinds = {s.kind for s in exporter.get_finished_spans()}
        assert SpanKind.SERVER not in kinds and SpanKind.CLIENT not in kinds
    finally:
        tracing.uninstall()
        await chain.channel.close()


def test_service_names_default_to_clawhub_service() -> None:
    assert tracing.service_name("gateway", {}) == "clawhub-gateway"
    assert tracing.service_name("gateway", {"OTEL_SERVICE_NAME": "edge"}) == "edge"


def test_a_new_traceparent_is_valid_w3c_and_sampled() -> None:
    header, trace_id = tracing.new_traceparent()
    version, tid, span_id, flags = header.split("-")
    assert (version, tid, flags) == ("00", trace_id, "01")
    assert len(tid) == 32 and len(span_id) == 16 and int(tid, 16) and int(span_id, 16)
    assert tracing.new_traceparent()[1] != trace_id


async def test_a_call_its_caller_did_not_sample_is_recorded_nowhere(chain: Chain,
                                                                   spans: InMemorySpanExporter) -> None:
    """A traceparent with the sampled flag off: no service records the call (its spans would be a partial trace),
    and the call still works."""
    spans.clear()
    header, _ = tracing.new_traceparent()
    unsampled = header[:-2] + "00"
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"quiet"), timeout=10,
                                            metadata=(("traceparent", unsampled),))
    assert response.raw_output == b"quiet"
    # (Background calls outside any call, such as the dispatcher's stats reports, start traces of their own.)
    trace_id = int(unsampled.split("-")[1], 16)
    assert not [(s.name, s.kind) for s in spans.get_finished_spans() if s.context.trace_id == trace_id]


def test_the_root_ratio_follows_the_parent_based_samplers() -> None:
    assert tracing.root_ratio({}) == tracing.DEFAULT_RATIO
    assert tracing.root_ratio({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}) == 1.0
    assert tracing.root_ratio({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}) == 0.0
    assert tracing.root_ratio({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                               "OTEL_TRACES_SAMPLER_ARG": "0.25"}) == 0.25
    # Not parent-based: the SDK decides every span, no fast path.
    assert tracing.root_ratio({"OTEL_TRACES_SAMPLER": "always_on"}) is None
    assert tracing.root_ratio({"OTEL_TRACES_SAMPLER": "traceidratio"}) is None


async def test_a_call_not_chosen_at_its_root_is_recorded_nowhere(start_service: Starter, tmp_path: Path) -> None:
    """Ratio 0: the gateway decides at the root not to record, and no service makes a span of the call (it still
    passes an unsampled traceparent on, so log lines of one call share a trace id); nor does a span started
    outside any call."""
    exporter = tracing.install_in_memory(ratio=0.0)
    try:
        chain = await start_chain(start_service, tmp_path)
        try:
            for _ in range(3):
                response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"q"),
                                                        timeout=10)
                assert response.raw_output == b"q"
            with tracing.span("outside a call") as span:
                assert not span.is_recording()
                with tracing.span("inside it") as inner:
                    assert not inner.is_recording()
                assert tracing.unsampled_entries() is not None
        finally:
            await chain.channel.close()
        names = [(s.name, s.kind) for s in exporter.get_finished_spans()
                 if s.name in (GATEWAY, DISPATCHER, EXECUTOR, "sandbox.run", "outside a call", "inside it")]
        assert not names, names
    finally:
        tracing.uninstall()


@pytest.mark.parametrize("header", [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # invalid: zero trace id
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # another version
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
    "not a traceparent",
])
def test_w3c_headers_are_read_and_written_as_the_propagation_api_does(header: str) -> None:
    from opentelemetry import propagate, trace

    tracing.install_in_memory()
    try:
        for state in ("", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"):
            metadata = (("traceparent", header),) + ((("tracestate", state),) if state else ())
            ours = trace.get_current_span(tracing.extract(metadata)).get_span_context()
            theirs = trace.get_current_span(propagate.extract(dict(metadata))).get_span_context()
            assert ours == theirs, (header, state)
            if ours.is_valid:
                carrier: dict[str, str] = {}
                propagate.inject(carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(ours)))
                written = tracing.inject((("x-other", "kept"), ("traceparent", "stale")), trace.NonRecordingSpan(ours))
                assert written == (("x-other", "kept"), *carrier.items())
    finally:
        tracing.uninstall()
