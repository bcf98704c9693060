"""The control plane is not on the call path (issue 13, docs/routing.md): under steady load (≥ 200 calls/s from a
separate process), kill -9 of the dispatcher and then of the deployer costs no call, because the gateway calls
executors itself with the last routes it received; once they are back (`clawhub up` restarts them), a deploy
goes through the restarted control plane and the new version takes the traffic."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Suite, start_up, stop_up, suite_env
from tests.e2e.loadgen import LoadProcess
from tests.e2e.release_skills import write_skill
from tests.e2e.test_supervision import alive, services_of, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

SKILL = "com.example.control-plane"
RATE = 220.0


def service_pid(suite: Suite, service: str) -> int:
    [pid] = [pid for pid, command in services_of(suite.process.pid).items() if command.endswith(f"services.{service}")]
    return pid


def kill_and_wait_back(suite: Suite, service: str) -> None:
    pid = service_pid(suite, service)
    seen = len([line for line in suite.log if f"{service} is back on" in line])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 5, f"the {service} died")
    wait_for(lambda: len([line for line in suite.log if f"{service} is back on" in line]) > seen, 30,
             f"up restarts the {service}", suite)


def test_killing_the_dispatcher_and_the_deployer_under_load_costs_no_call(tmp_path: Path) -> None:
    suite = start_up(tmp_path / "data", executors=2,
                     env=suite_env(CLAWHUB_UP_RESTART_DELAY="0.1", CLAWHUB_UP_RESTART_MAX_DELAY="0.5"))
    try:
        for version in ("1.0.0", "2.0.0"):
            result = suite.cli("publish", str(write_skill(tmp_path / version, SKILL, version)))
            assert result.returncode == 0, result.stderr
        result = suite.cli("deploy", f"{SKILL}@1.0.0", "--watch", timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        load = LoadProcess(suite.gateway, SKILL, tmp_path / "load.json", rate=RATE, concurrency=32)
        time.sleep(1.0)
        kill_and_wait_back(suite, "dispatcher")
        time.sleep(1.0)
        kill_and_wait_back(suite, "deployer")
        time.sleep(1.0)
        # The restarted control plane works: a deploy reaches the gateway through the new dispatcher.
        result = suite.cli("deploy", f"{SKILL}@2.0.0", "--watch", timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr + "".join(suite.log[-30:])
        switched = time.monotonic()
        time.sleep(1.0)
        summary = load.stop()
        assert summary["failed"] == 0, f"{summary['failed']} failed calls: {summary['failures']}"
        assert summary["achieved_rate"] >= 200, summary["achieved_rate"]
        after = {row[3] for row in summary["timeline"] if row[0] > switched}
        assert after == {"2.0.0"}, after
    finally:
        stop_up(suite)
