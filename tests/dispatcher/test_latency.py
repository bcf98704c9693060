"""The shared latency histogram the dispatcher reports and the deployer merges."""

from __future__ import annotations

import math

import pytest

from services.runtime.latency import BOUNDS_SECONDS, Histogram, valid_bounds


def test_quantile_is_the_upper_bound_of_its_bucket() -> None:
    h = Histogram()
    assert h.quantile(0.99) == 0.0
    for _ in range(99):
        h.add(0.004)
    h.add(0.4)
    assert h.total == 100
    assert h.quantile(0.99) == 0.005 and h.quantile(1.0) == 0.5
    h.add(120.0)
    assert h.quantile(1.0) == math.inf


def test_merge_adds_counts_and_maps_other_bounds() -> None:
    a, b = Histogram(), Histogram()
    a.add(0.001)
    b.add(0.9, count=3)
    a.merge(b)
    assert a.total == 4 and a.quantile(0.5) == 1.0
    other = Histogram((0.01, 2.0), [1, 2, 1])
    a.merge(other)
    assert a.total == 8 and a.counts[BOUNDS_SECONDS.index(2.0)] == 2 and a.counts[-1] == 1
    with pytest.raises(ValueError, match="counts"):
        Histogram((0.1,), [1])


def test_valid_bounds() -> None:
    assert valid_bounds(BOUNDS_SECONDS)
    assert not valid_bounds(())
    assert not valid_bounds((0.2, 0.1))
    assert not valid_bounds((0.0, 0.1))
    assert not valid_bounds((0.1, math.inf))
    assert not valid_bounds(tuple(i / 100 for i in range(1, 70)))
