"""Relayed response streams on the public port: blob downloads are not served there, a caller that stops
reading holds the relay (and its upstream) instead of making the gateway buffer the stream, and a caller that
goes away ends the upstream call at once with no traceback in the gateway's log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.registry.v1 import registry_internal_pb2 as registry_internal_pb
from clawhub.registry.v1 import registry_internal_pb2_grpc as registry_internal_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.errors import Reason, error_info
from services.runtime.server import ServiceHost, create_server
from tests.conftest import Starter

DEPLOYER = deployer_pb.DESCRIPTOR.services_by_name["DeployerService"].full_name
WATCH = f"/{DEPLOYER}/WatchDeployment"
MESSAGES = 400
# Field 1 holding 1 MiB: far larger than a deployment event, to fill flow-control windows fast (the relay does
# not decode what it relays).
BIG_MESSAGE = b"\x0a\x80\x80\x40" + b"x" * (1 << 20)


class Upstream:
    """A stand-in deployer whose WatchDeployment streams MESSAGES big messages, counting what it sent."""

    def __init__(self) -> None:
        self.sent = 0
        self.streams_closed = 0
        self.closed = asyncio.Event()

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        try:
            for _ in range(MESSAGES):
                self.sent += 1
                yield BIG_MESSAGE
        finally:
            self.streams_closed += 1
            self.closed.set()

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            DEPLOYER, {"WatchDeployment": grpc.unary_stream_rpc_method_handler(self.watch)}),))


@pytest.fixture
async def relay(start_service: Starter) -> AsyncIterator[tuple[Upstream, grpc.aio.Channel]]:
    upstream = Upstream()

    async def build() -> ServiceHost:
        return create_server("deployer", [DEPLOYER], host="127.0.0.1", port=0, register=upstream.register)

    deployer = await start_service(build())
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address="127.0.0.1:1", registry_address="127.0.0.1:1",
        deployer_address=f"127.0.0.1:{deployer.port}", grace_seconds=0.2)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options=[("grpc.max_receive_message_length", -1)])
    yield upstream, channel
    await channel.close()


async def test_blob_downloads_are_not_served_on_the_public_port(start_service: Starter, tmp_path: Path) -> None:
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", shutdown_grace_seconds=0.5)))
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address="127.0.0.1:1", registry_address=f"127.0.0.1:{registry.port}",
        deployer_address="127.0.0.1:1", grace_seconds=0.2)))
    request = registry_internal_pb.DownloadBlobRequest(digest="sha256:" + "0" * 64)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry_internal_grpc.RegistryInternalServiceStub(channel).DownloadBlob(request, timeout=5).read()
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        info = error_info(caught.value)
        assert info is not None and info.reason == Reason.METHOD_NOT_EXPOSED
        assert info.metadata["method"] == "/clawhub.registry.v1.RegistryInternalService/DownloadBlob"
        # The public registry is still relayed.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry_grpc.RegistryServiceStub(channel).GetSkill(
                registry_pb.GetSkillRequest(name="com.example.none"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Executors still download from the registry itself.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry_internal_grpc.RegistryInternalServiceStub(channel).DownloadBlob(request, timeout=5).read()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def settled(count: Callable[[], int], *, quiet_polls: int = 5, interval: float = 0.1) -> int:
    """`count()` once it has not changed for `quiet_polls` polls in a row (at most 10 s)."""
    last, same = -1, 0
    for _ in range(int(10 / interval)):
        value = count()
        same = same + 1 if value == last else 0
        if same >= quiet_polls:
            return value
        last = value
        await asyncio.sleep(interval)
    raise AssertionError(f"still growing after 10 s: {last}")


async def test_a_caller_that_stops_reading_holds_the_relay(relay: tuple[Upstream, grpc.aio.Channel]) -> None:
    """The relay writes with backpressure: it reads from its upstream only as fast as its caller reads. What the
    gateway holds for a stalled caller is bounded by HTTP/2's flow-control windows, not by the stream's size."""
    upstream, channel = relay
    call = channel.unary_stream(WATCH)(b"", timeout=30)
    await call.read()
    sent = await settled(lambda: upstream.sent)
    assert sent < MESSAGES // 4, f"the relay pulled {sent} MiB for a caller that read 1 MiB"
    # Reading on resumes the stream: nothing was lost or reordered.
    received = 1
    while await call.read() != grpc.aio.EOF:
        received += 1
    assert received == MESSAGES


async def test_a_caller_that_goes_away_ends_the_upstream_call_quietly(relay: tuple[Upstream, grpc.aio.Channel],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Each caller reads one message and cancels while the relay is blocked writing the next ones: the relay's
    write fails before gRPC tells it of the cancellation (gRPC logged that with a traceback, one per stream),
    and its upstream call must end now, not at its deadline or garbage collection."""
    upstream, channel = relay
    streams = 5
    calls = [channel.unary_stream(WATCH)(b"", timeout=30) for _ in range(streams)]
    with caplog.at_level(logging.DEBUG):
        for call in calls:
            await call.read()
        await settled(lambda: upstream.sent)  # every relay is blocked in a write now
        for call in calls:
            call.cancel()

        async def all_closed() -> None:
            while upstream.streams_closed < streams:
                upstream.closed.clear()
                await upstream.closed.wait()

        await asyncio.wait_for(all_closed(), 5)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) <= 2 * streams  # at most one line per stream and hop (rate-limited to 5 per 10 s each)
