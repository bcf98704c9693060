"""The transition table of the release state machine, and a record refusing an illegal step."""

from __future__ import annotations

import grpc
import pytest
from clawhub.common.v1 import skill_pb2

from services.deployer.model import DeploymentRecord, Transition
from services.deployer.statemachine import (
    ACTIVE,
    DEPLOYING,
    FAILED,
    PENDING,
    READY,
    ROLLING_BACK,
    TRANSITIONS,
    VERIFYING,
    check_transition,
    is_allowed,
)
from services.runtime.errors import Reason, ServiceError

ALLOWED = {
    (PENDING, VERIFYING), (VERIFYING, READY), (VERIFYING, FAILED), (READY, DEPLOYING),
    (DEPLOYING, ACTIVE), (DEPLOYING, ROLLING_BACK), (ROLLING_BACK, ACTIVE), (ROLLING_BACK, FAILED),
    (ACTIVE, ROLLING_BACK),
}
STATES = [PENDING, VERIFYING, READY, DEPLOYING, ACTIVE, ROLLING_BACK, FAILED]


def test_the_table_is_exactly_the_design() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


@pytest.mark.parametrize("from_state", STATES)
@pytest.mark.parametrize("to_state", STATES)
def test_every_pair_is_allowed_or_refused(from_state: int, to_state: int) -> None:
    if (from_state, to_state) in ALLOWED:
        assert is_allowed(from_state, to_state)
        check_transition(from_state, to_state)
        return
    assert not is_allowed(from_state, to_state)
    with pytest.raises(ServiceError) as caught:
        check_transition(from_state, to_state, deployment_id="d1")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == Reason.ILLEGAL_TRANSITION
    assert caught.value.metadata["deployment_id"] == "d1"


def test_a_record_refuses_an_illegal_transition_and_stays_unchanged() -> None:
    record = DeploymentRecord(
        id="d1", skill="com.acme.echo", version="1.0.0", digest="sha256:" + "0" * 64, limits=skill_pb2.Limits(),
        state=FAILED, history=[Transition(READY, DEPLOYING, 1, "deploy"), Transition(DEPLOYING, ROLLING_BACK, 2, "x"),
                               Transition(ROLLING_BACK, FAILED, 3, "y")],
        previous_id="", previous_version="", create_ns=1, update_ns=3)
    with pytest.raises(ServiceError) as caught:
        record.apply(ACTIVE, "resurrect", 4)
    assert "illegal transition Failed → Active" in caught.value.message
    assert record.state == FAILED and len(record.history) == 3 and record.update_ns == 3
