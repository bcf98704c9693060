"""Backpressure, retries and ejection for the data path: the pure building blocks the router
(services/runtime/routing.py) puts around each call to an executor. Nothing here talks gRPC or logs; every
clock is injectable so that tests drive time by hand. See docs/routing.md, "Backpressure, retries and ejection".

- `AdaptiveLimit`: how many calls one endpoint gets at once, learnt from latency; calls beyond it wait in a
  FIFO that sheds a call only when its deadline cannot be met (`Shed`), instead of refusing it.
- `RetryBudget`: retries allowed as a bounded share of the original calls (plus a small floor), so that retries
  cannot multiply the load of an overloaded service.
- `backoff`: exponential backoff with full jitter between attempts.
- `OutlierDetector`: endpoints that keep failing are ejected for a growing time and probed back one call at a
  time, never more than a set share of the pool at once.

These run on every call, thousands of times a second, in Python: the common path of each is a few attribute
reads and integer operations, with no allocation beyond the awaitable that an `async def` costs (the router
can avoid even that with `AdaptiveLimit.try_acquire` first).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable

# What a shed call is told to wait before trying this endpoint again (RetryInfo), within these bounds.
MIN_RETRY_SECONDS = 0.01
MAX_RETRY_SECONDS = 5.0

_random = random.Random()  # jitter, unless a caller brings its own generator


class Shed(Exception):
    """A call that cannot get a slot before its deadline (`cause` "deadline") or finds the wait queue full
    (`cause` "queue_full"); `retry_after` is a suggested pause in seconds before trying this endpoint again
    (another endpoint may be tried at once)."""

    def __init__(self, cause: str, retry_after: float) -> None:
        super().__init__(f"shed ({cause}); retry after {retry_after:.3f} s")
        self.cause = cause
        self.retry_after = retry_after


class AdaptiveLimit:
    """Concurrency limit for one endpoint that tracks latency, with a deadline-aware FIFO of waiting calls.

    The algorithm is a latency gradient against a probed no-load baseline, as in Netflix concurrency-limits'
    Gradient and Envoy's adaptive concurrency filter. `rtt` is a moving average of call times (`short_window`
    calls). `min_rtt`, the baseline, is the mean call time measured in a probe: about every `probe_interval`
    seconds (jittered, so that gateways do not probe together) the limit drops to min_limit until
    `probe_samples` calls started at that concurrency have ended, and then returns to where it was. After each
    call, `gradient = clamp(tolerance * min_rtt / rtt, 0.5, 1)` and the limit moves by 1/limit of the step
    `smoothing * (limit * gradient + sqrt(limit) - limit)`: about one whole step per round trip of calls, as TCP
    grows its window per acknowledgement. While calls take about what they take unloaded the gradient is 1 and
    the limit grows by sqrt(limit) per round trip (headroom that looks for more concurrency); once queueing at
    the endpoint pushes `rtt` past `tolerance` times the baseline it shrinks, by at most half per round trip.
    It does not grow while fewer than half its slots are in use (nothing was learnt about more concurrency). A
    call `dropped` because the endpoint said it is overloaded cuts the limit by `backoff_ratio`, at most once
    per rtt (TCP's once per window): the calls of one burst fail together and are one signal.

    Why this and not AIMD or Gradient2: AIMD moves only on drops, so it settles where the endpoint starts
    refusing, with the endpoint's own queue full: the latency this is meant to avoid. Gradient2 compares `rtt`
    with its own long-term average, and a baseline that is any kind of running statistic of the calls (an
    average, a rolling minimum) follows the queueing the limit itself causes, so the limit creeps up until the
    endpoint refuses. Only a measurement at low concurrency tells queueing from work, hence the probe (Envoy's
    minRTT recalculation, BBR's ProbeRTT). Simulated (calls of 1 ms on 2 threads, an endpoint queue of 64,
    unbounded demand; tests/runtime/test_resilience.py has the simulation): Gradient2 settled near 40-60 in
    flight at 28 ms per call and overflowed the endpoint's queue thousands of times in 20 s; this settles near
    10 in flight at 6 ms per call (p50; 12 ms p99), with no overflow and the same throughput. A probe costs
    about `probe_samples / min_limit` round trips at low concurrency per interval: under 1% of the throughput
    at the defaults. The price of a baseline: calls of very different lengths under one limit make the mix
    look like queueing, so the router should keep one limit per (endpoint, skill version), not per endpoint.

    `acquire`/`release` bracket a call; `try_acquire` is the non-waiting form (take a slot only if one is free
    and nobody is waiting), for choosing among endpoints without queueing. Waiting is asyncio, on the running
    loop; the deadline timer is a loop timer set to `deadline - clock()`, so an injected clock must tick in
    seconds. One limit belongs to one event loop (no locks: the loop is the lock).
    """

    __slots__ = (
        "_clock", "_rng", "_min_limit", "_max_limit", "_max_queue", "_tolerance", "_smoothing", "_backoff_ratio",
        "_alpha", "_short_window", "_probe_interval", "_probe_samples", "_estimate", "_limit", "_in_flight",
        "_queued", "_waiters", "_rtt", "_warm", "_baseline", "_probe_at", "_probe_skip", "_probe_left",
        "_probe_sum", "_backoff_until", "_deadlines", "_pushed", "_sweeper", "_sweep_at",
    )

    def __init__(self, *, initial: int = 32, min_limit: int = 4, max_limit: int = 1000,
                 clock: Callable[[], float] = time.monotonic, max_queue: int = 1000, tolerance: float = 1.5,
                 smoothing: float = 0.5, backoff_ratio: float = 0.7, short_window: int = 10,
                 probe_interval: float = 5.0, probe_samples: int = 16, rng: random.Random | None = None) -> None:
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError(f"want 1 <= min_limit <= initial <= max_limit, got {min_limit}, {initial}, "
                             f"{max_limit}")
        if max_queue < 0:
            raise ValueError(f"max_queue must not be negative, got {max_queue}")
        if tolerance < 1.0 or not 0.0 < smoothing <= 1.0 or not 0.0 < backoff_ratio < 1.0:
            raise ValueError(f"want tolerance >= 1, 0 < smoothing <= 1 and 0 < backoff_ratio < 1; got "
                             f"{tolerance}, {smoothing}, {backoff_ratio}")
        if short_window < 1 or probe_interval <= 0 or probe_samples < 1:
            raise ValueError(f"want short_window >= 1, probe_interval > 0 and probe_samples >= 1; got "
                             f"{short_window}, {probe_interval}, {probe_samples}")
        self._clock = clock
        self._rng = rng or _random
        self._min_limit = min_limit
        self._max_limit = max_limit
        self._max_queue = max_queue
        self._tolerance = tolerance
        self._smoothing = smoothing
        self._backoff_ratio = backoff_ratio
        self._alpha = 2.0 / (short_window + 1)  # weight of the newest call in the moving average
        self._short_window = short_window
        self._probe_interval = probe_interval
        self._probe_samples = probe_samples
        self._estimate = float(initial)  # the limit before rounding down (during a probe: the one to return to)
        self._limit = initial
        self._in_flight = 0
        self._queued = 0  # live waiters; _waiters may also hold settled futures, skipped when reached
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Waiters' deadlines, earliest first, with one timer for the earliest (not a timer per waiter: a timer
        # costs a few µs to make and cancel, and most waiters are served long before their deadline).
        self._deadlines: list[tuple[float, int, asyncio.Future[None]]] = []
        self._pushed = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._rtt = 0.0  # moving average of call times; 0: no call measured yet
        self._warm = 0  # calls measured, counted up to short_window (until then _rtt is a plain mean)
        self._baseline = 0.0  # mean call time in the last probe; 0: none yet
        self._probe_at = -math.inf  # when the next probe is due (the first as soon as the limit is in use)
        self._probe_skip = 0  # during a probe: calls started before it, still to end (not measured)
        self._probe_left = 0  # during a probe: calls still to measure; 0: not probing
        self._probe_sum = 0.0
        self._backoff_until = -math.inf  # drops before this time belong to a burst already acted on

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def rtt(self) -> float:
        """Recent call time in seconds (moving average; 0 before the first measured call)."""
        return self._rtt

    @property
    def min_rtt(self) -> float:
        """The no-load baseline the gradient compares `rtt` with (0 before it is known)."""
        return self._baseline

    @property
    def probing(self) -> bool:
        """Whether the limit is down at min_limit to measure the baseline."""
        return self._probe_left > 0

    def expected_wait(self, position: int | None = None) -> float:
        """Seconds until a call at `position` in the queue (default: one joining now) gets a slot, judging by
        recent call times: slots free up at about `limit / rtt` per second (Little's law)."""
        if position is None:
            position = self._queued + 1
        return position * self._rtt / self._estimate

    def try_acquire(self) -> bool:
        if self._in_flight < self._limit and not self._queued:
            self._in_flight += 1
            return True
        return False

    async def acquire(self, deadline: float) -> None:
        """Take a slot now if in_flight < limit (and nobody waits), else wait FIFO for one. `deadline` is on
        the limit's clock: the latest moment at which getting a slot is still of use (the router passes the
        call's deadline less the time the call itself needs, e.g. `rtt`; math.inf: no deadline). Raises
        Shed("deadline") at once when the expected wait would pass the deadline, or when the deadline passes
        while waiting; Shed("queue_full") when max_queue calls already wait. Cancellation while waiting leaks
        no slot: a slot handed to a waiter cancelled before it resumed goes to the next waiter."""
        if self._in_flight < self._limit and not self._queued:
            self._in_flight += 1
            return
        if self._queued >= self._max_queue:
            raise Shed("queue_full", self._retry_after(self._queued))
        now = self._clock()
        position = self._queued + 1
        if now + position * self._rtt / self._estimate >= deadline:
            raise Shed("deadline", self._retry_after(position))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self._queued += 1
        # No deadline for a call without one (math.inf): it waits until served, cancelled or shed by size.
        if deadline != math.inf:
            self._watch_deadline(loop, waiter, deadline, now)
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done():  # cancelled some other way than through the waiter itself
                waiter.cancel()
            if waiter.cancelled():  # cancelled while still waiting: it leaves the queue
                self._queued -= 1
                self._compact()
            elif waiter.exception() is None:  # a slot was handed over just before the cancellation
                self._in_flight -= 1
                self._wake()
            raise

    def _watch_deadline(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], deadline: float,
                        now: float) -> None:
        deadlines = self._deadlines
        if len(deadlines) > 2 * self._queued + 64:  # served waiters pile up until their deadline: drop them
            deadlines[:] = [entry for entry in deadlines if not entry[2].done()]
            heapq.heapify(deadlines)
        self._pushed += 1
        heapq.heappush(deadlines, (deadline, self._pushed, waiter))
        if deadline < self._sweep_at:
            if self._sweeper is not None:
                self._sweeper.cancel()
            self._sweep_at = deadline
            self._sweeper = loop.call_later(deadline - now, self._sweep)

    def _sweep(self) -> None:
        """Shed every waiter whose deadline passed; then wait for the next deadline of a waiter still waiting."""
        # The timer was set for `due` (on the loop's clock, which is the limit's in the router): what was due
        # then is due now, whatever this limit's clock says.
        due = self._sweep_at
        self._sweeper, self._sweep_at = None, math.inf
        now = self._clock()
        due = now if now > due else due
        deadlines = self._deadlines
        while deadlines and (deadlines[0][0] <= due or deadlines[0][2].done()):
            self._expire(heapq.heappop(deadlines)[2])
        if deadlines:
            self._sweep_at = deadlines[0][0]
            self._sweeper = asyncio.get_running_loop().call_later(max(0.0, self._sweep_at - now), self._sweep)

    def release(self, rtt: float, *, dropped: bool = False, ignore: bool = False) -> None:
        """The call that held a slot ended after `rtt` seconds. `dropped`: it failed in a way that says the
        endpoint is overloaded (EXECUTOR_OVERLOADED, RESOURCE_EXHAUSTED, its deadline passed at the endpoint):
        the limit backs off multiplicatively. `ignore`: its time says nothing about the endpoint's load (the
        caller cancelled, the connection failed at once): the slot is freed and nothing is learnt. Wakes the
        next waiters."""
        in_flight = self._in_flight
        if in_flight <= 0:
            raise RuntimeError("release() without a slot held: every release must match one acquire")
        self._in_flight = in_flight - 1
        if dropped:
            now = self._clock()
            if now >= self._backoff_until:
                self._set_estimate(self._estimate * self._backoff_ratio)
                self._backoff_until = now + self._rtt
            if self._probe_skip:
                self._probe_skip -= 1
        elif not ignore:
            self._learn(rtt, in_flight)
        elif self._probe_skip:
            self._probe_skip -= 1
        if self._queued:
            self._wake()

    def _learn(self, rtt: float, in_flight: int) -> None:
        if self._probe_left:
            self._probe(rtt)
            return
        warm = self._warm
        if warm < self._short_window:  # the first calls: a plain mean (the fastest calls end first)
            warm += 1
            self._warm = warm
            self._rtt = average = self._rtt + (rtt - self._rtt) / warm
            if warm < self._short_window:
                return
        else:
            self._rtt = average = self._rtt + self._alpha * (rtt - self._rtt)
        estimate = self._estimate
        if in_flight * 2 < estimate:  # app-limited: most slots idle, nothing learnt about more concurrency
            if not self._baseline:  # ... but the calls ran at low concurrency: a baseline until the probe
                self._baseline = average
            return
        now = self._clock()
        if now >= self._probe_at:
            self._probe_left = self._probe_samples
            self._probe_skip = in_flight - 1  # the other calls in flight started before the probe
            self._probe_sum = 0.0
            self._limit = self._min_limit
            return
        baseline = self._baseline
        if average <= 0.0 or not baseline:  # a clock too coarse to see the calls
            gradient = 1.0
        else:
            gradient = self._tolerance * baseline / average
            gradient = 0.5 if gradient < 0.5 else 1.0 if gradient > 1.0 else gradient
        self._set_estimate(estimate + self._smoothing * (gradient - 1.0 + 1.0 / math.sqrt(estimate)))

    def _probe(self, rtt: float) -> None:
        if self._probe_skip:
            self._probe_skip -= 1
            return
        self._probe_sum += rtt
        self._probe_left -= 1
        if not self._probe_left:
            self._baseline = self._probe_sum / self._probe_samples
            self._probe_at = self._clock() + self._probe_interval * (0.8 + 0.4 * self._rng.random())
            self._set_estimate(self._estimate)  # back to the limit before the probe (release() wakes waiters)

    def _set_estimate(self, estimate: float) -> None:
        if estimate < self._min_limit:
            estimate = self._min_limit
        elif estimate > self._max_limit:
            estimate = self._max_limit
        self._estimate = estimate
        if not self._probe_left:
            self._limit = int(estimate)

    def _wake(self) -> None:
        """Hand free slots to waiters in FIFO order (more than one when the limit grew)."""
        waiters = self._waiters
        while waiters and self._in_flight < self._limit:
            waiter = waiters.popleft()
            if waiter.done():  # expired or cancelled, already counted out of _queued
                continue
            waiter.set_result(None)
            self._queued -= 1
            self._in_flight += 1

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self._queued -= 1
        waiter.set_exception(Shed("deadline", self._retry_after(self._queued + 1)))
        self._compact()

    def _compact(self) -> None:
        """Drop settled futures from the queue once they outnumber live ones: amortized O(1) per waiter, and a
        storm of expiring waiters cannot grow the deque while no slot frees up."""
        if len(self._waiters) > 2 * self._queued + 32:
            self._waiters = deque(waiter for waiter in self._waiters if not waiter.done())

    def _retry_after(self, position: int) -> float:
        wait = position * self._rtt / self._estimate
        return MIN_RETRY_SECONDS if wait < MIN_RETRY_SECONDS else MAX_RETRY_SECONDS if wait > MAX_RETRY_SECONDS \
            else wait


class RetryBudget:
    """Retries as a bounded share of the original calls, after Finagle's RetryBudget: each original call
    deposits `ratio` tokens (0.2: retries add at most 20% to the load), each retry withdraws 1, and
    `min_per_second * ttl` tokens are a standing reserve, so a quiet service can still retry (about
    `min_per_second` retries per second). Deposits and withdrawals count for `ttl` seconds and then expire, so an
    old burst of calls cannot fund a retry storm now, and the retries of the last `ttl` seconds keep counting
    against it. The window is `slices` buckets of `ttl / slices` seconds (a ring: O(1) per call, memory fixed).
    Tokens are counted in integer thousandths, so no rounding drifts over millions of calls. Not thread-safe:
    one budget per event loop (the router's, per service or per skill)."""

    __slots__ = ("_clock", "_deposit", "_reserve", "_slice_seconds", "_ring", "_index", "_slice_end", "_sum")

    _SCALE = 1000  # units per token

    def __init__(self, *, ratio: float = 0.2, min_per_second: float = 10.0, ttl: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, slices: int = 10) -> None:
        if ratio < 0 or min_per_second < 0 or ttl <= 0 or slices < 1:
            raise ValueError(f"want ratio >= 0, min_per_second >= 0, ttl > 0 and slices >= 1; got {ratio}, "
                             f"{min_per_second}, {ttl}, {slices}")
        self._clock = clock
        self._deposit = round(ratio * self._SCALE)
        self._reserve = round(min_per_second * ttl * self._SCALE)
        self._slice_seconds = ttl / slices
        self._ring = [0] * slices  # net units deposited (+) and withdrawn (-) per slice
        self._index = 0
        self._slice_end = clock() + self._slice_seconds
        self._sum = 0  # sum of the ring

    def deposit(self) -> None:
        """One per original call (not per retry)."""
        now = self._clock()
        if now >= self._slice_end:
            self._advance(now)
        self._ring[self._index] += self._deposit
        self._sum += self._deposit

    def try_withdraw(self) -> bool:
        """One per retry; False: the budget is spent, do not retry (answer with the last error)."""
        now = self._clock()
        if now >= self._slice_end:
            self._advance(now)
        if self._reserve + self._sum < self._SCALE:
            return False
        self._ring[self._index] -= self._SCALE
        self._sum -= self._SCALE
        return True

    @property
    def balance(self) -> float:
        """Retries the budget would allow now (for metrics and tests)."""
        now = self._clock()
        if now >= self._slice_end:
            self._advance(now)
        return max(0, self._reserve + self._sum) / self._SCALE

    def _advance(self, now: float) -> None:
        """Move to the slice holding `now`, expiring every slice passed (at most the whole ring)."""
        ring = self._ring
        passed = int((now - self._slice_end) / self._slice_seconds) + 1
        for _ in range(min(len(ring), passed)):
            self._index = (self._index + 1) % len(ring)
            self._sum -= ring[self._index]
            ring[self._index] = 0
        self._slice_end += passed * self._slice_seconds



def backoff(attempt: int, *, base: float = 0.01, cap: float = 0.2, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry): exponential backoff with full
    jitter, uniform(0, min(cap, base * 2**attempt)). Full jitter spreads the retries of calls that failed
    together, so they do not come back together (AWS Architecture Blog, "Exponential Backoff And Jitter")."""
    if attempt < 0:
        raise ValueError(f"attempt must not be negative, got {attempt}")
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    return (rng or _random).uniform(0.0, ceiling)


_HEALTHY, _EJECTED, _PROBING = 0, 1, 2


class _Endpoint:
    __slots__ = ("state", "failures", "ejections", "until", "probe_sent_at", "readmitted_at")

    def __init__(self) -> None:
        self.state = _HEALTHY
        self.failures = 0  # consecutive failures
        self.ejections = 0  # times ejected since it last stayed healthy for reset_after
        self.until = 0.0  # when the current ejection ends
        self.probe_sent_at: float | None = None  # when the probe call was let through; None: not yet
        self.readmitted_at = 0.0


class OutlierDetector:
    """Ejects endpoints that keep failing, as Envoy's outlier detection (consecutive errors) and a circuit
    breaker do: after `consecutive` failures in a row (the caller reports UNAVAILABLE, overload and internal
    errors; not a skill's own errors) an endpoint is ejected for `base_ejection * times ejected` seconds
    (at most `max_ejection`). When that time ends it is probing: exactly one call may go to it (`available`
    says True once); success readmits it, failure ejects it again for longer. The ejection count resets once it
    has stayed healthy for `reset_after` seconds (default max_ejection), so an endpoint that failed once last
    hour starts from the short ejection again. A probe whose result never comes (the call was cancelled) is
    given up after `probe_timeout` seconds and another probe is allowed.

    At most `max_ejected_percent` of the known endpoints are ejected (or probing) at once: a failure that would
    eject one more is counted but does not eject, so a global outage leaves the pool to the retry budget and
    the limits rather than emptying it (one endpoint alone is never ejected at the default 50%).

    Results for endpoints not in the set (removed ones, or before `set_endpoints`) are ignored, and such
    endpoints are available: the detector only ever narrows the set the router knows. Results that arrive
    while an endpoint is ejected (calls sent before it was) are ignored too. O(1) per call; not thread-safe.
    """

    __slots__ = ("_consecutive", "_base", "_max", "_max_percent", "_clock", "_reset_after", "_probe_timeout",
                 "_endpoints", "_out")

    def __init__(self, *, consecutive: int = 5, base_ejection: float = 1.0, max_ejection: float = 30.0,
                 max_ejected_percent: float = 50.0, clock: Callable[[], float] = time.monotonic,
                 reset_after: float | None = None, probe_timeout: float = 10.0) -> None:
        if consecutive < 1 or base_ejection <= 0 or max_ejection < base_ejection or \
                not 0 <= max_ejected_percent <= 100 or probe_timeout <= 0:
            raise ValueError(f"want consecutive >= 1, 0 < base_ejection <= max_ejection, 0 <= "
                             f"max_ejected_percent <= 100 and probe_timeout > 0; got {consecutive}, {base_ejection}, "
                             f"{max_ejection}, {max_ejected_percent}, {probe_timeout}")
        self._consecutive = consecutive
        self._base = base_ejection
        self._max = max_ejection
        self._max_percent = max_ejected_percent
        self._clock = clock
        self._reset_after = max_ejection if reset_after is None else reset_after
        self._probe_timeout = probe_timeout
        self._endpoints: dict[str, _Endpoint] = {}
        self._out = 0  # endpoints ejected or probing

    def set_endpoints(self, endpoints: Iterable[str]) -> None:
        """The endpoints now known: new ones start healthy, those still known keep their state, removed ones
        are forgotten (and no longer count for max_ejected_percent)."""
        wanted = dict.fromkeys(endpoints)  # ordered, so that ejected() lists them in a stable order
        for name in [name for name in self._endpoints if name not in wanted]:
            if self._endpoints.pop(name).state != _HEALTHY:
                self._out -= 1
        for name in wanted:
            if name not in self._endpoints:
                self._endpoints[name] = _Endpoint()

    def available(self, endpoint: str, *, claim: bool = True) -> bool:
        """Whether a call may go to `endpoint` now: healthy, or probing and its one probe not yet sent. For a
        probing endpoint True means the caller sends the probe (ask only for the endpoint about to be called);
        `claim=False` asks without taking the probe."""
        state = self._endpoints.get(endpoint)
        if state is None or state.state == _HEALTHY:
            return True
        now = self._clock()
        if state.state == _EJECTED:
            if now < state.until:
                return False
            state.state = _PROBING
            state.probe_sent_at = None
        if state.probe_sent_at is not None and now - state.probe_sent_at < self._probe_timeout:
            return False
        if claim:
            state.probe_sent_at = now
        return True

    def success(self, endpoint: str) -> None:
        state = self._endpoints.get(endpoint)
        if state is None:
            return
        if state.state == _HEALTHY:
            state.failures = 0
        elif state.state == _PROBING and state.probe_sent_at is not None:
            state.state = _HEALTHY
            state.failures = 0
            state.readmitted_at = self._clock()
            self._out -= 1

    def failure(self, endpoint: str) -> None:
        state = self._endpoints.get(endpoint)
        if state is None:
            return
        if state.state == _HEALTHY:
            state.failures += 1
            if state.failures < self._consecutive:
                return
            if (self._out + 1) * 100 > self._max_percent * len(self._endpoints):
                return  # ejecting it would take too much of the pool out: keep counting, try on the next one
            now = self._clock()
            if now - state.readmitted_at >= self._reset_after:
                state.ejections = 0
            self._out += 1
            self._eject(state, now)
        elif state.state == _PROBING and state.probe_sent_at is not None:
            self._eject(state, self._clock())

    def _eject(self, state: _Endpoint, now: float) -> None:
        state.ejections += 1
        state.state = _EJECTED
        state.failures = 0
        state.probe_sent_at = None
        state.until = now + min(self._max, self._base * state.ejections)

    def ejected(self) -> list[str]:
        """Endpoints out of rotation now (ejected or probing), for metrics and status."""
        if not self._out:
            return []
        return [name for name, state in self._endpoints.items() if state.state != _HEALTHY]
