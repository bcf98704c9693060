"""Latency histograms with fixed bucket bounds, shared by the dispatcher (which records calls) and the
deployer (which merges dispatchers' reports and checks the p99 of a release).

Fixed buckets make merging exact (counts add up) and keep a report small; a quantile is the upper bound of
the bucket it falls in, so it errs on the slow side, which is the safe side for a rollback decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Upper bounds in seconds. Dense where release thresholds usually sit (tens of ms to a few s).
BOUNDS_SECONDS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
    5.0, 10.0, 30.0, 60.0,
)
MAX_BUCKETS = 64


class Histogram:
    """Counts per bucket: one per bound, then one for everything slower than the last bound."""

    __slots__ = ("bounds", "counts")

    def __init__(self, bounds: Sequence[float] = BOUNDS_SECONDS, counts: Sequence[int] | None = None) -> None:
        self.bounds = tuple(bounds)
        self.counts = list(counts) if counts is not None else [0] * (len(self.bounds) + 1)
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.counts)} counts for {len(self.bounds)} bounds; want one more count "
                             "than bounds")

    @property
    def total(self) -> int:
        return sum(self.counts)

    def add(self, seconds: float, count: int = 1) -> None:
        # Linear scan: ~20 buckets, cheaper than bisect's call overhead at this size.
        for index, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[index] += count
                return
        self.counts[-1] += count

    def merge(self, other: Histogram) -> None:
        """Add `other`'s counts; with other bounds, each of its buckets lands where its upper bound falls."""
        if other.bounds == self.bounds:
            for index, count in enumerate(other.counts):
                self.counts[index] += count
            return
        for index, count in enumerate(other.counts):
            if count:
                self.add(other.bounds[index] if index < len(other.bounds) else math.inf, count)

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (0 with no calls, inf past the last bound)."""
        total = self.total
        if total == 0:
            return 0.0
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return self.bounds[index] if index < len(self.bounds) else math.inf
        return math.inf

    def clear(self) -> None:
        for index in range(len(self.counts)):
            self.counts[index] = 0

    def copy(self) -> Histogram:
        return Histogram(self.bounds, self.counts)


def valid_bounds(bounds: Sequence[float]) -> bool:
    """Strictly increasing, positive, finite, and not too many."""
    if not bounds or len(bounds) > MAX_BUCKETS:
        return False
    if any(not math.isfinite(b) or b <= 0 for b in bounds):
        return False
    return all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
