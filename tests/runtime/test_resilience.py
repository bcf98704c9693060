"""The router's building blocks (services/runtime/resilience.py): the adaptive concurrency limit and its
deadline-aware queue, the retry budget, backoff, and outlier ejection. Time is a hand-driven clock everywhere
except the two tests of a deadline passing while a call waits, which need the event loop's own timer."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from services.runtime.resilience import (
    MAX_RETRY_SECONDS,
    MIN_RETRY_SECONDS,
    AdaptiveLimit,
    OutlierDetector,
    RetryBudget,
    Shed,
    backoff,
)


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fill(limit: AdaptiveLimit) -> None:
    """Take every free slot, as a router with more demand than the limit would."""
    while limit.try_acquire():
        pass


def shed_at_once(waiting: Coroutine[Any, Any, None]) -> Shed:
    """The Shed that `waiting` raises before it ever suspends (fails if it would wait)."""
    with pytest.raises(Shed) as shed:
        waiting.send(None)
    return shed.value


async def settle() -> None:
    """Let woken tasks run."""
    for _ in range(3):
        await asyncio.sleep(0)


# --- AdaptiveLimit: how the limit moves ---------------------------------------------------------------------


def steady(size: int, clock: Clock, **kwargs: float) -> AdaptiveLimit:
    """A limit that moves only with latency (no probes after the first, a fixed jitter)."""
    return AdaptiveLimit(initial=size, max_limit=size, clock=clock, probe_interval=1e9, rng=random.Random(1),
                         **kwargs)  # type: ignore[arg-type]


def saturated_at(limit: AdaptiveLimit, clock: Clock, rtt: float, calls: int) -> None:
    """`calls` calls of `rtt` seconds, each replaced as it ends, with more demand than the limit."""
    for _ in range(calls):
        fill(limit)
        clock.advance(0.001)
        limit.release(rtt)


def test_the_first_probe_measures_the_baseline_at_min_limit() -> None:
    clock = Clock()
    limit = AdaptiveLimit(initial=32, min_limit=4, clock=clock, short_window=10, probe_samples=16)
    saturated_at(limit, clock, 0.010, 9)
    assert not limit.probing and limit.min_rtt == 0.0, "warming up: a plain mean of the first calls"
    saturated_at(limit, clock, 0.010, 1)
    assert limit.probing and limit.limit == 4
    saturated_at(limit, clock, 0.500, 31)  # the calls that started before the probe: not its measure
    saturated_at(limit, clock, 0.020, 15)
    assert limit.probing and limit.limit == 4
    saturated_at(limit, clock, 0.020, 1)
    assert not limit.probing
    assert limit.min_rtt == pytest.approx(0.020)
    assert limit.limit == 32, "back where it was"


async def test_waiters_queued_during_a_probe_are_admitted_when_it_ends() -> None:
    clock = Clock()
    limit = AdaptiveLimit(initial=16, max_limit=16, clock=clock, probe_samples=4, rng=random.Random(1))
    saturated_at(limit, clock, 0.010, 100)
    assert not limit.probing and limit.limit == 16
    clock.advance(10.0)
    saturated_at(limit, clock, 0.010, 1)
    assert limit.probing
    assert limit.in_flight == 15
    limit.release(0.001, dropped=True)  # an overload signal during the probe lowers the limit it returns to
    for _ in range(14):
        if limit.in_flight >= 4:
            assert not limit.try_acquire(), "at most min_limit calls in flight while probing"
        limit.release(0.500)  # not measured: they started at the old concurrency
    assert limit.probing and limit.limit == 4
    for _ in range(4):
        assert limit.try_acquire()
    waiters = [asyncio.create_task(limit.acquire(clock() + 10.0)) for _ in range(12)]
    await settle()
    for _ in range(4):  # the four probe calls end
        limit.release(0.010)
        await settle()
    assert not limit.probing and limit.limit == 11  # 16 * 0.7
    assert limit.min_rtt == pytest.approx(0.010)
    assert (limit.in_flight, limit.queued) == (11, 1)
    limit.release(0.010)
    await asyncio.gather(*waiters)


def test_limit_grows_while_latency_stays_flat() -> None:
    clock = Clock()
    limit = AdaptiveLimit(initial=10, max_limit=100, clock=clock, probe_interval=1e9)
    seen = []
    for _ in range(3000):
        fill(limit)
        clock.advance(0.001)
        limit.release(0.010)
        if not limit.probing:
            seen.append(limit.limit)
    assert seen == sorted(seen), "a flat latency never shrinks the limit"
    assert limit.limit == 100, "it grows to max_limit and stops there"
    assert limit.rtt == pytest.approx(0.010) and limit.min_rtt == pytest.approx(0.010)


def test_limit_does_not_grow_while_most_slots_are_idle() -> None:
    clock = Clock()
    limit = AdaptiveLimit(initial=10, clock=clock)
    for _ in range(300):
        assert limit.try_acquire()
        clock.advance(0.001)
        limit.release(0.010)
    assert limit.limit == 10, "one call at a time says nothing about 11"
    assert not limit.probing, "calls at low concurrency are a baseline already"
    assert limit.min_rtt == pytest.approx(0.010)


def test_limit_shrinks_when_latency_rises_then_follows_a_lasting_change() -> None:
    clock = Clock()
    limit = AdaptiveLimit(initial=64, min_limit=4, max_limit=64, clock=clock, probe_interval=5.0,
                          rng=random.Random(1))
    saturated_at(limit, clock, 0.010, 200)
    assert limit.limit == 64 and limit.min_rtt == pytest.approx(0.010)
    saturated_at(limit, clock, 0.050, 600)  # five times the baseline: queueing at the endpoint
    assert limit.limit <= 6, limit.limit
    assert limit.min_rtt == pytest.approx(0.010), "no probe yet: the baseline holds"
    clock.advance(6.0)  # the next probe (5 s, jittered by up to 20%) measures 50 ms at low concurrency
    saturated_at(limit, clock, 0.050, 30)
    assert limit.min_rtt == pytest.approx(0.050)
    saturated_at(limit, clock, 0.050, 3000)
    assert limit.limit == 64


def test_latency_spikes_move_the_limit_by_half_a_step_at_most() -> None:
    clock = Clock()
    limit = steady(100, clock, short_window=1)
    saturated_at(limit, clock, 0.010, 300)
    assert limit.limit == 100
    fill(limit)
    limit.release(10.0)  # one pathological call
    assert limit.limit == 99, "less than a slot"
    saturated_at(limit, clock, 10.0, 9)  # ten in a row: each moves it by (0.5 - 1/sqrt(100)) * smoothing
    assert limit.limit == 98


def test_drops_back_off_multiplicatively_once_per_rtt() -> None:
    clock = Clock()
    limit = steady(64, clock)
    saturated_at(limit, clock, 0.010, 300)
    assert limit.limit == 64
    limit.release(0.001, dropped=True)
    assert limit.limit == 44  # 64 * 0.7
    limit.release(0.001, dropped=True)  # same burst (within one rtt): one signal
    assert limit.limit == 44
    clock.advance(0.02)
    limit.release(0.001, dropped=True)
    assert limit.limit == 31  # 44.8 * 0.7
    for _ in range(20):
        clock.advance(1.0)
        fill(limit)
        limit.release(0.001, dropped=True)
    assert limit.limit == 4, "never below min_limit"
    assert limit.rtt == pytest.approx(0.010), "dropped calls do not feed the latency average"


def test_ignored_calls_free_the_slot_and_teach_nothing() -> None:
    clock = Clock()
    limit = AdaptiveLimit(initial=8, min_limit=8, max_limit=8, clock=clock)
    fill(limit)
    limit.release(5.0, ignore=True)
    assert limit.in_flight == 7 and limit.rtt == 0.0


def test_release_without_a_slot_is_an_error() -> None:
    limit = AdaptiveLimit()
    with pytest.raises(RuntimeError, match="release"):
        limit.release(0.01)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_limit"):
        AdaptiveLimit(initial=2, min_limit=4)
    with pytest.raises(ValueError, match="backoff_ratio"):
        AdaptiveLimit(backoff_ratio=1.0)


# --- AdaptiveLimit: the queue ------------------------------------------------------------------------------


def fixed(size: int, clock: Clock, max_queue: int = 1000) -> AdaptiveLimit:
    """A limit that cannot move (min = max), to test the queue alone."""
    return AdaptiveLimit(initial=size, min_limit=size, max_limit=size, clock=clock, max_queue=max_queue)


async def test_waiters_are_served_fifo_as_slots_free() -> None:
    clock = Clock()
    limit = fixed(2, clock)
    fill(limit)
    order: list[int] = []

    async def call(index: int) -> None:
        await limit.acquire(clock() + 10.0)
        order.append(index)

    tasks = [asyncio.create_task(call(index)) for index in range(5)]
    await settle()
    assert (limit.in_flight, limit.queued, order) == (2, 5, [])
    assert not limit.try_acquire(), "try_acquire does not jump the queue"
    for served in range(1, 6):
        limit.release(0.01)
        await settle()
        assert order == list(range(served))
        assert limit.in_flight == 2 and limit.queued == 5 - served
    await asyncio.gather(*tasks)


async def test_a_growing_limit_wakes_several_waiters() -> None:
    clock = Clock()
    limit = AdaptiveLimit(initial=4, min_limit=4, max_limit=100, clock=clock, short_window=1, probe_samples=1,
                          probe_interval=1e9, smoothing=1.0)
    saturated_at(limit, clock, 0.01, 5)  # warm-up and the first probe, at 4
    assert not limit.probing and limit.limit == 4
    fill(limit)
    tasks = [asyncio.create_task(limit.acquire(clock() + 10.0)) for _ in range(10)]
    await settle()
    releases = 0
    while limit.queued:
        limit.release(0.01)
        releases += 1
        await settle()
        assert limit.in_flight == limit.limit, "every slot the limit grants is taken by a waiter"
    assert limit.limit > 4
    await asyncio.gather(*tasks)
    assert releases < 10, "the limit grew: some releases admitted two waiters"


async def test_a_waiter_whose_deadline_cannot_be_met_is_shed_at_once() -> None:
    clock = Clock()
    limit = fixed(2, clock)
    fill(limit)
    limit.release(0.100)  # calls take 100 ms: a slot frees about every 50 ms
    assert limit.try_acquire()
    shed = shed_at_once(limit.acquire(clock() + 0.04))
    assert shed.cause == "deadline"
    assert shed.retry_after == pytest.approx(0.05)
    first = asyncio.create_task(limit.acquire(clock() + 0.2))  # 50 ms expected: it waits
    await settle()
    assert limit.queued == 1
    shed = shed_at_once(limit.acquire(clock() + 0.08))  # second in line: 100 ms expected
    assert shed.cause == "deadline"
    assert shed.retry_after == pytest.approx(0.10)
    shed_at_once(limit.acquire(clock()))  # a deadline already here never queues
    assert limit.queued == 1 and limit.in_flight == 2
    limit.release(0.1)
    await first
    assert limit.in_flight == 2 and limit.queued == 0


async def test_retry_after_stays_within_bounds() -> None:
    clock = Clock()
    limit = fixed(1, clock)
    fill(limit)
    limit.release(100.0)
    assert limit.try_acquire()
    assert shed_at_once(limit.acquire(clock() + 1.0)).retry_after == MAX_RETRY_SECONDS
    fast = fixed(1, clock)
    fill(fast)
    assert shed_at_once(fast.acquire(clock())).retry_after == MIN_RETRY_SECONDS  # nothing measured: the floor


async def test_a_deadline_that_passes_while_waiting_sheds_and_leaks_no_slot() -> None:
    clock = Clock()
    limit = fixed(1, clock)
    fill(limit)
    with pytest.raises(Shed) as shed:
        await limit.acquire(clock() + 0.05)  # nothing measured: no estimate, so it waits for its deadline
    assert shed.value.cause == "deadline"
    assert (limit.in_flight, limit.queued) == (1, 0)
    limit.release(0.01)
    assert limit.in_flight == 0
    assert limit.try_acquire()


async def test_a_call_without_a_deadline_waits_until_served() -> None:
    clock = Clock()
    limit = fixed(1, clock)
    fill(limit)
    limit.release(100.0)
    assert limit.try_acquire()
    waiter = asyncio.create_task(limit.acquire(math.inf))
    await asyncio.sleep(0.02)
    assert limit.queued == 1
    limit.release(0.01)
    await waiter
    assert (limit.in_flight, limit.queued) == (1, 0)


async def test_cancelling_a_waiter_leaks_no_slot() -> None:
    clock = Clock()
    limit = fixed(1, clock)
    fill(limit)
    waiter = asyncio.create_task(limit.acquire(clock() + 10.0))
    await settle()
    assert limit.queued == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (limit.in_flight, limit.queued) == (1, 0)
    limit.release(0.01)
    assert limit.in_flight == 0
    assert limit.try_acquire()


async def test_a_slot_handed_to_a_waiter_cancelled_before_it_ran_goes_to_the_next() -> None:
    clock = Clock()
    limit = fixed(1, clock)
    fill(limit)
    first = asyncio.create_task(limit.acquire(clock() + 10.0))
    second = asyncio.create_task(limit.acquire(clock() + 10.0))
    await settle()
    limit.release(0.01)  # the slot goes to `first`...
    first.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert (limit.in_flight, limit.queued) == (1, 0)
    limit.release(0.01)
    assert limit.in_flight == 0


async def test_many_cancelled_waiters_leave_the_queue_working() -> None:
    clock = Clock()
    limit = fixed(1, clock)
    fill(limit)
    gone = [asyncio.create_task(limit.acquire(clock() + 10.0)) for _ in range(200)]
    await settle()
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    assert limit.queued == 0
    assert len(limit._waiters) <= 40, "settled waiters are compacted away"
    last = asyncio.create_task(limit.acquire(clock() + 10.0))
    await settle()
    limit.release(0.01)
    await last
    assert (limit.in_flight, limit.queued) == (1, 0)


async def test_calls_beyond_max_queue_are_shed() -> None:
    clock = Clock()
    limit = fixed(1, clock, max_queue=2)
    fill(limit)
    waiting = [asyncio.create_task(limit.acquire(clock() + 10.0)) for _ in range(2)]
    await settle()
    assert shed_at_once(limit.acquire(clock() + 10.0)).cause == "queue_full"
    assert limit.queued == 2
    for _ in range(3):
        limit.release(0.01)
        await settle()
    await asyncio.gather(*waiting)
    assert (limit.in_flight, limit.queued) == (0, 0)


# --- RetryBudget ---------------------------------------------------------------------------------------------


def withdrawals(budget: RetryBudget) -> int:
    count = 0
    while budget.try_withdraw():
        count += 1
        assert count < 100_000
    return count


def test_budget_allows_ratio_retries_per_request() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=Clock())
    assert not budget.try_withdraw(), "no calls, no floor: no retries"
    for _ in range(100):
        budget.deposit()
    assert budget.balance == pytest.approx(20)
    assert withdrawals(budget) == 20


def test_budget_floor_lets_a_quiet_service_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10, ttl=10, clock=Clock())
    for _ in range(100):
        budget.deposit()
    assert withdrawals(budget) == 100 + 20  # the floor's reserve (10/s over 10 s) plus 20% of 100 calls


def test_deposits_and_withdrawals_expire_after_ttl() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, ttl=10, clock=clock)
    for _ in range(100):
        budget.deposit()
    clock.advance(5.0)
    for _ in range(20):
        budget.deposit()
    clock.advance(5.5)  # the first 100 deposits are older than the ttl now
    assert budget.balance == pytest.approx(10)
    clock.advance(100.0)
    assert budget.balance == 0
    assert not budget.try_withdraw()


def test_spent_retries_count_until_they_expire() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=1, ttl=10, clock=clock)
    assert withdrawals(budget) == 10
    clock.advance(5.0)
    assert not budget.try_withdraw(), "the reserve is spent for the whole window"
    clock.advance(6.0)
    assert withdrawals(budget) == 10


def test_budget_holds_at_a_steady_rate() -> None:
    """A long run at a steady rate: retries stay at ratio * calls plus the floor, window after window."""
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=10, ttl=10, clock=clock)
    retried = 0
    for _ in range(60_000):  # 60 s at 1,000 calls/s, every call failing and wanting a retry
        clock.advance(0.001)
        budget.deposit()
        retried += budget.try_withdraw()
    assert 0.2 * 60_000 - 10 <= retried <= 0.2 * 60_000 + 10 * 60 + 100


# --- backoff -------------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(0.2, 0.01 * 2**attempt)
        samples = [backoff(attempt, rng=rng) for _ in range(2000)]
        assert all(0.0 <= sample <= ceiling for sample in samples)
        assert max(samples) > 0.95 * ceiling
        assert sum(samples) / len(samples) == pytest.approx(ceiling / 2, rel=0.1)
    assert 0.0 <= backoff(10_000) <= 0.2
    with pytest.raises(ValueError):
        backoff(-1)


# --- OutlierDetector -----------------------------------------------------------------------------------------


def detector(clock: Clock, endpoints: int = 4, **kwargs: float) -> OutlierDetector:
    outliers = OutlierDetector(clock=clock, **kwargs)  # type: ignore[arg-type]
    outliers.set_endpoints(f"e{index}" for index in range(endpoints))
    return outliers


def fail(outliers: OutlierDetector, endpoint: str, times: int) -> None:
    for _ in range(times):
        outliers.failure(endpoint)


def test_ejected_after_consecutive_failures_only() -> None:
    outliers = detector(Clock())
    fail(outliers, "e0", 4)
    outliers.success("e0")
    fail(outliers, "e0", 4)
    assert outliers.available("e0") and outliers.ejected() == []
    outliers.failure("e0")
    assert not outliers.available("e0")
    assert outliers.ejected() == ["e0"]
    assert outliers.available("e1")


def test_probe_after_the_ejection_time_then_readmit_on_success() -> None:
    clock = Clock()
    outliers = detector(clock)
    fail(outliers, "e0", 5)
    clock.advance(0.75)
    assert not outliers.available("e0")
    clock.advance(0.25)
    assert outliers.available("e0", claim=False) and outliers.available("e0", claim=False), "asking is free"
    assert outliers.available("e0"), "the probe"
    assert not outliers.available("e0"), "exactly one probe until its result"
    assert outliers.ejected() == ["e0"]
    outliers.success("e0")
    assert outliers.ejected() == []
    assert all(outliers.available("e0") for _ in range(10))


def test_a_failed_probe_ejects_again_for_longer_up_to_the_maximum() -> None:
    clock = Clock()
    outliers = detector(clock, base_ejection=1.0, max_ejection=3.0)
    fail(outliers, "e0", 5)
    times = []
    for _ in range(5):
        waited = 0.0
        while not outliers.available("e0"):
            clock.advance(0.25)
            waited += 0.25
        times.append(waited)
        outliers.failure("e0")  # the probe fails
    assert times == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_the_ejection_count_resets_after_staying_healthy() -> None:
    clock = Clock()
    outliers = detector(clock, base_ejection=1.0, max_ejection=30.0, reset_after=60.0)
    fail(outliers, "e0", 5)
    clock.advance(1.0)
    assert outliers.available("e0")
    outliers.failure("e0")  # second ejection: 2 s
    clock.advance(2.0)
    assert outliers.available("e0")
    outliers.success("e0")
    clock.advance(10.0)
    fail(outliers, "e0", 5)  # soon after: the third ejection, 3 s
    clock.advance(2.5)
    assert not outliers.available("e0")
    clock.advance(0.5)
    assert outliers.available("e0")
    outliers.success("e0")
    clock.advance(60.0)
    fail(outliers, "e0", 5)  # a minute of health later: back to 1 s
    clock.advance(1.0)
    assert outliers.available("e0")


def test_never_more_than_max_ejected_percent() -> None:
    clock = Clock()
    outliers = detector(clock, endpoints=4)  # 50%: two of four
    for endpoint in ("e0", "e1", "e2", "e3"):
        fail(outliers, endpoint, 10)
    assert outliers.ejected() == ["e0", "e1"]
    assert outliers.available("e2") and outliers.available("e3")
    clock.advance(1.0)
    assert outliers.available("e0")
    outliers.success("e0")  # e0 is back: room for one more
    outliers.failure("e2")  # e2 kept failing; its next failure ejects it
    assert outliers.ejected() == ["e1", "e2"]
    lone = detector(clock, endpoints=1)
    fail(lone, "e0", 100)
    assert lone.available("e0"), "the only endpoint is never ejected"


def test_removed_endpoints_are_forgotten() -> None:
    clock = Clock()
    outliers = detector(clock, endpoints=2)
    fail(outliers, "e0", 5)
    assert outliers.ejected() == ["e0"]
    outliers.set_endpoints(["e1", "e2"])
    assert outliers.ejected() == []
    assert outliers.available("e0"), "unknown endpoints are the router's business"
    fail(outliers, "e0", 10)  # late results of a removed endpoint are ignored
    outliers.set_endpoints(["e0", "e1", "e2"])
    assert outliers.available("e0"), "a returning endpoint starts healthy"
    fail(outliers, "e1", 5)
    assert outliers.ejected() == ["e1"]
    outliers.set_endpoints(["e0", "e2"])  # e1's ejection no longer counts against the share
    fail(outliers, "e2", 5)
    assert outliers.ejected() == ["e2"]


def test_a_lost_probe_is_given_up_after_probe_timeout() -> None:
    clock = Clock()
    outliers = detector(clock, probe_timeout=5.0)
    fail(outliers, "e0", 5)
    clock.advance(1.0)
    assert outliers.available("e0")
    clock.advance(4.5)
    assert not outliers.available("e0")
    clock.advance(0.5)
    assert outliers.available("e0"), "the first probe never reported: another may go"


def test_results_that_arrive_while_ejected_are_ignored() -> None:
    clock = Clock()
    outliers = detector(clock)
    fail(outliers, "e0", 5)
    outliers.success("e0")  # a call sent before the ejection
    assert not outliers.available("e0")
    clock.advance(1.0)
    assert outliers.available("e0")
    outliers.failure("e0")
    clock.advance(1.0)
    assert not outliers.available("e0"), "the probe failed: two seconds this time"


# --- AdaptiveLimit against a simulated endpoint ---------------------------------------------------------------


def simulate(limit: AdaptiveLimit, clock: Clock, *, threads: int, queue: int, service: Callable[[], float],
             seconds: float, overhead: float = 0.0005) -> tuple[int, int, list[float], list[int]]:
    """Unbounded demand through `limit` to an endpoint with `threads` workers and room for `queue` waiting
    calls (beyond that it refuses at once, as an overloaded executor does). Discrete events on `clock`.
    Returns (calls served, calls refused, their times, the limit after each event)."""
    events: list[tuple[float, int, str, float]] = []  # (time, sequence, kind, start)
    sequence = 0
    busy = 0
    waiting: deque[float] = deque()
    served, refused, times, limits = 0, 0, [], []
    end = clock() + seconds

    def send(now: float) -> None:
        nonlocal busy, sequence
        sequence += 1
        if busy < threads:
            busy += 1
            heapq.heappush(events, (now + overhead + service(), sequence, "done", now))
        elif len(waiting) < queue:
            waiting.append(now)
        else:
            heapq.heappush(events, (now + overhead, sequence, "refused", now))

    while clock() < end:
        while limit.try_acquire():
            send(clock())
        clock.now, _, kind, start = heapq.heappop(events)
        if kind == "done":
            busy -= 1
            if waiting:
                busy += 1
                sequence += 1
                heapq.heappush(events, (clock() + service(), sequence, "done", waiting.popleft()))
            served += 1
            times.append(clock() - start)
            limit.release(clock() - start)
        else:
            refused += 1
            limit.release(clock() - start, dropped=True)
        limits.append(limit.limit)
    return served, refused, times, limits


def test_the_limit_keeps_a_simulated_endpoint_busy_without_queueing_in_it() -> None:
    """Calls of 1 ms (exponential) on 2 threads, an endpoint queue of 64: the limit settles low enough that
    the endpoint never refuses and calls take a few ms, high enough that its threads stay busy."""
    clock = Clock()
    rng = random.Random(1)
    limit = AdaptiveLimit(clock=clock, rng=random.Random(5))
    served, refused, times, limits = simulate(limit, clock, threads=2, queue=64,
                                              service=lambda: rng.expovariate(1000.0), seconds=10.0)
    assert refused == 0
    assert served / 10.0 > 0.97 * 2000, "the threads stay busy"
    settled = limits[len(limits) // 2:]
    assert 3 <= sum(settled) / len(settled) <= 20
    times.sort()
    assert times[len(times) // 2] < 0.008 and times[int(len(times) * 0.99)] < 0.025


def test_the_limit_backs_off_an_endpoint_that_refuses() -> None:
    """An endpoint with no queue at all refuses whatever its threads cannot take: the drops keep the limit
    near the thread count."""
    clock = Clock()
    rng = random.Random(2)
    limit = AdaptiveLimit(clock=clock, rng=random.Random(5))
    served, refused, _, limits = simulate(limit, clock, threads=8, queue=0,
                                          service=lambda: rng.expovariate(100.0), seconds=10.0)
    settled = limits[len(limits) // 2:]
    assert sum(settled) / len(settled) < 16
    assert refused < 0.2 * served
    assert served / 10.0 > 0.8 * 800
