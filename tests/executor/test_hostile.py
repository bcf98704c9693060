"""Hostile modules the earlier tests do not cover; each must leave the executor serving the next call."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import grpc
import pytest
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.executor.sandbox import RunControl, RunLimits, Sandbox, Verdict
from services.runtime.errors import error_info
from tests.executor import fixtures as f
from tests.executor.conftest import Executor, limits

MiB = 1024 * 1024


async def still_works(ex: Executor, timeout: float = 5) -> None:
    digest = ex.source.add(f.ECHO)
    response = await ex.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"alive"), timeout=timeout)
    assert response.output == b"ok:alive"


async def refused(ex: Executor, module: bytes, **fields: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    digest = ex.source.add(module)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ex.stub.Execute(pb.ExecuteRequest(digest=digest, **fields), timeout=10)
    info = error_info(caught.value)
    return caught.value.code(), info.reason, dict(info.metadata)


async def test_100_mb_of_output_is_stopped_by_the_output_cap_fast(executor: Executor) -> None:
    started = time.monotonic()
    code, reason, meta = await refused(executor, f.OUTPUT_100MB)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUTPUT_LIMIT_EXCEEDED")
    assert meta["max_output_bytes"] == str(4 * MiB)  # the executor's default cap
    assert time.monotonic() - started < 1.5
    await still_works(executor)


async def test_stderr_forever_is_stopped_by_the_stderr_limit(executor: Executor) -> None:
    started = time.monotonic()
    code, reason, meta = await refused(executor, f.STDERR_FOREVER, limits=limits(timeout_ms=5000, stderr=4096))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STDERR_LIMIT_EXCEEDED")
    assert 0 < len(meta["stderr_tail"]) <= 1024
    assert time.monotonic() - started < 2  # stopped at the next slice, not at the 5 s timeout
    await still_works(executor)


@pytest.mark.parametrize("memory, expected", [(16 * MiB, "MEMORY_LIMIT_EXCEEDED"), (64 * MiB, None)])
async def test_huge_module_is_handled_within_limits(executor: Executor, memory: int, expected: str | None) -> None:
    # 30 MB of data segment: it compiles, and runs only where its initial memory fits the limit.
    module = f.huge_data_module(30 * MiB)
    digest = executor.source.add(module)
    request = pb.ExecuteRequest(digest=digest, limits=limits(memory=memory))
    started = time.monotonic()
    if expected is None:
        response = await executor.stub.Execute(request, timeout=20)
        assert response.usage.peak_memory_bytes >= 30 * MiB
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await executor.stub.Execute(request, timeout=20)
        assert error_info(caught.value).reason == expected
    assert time.monotonic() - started < 10
    await still_works(executor)


async def test_memory_growth_bomb_with_a_large_limit(executor: Executor) -> None:
    code, reason, _ = await refused(executor, f.MEMORY_BOMB, limits=limits(memory=256 * MiB))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT_EXCEEDED")
    await still_works(executor)


async def test_200_concurrent_slow_calls_against_a_queue_of_50(make_executor) -> None:
    ex = await make_executor(threads=2, queue=50)
    digest = ex.source.add(f.COUNTDOWN)
    await ex.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    # About 20 ms of CPU per call: long enough that the 200 arrive while the first 52 are still in.
    request = pb.ExecuteRequest(digest=digest, input=struct.pack("<I", 15_000_000))
    started = time.monotonic()
    outcomes = await asyncio.gather(*(ex.stub.Execute(request, timeout=20) for _ in range(200)),
                                    return_exceptions=True)
    ok = [o for o in outcomes if isinstance(o, pb.ExecuteResponse)]
    shed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(ok) + len(shed) == 200
    assert all(o.output == b"done" for o in ok)
    assert {(o.code(), error_info(o).reason) for o in shed} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "EXECUTOR_OVERLOADED")}
    assert len(ok) >= 52 and len(shed) >= 100, (len(ok), len(shed))
    assert time.monotonic() - started < 15
    await still_works(ex)


async def test_client_cancelling_mid_run_frees_the_worker(make_executor) -> None:
    ex = await make_executor(threads=1, queue=4)
    loop_digest = ex.source.add(f.INFINITE_LOOP)
    await ex.stub.LoadSkill(pb.LoadSkillRequest(digest=loop_digest), timeout=5)
    await still_works(ex)
    # No deadline on the call and a 10 s skill timeout: only the cancellation can stop it early.
    call = ex.stub.Execute(pb.ExecuteRequest(digest=loop_digest, limits=limits(timeout_ms=10_000)))
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    started = time.monotonic()
    # One thread: this call can only run once the cancelled one has given its thread back.
    await still_works(ex, timeout=3)
    assert time.monotonic() - started < 1.0


def test_sandbox_run_control_cancels_and_limits_hold_in_start_functions() -> None:
    sandbox = Sandbox()
    try:
        looping = sandbox.compile("loop", f.INFINITE_LOOP)
        control = RunControl()
        threading.Timer(0.1, control.cancel).start()
        result = sandbox.run(looping, b"", RunLimits(1 * MiB, 5.0, 100, 100), control=control)
        assert result.verdict is Verdict.CANCELLED and result.wall_seconds < 1.0
        # Cancelled before it starts: it never runs.
        assert sandbox.run(looping, b"", RunLimits(1 * MiB, 5.0, 100, 100), control=control).wall_seconds == 0
        # A loop in the start function (during instantiation) is metered too.
        start_loop = sandbox.compile("start", f.LOOP_IN_START_FUNCTION, metered=True)
        result = sandbox.run(start_loop, b"", RunLimits(1 * MiB, 5.0, 100, 100, fuel=100_000))
        assert (result.verdict, result.fuel_consumed) == (Verdict.FUEL_EXHAUSTED, 100_000)
    finally:
        sandbox.close()
