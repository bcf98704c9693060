"""The dispatcher during a release: weighted targets, the candidate's failed calls retried on the stable
version, and per-version stats reported to the deployer."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from clawhub.common.v1 import routing_pb2, skill_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from services.dispatcher.server import build_server
from services.dispatcher.servicer import pick_target
from services.dispatcher.settings import Settings
from services.runtime.errors import Reason, error_info
from services.runtime.latency import BOUNDS_SECONDS
from tests.deployer.fakes import SKILL, FakeDeployer, FakeExecutor, Fakes, Starter, digest_of, eventually

DISPATCHER_ID = "dispatcher-release"
CANDIDATE = routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE
STABLE = routing_pb2.ROUTE_TARGET_ROLE_STABLE
OLD, NEW = "1.0.0", "2.0.0"


def target(version: str, weight: int, role: int = routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED,
           ) -> routing_pb2.RouteTarget:
    return routing_pb2.RouteTarget(version=version, digest=digest_of(SKILL, version), weight=weight, role=role,
                                   limits=skill_pb2.Limits(memory_bytes=2 << 20))


def table(generation: int, *targets: routing_pb2.RouteTarget) -> routing_pb2.RouteTable:
    return routing_pb2.RouteTable(generation=generation, routes=[routing_pb2.Route(skill=SKILL, targets=targets)])


@dataclass
class Env:
    fakes: Fakes
    deployer: FakeDeployer
    deployer_port: int
    executors: list[FakeExecutor]
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def dispatcher(self, *, rng: random.Random | None = None) -> pb_grpc.DispatcherServiceStub:
        settings = Settings(host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{self.deployer_port}",
                            executor_addresses=tuple(e.address for e in self.executors),
                            dispatcher_id=DISPATCHER_ID, retries=2, dispatch_timeout=10.0, grace=0.2,
                            stats_interval=0.02)
        host = await self.fakes.start_service(build_server(settings, rng=rng))
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        self.channels.append(ch)
        stub = pb_grpc.DispatcherServiceStub(ch)
        wanted = self.deployer.table.generation

        async def current() -> bool:
            return (await stub.GetRouteTable(pb.GetRouteTableRequest())).route_table.generation == wanted

        await eventually(current)
        return stub

    def executions(self, version: str) -> int:
        return sum(1 for e in self.executors for x in e.executions if x.request.digest == digest_of(SKILL, version))

    def totals(self, version: str) -> Counter[str]:
        """Every stats report about `version` added up."""
        total: Counter[str] = Counter()
        for request in self.deployer.stats:
            assert request.dispatcher_id == DISPATCHER_ID
            for report in request.reports:
                if report.version == version:
                    assert (report.skill, report.digest) == (SKILL, digest_of(SKILL, version))
                    total["requests"] += report.requests
                    total["failures"] += report.failures
                    total["retried"] += report.retried
                    total["histogram"] += sum(report.latency.counts)
        return total


@pytest.fixture
async def env(start_service: Starter) -> AsyncIterator[Env]:
    fakes = Fakes(start_service)
    deployer = FakeDeployer(table(1, target(NEW, 100, CANDIDATE), target(OLD, 0, STABLE)))
    host = await fakes.deployer(deployer)
    executors = [await fakes.executor(), await fakes.executor()]
    environment = Env(fakes, deployer, host.port, executors)
    yield environment
    for ch in environment.channels:
        await ch.close()


async def test_a_failing_candidate_is_retried_on_the_stable_version_and_counted(env: Env) -> None:
    for executor in env.executors:
        executor.modes[digest_of(SKILL, NEW)] = "trap"
    stub = await env.dispatcher()
    for index in range(10):
        response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"%d" % index), timeout=5)
        # The caller never sees the candidate's failure: the stable version answered.
        assert (response.output, response.version) == (b"echo:%d" % index, OLD)
    assert env.executions(NEW) == 10 and env.executions(OLD) == 10

    async def reported() -> bool:
        return env.totals(NEW)["requests"] == 10 and env.totals(OLD)["requests"] == 10

    await eventually(reported)
    assert env.totals(NEW) == Counter(requests=10, failures=10, retried=10, histogram=10)
    assert env.totals(OLD) == Counter(requests=10, histogram=10)


async def test_a_failed_candidate_call_is_logged_on_one_line_with_code_and_details(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    for executor in env.executors:
        executor.modes[digest_of(SKILL, NEW)] = "trap"
    stub = await env.dispatcher()
    with caplog.at_level(logging.INFO, logger="clawhub.dispatcher"):
        response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert response.version == OLD
    [line] = [r.getMessage() for r in caplog.records if "retrying on stable" in r.getMessage()]
    # Not the multi-line repr of the AioRpcError: its code, reason and details, on one line.
    assert line == (f"{SKILL}@{NEW} failed (ABORTED SKILL_TRAPPED: the skill trapped: wasm `unreachable` executed); "
                    f"retrying on stable {OLD}")


async def test_only_skill_and_executor_failures_are_retried(env: Env) -> None:
    new_digest = digest_of(SKILL, NEW)
    for executor in env.executors:
        executor.modes[new_digest] = "bad_input"
    stub = await env.dispatcher()
    # A caller error is the caller's: passed through, not retried, not counted against the version.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == Reason.INVALID_INPUT
    assert env.executions(OLD) == 0

    # Without a release under analysis (no roles), a failure is the caller's answer, as before.
    env.deployer.set_table(table(2, target(NEW, 100)))

    async def on_generation_2() -> bool:
        return (await stub.GetRouteTable(pb.GetRouteTableRequest())).route_table.generation == 2

    await eventually(on_generation_2)
    for executor in env.executors:
        executor.modes[new_digest] = "trap"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value).reason == Reason.SKILL_TRAPPED
    assert env.executions(OLD) == 0

    async def counted() -> bool:
        return env.totals(NEW)["requests"] == 1

    await eventually(counted)
    assert env.totals(NEW) == Counter(requests=1, failures=1, histogram=1)
    # Still serving a good call.
    for executor in env.executors:
        executor.modes.clear()
    response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"ok"), timeout=5)
    assert (response.output, response.version) == (b"echo:ok", NEW)


async def test_the_retry_on_the_stable_version_keeps_the_callers_deadline(env: Env) -> None:
    new_digest = digest_of(SKILL, NEW)
    for executor in env.executors:
        executor.modes[new_digest] = "trap"
        executor.delays[new_digest] = 0.2
    stub = await env.dispatcher()
    response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"a"), timeout=2)
    assert response.version == OLD
    retry = next(x for e in env.executors for x in e.executions if x.request.digest == digest_of(SKILL, OLD))
    # What the candidate used up is gone from the retry's budget.
    assert retry.time_remaining is not None and retry.time_remaining < 1.85

    async def first_counted() -> bool:
        return env.totals(NEW)["failures"] == 1

    # The first failure's report arrives on its own schedule (a busy machine delays it): wait for it, or it
    # would land after `before` is read below.
    await eventually(first_counted)

    # A candidate that hangs: it gets half the caller's budget, then the call is counted as its failure and
    # the stable version answers within the other half.
    for executor in env.executors:
        executor.modes.clear()
        executor.delays[new_digest] = 5.0
    before = env.totals(NEW)["failures"]
    response = await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"b"), timeout=1.0)
    assert response.version == OLD
    assert env.executions(OLD) == 2

    async def counted() -> bool:
        return env.totals(NEW)["failures"] == before + 1

    await eventually(counted)
    # A stable version slower than what is left of the deadline: the caller's deadline still ends the call.
    for executor in env.executors:
        executor.delays[digest_of(SKILL, OLD)] = 5.0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"c"), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_stats_reports_carry_counts_latency_and_p99(env: Env) -> None:
    env.deployer.set_table(table(2, target(NEW, 100, CANDIDATE), target(OLD, 0, STABLE)))
    for executor in env.executors:
        executor.delays[digest_of(SKILL, NEW)] = 0.03
    stub = await env.dispatcher()
    await asyncio.gather(*(stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
                           for _ in range(20)))

    async def reported() -> bool:
        return env.totals(NEW)["requests"] == 20

    await eventually(reported)
    assert env.totals(NEW) == Counter(requests=20, histogram=20)
    reports = [r for request in env.deployer.stats for r in request.reports if r.version == NEW]
    for report in reports:
        assert list(report.latency.upper_bounds_seconds) == list(BOUNDS_SECONDS)
        assert len(report.latency.counts) == len(BOUNDS_SECONDS) + 1
        # Every call took at least 30 ms: nothing lands in the buckets below it.
        assert sum(report.latency.counts[:BOUNDS_SECONDS.index(0.02) + 1]) == 0
        assert report.p99_latency.ToNanoseconds() >= 30_000_000
    # Idle: no more reports once the calls stop.
    await asyncio.sleep(0.1)
    sent = len(env.deployer.stats)
    await asyncio.sleep(0.1)
    assert len(env.deployer.stats) == sent


def test_weighted_pick_is_within_three_points_over_1000_seeded_picks() -> None:
    for weights in [(5, 95), (25, 75), (50, 50), (10, 20, 70)]:
        targets = [target(f"{i}.0.0", w) for i, w in enumerate(weights, start=1)]
        rng = random.Random(20261123)
        picks = Counter(pick_target(targets, rng).version for _ in range(1000))
        for t in targets:
            assert abs(picks[t.version] / 1000 - t.weight / sum(weights)) <= 0.03, (weights, picks)


async def test_the_dispatcher_honours_canary_weights(env: Env) -> None:
    env.deployer.set_table(table(2, target(NEW, 25, CANDIDATE), target(OLD, 75, STABLE)))
    stub = await env.dispatcher(rng=random.Random(5))
    versions: Counter[str] = Counter()
    for _ in range(10):
        responses = await asyncio.gather(*(stub.Dispatch(pb.DispatchRequest(skill=SKILL, input=b"w"), timeout=5)
                                           for _ in range(100)))
        versions.update(r.version for r in responses)
    assert abs(versions[NEW] / 1000 - 0.25) <= 0.03, versions
    assert versions[NEW] + versions[OLD] == 1000
