"""The executor's inline lane (`ExecutorServicer._run_inline`): a call of a module that imports nothing runs on
the event loop with no thread handoff while its module's calls stay quick; a call that runs long there is
stopped within one epoch tick and run again on the worker pool with its full limits, and its module runs on the
pool from then on. Calls of modules with imports always run on the pool."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from services.executor.scheduling import WorkerPool
from tests.executor.conftest import Executor, ExecutorFactory, limits
from tests.executor.test_memory_abi import ECHO, LOOPS, PRINTS, call, module, packed, refused

# Echoes an empty input; loops forever on any other.
LOOPS_ON_INPUT = module("(if (local.get $len) (then (loop $forever (br $forever))))"
                        + packed("(local.get $ptr)", "(local.get $len)"))


@pytest.fixture
def pool_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The cost keys (digests) of the calls that went to a worker pool."""
    runs: list[str] = []
    original = WorkerPool.run

    async def counted(self: WorkerPool, fn: Callable[[], Any], **kwargs: Any) -> Any:
        runs.append(kwargs.get("cost_key", ""))
        return await original(self, fn, **kwargs)

    monkeypatch.setattr(WorkerPool, "run", counted)
    return runs


class LoopWatch:
    """The longest time the event loop went without running this watcher's 1 ms ticks."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def stop(self) -> None:
        self._task.cancel()


async def test_quick_calls_of_modules_without_imports_run_on_the_event_loop(executor: Executor,
                                                                            pool_runs: list[str]) -> None:
    for i in range(20):
        assert (await call(executor, str(i).encode())).output == str(i).encode()
    assert pool_runs == []
    # A module with a WASI import runs on the pool (its imports reach outside its instance).
    assert (await call(executor, b"", PRINTS)).output == b"x"
    assert len(pool_runs) == 1


async def test_a_loop_is_stopped_within_a_tick_and_runs_on_the_pool_with_its_full_limits(
        executor: Executor, pool_runs: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await call(executor, b"warm")  # the executor's own first-call work is not what this measures
    watch = LoopWatch()
    started = time.monotonic()
    try:
        code, reason, meta = await refused(executor, LOOPS, limits(timeout_ms=300))
    finally:
        watch.stop()
    # The caller sees its own limit, not the inline lane's cap, and the call had all of it on the pool.
    assert (code, reason, meta["timeout_ms"]) == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT", "300")
    assert time.monotonic() - started >= 0.3
    assert len(pool_runs) == 1
    # The loop held the event loop for one epoch tick or two (10-20 ms), not its 300 ms (with room for a busy
    # machine: a thread switch alone can take 5 ms).
    assert watch.longest < 0.1, watch.longest
    assert sum("runs on the worker pool from now on" in r.getMessage() for r in caplog.records) == 1
    # From now on the module runs on the pool at once: the event loop is not held again.
    watch = LoopWatch()
    try:
        await refused(executor, LOOPS, limits(timeout_ms=100))
    finally:
        watch.stop()
    assert len(pool_runs) == 2 and watch.longest < 0.05, watch.longest
    assert sum("runs on the worker pool from now on" in r.getMessage() for r in caplog.records) == 1
    # Other modules keep their inline lane.
    await call(executor, b"still inline")
    assert len(pool_runs) == 2


async def test_a_module_slow_only_on_some_inputs_goes_to_the_pool_after_its_first_slow_call(
        executor: Executor, pool_runs: list[str]) -> None:
    for _ in range(5):
        assert (await call(executor, b"", LOOPS_ON_INPUT)).output == b""
    assert pool_runs == []
    code, reason, meta = await refused(executor, LOOPS_ON_INPUT, limits(timeout_ms=150), b"spin")
    assert (code, reason, meta["timeout_ms"]) == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT", "150")
    assert len(pool_runs) == 1
    assert (await call(executor, b"", LOOPS_ON_INPUT)).output == b""
    assert len(pool_runs) == 2


async def test_a_call_whose_budget_is_near_the_cap_goes_to_the_pool(executor: Executor,
                                                                   pool_runs: list[str]) -> None:
    """A call with 40 ms or less to run is not risked on the event loop: stopped at the cap and run again, it
    could miss a deadline it would have met."""
    assert (await call(executor, b"short", ECHO, limits(timeout_ms=30))).output == b"short"
    assert len(pool_runs) == 1


async def test_the_setting_turns_it_off(make_executor: ExecutorFactory, pool_runs: list[str]) -> None:
    executor = await make_executor(inline=0.0)
    for _ in range(3):
        assert (await call(executor, b"x")).output == b"x"
    assert len(pool_runs) == 3


async def test_a_module_whose_calls_keep_taking_more_cpu_than_the_setting_goes_to_the_pool(
        make_executor: ExecutorFactory, pool_runs: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """Three calls over the setting (CPU time: a nanosecond here, so every call is over it) and the module runs
    on the pool; the calls themselves are answered, inline, as they ran."""
    caplog.set_level(logging.INFO)
    executor = await make_executor(inline=1e-9)
    for i in range(3):
        assert (await call(executor, b"x")).output == b"x"
        assert pool_runs == [], i
    assert any("3 calls took over" in r.getMessage() for r in caplog.records)
    assert (await call(executor, b"x")).output == b"x"
    assert len(pool_runs) == 1
