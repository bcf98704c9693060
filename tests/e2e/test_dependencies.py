"""Run-time dependencies end to end: a library and a skill importing it, published with the CLI; the
deployer pins the resolution, executors link it into every call; a later library version does not change
what a running deployment links until it is deployed again."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc

from tests.e2e.conftest import ROOT, Suite
from tests.e2e.test_suite import invoke

SKILLS = ROOT / "examples" / "skills"
NAME = "com.example.cipher"


@pytest.fixture(scope="module")
def channel(suite: Suite) -> Iterator[grpc.Channel]:
    with suite.channel() as ch:
        yield ch


def test_a_skill_runs_linked_with_its_library(suite: Suite, channel: grpc.Channel) -> None:
    # Publishing the skill before its library fails verification: it imports from a package that does not
    # resolve yet.
    early = suite.cli("publish", str(SKILLS / "cipher"))
    assert early.returncode == 1 and "do not resolve" in early.stderr, early.stderr
    for skill in ("rot13", "cipher"):
        published = suite.cli("publish", str(SKILLS / skill))
        assert published.returncode == 0, published.stderr
    # A library cannot be deployed on its own.
    lonely = suite.cli("deploy", "com.example.rot13@1.0.0")
    assert lonely.returncode == 1, lonely.stdout
    deployed = suite.cli("deploy", f"{NAME}@1.0.0")
    assert deployed.returncode == 0, deployed.stderr + "".join(suite.log[-30:])
    assert invoke(channel, NAME, "Hello, World!").output.string_value == "Uryyb, Jbeyq!"
    deployment = deployer_grpc.DeployerServiceStub(channel).GetDeployment(
        deployer_pb.GetDeploymentRequest(id=_active_id(channel)), timeout=10).deployment
    assert [(d.package, d.version) for d in deployment.dependencies] == [("com.example.rot13", "1.0.0")]


def _active_id(channel: grpc.Channel) -> str:
    listed = deployer_grpc.DeployerServiceStub(channel).ListDeployments(
        deployer_pb.ListDeploymentsRequest(skill=NAME), timeout=10).deployments
    return next(d.id for d in listed if d.serving)
