"""Rate-limit buckets in Redis: shared by every process, kept under a prefix with an expiry, and what happens
while Redis is down (docs/ratelimits.md: by default each process limits with its own buckets; `closed`
refuses with UNAVAILABLE; either way one log line per outage, counted, and Redis tried again after a backoff).

The tests that kill Redis use a throwaway redis-server of their own, never the shared one."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from services.runtime.errors import error_info, status_of
from services.runtime.ratelimit import (
    RETRY_AFTER_METADATA,
    CallKey,
    Limit,
    RateLimiter,
    RateLimitSettings,
    RedisBackend,
    bucket_key,
    rate_limit_interceptor,
)
from services.runtime.ratelimit.redis_backend import safe_url, ttl_ms
from tests.conftest import RedisServer
from tests.runtime.test_ratelimit import Limited, invoke, limiter, refusal_details, start_limited

ROOT = Path(__file__).resolve().parents[2]
SKILL = "com.example.shared"
Starter = Callable[[bool], Awaitable[Limited]]
KEY = bucket_key(CallKey("peer:ipv4:127.0.0.1", "anonymous", "invoke", SKILL))


async def stop(server: Limited) -> None:
    await server.channel.close()
    await server.host.stop(0)
    await server.interceptor.close()


async def test_two_backends_share_one_bucket_kept_under_the_prefix_with_an_expiry(redis_url: str,
                                                                                   redis_prefix: str) -> None:
    first = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    second = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    client = aioredis.Redis.from_url(redis_url)
    try:
        decisions = [await (first if i % 2 else second).take("k", 1, 4) for i in range(6)]
        assert [d.allowed for d in decisions] == [True] * 4 + [False] * 2
        assert 0.9 < decisions[-1].retry_after_seconds <= 1.0
        assert await client.exists(f"{redis_prefix}k") == 1
        assert 0 < await client.pttl(f"{redis_prefix}k") <= ttl_ms(1, 4) == 5000
    finally:
        await client.aclose()
        await first.close()
        await second.close()


async def test_the_script_is_loaded_again_when_redis_forgot_it(throwaway_redis: RedisServer) -> None:
    backend = RedisBackend.from_url(throwaway_redis.url, prefix="test:")
    client = aioredis.Redis.from_url(throwaway_redis.url)
    try:
        assert (await backend.take("k", 1, 2)).allowed
        await client.script_flush()
        assert (await backend.take("k", 1, 2)).allowed
        assert not (await backend.take("k", 1, 2)).allowed
        assert backend.counters.redis_errors == 0
    finally:
        await client.aclose()
        await backend.close()


# --- two processes, one limit ---------------------------------------------------------------------------------

RATE, BURST, WINDOW = 50.0, 50.0, 2.0


def serve_child() -> None:
    """A process of its own: a server with the interceptor on the Redis backend; prints its port, serves until
    its stdin closes."""
    async def main() -> None:
        backend = RedisBackend.from_url(os.environ["RL_TEST_REDIS_URL"], prefix=os.environ["RL_TEST_PREFIX"])
        server = await start_limited(limiter({"invoke": Limit(RATE, BURST)}, backend))
        print(server.host.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await stop(server)

    asyncio.run(main())


async def test_two_processes_against_one_redis_hold_one_limit_together(redis_url: str, redis_prefix: str) -> None:
    env = {**os.environ, "RL_TEST_REDIS_URL": redis_url, "RL_TEST_PREFIX": redis_prefix}
    children = [subprocess.Popen(
        [sys.executable, "-c", "from tests.runtime.test_ratelimit_redis import serve_child; serve_child()"],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    channels: list[grpc.aio.Channel] = []
    try:
        ports = [int(await asyncio.to_thread(child.stdout.readline)) for child in children if child.stdout]
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
        admitted = [0, 0]
        refused = [0, 0]

        async def hammer(index: int, until: float) -> None:
            while time.monotonic() < until:
                try:
                    await invoke(channels[index], SKILL)
                    admitted[index] += 1
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    refused[index] += 1

        until = time.monotonic() + WINDOW
        await asyncio.gather(*(hammer(i, until) for i in (0, 1) for _ in range(16)))
    finally:
        for channel in channels:
            await channel.close()
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
    expected = BURST + RATE * WINDOW
    # Each process alone would admit `expected`: together they admit it once.
    assert abs(sum(admitted) - expected) <= 0.1 * expected, (admitted, refused)
    assert min(admitted) > 0 and sum(refused) > expected, (admitted, refused)


# --- Redis killed mid-test -------------------------------------------------------------------------------------


@pytest.fixture
async def on_throwaway(throwaway_redis: RedisServer) -> AsyncIterator[Callable[[bool], Awaitable[Limited]]]:
    """Start a server limiting invokes to a burst of 3 (refilled once in 100 s) in a throwaway Redis that the
    test kills, failing open or closed."""
    started: list[Limited] = []

    async def start(fail_open: bool) -> Limited:
        backend = RedisBackend.from_url(throwaway_redis.url, prefix="rl:", fail_open=fail_open, retry_seconds=0.3)
        settings = RateLimitSettings(class_limits={"invoke": Limit(0.01, 3)})
        started.append(await start_limited(RateLimiter(settings, backend, backend.counters)))
        return started[-1]

    yield start
    for server in started:
        await stop(server)


async def exhaust(server: Limited) -> None:
    for _ in range(3):
        await server.invoke(SKILL)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.invoke(SKILL)
    assert refusal_details(caught.value)[0]["limit"] == "0.01/3"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "clawhub.ratelimit" and r.levelno >= logging.WARNING]


async def redis_holds(url: str, key: str) -> bool:
    client = aioredis.Redis.from_url(url)
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


async def test_redis_down_fails_open_to_this_process_buckets_logged_once(
        on_throwaway: Starter, throwaway_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clawhub.ratelimit")
    server = await on_throwaway(True)
    counters = server.interceptor.counters
    await exhaust(server)
    assert counters.redis_outages == 0 and await redis_holds(throwaway_redis.url, f"rl:{KEY}")

    throwaway_redis.kill()
    # This process's own bucket (full, as a bucket never seen is) limits the caller while Redis is down.
    await exhaust(server)
    await asyncio.sleep(0.35)  # past the backoff: Redis is tried again, still down
    with pytest.raises(grpc.aio.AioRpcError):
        await server.invoke(SKILL)
    assert counters.redis_outages == 1 and counters.redis_errors == 2 and counters.fallback_decisions == 5
    [line] = warnings_of(caplog)
    assert "redis://127.0.0.1:" in line and "unreachable" in line and "this process's own buckets" in line

    throwaway_redis.start()
    await asyncio.sleep(0.35)
    # Back on Redis: its new (empty) database holds the caller's bucket again.
    await server.invoke(SKILL)
    assert await redis_holds(throwaway_redis.url, f"rl:{KEY}")
    assert counters.fallback_decisions == 5 and len(warnings_of(caplog)) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.name == "clawhub.ratelimit")


async def test_redis_down_fails_closed_with_unavailable_when_set(
        on_throwaway: Starter, throwaway_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clawhub.ratelimit")
    server = await on_throwaway(False)
    await server.invoke(SKILL)
    throwaway_redis.kill()
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.invoke(SKILL)
        err = caught.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        info = error_info(err)
        assert info is not None and info.reason == "UPSTREAM_UNAVAILABLE"
        assert info.metadata["upstream"] == "rate limit store"
        status = status_of(err)
        assert status is not None and any(d.type_url.endswith("google.rpc.RetryInfo") for d in status.details)
        assert dict(err.trailing_metadata() or ())[RETRY_AFTER_METADATA] == "1"
    counters = server.interceptor.counters
    assert counters.unavailable == 3 and counters.redis_outages == 1
    [line] = warnings_of(caplog)
    assert "refusing limited calls with UNAVAILABLE" in line

    throwaway_redis.start()
    await asyncio.sleep(0.35)
    await server.invoke(SKILL)
    assert counters.allowed == 2


async def test_the_settings_put_the_buckets_in_redis_under_their_prefix(redis_url: str, redis_prefix: str) -> None:
    settings = RateLimitSettings.from_env({"CLAWHUB_RATE_BACKEND": "redis", "CLAWHUB_RATE_REDIS_URL": redis_url,
                                           "CLAWHUB_RATE_REDIS_PREFIX": redis_prefix,
                                           "CLAWHUB_RATE_INVOKE": "0.01/2"})
    interceptor = rate_limit_interceptor(settings, domain="limited.clawhub")
    assert interceptor is not None and isinstance(interceptor.limiter.backend, RedisBackend)
    server = await start_limited(interceptor.limiter)
    try:
        for _ in range(2):
            await server.invoke(SKILL)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.invoke(SKILL)
        assert refusal_details(caught.value)[0]["limit"] == "0.01/2"
        assert await redis_holds(redis_url, f"{redis_prefix}{KEY}")
    finally:
        await stop(server)


def test_logs_name_redis_without_its_password() -> None:
    assert safe_url("redis://:hunter2@cache.internal:6380/2") == "redis://cache.internal:6380/2"
    assert safe_url("rediss://user:hunter2@[::1]/0") == "rediss://[::1]/0"
