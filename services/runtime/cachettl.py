"""A skill's result-cache TTL (`[cache] ttl = "60s"` in skill.toml; docs/cache.md): parsed by the CLI, checked
by the CLI and again by the registry when a version is published, in the same words.

A TTL is an opt-in promise that the skill is a pure function: the same input, args, env and module always
give the same output and running it has no effect worth repeating. The platform cannot check that promise,
so it bounds what a wrong one costs: at most MAX_TTL_SECONDS of a stale answer, and never below
MIN_TTL_SECONDS (shorter TTLs cost more in cache churn than they save).
"""

from __future__ import annotations

import re

from google.protobuf import duration_pb2

MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 24 * 3600

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_ttl(text: str) -> float:
    """Seconds in a TTL such as `"60s"`, `"5m"`, `"1.5h"` or `"500ms"`; ValueError for anything else.
    Range is not checked here (ttl_problem does)."""
    match = _TTL.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; write it as a number with a unit, such as \"60s\", "
                         "\"5m\" or \"1h\"")
    return float(match.group(1)) * _UNITS[match.group(2)]


def ttl_problem(ttl: duration_pb2.Duration) -> str | None:
    """Why a manifest's cache TTL cannot be published; None when it can."""
    if ttl.seconds < 0 or ttl.nanos < 0:
        return "a cache TTL must not be negative (leave [cache] out for a skill whose results are not cached)"
    seconds = ttl.seconds + ttl.nanos / 1e9
    if seconds < MIN_TTL_SECONDS or seconds > MAX_TTL_SECONDS:
        return (f"a cache TTL of {seconds:g} s is out of range: it must be from {MIN_TTL_SECONDS} s to "
                f"{MAX_TTL_SECONDS // 3600} h")
    return None


def to_duration(seconds: float) -> duration_pb2.Duration:
    """`seconds` as a Duration, to the millisecond."""
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(round(seconds * 1000))
    return duration
