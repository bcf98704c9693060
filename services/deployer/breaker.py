"""The deployment circuit breaker of the design documents.

After `failures` failed deployments of a skill within `window` (and no successful one since), new
deployments of it are refused until `reset` has passed since the last failure. Then one deployment may try
(half-open): if it fails too, the breaker opens again for another `reset`; if it succeeds, the failures
before it stop counting. Everything is derived from the persisted transition history, so a restarted
deployer keeps the breaker as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from services.runtime.errors import Reason, ServiceError

NS = 1_000_000_000


@dataclass(frozen=True)
class BreakerSettings:
    """`failures` 0 turns the breaker off."""

    failures: int = 3
    window_seconds: float = 600.0
    reset_seconds: float = 300.0


def check(skill: str, outcomes: Sequence[tuple[int, bool]], now_ns: int, settings: BreakerSettings,
          ) -> ServiceError | None:
    """The refusal when the breaker is open, else None.

    `outcomes` are the skill's finished deployments as (time, succeeded), oldest first, at least those of
    the last `window`.
    """
    if settings.failures <= 0:
        return None
    since = now_ns - int(settings.window_seconds * NS)
    failures: list[int] = []
    for time_ns, succeeded in outcomes:
        if time_ns < since:
            continue
        if succeeded:
            failures.clear()
        else:
            failures.append(time_ns)
    if len(failures) < settings.failures:
        return None
    open_until = failures[-1] + int(settings.reset_seconds * NS)
    if now_ns >= open_until:
        return None
    retry_after = (open_until - now_ns) / NS
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPLOYMENT_CIRCUIT_OPEN,
        f"{len(failures)} deployments of {skill} failed within {settings.window_seconds:g}s; new deployments "
        f"of it are refused for {retry_after:.0f}s more (fix the version, then deploy again)",
        metadata={"skill": skill, "failures": str(len(failures)), "window_seconds": f"{settings.window_seconds:g}",
                  "retry_after_seconds": f"{retry_after:.3f}"},
        retry_after_seconds=retry_after)
