"""The worker pool's admission (docs/executor-scheduling.md): calls wait instead of being refused, are shed with
EXECUTOR_OVERLOADED and RetryInfo only when their deadline cannot be met or the waiting bound is reached, leave
the queue when cancelled, and skills share the threads fairly."""

from __future__ import annotations

import asyncio
import struct
import threading

import grpc
import pytest
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.executor.scheduling import WorkerPool
from services.executor.settings import Settings
from services.runtime.errors import error_info, status_of
from tests.executor import fixtures as f
from tests.executor.conftest import Executor, limits

GENEROUS_QUEUE = Settings().queue


async def skill(ex: Executor, name: str, module: bytes, **fields: object) -> pb.ExecuteRequest:
    """An Execute request of skill `name` (published as 1.0.0 running `module`), its module loaded."""
    digest = ex.source.add(module)
    assert ex.assigned is not None
    ex.assigned.publish(name, "1.0.0", digest)
    await ex.stub.LoadSkill(pb.LoadSkillRequest(digest=digest, skill=name, version="1.0.0"), timeout=5)
    return pb.ExecuteRequest(digest=digest, skill=name, version="1.0.0", **fields)


async def until_load(ex: Executor, busy: int, queued: int) -> None:
    """Poll GetLoad until the pool shows `busy` threads and `queued` waiting calls (calls arrive asynchronously)."""
    load = None
    for _ in range(500):
        load = (await ex.stub.GetLoad(pb.GetLoadRequest(), timeout=5)).load
        if (load.busy_threads, load.queued) == (busy, queued):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the pool never showed {busy} busy and {queued} queued; last: {load}")


def overloaded(outcome: object) -> tuple[str, str]:
    """(cause, details) of an EXECUTOR_OVERLOADED refusal that carries RetryInfo; fails on anything else."""
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    info = error_info(outcome)
    assert (outcome.code(), info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "EXECUTOR_OVERLOADED"), outcome
    assert any(d.type_url.endswith("google.rpc.RetryInfo") for d in status_of(outcome).details)
    return info.metadata["cause"], outcome.details() or ""


async def cancel_all(calls: list[asyncio.Future[object]]) -> None:
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def test_another_skill_is_served_while_one_skill_fills_every_thread(make_executor) -> None:
    ex = await make_executor(threads=2, queue=GENEROUS_QUEUE)
    loops = await skill(ex, "a.loops", f.INFINITE_LOOP, limits=limits(timeout_ms=1000))
    echo = await skill(ex, "b.echo", f.ECHO, input=b"hi")
    # Twenty one-second loops of a module that has not run here yet (so it counts as slow): one runs, nineteen
    # wait, and the other thread is kept for quick calls (docs/executor-scheduling.md, "Headroom").
    hostile = [asyncio.ensure_future(ex.stub.Execute(loops, timeout=60)) for _ in range(20)]
    try:
        await until_load(ex, busy=1, queued=19)
        served = await asyncio.gather(*(ex.stub.Execute(echo, timeout=30) for _ in range(10)),
                                      return_exceptions=True)
        assert [getattr(r, "output", r) for r in served] == [b"ok:hi"] * 10
        # The echo calls ran on the kept thread, not after the loops queued before them: first come, first
        # served would have run the nineteen waiting loops (nineteen seconds on one thread) first.
        assert sum(not call.done() for call in hostile) >= 17
    finally:
        await cancel_all(hostile)
    await until_load(ex, busy=0, queued=0)  # cancelled loops left the queue, running ones were stopped


def test_the_reserve_is_one_thread_when_there_are_two_or_more() -> None:
    pools = [WorkerPool(threads=n, queue=1) for n in (1, 2, 8)]
    pools += [WorkerPool(threads=8, queue=1, reserve=3), WorkerPool(threads=2, queue=1, reserve=5)]
    try:
        assert [pool.reserve for pool in pools] == [0, 1, 1, 3, 1]
    finally:
        for pool in pools:
            pool.shutdown()


async def test_200_concurrent_calls_on_two_threads_all_wait_their_turn(make_executor) -> None:
    ex = await make_executor(threads=2, queue=GENEROUS_QUEUE)
    echo = await skill(ex, "fast.echo", f.ECHO, input=b"x")
    outcomes = await asyncio.gather(*(ex.stub.Execute(echo, timeout=30) for _ in range(200)),
                                    return_exceptions=True)
    refused = [o for o in outcomes if not isinstance(o, pb.ExecuteResponse)]
    assert refused == []
    assert {o.output for o in outcomes if isinstance(o, pb.ExecuteResponse)} == {b"ok:x"}


async def test_a_call_that_cannot_meet_its_deadline_is_shed_not_timed_out(make_executor) -> None:
    ex = await make_executor(threads=1, queue=GENEROUS_QUEUE)
    loops = await skill(ex, "slow.loops", f.INFINITE_LOOP, limits=limits(timeout_ms=1000))
    echo = await skill(ex, "quick.echo", f.ECHO, input=b"q")
    # One run teaches the pool that this module takes a second.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ex.stub.Execute(loops, timeout=10)
    assert error_info(caught.value).reason == "SKILL_TIMEOUT"
    # A call that holds the only thread for five seconds; its module has never run, so its end is not foreseen.
    hog = await skill(ex, "busy.countdown", f.COUNTDOWN, input=struct.pack("<I", 0xFFFF_FFFF),
                      limits=limits(timeout_ms=5000))
    holding = asyncio.ensure_future(ex.stub.Execute(hog, timeout=10))
    try:
        await until_load(ex, busy=1, queued=0)
        # A one-second skill with 0.8 s left: shed on arrival.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ex.stub.Execute(loops, timeout=0.8)
        cause, details = overloaded(caught.value)
        assert cause == "deadline" and "would wait and run about" in details
        # A fast call waits, and is shed just before its deadline (the hog still holds the thread) with an
        # answer it can act on instead of DEADLINE_EXCEEDED.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ex.stub.Execute(echo, timeout=1.0)
        cause, details = overloaded(caught.value)
        assert cause == "deadline" and "waited for a worker thread" in details
        await until_load(ex, busy=1, queued=0)
    finally:
        await cancel_all([holding])
    assert (await ex.stub.Execute(echo, timeout=5)).output == b"ok:q"


async def test_a_cancelled_waiting_call_gives_its_place_back(make_executor) -> None:
    ex = await make_executor(threads=1, queue=1)
    loops = await skill(ex, "slow.loops", f.INFINITE_LOOP, limits=limits(timeout_ms=10_000))
    echo = await skill(ex, "quick.echo", f.ECHO, input=b"e")
    holding = asyncio.ensure_future(ex.stub.Execute(loops, timeout=20))
    waiting: asyncio.Future[object] = asyncio.Future()
    try:
        await until_load(ex, busy=1, queued=0)
        waiting = asyncio.ensure_future(ex.stub.Execute(echo, timeout=20))
        await until_load(ex, busy=1, queued=1)
        # The one waiting place is taken: the hard bound sheds the next call.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ex.stub.Execute(echo, timeout=20)
        assert overloaded(caught.value)[0] == "queue_full"
        await cancel_all([waiting])
        await until_load(ex, busy=1, queued=0)
        # Its place is free again: the next call waits rather than being shed, and runs once the thread frees.
        again = asyncio.ensure_future(ex.stub.Execute(echo, timeout=20))
        await until_load(ex, busy=1, queued=1)
        await cancel_all([holding])
        assert (await again).output == b"ok:e"
    finally:
        await cancel_all([holding, waiting])


async def test_freed_threads_go_to_the_waiting_skill_holding_fewest_round_robin() -> None:
    pool = WorkerPool(threads=1, queue=100)
    ran: list[str] = []
    gate = threading.Event()

    def work(name: str) -> str:
        if not ran:
            gate.wait(5)  # the first call holds the only thread until everything is queued
        ran.append(name)
        return name

    try:
        names = ["a1", "a2", "a3", "b1", "b2", "b3", "c1"]
        calls = []
        for name in names:
            calls.append(asyncio.ensure_future(pool.run(lambda n=name: work(n), key=name[0])))  # type: ignore[misc]
            while pool.admitted < len(calls) or pool.load()[0] < 1:  # in order, a1 running before a2 queues
                await asyncio.sleep(0.005)
        while pool.load() != (1, 6):
            await asyncio.sleep(0.005)
        gate.set()
        assert await asyncio.gather(*calls) == names
        # Skills take turns; within a skill, calls run in the order they came.
        assert ran == ["a1", "a2", "b1", "c1", "a3", "b2", "b3"]
        assert pool.load() == (0, 0)
    finally:
        gate.set()
        await asyncio.to_thread(pool.shutdown)
