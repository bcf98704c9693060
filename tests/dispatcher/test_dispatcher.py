"""The dispatcher against a fake deployer (route table stream) and fake executors, over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from clawhub.common.v1 import routing_pb2, skill_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from services.dispatcher.server import build_server
from services.dispatcher.settings import Settings
from services.runtime.errors import Reason, error_info
from services.runtime.server import ServiceHost
from tests.deployer.fakes import SKILL, FakeDeployer, FakeExecutor, Fakes, Starter, digest_of, eventually

DISPATCHER_ID = "dispatcher-test"


def table(generation: int, *targets: tuple[str, int]) -> routing_pb2.RouteTable:
    """A table routing SKILL to (version, weight) targets."""
    return routing_pb2.RouteTable(generation=generation, routes=[routing_pb2.Route(skill=SKILL, targets=[
        routing_pb2.RouteTarget(version=v, digest=digest_of(SKILL, v), weight=w,
                                limits=skill_pb2.Limits(memory_bytes=2 << 20))
        for v, w in targets])])


@dataclass
class Env:
    fakes: Fakes
    deployer: FakeDeployer
    deployer_host: ServiceHost
    executors: list[FakeExecutor]
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def dispatcher(self, *, retries: int = 2, dispatch_timeout: float = 10.0) -> pb_grpc.DispatcherServiceStub:
        settings = Settings(host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{self.deployer_host.port}",
                            executor_addresses=tuple(e.address for e in self.executors),
                            dispatcher_id=DISPATCHER_ID, retries=retries, dispatch_timeout=dispatch_timeout,
                            grace=0.2)
        host = await self.fakes.start_service(build_server(settings))
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        self.channels.append(ch)
        return pb_grpc.DispatcherServiceStub(ch)


@pytest.fixture
async def env(start_service: Starter) -> AsyncIterator[Env]:
    fakes = Fakes(start_service)
    deployer = FakeDeployer(table(1, ("1.0.0", 100)))
    deployer_host = await fakes.deployer(deployer)
    executors = [await fakes.executor(), await fakes.executor()]
    environment = Env(fakes, deployer, deployer_host, executors)
    yield environment
    for ch in environment.channels:
        await ch.close()


async def generation(stub: pb_grpc.DispatcherServiceStub) -> int:
    return (await stub.GetRouteTable(pb.GetRouteTableRequest())).route_table.generation


async def has_generation(stub: pb_grpc.DispatcherServiceStub, expected: int) -> bool:
    return await generation(stub) == expected


def assert_status(err: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: Reason, domain: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    info = error_info(err)
    assert info is not None and (info.reason, info.domain) == (reason, domain), info


async def test_follows_the_route_table_and_acknowledges_each_generation(env: Env) -> None:
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 1))

    async def acked(generation: int) -> bool:
        return (DISPATCHER_ID, generation) in env.deployer.acks

    await eventually(lambda: acked(1))
    assert env.deployer.watchers == [DISPATCHER_ID]
    env.deployer.set_table(table(2, ("2.0.0", 100)))
    await eventually(lambda: acked(2))
    response = await stub.GetRouteTable(pb.GetRouteTableRequest())
    assert response.route_table == table(2, ("2.0.0", 100))


async def test_dispatch_runs_the_routed_digest_with_its_limits(env: Env) -> None:
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 1))
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"hello", request_id="r1"), timeout=5,
                                   metadata=(("traceparent", traceparent), ("x-other", "dropped")))
    assert response.output == b"echo:hello"
    assert (response.version, response.digest) == ("1.0.0", digest_of(SKILL, "1.0.0"))
    assert response.usage.wall_time.nanos == 1500 and response.usage.peak_memory_bytes == 65536
    ran = next(e for e in env.executors if e.address == response.executor)
    request = ran.executions[-1].request
    assert (request.digest, request.input, request.request_id) == (response.digest, b"hello", "r1")
    assert request.limits.memory_bytes == 2 << 20
    assert ran.executions[-1].metadata["traceparent"] == traceparent
    assert "x-other" not in ran.executions[-1].metadata


async def test_the_callers_deadline_propagates_and_a_default_applies_without_one(env: Env) -> None:
    stub = await env.dispatcher(dispatch_timeout=7.0)
    await eventually(lambda: has_generation(stub, 1))
    await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"a"), timeout=3)
    await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"b"))
    seen = sorted((x for e in env.executors for x in e.executions), key=lambda x: x.request.input)
    assert [x.request.input for x in seen] == [b"a", b"b"]
    # gRPC rounds deadlines on the wire, so allow a little slack above.
    assert 2.0 < seen[0].time_remaining <= 3.1
    assert 6.0 < seen[1].time_remaining <= 7.1


async def test_undeployed_skill_is_failed_precondition(env: Env) -> None:
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill="com.acme.not-deployed", input=b"x"), timeout=5)
    assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.SKILL_NOT_DEPLOYED,
                  "dispatcher.clawhub")
    # Nothing routed is close: no suggestion, and no empty `did_you_mean`.
    assert dict(error_info(caught.value).metadata) == {"skill": "com.acme.not-deployed"}
    # A typo of a routed name: the close routed names are suggested, in the message and the metadata.
    typo = SKILL[:-2] + SKILL[-1] + SKILL[-2]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill=typo, input=b"x"), timeout=5)
    assert error_info(caught.value).metadata["did_you_mean"] == SKILL
    assert f"(did you mean {SKILL}?)" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill="Bad Name", input=b"x"), timeout=5)
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_NAME, "dispatcher.clawhub")


async def test_an_unavailable_executor_is_retried_on_the_other(env: Env) -> None:
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 1))
    down, up = env.executors
    down.mode = "unavailable"
    # The pick is random: keep calling until the unavailable executor was picked first at least once.
    for _ in range(200):
        response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
        assert response.executor == up.address and response.output == b"echo:x"
        if down.executions:
            break
    assert down.executions, "the unavailable executor was never tried"
    assert len(up.executions) >= len(down.executions)


async def test_all_executors_unavailable_is_no_executor_available(env: Env) -> None:
    stub = await env.dispatcher(retries=2)
    await eventually(lambda: has_generation(stub, 1))
    for executor in env.executors:
        executor.mode = "unavailable"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert_status(caught.value, grpc.StatusCode.UNAVAILABLE, Reason.NO_EXECUTOR_AVAILABLE, "dispatcher.clawhub")
    # One attempt plus two retries, spread over both executors before repeating one.
    attempts = [len(e.executions) for e in env.executors]
    assert sum(attempts) == 3 and min(attempts) >= 1


async def test_executor_errors_pass_through_unchanged(env: Env) -> None:
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 1))
    for executor in env.executors:
        executor.mode = "trap"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert_status(caught.value, grpc.StatusCode.ABORTED, Reason.SKILL_TRAPPED, "executor.clawhub")
    assert caught.value.details() == "the skill trapped: wasm `unreachable` executed"
    assert error_info(caught.value).metadata["digest"] == digest_of(SKILL, "1.0.0")
    assert sum(len(e.executions) for e in env.executors) == 1, "only UNAVAILABLE is retried"


async def test_weights_split_traffic_and_zero_weight_takes_none(env: Env) -> None:
    env.deployer.set_table(table(3, ("1.0.0", 100), ("2.0.0", 0)))
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 3))
    versions = {(await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)).version
                for _ in range(30)}
    assert versions == {"1.0.0"}
    env.deployer.set_table(table(4, ("1.0.0", 50), ("2.0.0", 50)))
    await eventually(lambda: has_generation(stub, 4))
    versions = {(await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)).version
                for _ in range(100)}
    assert versions == {"1.0.0", "2.0.0"}


async def test_keeps_routing_while_the_deployer_is_away_and_reconnects(env: Env) -> None:
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 1))
    port = env.deployer_host.port
    await env.deployer_host.stop(grace=0)
    response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert response.version == "1.0.0"

    successor = FakeDeployer(table(7, ("3.0.0", 100)))
    await env.fakes.deployer(successor, port=port)
    await eventually(lambda: has_generation(stub, 7))
    response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert response.version == "3.0.0"
    assert successor.watchers == [DISPATCHER_ID]


async def test_the_targets_grants_travel_to_the_executor(env: Env) -> None:
    granted = table(2, ("1.0.0", 100))
    target = granted.routes[0].targets[0]
    target.env["GREETING"] = "Hello"
    target.args.extend(["--loud", "-n", "2"])
    target.bundle_digest = "sha256:" + "c" * 64
    target.capabilities.extend(["env:GREETING", "files"])
    env.deployer.set_table(granted)
    stub = await env.dispatcher()
    await eventually(lambda: has_generation(stub, 2))
    response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    request = next(e for e in env.executors if e.address == response.executor).executions[-1].request
    assert dict(request.env) == {"GREETING": "Hello"}
    assert list(request.args) == ["--loud", "-n", "2"]
    assert request.bundle_digest == "sha256:" + "c" * 64
    assert list(request.capabilities) == ["env:GREETING", "files"]
    assert request.limits.memory_bytes == 2 << 20
