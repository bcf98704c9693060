"""Releases under analysis: bake window, canary steps, automatic and manual rollback, the circuit breaker,
and a deployer killed mid-bake. Real deployer and dispatcher, fake registry and executors, over gRPC."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2, routing_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_internal_grpc
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from services.deployer.breaker import BreakerSettings
from services.deployer.plan import Defaults, Thresholds
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.runtime.errors import Reason, ServiceError, bad_request, error_info, status_of
from services.runtime.server import ServiceHost
from tests.deployer.conftest import DeployerStub, Env
from tests.deployer.fakes import SKILL, digest_of, eventually
from tests.deployer.test_deployer import assert_status, first_table, steps

DEPLOYING = release_pb2.RELEASE_STATE_DEPLOYING
ACTIVE = release_pb2.RELEASE_STATE_ACTIVE
ROLLING_BACK = release_pb2.RELEASE_STATE_ROLLING_BACK
FAILED = release_pb2.RELEASE_STATE_FAILED
READY = release_pb2.RELEASE_STATE_READY
CANDIDATE = routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE
STABLE = routing_pb2.ROUTE_TARGET_ROLE_STABLE
K = pb.DeploymentEventKind
FAILED_STEPS = [(READY, DEPLOYING), (DEPLOYING, ROLLING_BACK), (ROLLING_BACK, FAILED)]


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def bake(value: float) -> dict:
    return {"blue_green": pb.BlueGreenStrategy(bake=seconds(value))}


def kinds(events: list[pb.WatchDeploymentResponse]) -> list[int]:
    return [e.event.kind for e in events if e.HasField("event")]


def of_kind(events: list[pb.WatchDeploymentResponse], kind: int) -> list[pb.DeploymentEvent]:
    return [e.event for e in events if e.HasField("event") and e.event.kind == kind]


def targets(table: routing_pb2.RouteTable) -> list[tuple[str, int, int]]:
    return [(t.version, t.weight, t.role) for r in table.routes for t in r.targets]


async def release(env: Env, stub, version: str,
                  on_event: Callable[[pb.WatchDeploymentResponse], Awaitable[None]] | None = None,
                  timeout: float = 15.0, **kwargs) -> tuple[pb.Deployment, list[pb.WatchDeploymentResponse]]:
    """Create a deployment and follow it to its end, calling `on_event` on each event as it arrives.

    The executors hold LoadSkill until the watch is subscribed, so no event can be missed.
    """
    gate = asyncio.Event()
    for executor in env.executors:
        executor.load_gate = gate
    events: list[pb.WatchDeploymentResponse] = []
    try:
        created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version=version, **kwargs),
                                               timeout=5)).deployment
        async with asyncio.timeout(timeout):
            call = stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id))
            while (event := await call.read()) is not grpc.aio.EOF:
                gate.set()
                events.append(event)
                if on_event is not None:
                    await on_event(event)
    finally:
        gate.set()
        for executor in env.executors:
            executor.load_gate = None
    return events[-1].deployment, events


@dataclass
class Traffic:
    """Calls the skill without pause from a few concurrent callers; counts versions and failures."""

    dispatch: object
    versions: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _task: asyncio.Task | None = None
    _count: int = 0

    async def _caller(self) -> None:
        while True:
            self._count += 1
            try:
                response = await self.dispatch.Dispatch(  # type: ignore[attr-defined]
                    dispatcher_pb.DispatchRequest(skill=SKILL, input=b"%d" % self._count), timeout=5)
                self.versions[response.version] += 1
            except grpc.aio.AioRpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.ensure_future(asyncio.gather(*(self._caller() for _ in range(4))))
        await eventually(self._flowing)
        return self

    async def _flowing(self) -> bool:
        return sum(self.versions.values()) >= 10

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def platform(env: Env, **release_defaults) -> tuple[ServiceHost, object, object]:
    """A deployer (with these release defaults), a dispatcher, and 1.0.0 deployed at once (no bake)."""
    deployer = await env.deployer(release=Defaults(**release_defaults))
    dispatcher = await env.dispatcher(deployer)
    stub, dispatch = env.deployer_stub(deployer), env.dispatcher_stub(dispatcher)
    first, _ = await release(env, stub, "1.0.0", **bake(0))
    assert first.state == ACTIVE

    async def routed() -> bool:
        table = (await dispatch.GetRouteTable(dispatcher_pb.GetRouteTableRequest())).route_table
        return table.generation == 1

    await eventually(routed)
    return deployer, stub, dispatch


async def test_a_clean_bake_goes_active_and_unloads_the_previous_version_after(env: Env) -> None:
    _, stub, dispatch = await platform(env, bake_seconds=0.3, thresholds=Thresholds(min_requests=5))
    tables: list[routing_pb2.RouteTable] = []

    async def on_event(event: pb.WatchDeploymentResponse) -> None:
        if event.event.kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
            tables.append(await first_table(stub))
            # Nothing is unloaded while the bake runs: the previous version is the fallback.
            assert not any(digest_of(SKILL, "1.0.0") in e.unloaded for e in env.executors)

    async with Traffic(dispatch) as traffic:
        done, events = await release(env, stub, "2.0.0", on_event)
    assert traffic.failures == []
    assert traffic.versions["2.0.0"] > 0

    assert done.state == ACTIVE and done.serving and done.traffic_weight == 100
    assert steps(done) == [(READY, DEPLOYING), (DEPLOYING, ACTIVE)]
    assert done.verdict == pb.ANALYSIS_VERDICT_PASSED and "blue-green, bake 0.3s passed" in done.verdict_reason
    assert done.blue_green.bake.ToNanoseconds() == 300_000_000 and done.analysis.min_requests == 5
    assert done.stats.requests > 0 and done.stats.failures == 0 and done.stats.success_rate == 1.0
    assert "bake 0.3s passed" in done.history[-1].reason

    # During the bake: the new version takes everything, the previous one stands by for retries.
    assert targets(tables[0]) == [("2.0.0", 100, CANDIDATE), ("1.0.0", 0, STABLE)]
    assert targets(await first_table(stub)) == [("2.0.0", 100, routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED)]

    order = kinds(events)
    assert order.count(K.DEPLOYMENT_EVENT_KIND_PRELOADED) == 2
    assert K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS in order
    pushed = of_kind(events, K.DEPLOYMENT_EVENT_KIND_ROUTE_PUSHED)
    assert [(p.generation, p.weight) for p in pushed] == [(2, 100), (3, 100)]
    acked = of_kind(events, K.DEPLOYMENT_EVENT_KIND_ACKED)
    assert [(a.generation, a.acknowledged, a.dispatchers) for a in acked] == [(2, 1, 1), (3, 1, 1)]
    # The previous version is unloaded only after the bake passed and the final generation was acknowledged.
    final_ack = max(i for i, e in enumerate(events) if e.event.kind == K.DEPLOYMENT_EVENT_KIND_ACKED)
    unloaded = [i for i, e in enumerate(events) if e.event.kind == K.DEPLOYMENT_EVENT_KIND_UNLOADED]
    assert len(unloaded) == 2 and min(unloaded) > final_ack
    assert order.index(K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PASSED) < final_ack
    for executor in env.executors:
        assert digest_of(SKILL, "1.0.0") in executor.unloaded
        assert digest_of(SKILL, "2.0.0") in executor.loaded
    progress = of_kind(events, K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS)
    assert progress[-1].window.ToNanoseconds() == 300_000_000 and progress[-1].weight == 100

    listed = (await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL))).deployments
    assert [(d.version, d.serving, d.traffic_weight) for d in listed] == [("2.0.0", True, 100), ("1.0.0", False, 0)]

    # A manual rollback afterwards loads the unloaded version again before routing to it.
    rolled = await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=5)
    assert rolled.deployment.version == "1.0.0" and rolled.generation == 4
    for executor in env.executors:
        assert digest_of(SKILL, "1.0.0") in executor.loaded


async def assert_rolled_back(env: Env, stub, failed: pb.Deployment, reason: str) -> None:
    assert failed.state == FAILED and not failed.serving and failed.traffic_weight == 0
    assert steps(failed) == FAILED_STEPS
    assert reason in failed.history[-1].reason
    assert "previous version 1.0.0 restored at route generation 3" in failed.history[-1].reason
    assert targets(await first_table(stub)) == [("1.0.0", 100, routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED)]
    listed = (await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL))).deployments
    assert [(d.version, d.state, d.serving) for d in listed] == [("2.0.0", FAILED, False), ("1.0.0", ACTIVE, True)]
    for executor in env.executors:
        assert digest_of(SKILL, "2.0.0") not in executor.loaded
        assert digest_of(SKILL, "1.0.0") in executor.loaded


async def test_a_failure_rate_breach_rolls_back_with_no_failed_request(env: Env) -> None:
    _, stub, dispatch = await platform(env, bake_seconds=10, thresholds=Thresholds(min_requests=10))
    for executor in env.executors:
        executor.modes[digest_of(SKILL, "2.0.0")] = "fail_odd"  # fails on some inputs
    async with Traffic(dispatch) as traffic:
        failed, events = await release(env, stub, "2.0.0")
    # The bad version's failures were retried on 1.0.0: callers saw none.
    assert traffic.failures == []
    await assert_rolled_back(env, stub, failed, "analysis breach: success rate")
    assert failed.verdict == pb.ANALYSIS_VERDICT_FAILED and "success rate" in failed.verdict_reason
    assert failed.stats.failures > 0 and failed.stats.requests >= 10
    breach = of_kind(events, K.DEPLOYMENT_EVENT_KIND_ANALYSIS_BREACH)
    assert len(breach) == 1 and breach[0].stats.success_rate < 0.99
    rollback = of_kind(events, K.DEPLOYMENT_EVENT_KIND_ROLLBACK_STARTED)
    assert rollback and rollback[0].reason.startswith("analysis breach")
    # Ended by the breach, long before the 10 s bake window.
    assert (failed.history[-1].time.ToNanoseconds() - failed.history[0].time.ToNanoseconds()) < 9e9


async def test_a_p99_breach_rolls_back(env: Env) -> None:
    _, stub, dispatch = await platform(env, bake_seconds=10)
    for executor in env.executors:
        executor.delays[digest_of(SKILL, "2.0.0")] = 0.05
    analysis = pb.Analysis(max_p99_latency=seconds(0.01), min_requests=5)
    async with Traffic(dispatch) as traffic:
        failed, _ = await release(env, stub, "2.0.0", analysis=analysis)
    assert traffic.failures == []
    # The p99 is the upper bound of its histogram bucket: at least the 50 ms each call took.
    await assert_rolled_back(env, stub, failed, "analysis breach: p99 latency")
    assert "ms > 10 ms over" in failed.verdict_reason
    assert failed.analysis.max_p99_latency.ToNanoseconds() == 10_000_000
    assert failed.stats.p99_latency.ToNanoseconds() >= 50_000_000 and failed.stats.failures == 0


async def test_an_executor_health_flip_rolls_back(env: Env) -> None:
    _, stub, _ = await platform(env, bake_seconds=10)
    new_digest = digest_of(SKILL, "2.0.0")

    async def on_event(event: pb.WatchDeploymentResponse) -> None:
        if event.event.kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
            await env.executors[1].health.set(new_digest, health_pb2.HealthCheckResponse.NOT_SERVING)

    failed, events = await release(env, stub, "2.0.0", on_event)
    await assert_rolled_back(env, stub, failed, f"executor {env.executors[1].address} reports 2.0.0")
    assert "NOT_SERVING" in failed.history[-1].reason
    flip = of_kind(events, K.DEPLOYMENT_EVENT_KIND_HEALTH_NOT_SERVING)
    assert [f.executor for f in flip] == [env.executors[1].address]


async def test_canary_steps_through_its_weights(env: Env) -> None:
    _, stub, dispatch = await platform(env)
    seen: list[tuple[int, int, list[tuple[str, int, int]]]] = []

    async def on_event(event: pb.WatchDeploymentResponse) -> None:
        if event.event.kind == K.DEPLOYMENT_EVENT_KIND_CANARY_STEP:
            assert event.deployment.traffic_weight == event.event.weight
            seen.append((event.event.step, event.event.weight, targets(await first_table(stub))))

    canary = pb.CanaryStrategy(weights=[20, 50, 100], step=seconds(0.15))
    async with Traffic(dispatch) as traffic:
        done, events = await release(env, stub, "2.0.0", on_event, canary=canary)
    assert traffic.failures == []
    assert done.state == ACTIVE and done.verdict == pb.ANALYSIS_VERDICT_PASSED
    assert list(done.canary.weights) == [20, 50, 100] and done.canary.step.ToNanoseconds() == 150_000_000
    assert seen == [
        (1, 20, [("2.0.0", 20, CANDIDATE), ("1.0.0", 80, STABLE)]),
        (2, 50, [("2.0.0", 50, CANDIDATE), ("1.0.0", 50, STABLE)]),
        (3, 100, [("2.0.0", 100, CANDIDATE), ("1.0.0", 0, STABLE)]),
    ]
    assert all(s.steps == 3 for s in of_kind(events, K.DEPLOYMENT_EVENT_KIND_CANARY_STEP))
    assert traffic.versions["1.0.0"] > 0 and traffic.versions["2.0.0"] > 0
    assert targets(await first_table(stub)) == [("2.0.0", 100, routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED)]


async def test_a_canary_breach_drops_the_canary_weight_to_zero_at_once(env: Env) -> None:
    _, stub, dispatch = await platform(env)
    for executor in env.executors:
        executor.modes[digest_of(SKILL, "2.0.0")] = "trap"
    canary = pb.CanaryStrategy(weights=[10, 50, 100], step=seconds(10))
    async with Traffic(dispatch) as traffic:
        failed, events = await release(env, stub, "2.0.0", canary=canary, analysis=pb.Analysis(min_requests=3))
    assert traffic.failures == []
    await assert_rolled_back(env, stub, failed, "analysis breach: success rate 0.000")
    # One canary step only, then the push that takes the canary's weight to 0.
    assert [s.weight for s in of_kind(events, K.DEPLOYMENT_EVENT_KIND_CANARY_STEP)] == [10]
    assert [p.weight for p in of_kind(events, K.DEPLOYMENT_EVENT_KIND_ROUTE_PUSHED)] == [10, 0]


async def test_manual_rollback_mid_bake_aborts_the_release(env: Env) -> None:
    _, stub, dispatch = await platform(env, bake_seconds=10)
    first = (await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL))).deployments[0]
    rolled: list[pb.RollbackResponse] = []

    async def on_event(event: pb.WatchDeploymentResponse) -> None:
        if event.event.kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
            rolled.append(await stub.Rollback(pb.RollbackRequest(skill=SKILL, request_id="abort-1"), timeout=5))

    async with Traffic(dispatch) as traffic:
        failed, events = await release(env, stub, "2.0.0", on_event)
    assert traffic.failures == []
    await assert_rolled_back(env, stub, failed, "manual rollback requested")
    assert failed.verdict == pb.ANALYSIS_VERDICT_ABORTED
    assert rolled[0].deployment.id == first.id and rolled[0].deployment.serving
    assert rolled[0].generation == 3
    replay = await stub.Rollback(pb.RollbackRequest(skill=SKILL, request_id="abort-1"), timeout=5)
    assert (replay.deployment.id, replay.generation) == (first.id, 3)
    # Nothing left in flight: the skill deploys again.
    for executor in env.executors:
        executor.modes.clear()
    again, _ = await release(env, stub, "3.0.0", **bake(0))
    assert again.state == ACTIVE and again.previous_version == "1.0.0"


class Enough(Exception):
    """Stops following a deployment."""


async def test_manual_rollback_mid_bake_of_a_first_deployment_has_nothing_to_go_back_to(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer(release=Defaults(bake_seconds=10)))
    caught: list[grpc.aio.AioRpcError] = []

    async def on_event(event: pb.WatchDeploymentResponse) -> None:
        if event.event.kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=5)
            caught.append(refused.value)
            # Still a good call: the deployment can be read while it bakes.
            listed = await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL))
            assert listed.deployments[0].verdict == pb.ANALYSIS_VERDICT_RUNNING
            raise Enough

    with pytest.raises(Enough):
        await release(env, stub, "1.0.0", on_event)
    assert_status(caught[0], grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_PREVIOUS_VERSION)


class Clock:
    """A wall clock the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        import time

        return time.time_ns() + self.offset


def retry_delay(err: grpc.aio.AioRpcError) -> float:
    for detail in status_of(err).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo")


async def test_the_circuit_breaker_opens_after_repeated_failures_and_closes_after_the_reset(env: Env) -> None:
    clock = Clock()
    breaker = BreakerSettings(failures=2, window_seconds=600, reset_seconds=300)
    deployer = await env.deployer(breaker=breaker, clock=clock)
    stub = env.deployer_stub(deployer)
    first, _ = await release(env, stub, "1.0.0", **bake(0))
    env.executors[0].fail_load[digest_of(SKILL, "2.0.0")] = ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, Reason.MODULE_INVALID, "the module does not compile")
    for _ in range(2):
        failed, _ = await release(env, stub, "2.0.0", **bake(0))
        assert failed.state == FAILED

    async def refused(stub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="3.0.0"), timeout=5)
        assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPLOYMENT_CIRCUIT_OPEN)
        return caught.value

    err = await refused(stub)
    assert 290 < retry_delay(err) <= 300
    assert error_info(err).metadata["failures"] == "2"
    # Rollback is not a deployment: still allowed (nothing to go back to here, so NO_PREVIOUS_VERSION).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=5)
    assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_PREVIOUS_VERSION)

    # Counted from the persisted history: a restarted deployer keeps the breaker open.
    await deployer.stop(grace=0.2)
    stub = env.deployer_stub(await env.deployer(breaker=breaker, clock=clock))
    clock.offset = int(200e9)
    err = await refused(stub)
    assert 90 < retry_delay(err) <= 100

    # After the reset timeout one deployment may try; it succeeds and the breaker is closed again.
    clock.offset = int(301e9)
    done, _ = await release(env, stub, "3.0.0", **bake(0))
    assert done.state == ACTIVE and done.previous_version == "1.0.0"
    again, _ = await release(env, stub, "1.0.0", **bake(0))
    assert again.state == ACTIVE


async def test_strategy_and_analysis_are_validated(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    cases = [
        ({"canary": pb.CanaryStrategy(weights=[5, 50, 25, 100])}, "canary.weights"),
        ({"canary": pb.CanaryStrategy(weights=[5, 50])}, "canary.weights"),
        ({"canary": pb.CanaryStrategy(weights=[0, 100])}, "canary.weights"),
        ({"canary": pb.CanaryStrategy(weights=[50, 101])}, "canary.weights"),
        ({"canary": pb.CanaryStrategy(step=seconds(-1))}, "canary.step"),
        ({"blue_green": pb.BlueGreenStrategy(bake=seconds(3601))}, "blue_green.bake"),
        ({"analysis": pb.Analysis(min_success_rate=1.5)}, "analysis.min_success_rate"),
        ({"analysis": pb.Analysis(max_p99_latency=seconds(601))}, "analysis.max_p99_latency"),
        ({"analysis": pb.Analysis(min_requests=2_000_000)}, "analysis.min_requests"),
    ]
    for kwargs, field_name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0", **kwargs))
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
        assert [v.field for v in bad_request(caught.value).field_violations] == [field_name], kwargs
    done, _ = await release(env, stub, "1.0.0", canary=pb.CanaryStrategy(weights=[100], step=seconds(0)))
    assert done.state == ACTIVE and list(done.canary.weights) == [100]
    assert done.analysis.min_success_rate == 0.99 and done.analysis.max_p99_latency.seconds == 1


async def test_report_stats_is_validated(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    good = internal_pb.VersionStatsReport(
        skill=SKILL, version="1.0.0", digest=digest_of(SKILL, "1.0.0"), requests=3, failures=1,
        latency=internal_pb.LatencyHistogram(upper_bounds_seconds=[0.1], counts=[3, 0]))
    for request, field_name in [
        (internal_pb.ReportStatsRequest(reports=[good]), "dispatcher_id"),
        (internal_pb.ReportStatsRequest(dispatcher_id="d",
                                        reports=[internal_pb.VersionStatsReport(requests=1, failures=2)]),
         "reports[0].failures"),
        (internal_pb.ReportStatsRequest(dispatcher_id="d", reports=[internal_pb.VersionStatsReport(
            requests=1, latency=internal_pb.LatencyHistogram(upper_bounds_seconds=[0.2, 0.1], counts=[1, 0, 0]))]),
         "reports[0].latency.upper_bounds_seconds"),
        (internal_pb.ReportStatsRequest(dispatcher_id="d", reports=[internal_pb.VersionStatsReport(
            requests=1, latency=internal_pb.LatencyHistogram(upper_bounds_seconds=[0.1], counts=[1]))]),
         "reports[0].latency.counts"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportStats(request, timeout=5)
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
        assert [v.field for v in bad_request(caught.value).field_violations] == [field_name]
    await stub.ReportStats(internal_pb.ReportStatsRequest(dispatcher_id="d", reports=[good]), timeout=5)


async def test_the_gateway_refuses_report_stats(env: Env, start_service) -> None:
    deployer = await env.deployer()
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address="127.0.0.1:1", registry_address=env.registry_address,
        deployer_address=f"127.0.0.1:{deployer.port}", grace_seconds=0.2)))
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    env.channels.append(ch)
    through_gateway = deployer_grpc.DeployerServiceStub(ch)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await deployer_internal_grpc.DeployerInternalServiceStub(ch).ReportStats(
            internal_pb.ReportStatsRequest(dispatcher_id="intruder"), timeout=5)
    assert_status(caught.value, grpc.StatusCode.UNIMPLEMENTED, Reason.METHOD_NOT_EXPOSED)
    # Still relays the public methods.
    listed = await through_gateway.ListDeployments(pb.ListDeploymentsRequest(), timeout=5)
    assert list(listed.deployments) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_deployer_killed_mid_bake_settles_on_restart(env: Env, tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.deployer"], cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "CLAWHUB_INTERNAL_AUTH": "off",
             "CLAWHUB_DEPLOYER_PORT": str(port), "CLAWHUB_DEPLOYER_DATA_DIR": str(env.data_dir),
             "CLAWHUB_REGISTRY_ADDRESS": env.registry_address, "CLAWHUB_DEPLOYER_BAKE": "30",
             "CLAWHUB_EXECUTOR_ADDRESSES": ",".join(e.address for e in env.executors)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        env.channels.append(ch)
        stub = DeployerStub(ch)

        async def up() -> bool:
            try:
                await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=1)
                return True
            except grpc.aio.AioRpcError:
                return False

        await eventually(up, timeout=20, interval=0.1)
        first, _ = await release(env, stub, "1.0.0", **bake(0))
        assert first.state == ACTIVE

        async def on_event(event: pb.WatchDeploymentResponse) -> None:
            if event.event.kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
                assert targets(await first_table(stub)) == [("2.0.0", 100, CANDIDATE), ("1.0.0", 0, STABLE)]
                process.send_signal(signal.SIGKILL)

        with pytest.raises(grpc.aio.AioRpcError):
            await release(env, stub, "2.0.0", on_event)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    stub = env.deployer_stub(await env.deployer())
    listed = (await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL))).deployments
    settled = listed[0]
    assert settled.version == "2.0.0" and settled.state == FAILED and steps(settled) == FAILED_STEPS
    assert settled.history[-1].reason.startswith(
        "deployer restarted mid-deploy; previous version 1.0.0 restored at route generation 3")
    assert settled.verdict == pb.ANALYSIS_VERDICT_ABORTED and settled.blue_green.bake.seconds == 30
    # One route, one version: never two claiming the skill.
    assert targets(await first_table(stub)) == [("1.0.0", 100, routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED)]
    assert [(d.version, d.serving) for d in listed] == [("2.0.0", False), ("1.0.0", True)]


async def test_a_canary_of_the_module_already_serving_is_refused(env: Env) -> None:
    # Same digest (a redeploy with new env or limits): traffic and stats cannot be split from the serving one.
    _, stub, _ = await platform(env)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(
            skill=SKILL, version="1.0.0", canary=pb.CanaryStrategy(weights=[10, 100], step=seconds(1))), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(caught.value)
    assert violations is not None and [v.field for v in violations.field_violations] == ["canary"]
    # The refusal says what to do instead.
    details = caught.value.details() or ""
    assert f"{SKILL}@1.0.0 is the version serving now" in details
    assert "deploy it blue-green (leave out --canary" in details
    assert "publish a new version with a changed module and canary that" in details
    # Blue-green, the same redeploy goes through.
    done, _ = await release(env, stub, "1.0.0", **bake(0))
    assert done.state == ACTIVE


async def test_a_bake_with_too_few_calls_is_not_analysed_and_still_goes_active(env: Env) -> None:
    _, stub, dispatch = await platform(env, bake_seconds=0.2)
    quiet, events = await release(env, stub, "2.0.0")
    assert quiet.state == ACTIVE and quiet.serving
    assert quiet.verdict == pb.ANALYSIS_VERDICT_NOT_ANALYSED
    assert quiet.verdict_reason == "not analysed: no traffic (blue-green, bake 0.2s)"
    assert K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PASSED not in kinds(events)
    [not_analysed] = of_kind(events, K.DEPLOYMENT_EVENT_KIND_NOT_ANALYSED)
    assert not_analysed.reason == quiet.verdict_reason and not_analysed.stats.requests == 0
    assert "; not analysed: no traffic (blue-green, bake 0.2s); route generation" in quiet.history[-1].reason
    assert "passed" not in quiet.history[-1].reason

    # Some calls, but fewer than min_requests: nothing was judged either.
    async with Traffic(dispatch):
        few, _ = await release(env, stub, "3.0.0", analysis=pb.Analysis(min_requests=1_000_000))
    assert few.state == ACTIVE and few.verdict == pb.ANALYSIS_VERDICT_NOT_ANALYSED
    assert few.stats.requests > 0
    assert few.verdict_reason == (f"not analysed: {few.stats.requests} call{'s' if few.stats.requests > 1 else ''}, "
                                  "fewer than min_requests 1000000 (blue-green, bake 0.2s)")

    # No bake window at all.
    unbaked, _ = await release(env, stub, "2.0.0", **bake(0))
    assert unbaked.verdict == pb.ANALYSIS_VERDICT_NOT_ANALYSED
    assert unbaked.verdict_reason == "not analysed: no bake window (blue-green, bake 0s)"


async def test_an_unreachable_executor_does_not_fail_a_deploy(env: Env) -> None:
    """An executor that is down (connection refused) is skipped by the preload: the other one carries the
    release. When no executor can be reached, the deploy fails."""
    stub = env.deployer_stub(await env.deployer())
    await env.executors[0].host.stop(grace=None)
    done, events = await release(env, stub, "1.0.0", **bake(0))
    assert done.state == ACTIVE, done
    messages = [e.event.reason for e in events if e.HasField("event")]
    assert any(env.executors[0].address in m and "is unreachable, skipped" in m for m in messages), messages
    assert env.executors[1].loaded == {digest_of(SKILL, "1.0.0")}

    await env.executors[1].host.stop(grace=None)
    failed, _ = await release(env, stub, "2.0.0", **bake(0))
    assert failed.state == FAILED, failed
