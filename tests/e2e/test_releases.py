"""Acceptance of zero-downtime releases (issue 5): under continuous load from a separate process (≥ 200
calls/s, tests/e2e/loadgen.py), a blue-green deploy, a canary deploy, an automatic rollback of a bad version
and a manual rollback each complete with zero failed calls, and the traffic really moved.

Every change goes through the CLI (`clawhub deploy … --watch` in its plain, not-a-terminal mode), as an
operator's CI job would run it; one test runs it on a pty for the live display. Each test uses its own
skill, so the tests do not depend on each other.
Times compared between the load generator and this process are time.monotonic() on both sides, one
system-wide clock on Linux.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc

from tests.e2e.conftest import BIN, ROOT, Suite
from tests.e2e.loadgen import LoadProcess
from tests.e2e.release_skills import MARKER, SLOW_ON_MARKER, TRAP_ON_MARKER, write_skill

RATE = 220.0  # target calls/s; the acceptance bar is 200
MIN_RATE = 200.0
SETTLE = 1.0  # seconds of load before and after each change


@pytest.fixture(scope="module")
def deployer(suite: Suite) -> Iterator[deployer_grpc.DeployerServiceStub]:
    with suite.channel() as channel:
        yield deployer_grpc.DeployerServiceStub(channel)


def publish_versions(suite: Suite, tmp_path: Path, name: str, *versions: tuple[str, int]) -> None:
    for version, mode in versions:
        directory = write_skill(tmp_path / f"{name}-{version}", name, version, mode=mode)
        result = suite.cli("publish", str(directory))
        assert result.returncode == 0, result.stderr


def deploy(suite: Suite, ref: str, *flags: str) -> tuple[Any, float]:
    """`clawhub deploy REF --watch FLAGS`; returns the finished process and the monotonic time it returned."""
    result = suite.cli("deploy", ref, "--watch", *flags, timeout=60)
    return result, time.monotonic()


def start_load(suite: Suite, tmp_path: Path, name: str, marker_fraction: float = 0.0) -> LoadProcess:
    load = LoadProcess(suite.gateway, name, tmp_path / f"{name}-load.json", rate=RATE, concurrency=32,
                       marker=MARKER, marker_fraction=marker_fraction)
    time.sleep(SETTLE)
    return load


def stop_load(load: LoadProcess) -> dict[str, Any]:
    time.sleep(SETTLE)
    summary = load.stop()
    assert summary["failed"] == 0, f"{summary['failed']} failed calls: {summary['failures']}"
    assert summary["achieved_rate"] >= MIN_RATE, (
        f"the load ran at {summary['achieved_rate']} calls/s, below the {MIN_RATE:g} the acceptance asks for "
        f"(p99 latency {summary['latency_ms']['p99']} ms, {summary['late_slots']} late slots)")
    return summary


def served_after(summary: dict[str, Any], moment: float) -> set[str]:
    """Versions that answered calls sent after `moment` (monotonic)."""
    return {row[3] for row in summary["timeline"] if row[0] > moment}


def latest(deployer: deployer_grpc.DeployerServiceStub, name: str) -> deployer_pb.Deployment:
    response = deployer.ListDeployments(deployer_pb.ListDeploymentsRequest(skill=name, page_size=1), timeout=10)
    deployment: deployer_pb.Deployment = response.deployments[0]
    return deployment


def serving_version(deployer: deployer_grpc.DeployerServiceStub, name: str) -> str:
    """The version serving the skill, after checking its deployment is Active."""
    response = deployer.ListDeployments(deployer_pb.ListDeploymentsRequest(skill=name, page_size=50), timeout=10)
    serving = next(d for d in response.deployments if d.serving)
    assert serving.state == release_pb2.RELEASE_STATE_ACTIVE, serving
    return serving.version


def test_blue_green_deploy_under_load_fails_no_call(suite: Suite, tmp_path: Path,
                                                    deployer: deployer_grpc.DeployerServiceStub) -> None:
    name = "com.test.bluegreen"
    publish_versions(suite, tmp_path, name, ("1.0.0", 0), ("2.0.0", 0))
    first, _ = deploy(suite, f"{name}@1.0.0", "--bake", "0s")
    assert first.returncode == 0, first.stderr
    load = start_load(suite, tmp_path, name)
    try:
        result, returned = deploy(suite, f"{name}@2.0.0", "--bake", "1s")
    finally:
        summary = stop_load(load)
    assert result.returncode == 0, result.stderr
    assert f"{name}@2.0.0 is active" in result.stdout
    released = latest(deployer, name)
    assert released.blue_green.bake.ToMilliseconds() == 1000 and released.verdict == deployer_pb.ANALYSIS_VERDICT_PASSED
    # The load really spanned the switch, and once the deploy returned (every dispatcher acknowledged the
    # new route) no call went to the old version.
    assert summary["versions"].get("1.0.0", 0) > 0 and summary["versions"].get("2.0.0", 0) > 0, summary["versions"]
    assert served_after(summary, returned) == {"2.0.0"}


def test_manual_rollback_under_load_fails_no_call(suite: Suite, tmp_path: Path,
                                                  deployer: deployer_grpc.DeployerServiceStub) -> None:
    name = "com.test.manualrollback"
    publish_versions(suite, tmp_path, name, ("1.0.0", 0), ("2.0.0", 0))
    for ref in (f"{name}@1.0.0", f"{name}@2.0.0"):
        result, _ = deploy(suite, ref, "--bake", "0s")
        assert result.returncode == 0, result.stderr
    load = start_load(suite, tmp_path, name)
    try:
        rollback = suite.cli("rollback", name)
        returned = time.monotonic()
    finally:
        summary = stop_load(load)
    assert rollback.returncode == 0, rollback.stderr
    assert "rolled back to 1.0.0" in rollback.stdout
    assert summary["versions"].get("1.0.0", 0) > 0 and summary["versions"].get("2.0.0", 0) > 0, summary["versions"]
    assert served_after(summary, returned) == {"1.0.0"}
    assert serving_version(deployer, name) == "1.0.0"
    assert latest(deployer, name).state == release_pb2.RELEASE_STATE_ACTIVE


def test_canary_deploy_under_load_fails_no_call(suite: Suite, tmp_path: Path,
                                                deployer: deployer_grpc.DeployerServiceStub) -> None:
    name = "com.test.canary"
    publish_versions(suite, tmp_path, name, ("2.0.0", 0), ("3.0.0", 0))
    first, _ = deploy(suite, f"{name}@2.0.0", "--bake", "0s")
    assert first.returncode == 0, first.stderr
    load = start_load(suite, tmp_path, name)
    try:
        result, returned = deploy(suite, f"{name}@3.0.0", "--canary", "10,50,100", "--step", "1s",
                                  "--min-requests", "20")
    finally:
        summary = stop_load(load)
    assert result.returncode == 0, result.stderr
    # The plain progress lines name the weight steps. (Not the first one: it can go out before the CLI's
    # WatchDeployment subscribes, and the stream starts from the current state.)
    assert "canary step 2/3: 50% of traffic to 3.0.0 for 1s" in result.stderr, result.stderr
    released = latest(deployer, name)
    assert list(released.canary.weights) == [10, 50, 100] and released.canary.step.ToMilliseconds() == 1000
    assert released.verdict == deployer_pb.ANALYSIS_VERDICT_PASSED and released.traffic_weight == 100
    assert summary["versions"].get("2.0.0", 0) > 0 and summary["versions"].get("3.0.0", 0) > 0, summary["versions"]
    assert served_after(summary, returned) == {"3.0.0"}


def test_bad_version_is_rolled_back_automatically_and_no_call_fails(
        suite: Suite, tmp_path: Path, deployer: deployer_grpc.DeployerServiceStub) -> None:
    name = "com.test.autorollback"
    publish_versions(suite, tmp_path, name, ("1.0.0", 0), ("2.0.0", TRAP_ON_MARKER))
    first, _ = deploy(suite, f"{name}@1.0.0", "--bake", "0s")
    assert first.returncode == 0, first.stderr
    # One call in ten carries the marker, on which 2.0.0 traps (its smoke example passes).
    load = start_load(suite, tmp_path, name, marker_fraction=0.1)
    try:
        result, returned = deploy(suite, f"{name}@2.0.0", "--bake", "10s", "--min-success-rate", "0.99",
                                  "--min-requests", "20")
    finally:
        summary = stop_load(load)
    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stderr and "success rate" in result.stderr, result.stderr
    failed = latest(deployer, name)
    assert failed.version == "2.0.0" and failed.state == release_pb2.RELEASE_STATE_FAILED
    assert failed.verdict == deployer_pb.ANALYSIS_VERDICT_FAILED and "success rate" in failed.verdict_reason
    assert serving_version(deployer, name) == "1.0.0"
    # 2.0.0 really took traffic before it was rolled back; the calls it failed were answered by 1.0.0.
    assert summary["versions"].get("2.0.0", 0) > 0, summary["versions"]
    assert served_after(summary, returned) == {"1.0.0"}


def test_slow_version_is_rolled_back_automatically_and_no_call_fails(
        suite: Suite, tmp_path: Path, deployer: deployer_grpc.DeployerServiceStub) -> None:
    name = "com.test.slowrollback"
    publish_versions(suite, tmp_path, name, ("1.0.0", 0), ("2.0.0", SLOW_ON_MARKER))
    first, _ = deploy(suite, f"{name}@1.0.0", "--bake", "0s")
    assert first.returncode == 0, first.stderr
    # One call in fifty carries the marker, on which 2.0.0 sleeps 300 ms: its p99 is then at least that.
    load = start_load(suite, tmp_path, name, marker_fraction=0.02)
    try:
        result, returned = deploy(suite, f"{name}@2.0.0", "--bake", "10s", "--max-p99", "100ms",
                                  "--min-requests", "20")
    finally:
        summary = stop_load(load)
    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stderr and "p99" in result.stderr, result.stderr
    assert latest(deployer, name).state == release_pb2.RELEASE_STATE_FAILED
    assert serving_version(deployer, name) == "1.0.0"
    assert summary["versions"].get("2.0.0", 0) > 0, summary["versions"]
    assert served_after(summary, returned) == {"1.0.0"}


def test_deploy_on_a_terminal_shows_the_live_display(suite: Suite, tmp_path: Path) -> None:
    """With a terminal (a pty here) `clawhub deploy` needs no flag for the live display: a status line redrawn
    in place during the bake window, erased before the verdict."""
    name = "com.test.terminal"
    publish_versions(suite, tmp_path, name, ("1.0.0", 0))
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen([str(BIN / "clawhub"), "deploy", f"{name}@1.0.0", "--bake", "1s",
                                    "--gateway", suite.gateway], stdin=terminal, stdout=terminal, stderr=terminal,
                                   cwd=ROOT)
        os.close(terminal)
        screen = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        assert process.wait(30) == 0, screen.decode(errors="replace")
    finally:
        os.close(controller)
    text = screen.decode(errors="replace")
    assert "\r\x1b[K" in text and "DEPLOYING · " in text and "baking 1.0.0" in text, text
    assert text.rstrip().endswith(f"{name}@1.0.0 is active"), text


def test_the_load_generator_counts_failed_calls(suite: Suite, tmp_path: Path) -> None:
    """The zero-failure assertions above are only as good as the counting: a skill that is published but not
    deployed fails every call, and the generator must say so, by reason."""
    name = "com.test.undeployed"
    publish_versions(suite, tmp_path, name, ("1.0.0", 0))
    output = tmp_path / "load.json"
    result = subprocess.run([sys.executable, "-m", "tests.e2e.loadgen", "--gateway", suite.gateway, "--skill", name,
                             "--rate", "50", "--duration", "1", "--output", str(output)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = json.loads(output.read_text())
    assert summary["total"] >= 40 and summary["ok"] == 0 and summary["failed"] == summary["total"]
    assert summary["failures"] == {"FAILED_PRECONDITION SKILL_NOT_DEPLOYED": summary["total"]}
    assert all(not row[2] and row[5] == "FAILED_PRECONDITION" for row in summary["timeline"])
