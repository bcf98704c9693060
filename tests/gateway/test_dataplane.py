"""The proxyless data path (docs/routing.md) on a real chain: the gateway follows the dispatcher's routes and
executors, calls the executor itself, keeps routing when the dispatcher is gone, and reports its calls back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dataplane_pb2, dataplane_pb2_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as pb

from services.runtime.errors import Reason, error_info
from tests.conftest import Starter
from tests.deployer.fakes import eventually
from tests.gateway.support import ECHO_SKILL, Chain, start_chain


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path)
    yield chain
    await chain.channel.close()


async def invoke(chain: Chain, text: str = "hi", timeout: float = 10) -> pb.InvokeSkillResponse:
    return await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=f'"{text}"'.encode()),
                                        timeout=timeout)


def acks(chain: Chain) -> list[tuple[str, int]]:
    assert chain.routes is not None
    return chain.routes.acks


async def test_calls_keep_working_while_the_dispatcher_is_down(chain: Chain) -> None:
    """kill the control plane: the gateway routes with the last routes and executors it received."""
    await invoke(chain)
    await chain.dispatcher.stop(grace=0)
    for n in range(20):
        response = await invoke(chain, f"call {n}")
        assert response.output.string_value == f"call {n}"


async def test_a_route_change_reaches_the_gateway_before_the_deployer_hears_of_it(chain: Chain) -> None:
    """The dispatcher acknowledges a generation to the deployer only after the gateway that follows it did."""
    await invoke(chain)
    assert chain.routes is not None
    table = routing_pb2.RouteTable()
    table.CopyFrom(chain.routes.table)
    table.generation = 7
    del table.routes[:]
    chain.routes.set_table(table)

    async def acknowledged() -> bool:
        return ("gateway-tests", 7) in acks(chain)

    await eventually(acknowledged)
    # By then the gateway routes with generation 7, where the skill has no route.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke(chain)
    info = error_info(caught.value)
    assert info is not None and info.reason == Reason.SKILL_NOT_DEPLOYED


async def test_the_gateways_calls_reach_the_dispatchers_stats(chain: Chain) -> None:
    for _ in range(5):
        await invoke(chain)
    assert chain.routes is not None

    async def reported() -> bool:
        # The dispatcher adds the gateway's per-version counts to its own reports to the deployer.
        return sum(r.requests for s in chain.routes.stats for r in s.reports if r.skill == ECHO_SKILL) >= 5

    await eventually(reported)
    stats = await chain.stub.GetSkillStats(pb.GetSkillStatsRequest(skill=ECHO_SKILL), timeout=5)
    assert [s.calls for s in stats.skills] == [5]


async def test_an_executor_that_stops_answering_is_routed_around(chain: Chain) -> None:
    """The dispatcher's health checks publish a dead executor as not serving; with no other one, calls still
    try it (the check may be what is wrong) and fail with a clear status, not a hang."""
    await invoke(chain)
    await chain.executor.stop(grace=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.dispatcher.port}") as ch:
        stub = dataplane_pb2_grpc.DataPlaneServiceStub(ch)
        call = stub.WatchDataPlane(dataplane_pb2.WatchDataPlaneRequest(client_id="observer"))
        async with asyncio.timeout(5):
            async for state in call:
                if state.endpoints and not state.endpoints[0].serving:
                    break
        call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke(chain, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None and info.reason == Reason.NO_EXECUTOR_AVAILABLE


async def test_routing_through_the_dispatcher_still_works(start_service: Starter, tmp_path: Path) -> None:
    chain = await start_chain(start_service, tmp_path, routing="dispatcher")
    try:
        response = await invoke(chain)
        assert response.output.string_value == "hi"
        await chain.dispatcher.stop(grace=0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await invoke(chain, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await chain.channel.close()


async def test_the_data_plane_refuses_bad_reports(chain: Chain) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.dispatcher.port}") as ch:
        stub = dataplane_pb2_grpc.DataPlaneServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportCalls(dataplane_pb2.ReportCallsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        too_many = dataplane_pb2.ReportCallsRequest(client_id="x", skills=[
            dataplane_pb2.SkillCalls(skill=f"com.example.s{n}", calls=1) for n in range(1001)])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportCalls(too_many, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.WatchDataPlane(dataplane_pb2.WatchDataPlaneRequest(client_id="x" * 300)):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A latency bucket past an hour would overflow the quantiles `clawhub top` reads.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportCalls(dataplane_pb2.ReportCallsRequest(client_id="x", skills=[
                dataplane_pb2.SkillCalls(skill=ECHO_SKILL, calls=1, latency_buckets={9000: 1})]), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_restarted_dispatcher_without_routes_does_not_empty_the_gateways_routes(
        chain: Chain, start_service: Starter) -> None:
    """The deployer is down when the dispatcher comes back: the new dispatcher has no routes to give, so the
    gateway (which reconnects to it) keeps routing with the ones it had."""
    from services.dispatcher.server import build_server as build_dispatcher
    from services.dispatcher.settings import Settings as DispatcherSettings

    await invoke(chain)
    await chain.deployer.stop(grace=0)
    port = chain.dispatcher.port
    await chain.dispatcher.stop(grace=0)
    restarted = await start_service(build_dispatcher(DispatcherSettings(
        host="127.0.0.1", port=port, deployer_address=f"127.0.0.1:{chain.deployer.port}",
        executor_addresses=(f"127.0.0.1:{chain.executor.port}",), dispatcher_id="gateway-tests", grace=0.2)))
    await asyncio.sleep(2.5)  # the gateway's reconnection backoff is at most 2 s
    for n in range(10):
        assert (await invoke(chain, f"still {n}")).output.string_value == f"still {n}"
    await restarted.stop(grace=0)


async def test_the_gateway_acknowledges_a_restarted_dispatchers_first_state_and_is_not_cut_off(
        chain: Chain, start_service: Starter, caplog: pytest.LogCaptureFixture) -> None:
    """A new dispatcher sends the generation the gateway already routes with; the gateway acknowledges it all
    the same, so the dispatcher does not wait for it, cut it off, and then push the next generation while the
    gateway is reconnecting (which would let a release go on before the gateway routes by it)."""
    from services.dispatcher.server import build_server as build_dispatcher
    from services.dispatcher.settings import Settings as DispatcherSettings

    await invoke(chain)
    assert chain.routes is not None
    port = chain.dispatcher.port
    await chain.dispatcher.stop(grace=0)
    # The deployer answers the new dispatcher only once the gateway follows it (the order of a real restart,
    # where the dispatcher's first table can come after the gateway reconnected).
    chain.routes.hold = asyncio.Event()
    restarted = await start_service(build_dispatcher(DispatcherSettings(
        host="127.0.0.1", port=port, deployer_address=f"127.0.0.1:{chain.deployer.port}",
        executor_addresses=(f"127.0.0.1:{chain.executor.port}",), dispatcher_id="restarted", grace=0.2)))
    await asyncio.sleep(2.5)  # the gateway reconnects (its backoff is at most 2 s)
    chain.routes.hold.set()
    first = chain.routes.table.generation

    async def acknowledged(generation: int) -> bool:
        return ("restarted", generation) in acks(chain)

    # Acknowledged within the gateway's reconnection backoff, not after the 3-s cut-off.
    await eventually(lambda: acknowledged(first), timeout=2.5)
    table = routing_pb2.RouteTable()
    table.CopyFrom(chain.routes.table)
    table.generation = first + 1
    chain.routes.set_table(table)
    await eventually(lambda: acknowledged(first + 1), timeout=2.0)
    assert not [r for r in caplog.records if "did not acknowledge" in r.getMessage()]
    await restarted.stop(grace=0)
