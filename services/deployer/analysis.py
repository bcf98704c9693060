"""Analysis of a release: the new version's stats, added up from every dispatcher's reports, against the
plan's thresholds.

Stats count from the release's first route push to its end (not per canary step): a failure seen at 5%
still counts at 25%, and a low-traffic step does not wipe what earlier steps saw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.deployer.v1 import deployer_service_pb2 as pb

from services.deployer.plan import Thresholds, duration
from services.runtime.latency import Histogram, valid_bounds


@dataclass
class Tally:
    """A version's calls across dispatchers."""

    requests: int = 0
    failures: int = 0
    retried: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def add(self, report: internal_pb.VersionStatsReport) -> None:
        self.requests += report.requests
        self.failures += min(report.failures, report.requests)
        self.retried += report.retried
        if report.latency.counts:
            self.latency.merge(Histogram(report.latency.upper_bounds_seconds, report.latency.counts))

    @property
    def success_rate(self) -> float:
        return 1.0 if not self.requests else (self.requests - self.failures) / self.requests

    @property
    def p99(self) -> float:
        return self.latency.quantile(0.99)

    def to_proto(self) -> pb.VersionStats:
        return pb.VersionStats(requests=self.requests, failures=self.failures, success_rate=self.success_rate,
                               p99_latency=duration(min(self.p99, 3600.0)))

    def describe(self) -> str:
        if not self.requests:
            return "no requests"
        return (f"{self.requests} requests, {self.failures} failed, success rate {self.success_rate:.3f}, "
                f"p99 {_ms(self.p99)}")

    def to_json(self) -> str:
        return json.dumps({"requests": self.requests, "failures": self.failures, "retried": self.retried,
                           "bounds": list(self.latency.bounds), "counts": self.latency.counts})

    @classmethod
    def from_json(cls, text: str) -> Tally | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(int(data["requests"]), int(data["failures"]), int(data["retried"]),
                   Histogram(data["bounds"], data["counts"]))


def _ms(seconds: float) -> str:
    return "over 60 s" if math.isinf(seconds) else f"{seconds * 1000:g} ms"


def breach(tally: Tally, thresholds: Thresholds) -> str | None:
    """Why the tally breaks the thresholds, or None. Nothing counts before `min_requests` calls."""
    if tally.requests < max(1, thresholds.min_requests):
        return None
    if tally.success_rate < thresholds.min_success_rate:
        return (f"success rate {tally.success_rate:.3f} < {thresholds.min_success_rate:g} over "
                f"{tally.requests} requests ({tally.failures} failed)")
    if tally.p99 > thresholds.max_p99_seconds:
        return (f"p99 latency {_ms(tally.p99)} > {_ms(thresholds.max_p99_seconds)} over "
                f"{tally.requests} requests")
    return None


MAX_REPORTS = 1000


def report_problem(request: internal_pb.ReportStatsRequest) -> tuple[str, str] | None:
    """(field, problem) of a malformed stats report, or None."""
    if not request.dispatcher_id:
        return "dispatcher_id", "dispatcher_id is required: the id the dispatcher gave to WatchRoutes"
    if len(request.reports) > MAX_REPORTS:
        return "reports", f"at most {MAX_REPORTS} reports per call, not {len(request.reports)}"
    for index, report in enumerate(request.reports):
        name = f"reports[{index}]"
        if report.failures > report.requests:
            return f"{name}.failures", "more failures than requests"
        latency = report.latency
        if latency.counts or latency.upper_bounds_seconds:
            if not valid_bounds(latency.upper_bounds_seconds):
                return f"{name}.latency.upper_bounds_seconds", "bounds must be positive, finite, increasing, " \
                                                               "at most 64"
            if len(latency.counts) != len(latency.upper_bounds_seconds) + 1:
                return f"{name}.latency.counts", "there must be one count more than bounds"
    return None
