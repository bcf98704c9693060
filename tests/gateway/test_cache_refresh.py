"""Refresh-ahead of hot result cache entries (docs/cache.md, "Hot keys refresh ahead of expiry"): a hot entry
near its expiry is refreshed once, in the background, while every reader keeps getting hits; the new result
replaces the old one with a new TTL; a refresh that fails, or ran another version, is stored nowhere and the
entry expires as it would have; cold entries are not refreshed; at most MAX_REFRESHES run at once, and close()
cancels them; without a background loader the reader that draws the refresh runs it itself; two gateways
sharing L2 refresh once. The L1 parts run on an injected clock and random source, the Redis part in real time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable

import pytest
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from google.protobuf import duration_pb2

from services.gateway import cache as cache_module
from services.gateway.cache import MAX_REFRESHES, Plan, ResultCache
from services.runtime import metrics
from tests.deployer.fakes import eventually

HIT_L1, HIT_L2, MISS = pb.CACHE_STATUS_HIT_L1, pb.CACHE_STATUS_HIT_L2, pb.CACHE_STATUS_MISS
TTL = 60.0  # window: the last 12 s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Draws(random.Random):
    """TTLs without jitter, and every refresh draw comes out as `value` (0.0: due anywhere in the window)."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def plan_for(cache: ResultCache, data: bytes, seconds: float = TTL) -> Plan:
    route_target = routing_pb2.RouteTarget(
        version="1.0.0", digest="sha256:" + hashlib.sha256(b"m").hexdigest(), weight=100,
        env_digest="hmac-sha256:one", cache_ttl=duration_pb2.Duration(seconds=int(seconds)))
    plan = cache.plan("com.example.hot", (route_target,), data, no_cache=False)
    assert plan is not None
    return plan


class Skill:
    """Counts its runs; each run answers `output` (a failure when it is an exception), held at `gate` when set."""

    def __init__(self, output: bytes | Exception = b"v1", version: str = "1.0.0") -> None:
        self.output = output
        self.version = version
        self.runs = 0
        self.called = 0  # refresh() calls: the background loader made (not yet run)
        self.cancelled = 0
        self.gate: asyncio.Event | None = None

    async def run(self) -> dispatcher_pb.DispatchResponse:
        self.runs += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(self.output, Exception):
            raise self.output
        return dispatcher_pb.DispatchResponse(output=self.output, version=self.version)

    def refresh(self) -> Awaitable[dispatcher_pb.DispatchResponse]:
        self.called += 1
        return self.run()


async def hot(cache: ResultCache, plan: Plan, skill: Skill, hits: int = 3) -> None:
    """Store `plan`'s entry (a miss) and read it `hits` times while it is young."""
    assert (await cache.fetch(plan, skill.run))[1] == MISS
    for _ in range(hits):
        assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[1] == HIT_L1


async def settled(cache: ResultCache) -> None:
    await eventually(lambda: _true(not cache._refreshes))


async def _true(value: bool) -> bool:
    return value


def refreshes(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("clawhub_gateway_cache_refreshes_total", {"result": result}) or 0.0


async def test_a_hot_key_near_expiry_is_refreshed_once_in_the_background_while_readers_hit() -> None:
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    plan = plan_for(cache, b"hot")
    skill = Skill()
    await hot(cache, plan, skill)
    clock.now = 40.0  # hot, but 20 s from expiry: not yet
    assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[1] == HIT_L1
    assert skill.called == 0
    counted = refreshes("refreshed")
    skill.output, skill.gate = b"v2", asyncio.Event()
    clock.now = 50.0  # in the last 12 s
    readers = await asyncio.gather(*(cache.fetch(plan, skill.run, refresh=skill.refresh) for _ in range(20)))
    assert {(r.output, s) for r, s in readers} == {(b"v1", HIT_L1)}
    await eventually(lambda: _true(skill.runs == 2))
    # While it runs, readers still hit the old value, and start no other refresh.
    assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[0].output == b"v1"
    skill.gate.set()
    await settled(cache)
    assert skill.called == 1 and skill.runs == 2
    # The new result replaces the old one, with a new TTL from when it landed.
    result, status = await cache.fetch(plan, skill.run, refresh=skill.refresh)
    assert (result.output, status) == (b"v2", HIT_L1)
    clock.now = 50.0 + TTL - 0.01
    skill.gate = None
    assert (await cache.fetch(plan, skill.run))[1] == HIT_L1  # its 2nd hit: not hot yet
    clock.now = 50.0 + 2 * TTL
    assert (await cache.fetch(plan, skill.run))[1] == MISS
    assert cache.stats["refresh_refreshed"] >= 1 and refreshes("refreshed") >= counted + 1
    await cache.close()


async def test_without_a_background_loader_the_reader_that_draws_the_refresh_runs_it() -> None:
    """The servicer's `run` may only run while its caller waits: that reader refreshes in front (a MISS with the
    new result); the others, meanwhile, hit the old value."""
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    plan = plan_for(cache, b"front")
    skill = Skill()
    await hot(cache, plan, skill)
    skill.output, skill.gate = b"v2", asyncio.Event()
    clock.now = 55.0
    front = asyncio.ensure_future(cache.fetch(plan, skill.run))
    await eventually(lambda: _true(skill.runs == 2))
    others = await asyncio.gather(*(cache.fetch(plan, skill.run) for _ in range(10)))
    assert {(r.output, s) for r, s in others} == {(b"v1", HIT_L1)}
    skill.gate.set()
    result, status = await front
    assert (result.output, status) == (b"v2", MISS) and skill.runs == 2
    assert (await cache.fetch(plan, skill.run))[0].output == b"v2"
    await cache.close()


async def test_a_failed_refresh_is_not_stored_or_retried_and_the_entry_expires(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    plan = plan_for(cache, b"fails")
    skill = Skill()
    await hot(cache, plan, skill)
    skill.output = RuntimeError("skill failed")
    clock.now = 55.0
    with caplog.at_level(logging.DEBUG, logger="clawhub.gateway.cache"):
        for _ in range(5):
            result, status = await cache.fetch(plan, skill.run, refresh=skill.refresh)
            assert (result.output, status) == (b"v1", HIT_L1)
            await settled(cache)
    assert skill.called == 1 and skill.runs == 2  # tried once for this entry, not on every hit
    assert cache.stats["refresh_failed"] == 1 and cache.stats["stored"] == 1
    assert [r.levelno for r in caplog.records if r.name == "clawhub.gateway.cache"] == [logging.DEBUG]
    clock.now = TTL  # it expires when it would have; the next reader runs the skill (and gets its error)
    with pytest.raises(RuntimeError):
        await cache.fetch(plan, skill.run, refresh=skill.refresh)
    assert skill.runs == 3
    # The same in front: the reader who ran the failing refresh still gets the cached value, as a hit.
    skill.output = b"v1"
    await hot(cache, plan, skill)
    skill.output = RuntimeError("skill failed")
    clock.now = TTL + 55.0
    result, status = await cache.fetch(plan, skill.run)
    assert (result.output, status) == (b"v1", HIT_L1) and cache.stats["refresh_failed"] == 2
    await cache.close()


async def test_a_refresh_that_ran_another_version_is_not_stored() -> None:
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    plan = plan_for(cache, b"moved")
    skill = Skill()
    await hot(cache, plan, skill)
    skill.output, skill.version = b"v2", "2.0.0"  # the route moved: version 2 has another key
    clock.now = 55.0
    await cache.fetch(plan, skill.run, refresh=skill.refresh)
    await settled(cache)
    assert cache.stats["refresh_stale"] == 1
    assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[0].output == b"v1"
    clock.now = TTL
    assert (await cache.fetch(plan, skill.run))[1] == MISS
    await cache.close()


async def test_cold_keys_are_not_refreshed() -> None:
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    plan = plan_for(cache, b"cold")
    skill = Skill()
    await hot(cache, plan, skill, hits=1)  # read twice: once stored, once hit
    clock.now = TTL - 0.001  # a moment before expiry: any hot key would be due
    assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[1] == HIT_L1  # its 2nd hit
    assert skill.called == 0 and not cache._refreshes
    # The draw: with the random source high, a hot key early in the window is not due, near expiry it is.
    cache._rng = Draws(0.5)
    other = plan_for(cache, b"warm")
    await hot(cache, other, skill)
    clock.now = TTL - 0.001 + TTL - 11.0  # 11 s left of a 12 s window: P = exp(-2.75), about 6%
    assert (await cache.fetch(other, skill.run, refresh=skill.refresh))[1] == HIT_L1 and skill.called == 0
    clock.now += 10.5  # 0.5 s left: P = exp(-0.125), about 88%
    assert (await cache.fetch(other, skill.run, refresh=skill.refresh))[1] == HIT_L1 and skill.called == 1
    await settled(cache)
    await cache.close()


async def test_a_reader_that_misses_while_the_refresh_runs_waits_for_it() -> None:
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    plan = plan_for(cache, b"late")
    skill = Skill()
    await hot(cache, plan, skill)
    skill.output, skill.gate = b"v2", asyncio.Event()
    clock.now = 59.0
    assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[1] == HIT_L1
    clock.now = TTL + 1  # the entry expired before its refresh landed
    late = asyncio.ensure_future(cache.fetch(plan, skill.run, refresh=skill.refresh))
    await asyncio.sleep(0.01)
    assert not late.done()
    skill.gate.set()
    result, status = await late
    assert (result.output, status) == (b"v2", MISS) and skill.runs == 2
    await cache.close()


async def test_at_most_max_refreshes_run_and_close_cancels_them() -> None:
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    skill = Skill()
    plans = [plan_for(cache, f"key {n}".encode()) for n in range(MAX_REFRESHES + 2)]
    for plan in plans:
        await hot(cache, plan, skill)
    skill.gate = asyncio.Event()
    full = refreshes("full")
    clock.now = 55.0
    for plan in plans:
        assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[1] == HIT_L1
    assert skill.called == MAX_REFRESHES and len(cache._refreshes) == MAX_REFRESHES
    assert cache.stats["refresh_full"] == 2 and refreshes("full") == full + 2
    await eventually(lambda: _true(skill.runs == len(plans) + MAX_REFRESHES))
    # A key that found them all busy may try again once one has finished; close() ends the rest.
    await cache.close()
    assert skill.cancelled == MAX_REFRESHES and not cache._refreshes
    assert cache.stats["refresh_refreshed"] == 0


async def test_close_right_after_a_refresh_was_drawn_leaves_no_coroutine_unawaited(
        recwarn: pytest.WarningsRecorder) -> None:
    clock = Clock()
    cache = ResultCache(1 << 20, clock=clock, rng=Draws())
    plan = plan_for(cache, b"quick")
    skill = Skill()
    await hot(cache, plan, skill)
    clock.now = 55.0
    await cache.fetch(plan, skill.run, refresh=skill.refresh)
    await cache.close()  # before the refresh's task took its first step
    import gc
    gc.collect()
    assert skill.called == 1 and skill.runs == 1
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


async def test_two_gateways_sharing_l2_refresh_once(redis_url: str, redis_prefix: str) -> None:
    """Real time: L1 expiries follow Redis's. A (the miss, then the refresh), B (due while A's refresh holds
    the key's lock: leaves it to A) and C (due after A's refresh landed: takes it from L2)."""
    ttl = 4.0  # window: the last 0.8 s
    a, b, c = (ResultCache(1 << 20, redis_url, redis_prefix, rng=Draws()) for _ in range(3))
    try:
        plan = plan_for(a, b"shared", seconds=ttl)
        skill = Skill()
        started = time.monotonic()
        assert (await a.fetch(plan, skill.run))[1] == MISS
        for cache in (b, c):
            assert (await cache.fetch(plan, skill.run))[1] == HIT_L2
        for cache in (a, b, c):
            for _ in range(3):
                assert (await cache.fetch(plan, skill.run, refresh=skill.refresh))[1] == HIT_L1
        await asyncio.sleep(max(0.0, started + ttl - 0.6 - time.monotonic()))
        skill.output, skill.gate = b"v2", asyncio.Event()
        assert (await a.fetch(plan, skill.run, refresh=skill.refresh))[1] == HIT_L1
        await eventually(lambda: _true(skill.runs == 2))
        assert (await b.fetch(plan, skill.run, refresh=skill.refresh))[0].output == b"v1"
        await settled(b)
        assert b.stats["refresh_busy"] == 1
        skill.gate.set()
        await settled(a)
        assert a.stats["refresh_refreshed"] == 1
        assert (await c.fetch(plan, skill.run, refresh=skill.refresh))[0].output == b"v1"
        await settled(c)
        assert c.stats["refresh_l2"] == 1
        assert (await c.fetch(plan, skill.run))[0].output == b"v2"
        assert skill.runs == 2 and skill.called == 3  # B's and C's loaders were made, never run
        # B's entry expires as it would have, and B then finds A's refresh in L2.
        await asyncio.sleep(max(0.0, started + ttl + 0.05 - time.monotonic()))
        result, status = await b.fetch(plan, skill.run)
        assert (result.output, status) == (b"v2", HIT_L2) and skill.runs == 2
    finally:
        for cache in (a, b, c):
            await cache.close()


def test_refresh_results_are_the_metric_labels_documented() -> None:
    from pathlib import Path

    documented = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    row = next(line for line in documented.splitlines() if "clawhub_gateway_cache_refreshes_total" in line)
    assert all(f"`{result}`" in row for result in cache_module.REFRESH_RESULTS)


async def test_a_shared_miss_goes_with_the_caller_whose_run_it_is() -> None:
    """`run` reads its caller's gRPC call, which grpc.aio cannot be asked about once it ended (SIGSEGV): when
    that caller goes away, its load is cancelled and a caller still waiting loads with its own `run`. A waiter
    that goes away cancels nothing."""
    cache = ResultCache(1 << 20, rng=Draws())
    plan = plan_for(cache, b"owner")
    owner, other, third = Skill(b"owner's"), Skill(b"other's"), Skill(b"third's")
    owner.gate, other.gate, third.gate = (asyncio.Event() for _ in range(3))
    first = asyncio.ensure_future(cache.fetch(plan, owner.run))
    await eventually(lambda: _true(owner.runs == 1))
    waiting = asyncio.ensure_future(cache.fetch(plan, other.run))
    leaving = asyncio.ensure_future(cache.fetch(plan, third.run))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await eventually(lambda: _true(other.runs + third.runs == 1))
    assert owner.cancelled == 1
    loader, bystander = (other, leaving) if other.runs else (third, waiting)
    running = waiting if loader is other else leaving
    bystander.cancel()  # a waiter going away: the load goes on
    with pytest.raises(asyncio.CancelledError):
        await bystander
    assert loader.gate is not None
    loader.gate.set()
    result, status = await running
    assert (result.output, status) == (loader.output, MISS) and loader.cancelled == 0
    assert (await cache.fetch(plan, owner.run))[0].output == loader.output  # stored
