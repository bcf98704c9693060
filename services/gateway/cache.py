"""The gateway's result cache (docs/cache.md): a skill whose manifest declares `[cache] ttl = "60s"` promises to
be a pure function, so a successful result may answer the next identical call without running the skill.

Two levels: L1 in this process (an LRU bounded by bytes, each entry with its TTL) and, when
CLAWHUB_GATEWAY_CACHE_REDIS_URL is set, L2 in Redis, shared by every gateway (values under a key prefix with
Redis's own expiry; never flushed). A lookup goes L1 → L2 → the skill; an L2 hit fills L1 for what remains of
its TTL.

When a call may be cached (`plan`): the caller did not ask for `no_cache`, and the skill's route (as the
gateway's route table shows it, at most ROUTES_MAX_AGE_SECONDS old: services/gateway/schemas.py) has exactly
one target with weight > 0, that target declares a TTL and carries an env digest, and no release is under
analysis (no target has a role: a candidate's calls must reach it to be counted). Anything else is a BYPASS.
So the version that runs a call is known before it runs, and the key names it:

    key = sha256(skill, the target's fingerprint, input bytes)

where the fingerprint hashes everything of the target that can change a result: module digest, bundle and
dependency digests, args, limits, capabilities, env names and the env digest (a keyed hash of the env values
the deployer makes; the values themselves never reach the gateway). A deploy, a new env value, new limits:
a new key, never a stale result. A miss is stored only if the version that ran is the one the key names (the
route may have changed meanwhile), and only on success: a failure is never cached.

TTLs are jittered by ±TTL_JITTER, so entries written together do not expire together. Concurrent misses for
one key in this process run the skill once (the others wait for it and share its result, or its error; if
the caller whose `run` it is goes away first, it is cancelled and a remaining caller runs its own);
across gateways, the first to miss takes a short Redis lock (SET NX PX, LOCK_MS) and the others poll L2 for
its result for up to that long before running the skill themselves. Redis failures never fail a call: the
cache degrades to L1 (logged once per outage, rate-limited) and Redis is tried again after
REDIS_RETRY_SECONDS.

Hot keys are refreshed ahead of expiry: an L1 hit on an entry read at least REFRESH_MIN_HITS times, in the last
REFRESH_AHEAD of its TTL, draws whether to refresh it now (the closer to expiry, the likelier: XFetch's draw,
scaled to that window). One refresh per entry, single-flight, at most MAX_REFRESHES at a time, and across
gateways behind the same Redis lock (a gateway that finds the entry already refreshed in L2 takes it from
there). With a `refresh` loader (one that no longer needs the caller's gRPC call) it runs in the background
and every reader keeps getting hits; without one, the reader that drew the refresh runs it itself, as a miss
(grpc.aio must not be asked about a call that has ended: the caller's `run` may only run while it waits). A
refresh that fails or ran another version is stored nowhere: the entry expires as it would have.

Authorization, rate limiting and input validation run before the cache (interceptors, then InvokeSkill's
checks), so a hit is served only to a caller allowed to make the call, with an input the skill accepts; a
refresh runs with the credentials of the reader that triggered it, who was authorized for this very call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.gateway.v1 import gateway_service_pb2 as pb

from services.runtime import metrics
from services.runtime.errors import RateLimitedLog, describe_error

log = logging.getLogger("clawhub.gateway.cache")

TTL_JITTER = 0.10
# How long another gateway's miss may hold a key before this one runs the skill itself, and how often L2 is
# polled meanwhile.
LOCK_MS = 2000
LOCK_POLL_SECONDS = 0.02
REDIS_TIMEOUT_SECONDS = 0.5
REDIS_RETRY_SECONDS = 5.0
# Fingerprints of route targets kept (one per distinct target).
MAX_FINGERPRINTS = 4096
# Refresh-ahead: an entry hit at least REFRESH_MIN_HITS times in this L1 (the hit that draws included) is hot;
# in the last REFRESH_AHEAD of the plan's TTL each hit refreshes it with probability
# exp(-REFRESH_STEEPNESS * remaining / window): ~5% at the window's start, 22% halfway, 1 at expiry. A hot key
# is refreshed early in the window; a key hit a few times per window, if at all, late in it.
REFRESH_AHEAD = 0.2
REFRESH_MIN_HITS = 3
REFRESH_STEEPNESS = 3.0
# Refreshes running at once in one gateway; a hot key found due beyond that is left for a later hit.
MAX_REFRESHES = 4
# How a refresh ended (the `result` of clawhub_gateway_cache_refreshes_total): the skill ran and its result
# replaced the entry; L2 already held a newer one; another gateway held the key's lock; the skill failed; the
# version that ran is not the key's; MAX_REFRESHES were running.
REFRESH_RESULTS = ("refreshed", "l2", "busy", "failed", "stale", "full")

Status: TypeAlias = pb.CacheStatus.ValueType
Loader: TypeAlias = Callable[[], Awaitable[dispatcher_pb.DispatchResponse]]


@dataclass(frozen=True)
class Plan:
    """A call that may be answered from the cache: its key, TTL and the version that would run it."""

    key: str
    ttl: float
    version: str


class Entry:
    """An L1 entry: its value, when it expires, how often it was hit, whether a refresh was tried for it, and
    what its hits answer (made from the value on the first hit, then reused: `shown`, its size in `extra`)."""

    __slots__ = ("expires", "value", "hits", "refreshing", "shown", "extra")

    def __init__(self, expires: float, value: bytes) -> None:
        self.expires = expires
        self.value = value
        self.hits = 0
        self.refreshing = False  # at most one refresh per entry: a failed one is not retried, the entry expires
        self.shown: Any = None
        self.extra = 0


class L1:
    """An in-process LRU bounded by the bytes of its values, each entry with an expiry time."""

    def __init__(self, max_bytes: int, clock: Callable[[], float]) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._items: OrderedDict[str, Entry] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        entry = self.lookup(key)
        return None if entry is None else entry.value

    def lookup(self, key: str) -> Entry | None:
        """The live entry for `key`, counted as a hit and made the most recently used."""
        entry = self._items.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        entry.hits += 1
        return entry

    def put(self, key: str, value: bytes, ttl: float) -> None:
        size = len(value) + len(key)
        if size > self.max_bytes // 4:
            return  # one entry may not push out most of the cache
        self._drop(key)
        self._items[key] = Entry(self._clock() + ttl, value)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._drop(oldest)

    def show(self, key: str, entry: Entry, shown: Any, size: int) -> None:
        """Keep what `entry`'s hits answer (`size` bytes more), if the entry is still the one under `key`."""
        if self._items.get(key) is not entry:
            return
        entry.shown, entry.extra = shown, size
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._items) > 1:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry.value) + len(key) + entry.extra

    def __len__(self) -> int:
        return len(self._items)


class ResultCache:
    """L1 (+ L2 when a Redis URL is given) with single-flight misses. `clock` and `rng` are injectable for
    tests (TTL expiry without sleeping)."""

    def __init__(self, max_bytes: int, redis_url: str = "", redis_prefix: str = "clawhub:cache:",
                 *, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.l1 = L1(max_bytes, clock)
        self._clock = clock
        self._rng = rng or random.Random()
        self._prefix = redis_prefix
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as aioredis  # only gateways configured with Redis load it
            self._redis = aioredis.Redis.from_url(
                redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        self._redis_down_until = -float("inf")
        self._log = RateLimitedLog(log)
        self._flights: dict[str, asyncio.Future[tuple[dispatcher_pb.DispatchResponse, Status]]] = {}
        self._fingerprints: OrderedDict[bytes, bytes] = OrderedDict()
        # skill -> (the route targets it was made for, its key template or None for a bypass): plan() per call.
        self._plans: dict[str, tuple[Sequence[routing_pb2.RouteTarget], tuple[Any, float, str] | None]] = {}
        # Refreshes running, by key: background ones as tasks (cancelled by close()), a reader's own as a future
        # it resolves. A reader that misses a key while its refresh runs waits for it.
        self._refreshes: dict[str, asyncio.Future[Any]] = {}
        self.stats = {"hit_l1": 0, "hit_l2": 0, "miss": 0, "bypass": 0, "stored": 0, "redis_errors": 0,
                      **{f"refresh_{result}": 0 for result in REFRESH_RESULTS}}

    @property
    def enabled(self) -> bool:
        return self.l1.max_bytes > 0 or self._redis is not None

    def plan(self, skill: str, targets: Sequence[routing_pb2.RouteTarget] | None, data: bytes,
             no_cache: bool) -> Plan | None:
        """The call's key when it may be cached (see the module's docstring); None: bypass the cache."""
        if no_cache or not targets or not self.enabled:
            return None
        memo = self._plans.get(skill)
        if memo is None or memo[0] is not targets:
            # Once per skill and route table (the gateway keeps one tuple of targets per route until the next).
            if len(self._plans) >= MAX_FINGERPRINTS:
                self._plans.clear()
            memo = self._plans[skill] = (targets, self._template(skill, targets))
        template = memo[1]
        if template is None:
            return None
        digest = template[0].copy()
        digest.update(data)
        return Plan(digest.hexdigest(), template[1], template[2])

    def _template(self, skill: str, targets: Sequence[routing_pb2.RouteTarget]) -> tuple[Any, float, str] | None:
        """What the keys of `skill`'s calls share under `targets`: the hash of skill and fingerprint (the input
        is added per call), the TTL and the version; None when its calls bypass the cache."""
        live = [t for t in targets if t.weight > 0]
        if len(live) != 1 or any(t.role != routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED for t in targets):
            return None
        target = live[0]
        if not target.HasField("cache_ttl") or not target.env_digest:
            return None
        ttl = target.cache_ttl.ToMilliseconds() / 1000
        if ttl <= 0:
            return None
        digest = hashlib.sha256()
        for part in (skill.encode(), self._fingerprint(target)):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return digest, ttl, target.version

    def _fingerprint(self, target: routing_pb2.RouteTarget) -> bytes:
        """sha256 of everything of `target` that can change a result (weight and role cannot)."""
        raw = target.SerializeToString(deterministic=True)
        found = self._fingerprints.get(raw)
        if found is None:
            copy = routing_pb2.RouteTarget()
            copy.CopyFrom(target)
            copy.ClearField("weight")
            copy.ClearField("role")
            copy.ClearField("input_schema")  # checked before the cache; it cannot change an output
            found = hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()
            self._fingerprints[raw] = found
            if len(self._fingerprints) > MAX_FINGERPRINTS:
                self._fingerprints.popitem(last=False)
        return found

    async def fetch(self, plan: Plan, run: Loader, *, refresh: Loader | None = None,
                    present: Callable[[dispatcher_pb.DispatchResponse, Status], Any] = lambda r, s: (r, s)) -> Any:
        """`present(result, status)`: the cached result for `plan`, or `run()`'s (stored on success), with where it
        came from (by default the pair itself). An L1 entry presents its result once, on its first hit, and every
        hit after gets that same object (so `present` must make one nobody changes): a hit parses nothing.

        `run` may only be awaited while the caller waits (it may ask the caller's gRPC call things, which
        grpc.aio cannot answer once the call has ended). `refresh`, when given, is how a hot entry is refreshed
        in the background: it is called here, while the caller's call is live, and what it returns is awaited
        after that call may have ended, so it must take from the call all it needs when called, and start no
        work until awaited. Without it, a refresh that falls due runs `run` in the foreground (a MISS)."""
        entry = self.l1.lookup(plan.key)
        if entry is not None:
            self.stats["hit_l1"] += 1
            if entry.hits >= REFRESH_MIN_HITS and not entry.refreshing and self._due(entry.expires, plan.ttl):
                if refresh is not None:
                    self._refresh_behind(plan, entry, refresh)
                else:
                    refreshed = await self._refresh_in_front(plan, entry, run)
                    if refreshed is not None:
                        return present(*refreshed)
            shown = entry.shown
            if shown is None:
                shown = present(_parse(entry.value), pb.CACHE_STATUS_HIT_L1)
                size = shown.ByteSize() if hasattr(shown, "ByteSize") else len(entry.value)
                self.l1.show(plan.key, entry, shown, size)
            return shown
        return present(*await self._fetch(plan, run))

    async def _fetch(self, plan: Plan, run: Loader) -> tuple[dispatcher_pb.DispatchResponse, Status]:
        """Past L1: a refresh under way, another caller's miss, L2, or the skill."""
        pending = self._refreshes.get(plan.key)
        if pending is not None:
            # The entry expired while its refresh runs: wait for that rather than run the skill again. Told
            # MISS, like those who wait for another's miss.
            await asyncio.shield(pending)
            value = self.l1.get(plan.key)
            if value is not None:
                return _parse(value), pb.CACHE_STATUS_MISS
        while True:
            flight = self._flights.get(plan.key)
            mine = flight is None
            if flight is None:
                flight = asyncio.ensure_future(self._load(plan, run))
                self._flights[plan.key] = flight
                flight.add_done_callback(lambda f: self._landed(plan.key, f))
            # Callers that waited on another's miss did not run the skill either; they are told MISS (the
            # result was not in the cache when they asked) or HIT_L2.
            try:
                return await asyncio.shield(flight)
            except asyncio.CancelledError:
                if mine:
                    # The load runs this caller's `run`, which reads its gRPC call: grpc.aio crashes the process
                    # when asked about an ended call (context.peer(), SIGSEGV). So the load goes with its caller.
                    flight.cancel()
                    raise
                if flight.cancelled() and not _cancelling():
                    continue  # the caller whose load this was went away; this one loads with its own `run`
                raise

    def _landed(self, key: str, flight: asyncio.Future[tuple[dispatcher_pb.DispatchResponse, Status]]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved even if every waiter went away

    async def _load(self, plan: Plan, run: Callable[[], Awaitable[dispatcher_pb.DispatchResponse]],
                    ) -> tuple[dispatcher_pb.DispatchResponse, Status]:
        value, remaining = await self._l2_get(plan.key)
        if value is not None:
            self.stats["hit_l2"] += 1
            self.l1.put(plan.key, value, remaining if remaining > 0 else self._jittered(plan.ttl))
            return _parse(value), pb.CACHE_STATUS_HIT_L2
        locked = await self._lock(plan.key)
        if not locked:
            # Another gateway runs this call now: wait for its result rather than run the skill again.
            deadline = self._clock() + LOCK_MS / 1000
            while self._clock() < deadline:
                await asyncio.sleep(LOCK_POLL_SECONDS)
                value, remaining = await self._l2_get(plan.key)
                if value is not None:
                    self.stats["hit_l2"] += 1
                    self.l1.put(plan.key, value, remaining if remaining > 0 else self._jittered(plan.ttl))
                    return _parse(value), pb.CACHE_STATUS_HIT_L2
        self.stats["miss"] += 1
        try:
            result = await run()  # an error is raised to every waiter and stored nowhere
            await self._store(plan, result)
            return result, pb.CACHE_STATUS_MISS
        finally:
            if locked:
                await self._unlock(plan.key)

    async def _store(self, plan: Plan, result: dispatcher_pb.DispatchResponse) -> bool:
        """Keep a successful `result` in L1 and L2 for a new (jittered) TTL, if the version that ran is the one
        the key names."""
        if result.version != plan.version:
            return False
        # What the response needs, nothing of the hops (which executor ran it).
        value = dispatcher_pb.DispatchResponse(
            output=result.output, version=result.version, usage=result.usage).SerializeToString()
        ttl = self._jittered(plan.ttl)
        self.l1.put(plan.key, value, ttl)
        await self._l2_put(plan.key, value, ttl)
        self.stats["stored"] += 1
        return True

    def _jittered(self, ttl: float) -> float:
        return ttl * (1 + self._rng.uniform(-TTL_JITTER, TTL_JITTER))

    # Refresh-ahead.

    def _due(self, expires: float, ttl: float) -> bool:
        """Whether a hit on a hot entry that expires at `expires` refreshes it now: in the last REFRESH_AHEAD of
        `ttl`, with a probability that rises to 1 at expiry (so gateways and keys do not all refresh at once)."""
        window = REFRESH_AHEAD * ttl
        remaining = expires - self._clock()
        return remaining <= window and self._rng.random() < math.exp(-REFRESH_STEEPNESS * remaining / window)

    def _claim(self, plan: Plan, entry: Entry) -> bool:
        """Take the entry's one refresh, if no other runs for its key and fewer than MAX_REFRESHES run at all."""
        if plan.key in self._refreshes:
            return False
        if len(self._refreshes) >= MAX_REFRESHES:
            self._refreshed("full")  # not claimed: a later hit may try again
            return False
        entry.refreshing = True
        return True

    def _refresh_behind(self, plan: Plan, entry: Entry, refresh: Loader) -> None:
        """Start refreshing `entry` in the background with `refresh` (called now, awaited later)."""
        if not self._claim(plan, entry):
            return
        try:
            loading = refresh()
        except Exception as exc:  # noqa: BLE001 - a refresh never fails the read that triggered it
            log.debug("could not start refreshing a cache entry: %s", describe_error(exc))
            self._refreshed("failed")
            return
        task = asyncio.ensure_future(self._refresh(plan, lambda: loading))
        self._refreshes[plan.key] = task

        def done(finished: asyncio.Future[Any]) -> None:
            if self._refreshes.get(plan.key) is finished:
                del self._refreshes[plan.key]
            if asyncio.iscoroutine(loading):
                loading.close()  # never awaited when cancelled before it started; a no-op otherwise
            error = None if finished.cancelled() else finished.exception()
            if error is not None:
                log.debug("refreshing a cache entry failed: %s", describe_error(error))

        task.add_done_callback(done)

    async def _refresh_in_front(self, plan: Plan, entry: Entry,
                                run: Loader) -> tuple[dispatcher_pb.DispatchResponse, Status] | None:
        """Refresh `entry` with the caller's own `run`, while the caller waits (cancelled with it)."""
        if not self._claim(plan, entry):
            return None
        landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refreshes[plan.key] = landed
        try:
            return await self._refresh(plan, run)
        finally:
            if self._refreshes.get(plan.key) is landed:
                del self._refreshes[plan.key]
            landed.set_result(None)

    async def _refresh(self, plan: Plan, load: Loader) -> tuple[dispatcher_pb.DispatchResponse, Status] | None:
        """One refresh of `plan`'s entry: the new result and where it came from, or None when the entry stays
        as it is (to expire when it would have)."""
        window = REFRESH_AHEAD * plan.ttl
        value, remaining = await self._l2_get(plan.key)
        if value is not None and remaining > window:
            # Another gateway refreshed it already.
            self.l1.put(plan.key, value, remaining)
            self._refreshed("l2")
            return _parse(value), pb.CACHE_STATUS_HIT_L2
        if not await self._lock(plan.key):
            # Another gateway runs this call now; its result reaches L2, where this gateway finds it when its
            # own entry expires.
            self._refreshed("busy")
            return None
        try:
            try:
                result = await load()
            except Exception as exc:  # noqa: BLE001 - a failure is stored nowhere; the entry expires
                log.debug("refreshing a cache entry failed; it expires as it would have: %s", describe_error(exc))
                self._refreshed("failed")
                return None
            if not await self._store(plan, result):
                self._refreshed("stale")  # the route moved: its new version has another key
                return None
        finally:
            await self._unlock(plan.key)
        self._refreshed("refreshed")
        return result, pb.CACHE_STATUS_MISS

    def _refreshed(self, result: str) -> None:
        self.stats[f"refresh_{result}"] += 1
        metrics.cache_refresh(result)

    # L2.

    def _redis_usable(self) -> bool:
        return self._redis is not None and self._clock() >= self._redis_down_until

    def _redis_failed(self, exc: Exception) -> None:
        self.stats["redis_errors"] += 1
        self._redis_down_until = self._clock() + REDIS_RETRY_SECONDS
        self._log.warning("the result cache's Redis (L2) failed; using L1 only for %.0f s: %s",
                          REDIS_RETRY_SECONDS, describe_error(exc))

    async def _l2_get(self, key: str) -> tuple[bytes | None, float]:
        if not self._redis_usable():
            return None, 0.0
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._prefix + "v:" + key)
                pipe.pttl(self._prefix + "v:" + key)
                value, pttl = await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - any Redis failure degrades to L1, never fails the call
            self._redis_failed(exc)
            return None, 0.0
        return (bytes(value) if value is not None else None), (pttl / 1000 if pttl and pttl > 0 else 0.0)

    async def _l2_put(self, key: str, value: bytes, ttl: float) -> None:
        if not self._redis_usable():
            return
        try:
            await self._redis.set(self._prefix + "v:" + key, value, px=max(int(ttl * 1000), 1))
        except Exception as exc:  # noqa: BLE001
            self._redis_failed(exc)

    async def _lock(self, key: str) -> bool:
        """True when this gateway may run the call (it holds the lock, or there is no L2 to share with)."""
        if not self._redis_usable():
            return True
        try:
            return bool(await self._redis.set(self._prefix + "lock:" + key, b"1", nx=True, px=LOCK_MS))
        except Exception as exc:  # noqa: BLE001
            self._redis_failed(exc)
            return True

    async def _unlock(self, key: str) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.delete(self._prefix + "lock:" + key)
        except Exception as exc:  # noqa: BLE001
            self._redis_failed(exc)

    async def close(self) -> None:
        """Cancel the background refreshes (they must not outlive the gateway), then let go of Redis."""
        running = [f for f in self._refreshes.values() if isinstance(f, asyncio.Task)]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()


def _cancelling() -> bool:
    """Whether the running task itself was asked to stop (not only something it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _parse(value: bytes) -> dispatcher_pb.DispatchResponse:
    result = dispatcher_pb.DispatchResponse()
    result.ParseFromString(value)
    return result
