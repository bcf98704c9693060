"""The executor's metrics (docs/metrics.md), scraped from its metrics port: per skill version calls, failures
by reason, time and fuel; the worker pool's busy threads and queue; module loads by tier."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.runtime.metrics import MetricsSettings
from tests.executor import fixtures as f
from tests.executor.conftest import ASSIGNED_SKILL, Executor, ExecutorFactory, limits
from tests.runtime.metrics_scrape import Samples, ascrape, moved, total

SKILL = {"skill": ASSIGNED_SKILL}


async def _execute(ex: Executor, module: bytes, data: bytes = b"", **kwargs: object) -> pb.ExecuteResponse:
    digest = ex.source.add(module)
    return await ex.stub.Execute(pb.ExecuteRequest(digest=digest, input=data, **kwargs), timeout=10)


async def test_skill_calls_failures_time_fuel_and_tiers_move(make_executor: ExecutorFactory) -> None:
    ex = await make_executor(metrics=MetricsSettings(port=0))
    url = ex.host.metrics_url
    before = await ascrape(url)
    assert (await _execute(ex, f.ECHO, b"one")).output == b"ok:one"  # cold: fetched and compiled
    assert (await _execute(ex, f.ECHO, b"two")).output == b"ok:two"  # hot
    metered = await _execute(ex, f.ECHO, b"three", limits=limits())
    with pytest.raises(grpc.aio.AioRpcError) as trapped:
        await _execute(ex, f.TRAP)
    assert trapped.value.code() == grpc.StatusCode.ABORTED
    fuel_limits = limits()
    fuel_limits.fuel = 1_000_000
    fueled = await _execute(ex, f.ECHO, b"four", limits=fuel_limits)
    assert fueled.usage.fuel_consumed > 0 and metered.output == b"ok:three"
    after = await ascrape(url)

    assert moved(before, after, "clawhub_skill_invocations_total", **SKILL) == 5
    assert moved(before, after, "clawhub_skill_failures_total", **SKILL, reason="SKILL_TRAPPED") == 1
    assert moved(before, after, "clawhub_skill_failures_total", **SKILL) == 1
    assert moved(before, after, "clawhub_skill_duration_seconds_count", **SKILL) == 5
    assert moved(before, after, "clawhub_skill_duration_seconds_sum", **SKILL) > 0
    # Only the metered call has fuel to observe.
    assert moved(before, after, "clawhub_skill_fuel_consumed_count", **SKILL) == 1
    assert moved(before, after, "clawhub_skill_fuel_consumed_sum", **SKILL) == fueled.usage.fuel_consumed
    # The versions are the ones the calls named, bounded: never a digest or an input.
    versions = {dict(labels)["version"] for (name, labels) in after if name == "clawhub_skill_invocations_total"
                and dict(labels)["skill"] == ASSIGNED_SKILL}
    assert all(v.startswith("1.0.0-t") or v == "other" for v in versions), versions
    assert moved(before, after, "clawhub_executor_module_loads_total", tier="cold") >= 2  # ECHO (both engines), TRAP
    assert moved(before, after, "clawhub_executor_module_loads_total", tier="hot") >= 1
    assert total(after, "clawhub_executor_module_cache_bytes") > 0
    # The Execute RPC itself is counted like every RPC.
    assert moved(before, after, "clawhub_rpc_requests_total", grpc_method="Execute", grpc_code="OK") == 4
    assert moved(before, after, "clawhub_rpc_errors_total", grpc_method="Execute", reason="SKILL_TRAPPED") == 1


async def _until(url: str, check: object, tries: int = 200) -> Samples:
    """Scrape until `check(samples)` holds (a bounded poll: the calls reach the pool asynchronously)."""
    samples = Samples()
    for _ in range(tries):
        samples = await ascrape(url)
        if check(samples):  # type: ignore[operator]
            return samples
        await asyncio.sleep(0.02)
    raise AssertionError(f"never true; last scrape: { {k: v for k, v in samples.items() if 'executor' in k[0]} }")


async def test_busy_threads_and_queue_depth_follow_the_pool(make_executor: ExecutorFactory) -> None:
    ex = await make_executor(metrics=MetricsSettings(port=0), threads=1, queue=3)
    url = ex.host.metrics_url
    idle = await ascrape(url)
    assert total(idle, "clawhub_executor_threads") >= 1
    assert total(idle, "clawhub_executor_queue_capacity") >= 3
    # Two loops on one thread: one runs, one waits, until their 1 s timeouts stop them.
    calls = [asyncio.ensure_future(_execute(ex, f.INFINITE_LOOP, limits=limits(timeout_ms=1000))) for _ in range(2)]
    try:
        await _until(url, lambda s: total(s, "clawhub_executor_busy_threads") >= 1
                     and total(s, "clawhub_executor_queue_depth") >= 1)
    finally:
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.DEADLINE_EXCEEDED
               for r in results), results
    after = await _until(url, lambda s: total(s, "clawhub_executor_queue_depth") == 0
                         and total(s, "clawhub_skill_failures_total", reason="SKILL_TIMEOUT")
                         - total(idle, "clawhub_skill_failures_total", reason="SKILL_TIMEOUT") == 2)
    assert moved(idle, after, "clawhub_skill_failures_total", **SKILL, reason="SKILL_TIMEOUT") == 2
