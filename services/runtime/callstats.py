"""Call statistics of the data path, counted where calls are routed (the gateway, and the dispatcher's own
Dispatch) and reported in small batches.

**Per version** (`VersionStats`): what the deployer's release analysis needs. A gateway reports its deltas to
the dispatcher (DataPlaneService.ReportCalls), which adds them to its own (`add_report`) and reports the sum to
the deployer (DeployerInternalService.ReportStats).

**Per skill** (`SkillCallDeltas`): every ended call by reason and latency bucket, for `clawhub top`; a gateway
reports them to the dispatcher, whose rolling window (services/dispatcher/skillstats.py) shows them.

The deployer analyses a release (bake window, canary steps) with these reports, and its rollback is only as
fast as the report that shows the breach. So the reporter sends the first report as soon as there is
anything to send, then at most one per `interval` while traffic lasts; with no traffic it sends nothing.
Reports carry deltas (counts since the previous report), so the deployer can add up the reports of every
dispatcher. A report that cannot be delivered is dropped: a deployer that is away analyses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import grpc
from clawhub.common.v1 import routing_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_grpc
from google.protobuf import duration_pb2

from services.runtime.errors import ServiceError, describe_error, error_info
from services.runtime.latency import Histogram
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.stats")

REPORT_TIMEOUT = 2.0
# Sliding window of the p99 shown with each report: SLOTS slots of SLOT_SECONDS each.
SLOT_SECONDS = 0.1
SLOTS = 10

Key = tuple[str, str, str]  # skill, version, digest


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(min(seconds, 3600.0) * 1e9))
    return value


@dataclass
class _Counts:
    """One version's calls since the previous report, plus recent slots for the sliding p99."""

    requests: int = 0
    failures: int = 0
    retried: int = 0
    latency: Histogram = field(default_factory=Histogram)
    # (slot number, histogram of the calls that ended in it), oldest first.
    slots: deque[tuple[int, Histogram]] = field(default_factory=deque)


class VersionStats:
    """Counts calls per (skill, version, digest); `drain()` hands out the deltas as a report."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: dict[Key, _Counts] = {}
        self._pending = asyncio.Event()

    @staticmethod
    def key(skill: str, target: routing_pb2.RouteTarget) -> Key:
        return skill, target.version, target.digest

    def record(self, key: Key, seconds: float, *, failed: bool) -> None:
        """One call on the version that took `seconds` and failed (skill or executor) or not."""
        counts = self._counts.setdefault(key, _Counts())
        counts.requests += 1
        counts.failures += int(failed)
        counts.latency.add(seconds)
        self._current_slot(counts).add(seconds)
        self._pending.set()

    def _current_slot(self, counts: _Counts) -> Histogram:
        """The histogram of the sliding window's current slot (slots older than the window dropped)."""
        slot = int(self._clock() / SLOT_SECONDS)
        if not counts.slots or counts.slots[-1][0] != slot:
            counts.slots.append((slot, Histogram()))
            while counts.slots and counts.slots[0][0] <= slot - SLOTS:
                counts.slots.popleft()
        return counts.slots[-1][1]

    def add_report(self, report: deployer_pb.VersionStatsReport) -> None:
        """Add another router's deltas (a gateway's report) as if its calls had been counted here: their
        latency goes into the current slot of the sliding window, bucket by bucket."""
        if not report.requests and not report.retried:
            return
        key = (report.skill, report.version, report.digest)
        counts = self._counts.setdefault(key, _Counts())
        counts.requests += report.requests
        counts.failures += report.failures
        counts.retried += report.retried
        bounds = tuple(report.latency.upper_bounds_seconds)
        if bounds and len(report.latency.counts) == len(bounds) + 1:
            histogram = Histogram(bounds, report.latency.counts)
            counts.latency.merge(histogram)
            self._current_slot(counts).merge(histogram)
        self._pending.set()

    def retried(self, key: Key) -> None:
        """A failed call of the version was retried on the stable one."""
        self._counts.setdefault(key, _Counts()).retried += 1
        self._pending.set()

    def sliding_p99(self, key: Key) -> float:
        counts = self._counts.get(key)
        if counts is None:
            return 0.0
        oldest = int(self._clock() / SLOT_SECONDS) - SLOTS
        merged = Histogram()
        for slot, histogram in counts.slots:
            if slot > oldest:
                merged.merge(histogram)
        return merged.quantile(0.99)

    async def wait(self) -> None:
        """Until some call was counted since the last drain."""
        await self._pending.wait()

    def drain(self) -> list[deployer_pb.VersionStatsReport]:
        """The deltas since the previous drain, one entry per version that had calls; resets them."""
        self._pending.clear()
        reports = []
        idle = []
        for key, counts in self._counts.items():
            if not counts.requests and not counts.retried:
                # Nothing new: forget the version once its sliding window is empty too.
                if not counts.slots or counts.slots[-1][0] <= int(self._clock() / SLOT_SECONDS) - SLOTS:
                    idle.append(key)
                continue
            skill, version, digest = key
            reports.append(deployer_pb.VersionStatsReport(
                skill=skill, version=version, digest=digest, requests=counts.requests,
                failures=counts.failures, retried=counts.retried,
                latency=deployer_pb.LatencyHistogram(upper_bounds_seconds=counts.latency.bounds,
                                                     counts=counts.latency.counts),
                p99_latency=duration(self.sliding_p99(key))))
            counts.requests = counts.failures = counts.retried = 0
            counts.latency.clear()
        for key in idle:
            del self._counts[key]
        return reports


class StatsSink(Protocol):
    """Where reports go (the deployer)."""

    async def report(self, request: deployer_pb.ReportStatsRequest) -> None: ...


class GrpcStatsSink:
    """DeployerInternalService.ReportStats over the dispatcher's channel to the deployer."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = REPORT_TIMEOUT) -> None:
        self._stub = cast("deployer_grpc.DeployerInternalServiceAsyncStub",
                          deployer_grpc.DeployerInternalServiceStub(channel))
        self._timeout = timeout

    async def report(self, request: deployer_pb.ReportStatsRequest) -> None:
        await self._stub.ReportStats(request, timeout=self._timeout)


class StatsReporter(BackgroundLoop):
    """Sends the stats as soon as there are some, then at most one report per `interval`."""

    task_name = "stats-reporter"

    def __init__(self, stats: VersionStats, sink: StatsSink, dispatcher_id: str, *, interval: float) -> None:
        super().__init__()
        self._stats = stats
        self._sink = sink
        self._dispatcher_id = dispatcher_id
        self._interval = interval

    async def run(self) -> None:
        while True:
            await self._stats.wait()
            reports = self._stats.drain()
            if reports:
                try:
                    await self._sink.report(deployer_pb.ReportStatsRequest(
                        dispatcher_id=self._dispatcher_id, reports=reports))
                except grpc.aio.AioRpcError as err:
                    log.debug("stats report dropped: %s", describe_error(err))
                except Exception:  # noqa: BLE001 - the reporter must outlive any single failure
                    log.exception("stats report failed")
            # Batches the calls of the next `interval` into one report.
            await asyncio.sleep(self._interval)


# --- Per skill -------------------------------------------------------------------------------------------------

BUCKETS_PER_DOUBLING = 8
_SCALE = BUCKETS_PER_DOUBLING / math.log(2)
_MICROSECOND = 1e-6
# Entries in one ReportCalls (the dispatcher refuses more).
MAX_REPORT_ENTRIES = 1000


def bucket(seconds: float) -> int:
    """The latency bucket of `seconds`: bucket i holds (2^((i-1)/B), 2^(i/B)] µs; 0 holds up to 1 µs."""
    if seconds <= _MICROSECOND:
        return 0
    return math.ceil(math.log(seconds / _MICROSECOND) * _SCALE)


def bucket_value(index: int) -> float:
    """A bucket's representative latency in seconds: its geometric middle (its bound for bucket 0)."""
    if index <= 0:
        return _MICROSECOND
    return _MICROSECOND * 2 ** ((index - 0.5) / BUCKETS_PER_DOUBLING)


def reason_of(exc: BaseException) -> str:
    """How a failed call is told in `errors_by_reason`: its ErrorInfo reason, else its status code's name."""
    if isinstance(exc, ServiceError):
        return str(exc.reason) or exc.code.name
    if isinstance(exc, grpc.aio.AioRpcError):
        info = error_info(exc)
        return str(info.reason if info is not None and info.reason else exc.code().name)
    if isinstance(exc, asyncio.CancelledError):
        return str(grpc.StatusCode.CANCELLED.name)
    return str(grpc.StatusCode.UNKNOWN.name)  # a bug: the error interceptor answers it with UNKNOWN too


class SkillCalls(Protocol):
    """Where a router counts every ended call of a routed skill (`reason` empty for a success)."""

    def knows(self, skill: str) -> bool: ...

    def record(self, skill: str, seconds: float, reason: str = "") -> None: ...


class _SkillDelta:
    __slots__ = ("calls", "reasons", "latency")

    def __init__(self) -> None:
        self.calls = 0
        self.reasons: dict[str, int] = {}
        self.latency: dict[int, int] = {}


class SkillCallDeltas:
    """A gateway's per-skill counts since its previous report (`drain`), in the buckets of the dispatcher's
    window, so the dispatcher adds them up exactly. At most MAX_REPORT_ENTRIES skills between two reports
    (a gateway records only routed skills)."""

    def __init__(self) -> None:
        self._skills: dict[str, _SkillDelta] = {}
        self._known: set[str] = set()

    def knows(self, skill: str) -> bool:
        return skill in self._known

    def record(self, skill: str, seconds: float, reason: str = "") -> None:
        delta = self._skills.get(skill)
        if delta is None:
            if len(self._skills) >= MAX_REPORT_ENTRIES:
                return
            delta = self._skills[skill] = _SkillDelta()
            self._known.add(skill)
        delta.calls += 1
        index = bucket(seconds)
        delta.latency[index] = delta.latency.get(index, 0) + 1
        if reason:
            delta.reasons[reason] = delta.reasons.get(reason, 0) + 1

    def drain(self) -> list[tuple[str, int, dict[str, int], dict[int, int]]]:
        """(skill, calls, errors by reason, latency buckets) of every skill with calls since the last drain."""
        drained = [(skill, d.calls, d.reasons, d.latency) for skill, d in self._skills.items()]
        self._skills = {}
        self._known = {skill for skill, *_ in drained}
        return drained
