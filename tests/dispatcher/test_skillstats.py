"""The dispatcher's rolling per-skill stats behind `clawhub top`: the window, percentiles, errors by reason,
bounded memory, the version a route serves, and executors named by position."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from clawhub.common.v1 import observability_pb2, routing_pb2

from services.dispatcher.skillstats import (
    SkillStats,
    active_version,
    bucket,
    bucket_value,
    executor_loads,
    reason_of,
    to_proto,
)
from services.runtime.errors import Reason, ServiceError

SKILL = "com.example.echo"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_calls_leave_the_window_after_it_and_an_idle_skill_is_forgotten() -> None:
    clock = Clock()
    stats = SkillStats(window=60, clock=clock)
    clock.now += 100  # long after start: rates are over the full window
    stats.record(SKILL, 0.001)
    clock.now += 30
    stats.record(SKILL, 0.001, Reason.SKILL_TIMEOUT)
    stats.record(SKILL, 0.001)
    summary = stats.snapshot()[SKILL]
    assert (summary.calls, summary.errors) == (3, 1)
    assert summary.calls_per_second == pytest.approx(3 / 60)
    clock.now += 30.5  # the first call's second is out of the window, the others are in
    summary = stats.snapshot()[SKILL]
    assert (summary.calls, summary.errors) == (2, 1)
    clock.now += 30
    assert stats.snapshot() == {} and not stats.knows(SKILL)


def test_a_slot_is_reused_a_window_later_without_its_old_calls() -> None:
    clock = Clock(2000.0)
    stats = SkillStats(window=10, clock=clock)
    for _ in range(5):
        stats.record(SKILL, 0.002)
    clock.now += 10  # the same slot of the ring, one window later
    stats.record(SKILL, 0.002)
    assert stats.snapshot()[SKILL].calls == 1


def test_rates_right_after_start_are_over_the_time_there_was() -> None:
    clock = Clock()
    stats = SkillStats(window=60, clock=clock)
    clock.now += 10
    for _ in range(50):
        stats.record(SKILL, 0.001)
    assert stats.snapshot()[SKILL].calls_per_second == pytest.approx(5.0)


@pytest.mark.parametrize("seconds", [3e-6, 0.00042, 0.0071, 0.25, 4.0, 95.0])
def test_a_bucket_stands_for_its_latencies_within_five_percent(seconds: float) -> None:
    assert bucket_value(bucket(seconds)) == pytest.approx(seconds, rel=0.05)


def test_percentiles_from_the_merged_window() -> None:
    clock = Clock(5000.0)
    stats = SkillStats(window=60, clock=clock)
    for i in range(98):
        stats.record(SKILL, 0.0004 if i % 2 else 0.0006)
        clock.now += 0.25  # spread over several seconds: percentiles merge every slot
    stats.record(SKILL, 0.8)
    stats.record(SKILL, 0.9)
    summary = stats.snapshot()[SKILL]
    assert summary.calls == 100
    assert 0.0004 * 0.95 <= summary.p50_seconds <= 0.0006 * 1.05
    # Rank 99 of 100 is the first slow call.
    assert summary.p99_seconds == pytest.approx(0.8, rel=0.05)
    message = to_proto(SKILL, summary, 60, "1.0.0")
    assert message.p99_ms == pytest.approx(800, rel=0.05) and message.window_seconds == 60


def test_errors_are_counted_by_reason() -> None:
    clock = Clock()
    stats = SkillStats(clock=clock)
    stats.record(SKILL, 0.01, Reason.OUTPUT_LIMIT_EXCEEDED)
    clock.now += 1
    stats.record(SKILL, 0.01, Reason.OUTPUT_LIMIT_EXCEEDED)
    stats.record(SKILL, 0.02, "UNAVAILABLE")
    stats.record(SKILL, 0.01)
    stats.record("com.example.other", 0.01)
    snapshot = stats.snapshot()
    assert snapshot[SKILL].errors == 3 and snapshot[SKILL].calls == 4
    assert snapshot[SKILL].errors_by_reason == {"OUTPUT_LIMIT_EXCEEDED": 2, "UNAVAILABLE": 1}
    assert snapshot["com.example.other"].errors_by_reason == {}
    assert set(stats.snapshot(SKILL)) == {SKILL}
    message = to_proto(SKILL, snapshot[SKILL], 60, "")
    assert dict(message.errors_by_reason) == {"OUTPUT_LIMIT_EXCEEDED": 2, "UNAVAILABLE": 1}


def test_at_most_max_skills_are_kept_and_idle_ones_make_room() -> None:
    clock = Clock()
    stats = SkillStats(window=5, clock=clock, max_skills=2)
    stats.record("a.b.one", 0.001)
    stats.record("a.b.two", 0.001)
    stats.record("a.b.three", 0.001)
    assert set(stats.snapshot()) == {"a.b.one", "a.b.two"}
    clock.now += 10  # both idle now
    stats.record("a.b.three", 0.001)
    assert set(stats.snapshot()) == {"a.b.three"}


def test_reason_of_each_kind_of_failure() -> None:
    assert reason_of(ServiceError(grpc.StatusCode.ABORTED, Reason.SKILL_TRAPPED, "trapped")) == "SKILL_TRAPPED"
    bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
    assert reason_of(bare) == "UNAVAILABLE"
    assert reason_of(asyncio.CancelledError()) == "CANCELLED"
    assert reason_of(RuntimeError("bug")) == "UNKNOWN"


STABLE = routing_pb2.ROUTE_TARGET_ROLE_STABLE


def _target(version: str, weight: int, role: routing_pb2.RouteTargetRole.ValueType = STABLE,
            ) -> routing_pb2.RouteTarget:
    return routing_pb2.RouteTarget(version=version, weight=weight, role=role)


def test_active_version_is_the_candidate_during_a_release_else_the_heaviest_target() -> None:
    candidate = routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE
    assert active_version(None) == ""
    assert active_version(routing_pb2.Route(skill=SKILL)) == ""
    assert active_version(routing_pb2.Route(skill=SKILL, targets=[_target("1.0.0", 100)])) == "1.0.0"
    canary = routing_pb2.Route(skill=SKILL, targets=[_target("1.0.0", 95), _target("2.0.0", 5, candidate)])
    assert active_version(canary) == "2.0.0"
    preloading = routing_pb2.Route(skill=SKILL, targets=[_target("1.0.0", 100), _target("2.0.0", 0, candidate)])
    assert active_version(preloading) == "1.0.0"
    assert active_version(routing_pb2.Route(skill=SKILL, targets=[_target("1.0.0", 30), _target("1.1.0", 70)])) \
        == "1.1.0"


class Loads:
    """Executors as GetSkillStats asks them: the second one is down, the third one too slow."""

    addresses = ("10.0.0.7:50055", "10.0.0.8:50055", "10.0.0.9:50055")

    async def get_load(self, address: str, *, timeout: float) -> observability_pb2.ExecutorLoad:
        if address != self.addresses[0]:
            code = grpc.StatusCode.UNAVAILABLE if address == self.addresses[1] else grpc.StatusCode.DEADLINE_EXCEEDED
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no answer")
        return observability_pb2.ExecutorLoad(reachable=True, busy_threads=1, threads=4, queued=0,
                                              queue_capacity=64)


async def test_executors_are_named_by_position_and_the_silent_ones_unreachable() -> None:
    loads = await executor_loads(Loads(), timeout=0.05)
    assert [load.executor for load in loads] == ["executor-1", "executor-2", "executor-3"]
    assert [load.reachable for load in loads] == [True, False, False]
    assert (loads[0].busy_threads, loads[0].threads, loads[0].queue_capacity) == (1, 4, 64)
    assert loads[1].threads == 0
    assert all("10.0.0" not in str(load) for load in loads)
