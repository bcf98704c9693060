"""The public port never tells a caller where the platform's services live: a relayed service that is down,
a dispatcher that is down, and a dispatcher's own status naming executors all reach the caller without an
address; the gateway's log has it instead."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from clawhub.common.v1 import routing_pb2
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.dispatcher.server import build_server as build_dispatcher
from services.dispatcher.settings import Settings as DispatcherSettings
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.runtime.errors import HIDDEN_ADDRESS, Reason, error_info, redact_addresses, upstream_error
from services.runtime.server import ServiceHost
from tests.conftest import Starter
from tests.deployer.fakes import FakeDeployer, Fakes
from tests.gateway.support import assert_no_address

SKILL = "com.example.gone"


def dead_address() -> str:
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


GatewayTo = Callable[..., Awaitable[tuple[ServiceHost, grpc.aio.Channel]]]


@pytest.fixture
async def gateway_to(start_service: Starter) -> AsyncIterator[GatewayTo]:
    channels: list[grpc.aio.Channel] = []

    async def start(**addresses: str) -> tuple[ServiceHost, grpc.aio.Channel]:
        host = await start_service(build_gateway(GatewaySettings(**{
            "host": "127.0.0.1", "port": 0, "grace_seconds": 0.5, "invoke_timeout": 5.0, "forward_timeout": 5.0,
            **addresses})))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        channels.append(channel)
        return host, channel

    yield start
    for channel in channels:
        await channel.close()


async def test_a_relayed_service_that_is_down(gateway_to: GatewayTo, caplog: pytest.LogCaptureFixture) -> None:
    registry = dead_address()
    _, channel = await gateway_to(registry_address=registry)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_grpc.RegistryServiceStub(channel).GetSkill(registry_pb.GetSkillRequest(name=SKILL), timeout=5)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(err)
    assert info is not None and info.reason == Reason.UPSTREAM_UNAVAILABLE and info.metadata["upstream"] == "registry"
    assert_no_address(err, [registry])
    assert any(registry in r.getMessage() for r in caplog.records), "the gateway logs the address instead"


async def test_a_dispatcher_that_is_down(gateway_to: GatewayTo, caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = dead_address()
    _, channel = await gateway_to(dispatcher_address=dispatcher)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.GatewayServiceStub(channel).InvokeSkill(pb.InvokeSkillRequest(name=SKILL), timeout=5)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(err)
    assert info is not None and info.reason == Reason.UPSTREAM_UNAVAILABLE and info.metadata["upstream"] == "dispatcher"
    assert_no_address(err, [dispatcher])
    assert any(dispatcher in r.getMessage() for r in caplog.records)


async def test_a_dispatcher_status_naming_executors(gateway_to: GatewayTo, start_service: Starter) -> None:
    """The dispatcher's NO_EXECUTOR_AVAILABLE names the executors it tried (for its operators); the gateway
    passes the status on without them."""
    executor = dead_address()
    table = routing_pb2.RouteTable(generation=1, routes=[routing_pb2.Route(skill=SKILL, targets=[
        routing_pb2.RouteTarget(version="1.0.0", digest="sha256:" + "ab" * 32, weight=100)])])
    deployer = await Fakes(start_service).deployer(FakeDeployer(table))
    dispatcher = await start_service(build_dispatcher(DispatcherSettings(
        host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{deployer.port}", executor_addresses=(executor,),
        dispatcher_id="public-errors", retries=1, dispatch_timeout=5.0, grace=0.2)))
    _, channel = await gateway_to(dispatcher_address=f"127.0.0.1:{dispatcher.port}")
    stub = pb_grpc.GatewayServiceStub(channel)
    err: grpc.aio.AioRpcError | None = None
    for _ in range(100):  # until the dispatcher has its route table
        try:
            await stub.InvokeSkill(pb.InvokeSkillRequest(name=SKILL), timeout=5)
        except grpc.aio.AioRpcError as caught:
            err = caught
            info = error_info(caught)
            if info is not None and info.reason == Reason.NO_EXECUTOR_AVAILABLE:
                break
    assert err is not None
    info = error_info(err)
    assert info is not None and info.reason == Reason.NO_EXECUTOR_AVAILABLE, err.details()
    assert info.metadata["skill"] == SKILL and "executors" not in info.metadata
    assert HIDDEN_ADDRESS in (err.details() or "")
    assert_no_address(err, [executor, f"127.0.0.1:{dispatcher.port}", f"127.0.0.1:{deployer.port}"])


@pytest.mark.parametrize(("text", "public"), [
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50052: Connection refused",
     f"failed to connect to all addresses; last error: UNKNOWN: {HIDDEN_ADDRESS}: Connection refused"),
    ("executors (10.0.0.7:50055, executor-2.svc.cluster.local:50055, [::1]:50056)",
     f"executors ({HIDDEN_ADDRESS}, {HIDDEN_ADDRESS}, {HIDDEN_ADDRESS})"),
    ("dns:///registry:50052 is down", f"{HIDDEN_ADDRESS} is down"),
    # What must stay: digests, times, versions, field names.
    ("module sha256:12345abcdef… at 10:30, com.acme.x@1.0.0, env:NAME, limits.timeout_ms:2000",
     "module sha256:12345abcdef… at 10:30, com.acme.x@1.0.0, env:NAME, limits.timeout_ms:2000"),
])
def test_redaction(text: str, public: str) -> None:
    assert redact_addresses(text) == public


async def test_upstream_errors_name_the_service_not_its_address() -> None:
    """upstream_error puts no address in message or metadata (the deployer and dispatcher use it too, and
    their statuses reach callers through the gateway)."""
    async with grpc.aio.insecure_channel(dead_address()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/x.Y/Z")(b"", timeout=2)
    translated = upstream_error(caught.value, "registry", "127.0.0.1:1")
    assert "127.0.0.1" not in str(translated)
    assert "address" not in getattr(translated, "metadata", {})
