"""The executor's worker pool: backpressure instead of refusal, and fair sharing of threads between skills.

A call that finds every worker thread busy waits in a queue that costs no thread (an entry and a future), and
is shed (`Overloaded`) only when it cannot be served: its deadline cannot be met, judging by recent run times
of the same module, or the hard bound on waiting calls (memory safety) is reached, or the pool is shutting
down. A caller that goes away leaves the queue at once. See docs/executor-scheduling.md.

Fair sharing: calls wait in one FIFO per skill, and a thread that becomes free takes the next call of the
waiting skill that holds the fewest threads now, round-robin among equals (the skill just served goes to the
back). While other skills wait, a skill therefore gets no more than its share (threads / active skills, at
least one) of the threads that free up; a skill alone may use every thread. Running calls are never
preempted: a skill that held every thread before others arrived gives them back as its calls end, each within
its own timeout. All weights are equal (plain fewest-threads-first rather than weighted fair queueing): skills
have no declared weights to honour, and equal shares are what keeps a slow or hostile skill from slowing others.

Headroom for short calls: fair shares alone cannot help a skill whose calls arrive while a slow skill (a
one-second loop, a hostile module) holds every thread, since running calls are never preempted. So calls whose
module is known to be slow (its recent run time is SLOW_SECONDS or more) may hold at most `threads - reserve`
threads together (`reserve`: one thread when there are two or more): the last thread is always left to calls
that are quick, which then wait for a thread only as long as quick calls take. A slow skill alone therefore
runs on one thread fewer; a quick one may use every thread. A module that has not run here yet counts as slow until
its first call ends, so a burst of a new module cannot take the reserved thread either.

The scheduler runs on the worker threads themselves: each takes its next call under one lock, so a freed
thread goes straight to the next call without a round trip through the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Shed a waiting call this long before the moment its deadline can no longer be met, so that the answer
# (EXECUTOR_OVERLOADED with RetryInfo, which a caller can act on) reaches it before its own deadline fires.
SHED_MARGIN_SECONDS = 0.05
# Weight of the newest run in a module's run-time estimate (exponentially weighted moving average).
ESTIMATE_WEIGHT = 0.3
# Modules whose run time is remembered (the oldest is forgotten first); a bound, not a tuning knob.
MAX_ESTIMATES = 4096
# What a shed call is told to wait before retrying (RetryInfo), within these bounds.
MIN_RETRY_SECONDS = 0.2
MAX_RETRY_SECONDS = 5.0
# A call whose module recently ran this long or longer is slow: slow calls leave the reserved threads free.
SLOW_SECONDS = 0.05

WAITING, RUNNING, DONE = "waiting", "running", "done"


class Overloaded(Exception):
    """A call the pool will not run: `cause` is `deadline` (it cannot finish in time), `queue_full` (the
    hard bound on waiting calls) or `shutting_down`; `retry_after` is a suggested pause in seconds."""

    def __init__(self, cause: str, message: str, retry_after: float = MIN_RETRY_SECONDS) -> None:
        super().__init__(message)
        self.cause = cause
        self.message = message
        self.retry_after = retry_after


@dataclass(eq=False)
class _Call(Generic[T]):
    fn: Callable[[], T]
    key: str  # whose share it counts against: the skill (or the digest when the call names none)
    cost_key: str  # whose run times estimate it: the module digest
    deadline: float | None  # time.monotonic() by which it must be done, None: no deadline
    estimate: float  # expected run time in seconds (0: unknown)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    state: str = WAITING
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Complete `future` on its loop, unless its awaiting call was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _post(call: _Call[Any], result: Any, error: BaseException | None) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        call.loop.call_soon_threadsafe(_settle, call.future, result, error)


class WorkerPool:
    """`threads` worker threads shared fairly between skills, with a deadline-aware queue of at most `queue`
    waiting calls (`capacity` = threads + queue calls admitted at once)."""

    def __init__(self, threads: int, queue: int, reserve: int | None = None) -> None:
        self.threads = threads
        self.queue = queue
        self.capacity = threads + queue
        # Threads slow calls leave to quick ones (see the module docstring).
        self.reserve = min(threads - 1, 1 if reserve is None else reserve) if threads > 1 else 0
        self._slow_running = 0
        self._cond = threading.Condition(threading.Lock())
        self._waiting: OrderedDict[str, deque[_Call[Any]]] = OrderedDict()  # skills with waiting calls, in turn
        self._held: dict[str, int] = {}  # threads held per skill
        self._waiting_count = 0
        self._running = 0
        self._estimates: OrderedDict[str, float] = OrderedDict()  # module digest → seconds
        self._ends: list[float | None] = [None] * threads  # per thread: expected end of its call (monotonic)
        self._closed = False
        self._workers = [threading.Thread(target=self._work, args=(i,), name=f"wasm_{i}", daemon=True)
                         for i in range(threads)]
        for worker in self._workers:
            worker.start()

    # Numbers for GetLoad and metrics.

    @property
    def admitted(self) -> int:
        """Calls running or waiting now."""
        return self._running + self._waiting_count

    def load(self) -> tuple[int, int]:
        """(busy threads, waiting calls) now."""
        return self._running, self._waiting_count

    def estimate(self, cost_key: str) -> float:
        """Recent run time in seconds of the module (0 when it has not run here yet)."""
        return self._estimates.get(cost_key, 0.0)

    # Admission.

    async def run(self, fn: Callable[[], T], *, key: str, cost_key: str = "", deadline: float | None = None,
                  timeout: float | None = None) -> T:
        """Run `fn` on a worker thread when its turn comes and return its result, or raise `Overloaded`.
        `deadline` (time.monotonic()) is when the caller stops waiting; `timeout` bounds the run itself, and so
        the estimate of how long it takes. Cancelling the awaiting task takes a waiting call out of the queue at
        once; a running one runs on (stopping it is the caller's business: RunControl)."""
        loop = asyncio.get_running_loop()
        estimate = self.estimate(cost_key or key)
        if timeout is not None:
            estimate = min(estimate, timeout)
        call: _Call[T] = _Call(fn, key, cost_key or key, deadline, estimate, loop, loop.create_future())
        with self._cond:
            self._admit(call)
            self._cond.notify()
        if deadline is not None and call.state == WAITING:
            # Shed while waiting once it could no longer finish in time (a thread may take it before).
            shed_at = deadline - estimate - SHED_MARGIN_SECONDS
            call.timer = loop.call_later(max(0.0, shed_at - time.monotonic()), self._expire, call)
        try:
            return await call.future
        except asyncio.CancelledError:
            self._leave(call)
            raise
        finally:
            if call.timer is not None:
                call.timer.cancel()

    def try_submit(self, fn: Callable[[], T], key: str = "") -> asyncio.Future[T] | None:
        """`run` without a deadline, as a future; None when the pool will not take it (for the benchmarks)."""
        loop = asyncio.get_running_loop()
        call: _Call[T] = _Call(fn, key, key, None, 0.0, loop, loop.create_future())
        with self._cond:
            try:
                self._admit(call)
            except Overloaded:
                return None
            self._cond.notify()
        return call.future

    def _admit(self, call: _Call[Any]) -> None:
        """Queue `call` (under the lock), or raise Overloaded. A call that a free thread will take at once is
        never shed: its deadline is the sandbox's to enforce."""
        if self._closed:
            raise Overloaded("shutting_down", "the executor is shutting down")
        idle = self.threads - self._running  # threads about to take the calls queued before this one
        if self._waiting_count >= idle:
            if self._waiting_count - idle >= self.queue:
                raise Overloaded(
                    "queue_full", f"the executor has its maximum of {self.queue} calls waiting for "
                    f"{self.threads} threads; retry later or on another executor", self._retry_after())
            if call.deadline is not None:
                expected = self._expected_wait(call) + call.estimate
                remaining = call.deadline - time.monotonic()
                if expected + SHED_MARGIN_SECONDS > remaining:
                    raise Overloaded(
                        "deadline", f"the call would wait and run about {expected:.3f} s but has "
                        f"{max(0.0, remaining):.3f} s left; retry later or on another executor",
                        self._retry_after())
        queue = self._waiting.get(call.key)
        if queue is None:
            queue = self._waiting[call.key] = deque()
        queue.append(call)
        self._waiting_count += 1

    def _expected_wait(self, call: _Call[Any]) -> float:
        """How long `call` should wait for a thread (under the lock): until the first running call is expected
        to end, then one run of its module per round for each call of its skill ahead of it, with the skill's
        fair share of threads. Optimistic where run times are unknown; the timer of `run` is the safety net."""
        now = time.monotonic()
        ends = [end for end in self._ends if end is not None]
        free_in = max(0.0, min(ends) - now) if len(ends) >= self.threads else 0.0
        active = len(set(self._held) | set(self._waiting) | {call.key})
        share = max(1, self.threads // active)
        ahead = len(self._waiting.get(call.key, ()))
        return free_in + (ahead // share) * call.estimate

    def _retry_after(self) -> float:
        now = time.monotonic()
        ends = [end - now for end in self._ends if end is not None]
        soonest = min(ends) if ends else 0.0
        return min(MAX_RETRY_SECONDS, max(MIN_RETRY_SECONDS, soonest))

    def _forget(self, call: _Call[Any], queued: bool = True) -> None:
        """Take a waiting call's place back (under the lock); `queued`: it is still in its skill's queue."""
        call.state = DONE
        self._waiting_count -= 1
        queue = self._waiting[call.key]
        if queued:
            queue.remove(call)  # cheap in the usual case: calls leave about in the order they came
        if not queue:
            del self._waiting[call.key]

    def _leave(self, call: _Call[Any]) -> None:
        with self._cond:
            if call.state == WAITING:
                self._forget(call)

    def _expire(self, call: _Call[Any]) -> None:
        """The call can no longer finish in time: shed it, unless a thread took it meanwhile."""
        with self._cond:
            if call.state != WAITING:
                return
            self._forget(call)
            retry_after = self._retry_after()
        _settle(call.future, None, Overloaded(
            "deadline", "the call waited for a worker thread until too little of its deadline was left to run; "
                        "retry later or on another executor", retry_after))

    # The worker threads.

    def _next(self) -> _Call[Any] | None:
        """The next call to run (under the lock): the first waiting call of the waiting skill holding the
        fewest threads, the earliest in turn among equals, passing over slow calls while slow calls already hold
        every thread but the reserved ones; None when nothing (that may run now) waits."""
        while self._waiting:
            slow_full = self._slow_running >= self.threads - self.reserve
            candidates = sorted(self._waiting, key=lambda k: self._held.get(k, 0))  # stable: round-robin
            key = next((k for k in candidates if not (slow_full and self._slow(self._waiting[k][0]))), None)
            if key is None:
                return None
            call = self._waiting[key].popleft()
            self._forget(call, queued=False)
            if key in self._waiting:
                self._waiting.move_to_end(key)
            if (call.deadline is not None
                    and time.monotonic() > call.deadline - call.estimate - SHED_MARGIN_SECONDS):
                _post(call, None, Overloaded("deadline", "the call's deadline passed while it waited for a "
                                                         "worker thread; retry later or on another executor"))
                continue
            call.state = RUNNING
            return call
        return None

    def _slow(self, call: _Call[Any]) -> bool:
        """Whether the call's module is slow by what is known now (not when the call arrived: calls queued
        before the module's first run ended are judged by that run). A module that has not run here yet counts
        as slow until its first call ends: a burst of a new module cannot take the reserved threads (a quick
        one is known quick after its first call, a few ms)."""
        known = self._estimates.get(call.cost_key)
        return known is None or known >= SLOW_SECONDS

    def _work(self, index: int) -> None:
        while True:
            with self._cond:
                call = self._next()
                while call is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    call = self._next()
                self._running += 1
                slow = self._slow(call)
                self._slow_running += slow
                self._held[call.key] = self._held.get(call.key, 0) + 1
                started = time.monotonic()
                self._ends[index] = started + call.estimate
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting call
                error = exc
            elapsed = time.monotonic() - started
            with self._cond:
                self._running -= 1
                self._slow_running -= slow
                if slow:
                    self._cond.notify()  # a slow call passed over may run now
                held = self._held[call.key] - 1
                if held:
                    self._held[call.key] = held
                else:
                    del self._held[call.key]
                self._ends[index] = None
                self._remember(call.cost_key, elapsed)
            _post(call, result, error)

    def _remember(self, cost_key: str, elapsed: float) -> None:
        old = self._estimates.pop(cost_key, None)
        self._estimates[cost_key] = elapsed if old is None else old + ESTIMATE_WEIGHT * (elapsed - old)
        if len(self._estimates) > MAX_ESTIMATES:
            self._estimates.popitem(last=False)

    def shutdown(self) -> None:
        """Shed waiting calls, wait for running ones (each bounded by its timeout)."""
        with self._cond:
            self._closed = True
            shed = [call for queue in self._waiting.values() for call in queue]
            self._waiting.clear()
            self._waiting_count = 0
            for call in shed:
                call.state = DONE
            self._cond.notify_all()
        for call in shed:
            _post(call, None, Overloaded("shutting_down", "the executor is shutting down"))
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()
