"""The release state machine of DESIGN.md, as one table.

    Pending → Verifying → Ready | Failed          (the registry's part: publishing and verification)
    Ready → Deploying → Active | RollingBack      (the deployer's part)
    RollingBack → Active | Failed
    Active → RollingBack                          (clawhub's addition: a manual rollback)

How the deployer walks it, per deployment (one record per rollout of one version):

- A deployment is created with the transition Ready → Deploying.
- Deploying → Active: preloaded on every executor, its analysis windows (bake window or canary steps)
  passed, and the final route generation acknowledged by every connected dispatcher. The deployment now
  serves; the one it replaced stays Active with `serving=false` (Active means "this rollout succeeded";
  `serving` says where traffic goes now). The analysis runs inside Deploying: it is a step of the rollout,
  not a state of its own, so the machine stays the one of DESIGN.md.
- Deploying → RollingBack → Failed: the rollout failed. The skill's release goes back to Active on the
  previous version (whose deployment stays Active and serving, or is pushed again if the new route had
  already gone out); the failed deployment ends Failed, and its last reason says whether the previous
  version was restored or the rollback itself failed. A breach during the analysis, a per-digest health
  flip, and a manual `Rollback` during the analysis all take this path.
- Active → RollingBack → Active: a manual `Rollback` of the serving deployment. The route goes back to the
  previous version; the rolled-back deployment ends Active again but no longer serving, with the reason.

Any other transition is refused with FAILED_PRECONDITION / ILLEGAL_TRANSITION.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import grpc
from clawhub.common.v1 import release_pb2

from services.runtime.errors import Reason, ServiceError

State: TypeAlias = release_pb2.ReleaseState.ValueType

PENDING = release_pb2.RELEASE_STATE_PENDING
VERIFYING = release_pb2.RELEASE_STATE_VERIFYING
READY = release_pb2.RELEASE_STATE_READY
DEPLOYING = release_pb2.RELEASE_STATE_DEPLOYING
ACTIVE = release_pb2.RELEASE_STATE_ACTIVE
ROLLING_BACK = release_pb2.RELEASE_STATE_ROLLING_BACK
FAILED = release_pb2.RELEASE_STATE_FAILED

TRANSITIONS: Mapping[State, frozenset[State]] = {
    PENDING: frozenset({VERIFYING}),
    VERIFYING: frozenset({READY, FAILED}),
    READY: frozenset({DEPLOYING}),
    DEPLOYING: frozenset({ACTIVE, ROLLING_BACK}),
    ACTIVE: frozenset({ROLLING_BACK}),
    ROLLING_BACK: frozenset({ACTIVE, FAILED}),
    FAILED: frozenset(),
}

# States a deployment's watch ends in; they change again only through a new operation (a manual rollback).
SETTLED: frozenset[State] = frozenset({ACTIVE, FAILED})
# States of a deployment whose rollout (or manual rollback) is still running.
IN_FLIGHT: frozenset[State] = frozenset({DEPLOYING, ROLLING_BACK})

_NAMES = {
    release_pb2.RELEASE_STATE_UNSPECIFIED: "Unspecified",
    PENDING: "Pending",
    VERIFYING: "Verifying",
    READY: "Ready",
    DEPLOYING: "Deploying",
    ACTIVE: "Active",
    ROLLING_BACK: "RollingBack",
    FAILED: "Failed",
}


def state_name(state: State) -> str:
    """The DESIGN.md name of a state, such as `RollingBack`."""
    return _NAMES.get(state, f"state {int(state)}")


def is_allowed(from_state: State, to_state: State) -> bool:
    return to_state in TRANSITIONS.get(from_state, frozenset())


def check_transition(from_state: State, to_state: State, *, deployment_id: str = "") -> None:
    """Raise FAILED_PRECONDITION / ILLEGAL_TRANSITION unless the table allows from_state → to_state."""
    if is_allowed(from_state, to_state):
        return
    allowed = ", ".join(sorted(state_name(s) for s in TRANSITIONS.get(from_state, frozenset()))) or "none"
    subject = f"deployment {deployment_id}: " if deployment_id else ""
    raise ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.ILLEGAL_TRANSITION,
        f"{subject}illegal transition {state_name(from_state)} → {state_name(to_state)} "
        f"(allowed from {state_name(from_state)}: {allowed})",
        metadata={"from_state": state_name(from_state), "to_state": state_name(to_state),
                  **({"deployment_id": deployment_id} if deployment_id else {})},
    )
