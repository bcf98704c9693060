"""The shared router (services/runtime/routing.py) with its backpressure, retry budget and ejection, against
executors that misbehave on purpose. The executors here are in-process implementations of the router's
ExecutorClient protocol (the gRPC client is covered by the chain tests in tests/gateway and tests/dispatcher):
what is tested is the router's choices, which need executors that fail exactly as told."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import grpc
import pytest
from clawhub.common.v1 import observability_pb2, routing_pb2
from clawhub.executor.v1 import executor_service_pb2 as executor_pb

from services.runtime.callstats import SkillCallDeltas, VersionStats
from services.runtime.errors import Reason, ServiceError, error_info
from services.runtime.executors import ExecutorPicker, LogStream
from services.runtime.routing import Router, RouteState

SKILL = "com.example.echo"


class Unavailable(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")


class Executors:
    """Executors by address: `down` ones answer UNAVAILABLE, the others echo after `delay` seconds."""

    def __init__(self, addresses: tuple[str, ...], *, down: frozenset[str] = frozenset(), delay: float = 0.0):
        self._addresses = addresses
        self.down = down
        self.delay = delay
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.peak = 0

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    async def execute(self, address: str, request: executor_pb.ExecuteRequest, *, timeout: float,
                      metadata: tuple[tuple[str, str], ...] = ()) -> executor_pb.ExecuteResponse:
        self.calls[address] += 1
        if address in self.down:
            raise Unavailable()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return executor_pb.ExecuteResponse(output=request.input)

    async def get_load(self, address: str, *, timeout: float) -> observability_pb2.ExecutorLoad:
        return observability_pb2.ExecutorLoad()

    def tail_logs(self, address: str, request: executor_pb.TailSkillLogsRequest, *,
                  metadata: tuple[tuple[str, str], ...] = ()) -> LogStream:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def router(executors: Executors, *, retries: int = 2) -> Router:
    routes = RouteState()
    routes.apply(routing_pb2.RouteTable(generation=1, routes=[routing_pb2.Route(skill=SKILL, targets=[
        routing_pb2.RouteTarget(version="1.0.0", digest="sha256:" + "a" * 64, weight=100)])]))
    picker = ExecutorPicker(executors.addresses, rng=random.Random(7))
    return Router(routes, executors, picker, retries=retries, default_timeout=5.0, stats=VersionStats(),
                  skills=SkillCallDeltas(), rng=random.Random(7))


async def call(r: Router, timeout: float | None = 5.0) -> bytes:
    routed = await r.invoke(SKILL, b"x", "req", time_remaining=lambda: timeout, metadata=())
    return routed.output


async def test_an_executor_that_keeps_failing_is_ejected_and_calls_go_elsewhere_first_time() -> None:
    executors = Executors(("good:1", "bad:1"), down=frozenset({"bad:1"}))
    r = router(executors)
    for _ in range(40):
        assert await call(r) == b"x"  # retried on the good one when the bad one was tried
    failures_so_far = executors.calls["bad:1"]
    assert failures_so_far >= 5 and "bad:1" in r.picker.outliers.ejected()
    for _ in range(40):
        await call(r)
    # Ejected for a second (and longer each time): at most a probe reached it meanwhile.
    assert executors.calls["bad:1"] - failures_so_far <= 1


async def test_retries_are_bounded_by_the_budget_when_every_executor_is_down() -> None:
    executors = Executors(("a:1", "b:1"), down=frozenset({"a:1", "b:1"}))
    r = router(executors, retries=2)
    for _ in range(600):
        with pytest.raises(ServiceError) as caught:
            await call(r)
        assert caught.value.reason == Reason.NO_EXECUTOR_AVAILABLE
    attempts = sum(executors.calls.values())
    # Without a budget: 3 attempts per call (1,800). With it: the calls, 20% of them, and the reserve of 100.
    assert 600 <= attempts <= 600 + 0.2 * 600 + 100 + 5, attempts


async def test_calls_beyond_the_limit_wait_at_the_router_and_those_that_cannot_start_in_time_are_shed() -> None:
    executors = Executors(("only:1",), delay=0.2)
    r = router(executors)
    results = await asyncio.gather(*(call(r, timeout=0.5) for _ in range(120)), return_exceptions=True)
    shed = [e for e in results if isinstance(e, ServiceError)]
    done = [x for x in results if x == b"x"]
    assert done and shed and len(done) + len(shed) == len(results), Counter(type(x).__name__ for x in results)
    # Never more in flight at the executor than the limit allows (it starts at 32).
    assert executors.peak <= 32
    for error in shed:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == Reason.EXECUTOR_OVERLOADED
        assert error.retry_after_seconds is not None and error.retry_after_seconds > 0
        status = error.to_status("dispatcher.clawhub")
        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


async def test_a_call_with_time_to_wait_is_not_refused() -> None:
    executors = Executors(("only:1",), delay=0.01)
    r = router(executors)
    results = await asyncio.gather(*(call(r, timeout=10) for _ in range(300)))
    assert results == [b"x"] * 300


def test_unavailable_error_carries_no_error_info() -> None:
    assert error_info(Unavailable()) is None
