"""GatewayService.GetSkillStats (`clawhub top`) through a real gateway → dispatcher → executor: calls, latency
and errors by reason as the dispatcher counted them, the executor's pool, the deployment states the deployer
gives (or none when it cannot)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2, routing_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as pb

from services.runtime.errors import error_info
from services.runtime.server import create_server
from tests.conftest import Starter
from tests.deployer.fakes import eventually
from tests.gateway.support import ECHO_SKILL, Chain, start_chain

MAX_OUTPUT = 16


async def limit_output(chain: Chain) -> None:
    """Route the echo skill with a 16-byte output limit: a longer input fails OUTPUT_LIMIT_EXCEEDED."""
    assert chain.routes is not None
    table = routing_pb2.RouteTable()
    table.CopyFrom(chain.routes.table)
    table.generation = 2
    table.routes[0].targets[0].limits.max_output_bytes = MAX_OUTPUT
    chain.routes.set_table(table)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.dispatcher.port}") as ch:
        stub = dispatcher_grpc.DispatcherServiceStub(ch)

        async def routed() -> bool:
            response = await stub.GetRouteTable(dispatcher_pb.GetRouteTableRequest(), timeout=5)
            return bool(response.route_table.generation == 2)

        await eventually(routed)


async def invoke_some(chain: Chain, ok: int, too_long: int) -> None:
    for _ in range(ok):
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"hi"), timeout=10)
    for _ in range(too_long):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"x" * 100), timeout=10)
        info = error_info(caught.value)
        assert info is not None and info.reason == "OUTPUT_LIMIT_EXCEEDED"


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path)
    await limit_output(chain)
    yield chain
    await chain.channel.close()


async def test_calls_latency_and_errors_by_reason(chain: Chain) -> None:
    await invoke_some(chain, ok=6, too_long=2)
    # A name with no route is refused, and not kept: callers cannot grow the dispatcher's stats.
    with pytest.raises(grpc.aio.AioRpcError):
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name="com.example.nothing-here"), timeout=10)
    response = await chain.stub.GetSkillStats(pb.GetSkillStatsRequest(), timeout=10)
    assert [s.skill for s in response.skills] == [ECHO_SKILL]
    echo = response.skills[0]
    assert (echo.calls, echo.errors) == (8, 2)
    assert dict(echo.errors_by_reason) == {"OUTPUT_LIMIT_EXCEEDED": 2}
    assert echo.p50_ms > 0 and echo.p99_ms >= echo.p50_ms
    assert echo.calls_per_second > 0 and echo.window_seconds == 60
    assert echo.active_version == "1.0.0"
    # The stand-in deployer serves no DeployerService: the state is left empty rather than failing the call.
    assert echo.deployment_state == ""
    [executor] = response.executors
    assert executor.executor == "executor-1" and executor.reachable
    assert (executor.threads, executor.queue_capacity, executor.busy_threads, executor.queued) == (2, 16, 0, 0)
    assert "127.0.0.1" not in str(response)


async def test_one_skill_and_a_routed_skill_without_calls(chain: Chain) -> None:
    only = await chain.stub.GetSkillStats(pb.GetSkillStatsRequest(skill=ECHO_SKILL), timeout=10)
    # Routed but not called yet: listed, with zeros.
    assert [(s.skill, s.calls, s.active_version) for s in only.skills] == [(ECHO_SKILL, 0, "1.0.0")]
    other = await chain.stub.GetSkillStats(pb.GetSkillStatsRequest(skill="com.example.other"), timeout=10)
    assert list(other.skills) == [] and len(other.executors) == 1


async def test_an_executor_that_is_down_shows_unreachable(chain: Chain) -> None:
    await chain.executor.stop(grace=0)
    response = await chain.stub.GetSkillStats(pb.GetSkillStatsRequest(), timeout=10)
    assert [(e.executor, e.reachable, e.threads) for e in response.executors] == [("executor-1", False, 0)]
    assert [s.skill for s in response.skills] == [ECHO_SKILL]


class Deployments(deployer_grpc.DeployerServiceServicer):
    """ListDeployments in two pages, newest first; the echo skill's latest deployment is on the second."""

    def __init__(self) -> None:
        self.pages: list[str] = []

    async def ListDeployments(self, request: deployer_pb.ListDeploymentsRequest, context: Any,
                              ) -> deployer_pb.ListDeploymentsResponse:
        self.pages.append(request.page_token)
        if not request.page_token:
            return deployer_pb.ListDeploymentsResponse(next_page_token="page-2", deployments=[
                deployer_pb.Deployment(skill="com.example.other", state=release_pb2.RELEASE_STATE_ACTIVE)])
        return deployer_pb.ListDeploymentsResponse(next_page_token="page-3", deployments=[
            deployer_pb.Deployment(skill=ECHO_SKILL, version="1.1.0", state=release_pb2.RELEASE_STATE_DEPLOYING),
            deployer_pb.Deployment(skill=ECHO_SKILL, version="1.0.0", state=release_pb2.RELEASE_STATE_ACTIVE)])


async def test_deployment_state_of_the_latest_deployment(start_service: Starter, tmp_path: Path) -> None:
    deployments = Deployments()
    deployer = await start_service(_build_deployments(deployments))
    chain = await start_chain(start_service, tmp_path, deployer_address=f"127.0.0.1:{deployer.port}")
    try:
        response = await chain.stub.GetSkillStats(pb.GetSkillStatsRequest(), timeout=10)
    finally:
        await chain.channel.close()
    assert [(s.skill, s.deployment_state) for s in response.skills] == [(ECHO_SKILL, "DEPLOYING")]
    # Pages are read until every skill has its state, and no further.
    assert deployments.pages == ["", "page-2"]


async def _build_deployments(servicer: Deployments) -> Any:
    return create_server("deployer", ["clawhub.deployer.v1.DeployerService"], host="127.0.0.1", port=0,
                         grace_seconds=0.2,
                         register=lambda s: deployer_grpc.add_DeployerServiceServicer_to_server(servicer, s))
