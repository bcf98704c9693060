"""Buckets in Redis, shared by every replica: one atomic Lua script per call, on the Redis server's clock.

The script reads the bucket (a hash: tokens `t`, time of the last take `s` in microseconds of `TIME`), refills
it, takes the cost if it can, writes it back and sets an expiry of the time the bucket takes to fill (plus a
second): a bucket that would be full anyway is not kept. It runs with EVALSHA; a server that does not know
the script (restarted, SCRIPT FLUSH) gets it loaded and the call retried (redis-py's registered scripts).

While Redis cannot be reached (refused, timed out, an error reply), calls are decided without it: by this
process's own buckets (`fail_open`, the default) or refused (`unavailable`). The outage is counted and logged
once, with its end; Redis is tried again every `retry_seconds`, by one call at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.runtime.errors import describe_error
from services.runtime.ratelimit.buckets import Decision, LocalBackend, RateLimitCounters, check_cost

log = logging.getLogger("clawhub.ratelimit")

TAKE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
local elapsed = now - stamp
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate / 1000000)
local allowed = 0
local retry = 0
if tokens + 1e-9 >= cost then
  tokens = math.max(tokens - cost, 0)
  allowed = 1
else
  retry = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {allowed, string.format('%.17g', retry), string.format('%.17g', tokens)}
"""


def safe_url(url: str) -> str:
    """`url` without its user and password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def ttl_ms(rate: float, burst: float) -> int:
    """How long a bucket is kept after its last take: until it would be full again, plus a second."""
    return math.ceil(burst / rate * 1000) + 1000


class RedisBackend:
    """Token buckets in Redis under `prefix`; see the module docstring."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, fail_open: bool = True,
                 fallback: LocalBackend | None = None, retry_seconds: float = 1.0,
                 counters: RateLimitCounters | None = None, name: str = "redis",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._script = client.register_script(TAKE_SCRIPT)
        self._prefix = prefix
        self._fail_open = fail_open
        self._fallback = fallback if fallback is not None else LocalBackend()
        self._retry_seconds = retry_seconds
        self.counters = counters if counters is not None else RateLimitCounters()
        self._name = name
        self._clock = clock
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._probing = False

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.25, **kwargs: Any) -> RedisBackend:
        """A backend on a client of `url`: each command waits at most `timeout` seconds (connect or answer) and
        is not retried by redis-py (a failure falls back at once; Redis is tried again after the backoff)."""
        client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                         retry=Retry(NoBackoff(), 0), health_check_interval=0)
        return cls(client, name=safe_url(url), **kwargs)

    @property
    def down(self) -> bool:
        """Whether Redis is taken to be unreachable now."""
        return self._down_since is not None

    async def take(self, key: str, rate: float, burst: float, cost: float = 1) -> Decision:
        check_cost(burst, cost)
        now = self._clock()
        probing = False
        if self._down_since is not None:
            if now < self._retry_at or self._probing:
                return await self._without_redis(key, rate, burst, cost, now)
            probing = self._probing = True
        try:
            reply = await self._script(keys=[self._prefix + key], args=[repr(float(rate)), repr(float(burst)),
                                                                        repr(float(cost)), ttl_ms(rate, burst)])
        except (RedisError, OSError) as exc:
            self._failed(exc, now)
            return await self._without_redis(key, rate, burst, cost, now)
        finally:
            if probing:
                self._probing = False
        if self._down_since is not None:
            log.info("rate limits: %s is reachable again after %.1fs; buckets are shared again", self._name,
                     self._clock() - self._down_since)
            self._down_since = None
        allowed, retry, tokens = reply
        return Decision(int(allowed) == 1, float(retry), float(tokens))

    def _failed(self, exc: BaseException, now: float) -> None:
        self.counters.redis_errors += 1
        self._retry_at = now + self._retry_seconds
        if self._down_since is None:
            self._down_since = now
            self.counters.redis_outages += 1
            fallback = ("limiting with this process's own buckets" if self._fail_open
                        else "refusing limited calls with UNAVAILABLE")
            log.warning("rate limits: %s is unreachable (%s); %s until it is back (trying again every %gs)",
                        self._name, describe_error(exc), fallback, self._retry_seconds)

    async def _without_redis(self, key: str, rate: float, burst: float, cost: float, now: float) -> Decision:
        self.counters.fallback_decisions += 1
        if self._fail_open:
            return self._fallback.take_now(key, rate, burst, cost)
        return Decision(False, max(self._retry_at - now, 0.001), 0.0, unavailable=True)

    async def close(self) -> None:
        await self._client.aclose()
        await self._fallback.close()
