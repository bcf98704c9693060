"""Per-version invocation stats: counted on every call, reported to the deployer in small batches.

The deployer analyses a release (bake window, canary steps) with these reports, and its rollback is only as
fast as the report that shows the breach. So the reporter sends the first report as soon as there is
anything to send, then at most one per `interval` while traffic lasts; with no traffic it sends nothing.
Reports carry deltas (counts since the previous report), so the deployer can add up the reports of every
dispatcher. A report that cannot be delivered is dropped: a deployer that is away analyses nothing.
"""

from __future__ import annotations

import asyncio
import logging
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

from services.runtime.errors import describe_error
from services.runtime.latency import Histogram
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.dispatcher")

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
        slot = int(self._clock() / SLOT_SECONDS)
        if not counts.slots or counts.slots[-1][0] != slot:
            counts.slots.append((slot, Histogram()))
            while counts.slots and counts.slots[0][0] <= slot - SLOTS:
                counts.slots.popleft()
        counts.slots[-1][1].add(seconds)
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
