"""Token buckets: the refill arithmetic, the backend interface and the in-process backend.

A bucket holds at most `burst` tokens and gains `rate` tokens per second; a call takes `cost` tokens (one) when
the bucket holds that many, else it is refused and told how long until it would hold them. A bucket never
seen (or forgotten) is full. Both backends compute the same thing (the Redis one in Lua, on Redis's clock).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Float sums drift: a bucket refilled for exactly the advertised retry delay must hold the token, not
# 0.9999999999 of it.
EPSILON = 1e-9


@dataclass(slots=True)  # not frozen: a frozen dataclass costs three times as much to build, once per call
class Decision:
    """What a bucket said: `allowed`, else `retry_after_seconds` until the call would be; `remaining` tokens
    after this call. `unavailable`: no bucket could be consulted (Redis down and the setting fails closed)."""

    allowed: bool
    retry_after_seconds: float
    remaining: float
    unavailable: bool = False


@dataclass
class RateLimitCounters:
    """Counts for the metrics (read them; never reset here)."""

    allowed: int = 0
    """Calls a bucket admitted."""
    refused: int = 0
    """Calls refused with RATE_LIMITED."""
    unavailable: int = 0
    """Calls refused because no bucket could be consulted (Redis down, CLAWHUB_RATE_REDIS_DOWN=closed)."""
    redis_errors: int = 0
    """Redis calls that failed (connection refused, timeout, error reply)."""
    redis_outages: int = 0
    """Times Redis went from reachable to unreachable (each logs one line)."""
    fallback_decisions: int = 0
    """Decisions taken without Redis while it was down (by the local buckets, or refusals when failing closed)."""


class Backend(Protocol):
    """Where buckets live. `take` is atomic per key: concurrent calls never both get the last token."""

    async def take(self, key: str, rate: float, burst: float, cost: float = 1) -> Decision: ...

    async def close(self) -> None: ...


def check_cost(burst: float, cost: float) -> None:
    if not 0 < cost <= burst:
        raise ValueError(f"a call costing {cost} tokens can never pass a bucket of {burst}")


def refill(tokens: float, elapsed: float, rate: float, burst: float) -> float:
    """Tokens after `elapsed` seconds (a clock going backwards adds nothing), never above `burst`."""
    return min(burst, tokens + max(elapsed, 0.0) * rate)


def decide(tokens: float, rate: float, cost: float) -> tuple[Decision, float]:
    """Take `cost` from a bucket holding `tokens`: the decision and the tokens left in the bucket."""
    if tokens + EPSILON >= cost:
        left = max(tokens - cost, 0.0)
        return Decision(True, 0.0, left), left
    return Decision(False, (cost - tokens) / rate, tokens), tokens


class LocalBackend:
    """Buckets in this process, at most `max_keys` of them: the least recently used bucket is forgotten first
    (a forgotten bucket is full again), so a flood of distinct keys costs bounded memory (about 300 bytes a
    bucket with its key: 30 MB for the default 100,000). Callers on one event loop: no lock needed, `take`
    never awaits."""

    def __init__(self, max_keys: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._max_keys = max_keys
        self._clock = clock
        # key → [tokens, time of the last take]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def take_now(self, key: str, rate: float, burst: float, cost: float = 1) -> Decision:
        """`take`, synchronously."""
        check_cost(burst, cost)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            tokens = burst
            bucket = self._buckets[key] = [burst, now]
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            tokens = refill(bucket[0], now - bucket[1], rate, burst)
            self._buckets.move_to_end(key)
        decision, bucket[0] = decide(tokens, rate, cost)
        bucket[1] = now
        return decision

    async def take(self, key: str, rate: float, burst: float, cost: float = 1) -> Decision:
        return self.take_now(key, rate, burst, cost)

    async def close(self) -> None:
        self._buckets.clear()
