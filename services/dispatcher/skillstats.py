"""Rolling per-skill call statistics for `clawhub top` (DispatcherService.GetSkillStats).

Every Dispatch that ends is one `SkillStats.record(skill, seconds, reason)`. It runs on the hot path, so it
is O(1) and allocation-free but once a second per skill: each skill keeps a ring of one-second slots (the
window, `WINDOW_SECONDS`), and a call adds to its slot's counters and to a sparse latency histogram (a dict
from bucket to count). Buckets are logarithmic, `BUCKETS_PER_DOUBLING` per doubling from 1 µs, so a quantile
read from them is within about 4.5% of the true one whatever the latency's scale (a fixed-bound histogram
such as `services/runtime/latency.py`, made for release thresholds, would show every sub-millisecond call as
1 ms). The work of merging the window's slots is done by `snapshot`, once per `clawhub top` refresh.

This is not `stats.py`'s VersionStats: that one counts per version what the deployer's release analysis
needs (deltas drained into reports, failures counted only when they are the version's fault); this one is
what an operator looks at, so every ended call counts, and every failure is told by its reason.

Memory is bounded: a skill is forgotten once its window is empty, and at most `MAX_SKILLS` skills are kept
(the dispatcher records only calls of routed skills, so names callers make up never get here).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from clawhub.common.v1 import observability_pb2, routing_pb2

from services.runtime.callstats import bucket, bucket_value, reason_of

__all__ = ["SkillStats", "Summary", "bucket", "bucket_value", "reason_of", "quantile", "executor_loads",
           "active_version", "to_proto"]

WINDOW_SECONDS = 60
MAX_SKILLS = 10_000
# How long GetSkillStats waits for an executor's GetLoad before showing it unreachable.
LOAD_TIMEOUT = 0.5


class _Second:
    """The calls of one skill that ended in one second."""

    __slots__ = ("second", "calls", "errors", "reasons", "latency")

    def __init__(self, second: int) -> None:
        self.second = second
        self.calls = 0
        self.errors = 0
        self.reasons: dict[str, int] = {}
        self.latency: dict[int, int] = {}


@dataclass
class Summary:
    """One skill over the window."""

    calls: int = 0
    errors: int = 0
    calls_per_second: float = 0.0
    p50_seconds: float = 0.0
    p99_seconds: float = 0.0
    errors_by_reason: dict[str, int] = field(default_factory=dict)


def quantile(histogram: dict[int, int], total: int, q: float) -> float:
    """The q-quantile of a sparse bucket histogram holding `total` calls (0 with none)."""
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(max(histogram))


class SkillStats:
    """Per skill, the calls that ended in the last `window` seconds (whole seconds of `clock`)."""

    def __init__(self, *, window: int = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic,
                 max_skills: int = MAX_SKILLS) -> None:
        if window < 1:
            raise ValueError("the window is at least one second")
        self.window = window
        self._clock = clock
        self._max_skills = max_skills
        self._rings: dict[str, list[_Second | None]] = {}
        self._started = clock()

    def knows(self, skill: str) -> bool:
        return skill in self._rings

    def record(self, skill: str, seconds: float, reason: str = "") -> None:
        """One call of `skill` that ended now after `seconds`; `reason` is empty for a success, else what
        `reason_of` says of its error."""
        slot = self._slot(skill)
        if slot is None:
            return
        slot.calls += 1
        index = bucket(seconds)
        latency = slot.latency
        latency[index] = latency.get(index, 0) + 1
        if reason:
            slot.errors += 1
            slot.reasons[reason] = slot.reasons.get(reason, 0) + 1

    def merge(self, skill: str, calls: int, reasons: dict[str, int], latency: dict[int, int]) -> None:
        """Add a gateway's calls of `skill` (DataPlaneService.ReportCalls) to the current second, as if they
        had ended here now."""
        if calls <= 0:
            return
        slot = self._slot(skill)
        if slot is None:
            return
        slot.calls += calls
        for index, count in latency.items():
            slot.latency[index] = slot.latency.get(index, 0) + count
        for reason, count in reasons.items():
            slot.errors += count
            slot.reasons[reason] = slot.reasons.get(reason, 0) + count

    def _slot(self, skill: str) -> _Second | None:
        now = int(self._clock())
        ring = self._rings.get(skill)
        if ring is None:
            if len(self._rings) >= self._max_skills:
                self._forget_idle(now)
                if len(self._rings) >= self._max_skills:
                    return None
            ring = self._rings[skill] = [None] * self.window
        position = now % self.window
        slot = ring[position]
        if slot is None or slot.second != now:
            slot = ring[position] = _Second(now)
        return slot

    def snapshot(self, only: str = "") -> dict[str, Summary]:
        """Every skill with calls in the window (or just `only`), summarised; forgets skills whose window is
        empty."""
        now = self._clock()
        second = int(now)
        oldest = second - self.window  # slots of seconds after this one are in the window
        # Right after the dispatcher started, the window is not full yet: rates are over the time there was.
        span = max(1.0, min(float(self.window), now - self._started))
        summaries: dict[str, Summary] = {}
        idle = []
        for skill, ring in self._rings.items():
            if only and skill != only:
                continue
            slots = [slot for slot in ring if slot is not None and slot.second > oldest]
            if not slots:
                idle.append(skill)
                continue
            summary = Summary()
            merged: dict[int, int] = {}
            for slot in slots:
                summary.calls += slot.calls
                summary.errors += slot.errors
                for reason, count in slot.reasons.items():
                    summary.errors_by_reason[reason] = summary.errors_by_reason.get(reason, 0) + count
                for index, count in slot.latency.items():
                    merged[index] = merged.get(index, 0) + count
            summary.calls_per_second = summary.calls / span
            summary.p50_seconds = quantile(merged, summary.calls, 0.50)
            summary.p99_seconds = quantile(merged, summary.calls, 0.99)
            summaries[skill] = summary
        for skill in idle:
            del self._rings[skill]
        return summaries

    def _forget_idle(self, now: int) -> None:
        oldest = now - self.window
        for skill in [s for s, ring in self._rings.items()
                      if all(slot is None or slot.second <= oldest for slot in ring)]:
            del self._rings[skill]


class LoadSource(Protocol):
    """The executors as GetSkillStats asks them (services/runtime/executors.py's ExecutorClient)."""

    @property
    def addresses(self) -> tuple[str, ...]: ...

    async def get_load(self, address: str, *, timeout: float) -> observability_pb2.ExecutorLoad: ...


def executor_name(position: int) -> str:
    """How an executor is shown to users: by its place in the dispatcher's list (1-based), never its address
    (the names `clawhub up` labels them with)."""
    return f"executor-{position + 1}"


async def executor_loads(executors: LoadSource, *, timeout: float = LOAD_TIMEOUT,
                         ) -> list[observability_pb2.ExecutorLoad]:
    """Every executor's pool use, asked of all of them at once; one that does not answer within `timeout`
    is shown unreachable (all zero)."""
    addresses: Sequence[str] = executors.addresses

    async def one(position: int, address: str) -> observability_pb2.ExecutorLoad:
        try:
            load = await executors.get_load(address, timeout=timeout)
        except (grpc.aio.AioRpcError, OSError):  # TimeoutError is an OSError
            return observability_pb2.ExecutorLoad(executor=executor_name(position), reachable=False)
        shown = observability_pb2.ExecutorLoad()
        shown.CopyFrom(load)
        shown.executor = executor_name(position)
        shown.reachable = True
        return shown

    return list(await asyncio.gather(*(one(i, a) for i, a in enumerate(addresses))))


def active_version(route: routing_pb2.Route | None) -> str:
    """The version a route serves now: its candidate while a release gives it traffic, else its target with
    the most weight (the only one, outside a release); empty without a route or targets."""
    if route is None or not route.targets:
        return ""
    for target in route.targets:
        if target.role == routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE and target.weight > 0:
            return str(target.version)
    return str(max(route.targets, key=lambda t: t.weight).version)


def to_proto(skill: str, summary: Summary | None, window: int, version: str) -> observability_pb2.SkillStats:
    """A skill's SkillStats message (all zero but its name, window and version when it had no calls)."""
    stats = observability_pb2.SkillStats(skill=skill, window_seconds=window, active_version=version)
    if summary is not None:
        stats.calls = summary.calls
        stats.errors = summary.errors
        stats.calls_per_second = summary.calls_per_second
        stats.p50_ms = summary.p50_seconds * 1e3
        stats.p99_ms = summary.p99_seconds * 1e3
        stats.errors_by_reason.update(summary.errors_by_reason)
    return stats
