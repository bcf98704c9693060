"""The deployment circuit breaker's rule, on its own (the end-to-end case is in test_release.py)."""

from __future__ import annotations

import grpc

from services.deployer.breaker import BreakerSettings, check
from services.runtime.errors import Reason

S = 1_000_000_000
SETTINGS = BreakerSettings(failures=3, window_seconds=600, reset_seconds=300)


def test_opens_at_n_failures_within_the_window() -> None:
    now = 10_000 * S
    failures = [(now - 500 * S, False), (now - 100 * S, False)]
    assert check("com.acme.x", failures, now, SETTINGS) is None
    refusal = check("com.acme.x", [*failures, (now - 10 * S, False)], now, SETTINGS)
    assert refusal is not None and refusal.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refusal.reason == Reason.DEPLOYMENT_CIRCUIT_OPEN
    assert refusal.retry_after_seconds == 290
    # A failure older than the window does not count.
    assert check("com.acme.x", [(now - 700 * S, False), *failures], now, SETTINGS) is None


def test_a_success_closes_it_and_a_failed_trial_after_the_reset_reopens_it() -> None:
    now = 10_000 * S
    three = [(now - 400 * S, False), (now - 390 * S, False), (now - 380 * S, False)]
    # Reset passed since the last failure: half-open, one deployment may try.
    assert check("s", three, now, SETTINGS) is None
    # The trial failed: open again for a whole reset period.
    refusal = check("s", [*three, (now - 1 * S, False)], now, SETTINGS)
    assert refusal is not None and refusal.retry_after_seconds == 299
    # The trial succeeded: the failures before it stop counting.
    assert check("s", [*three, (now - 2 * S, True), (now - 1 * S, False)], now, SETTINGS) is None


def test_zero_failures_turns_it_off() -> None:
    now = 10_000 * S
    failures = [(now - i * S, False) for i in range(1, 10)]
    assert check("s", failures, now, BreakerSettings(failures=0)) is None
