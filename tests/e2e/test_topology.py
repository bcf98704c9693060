"""Beyond one machine (issue 15's acceptance): 2 gateways, 2 dispatchers, 3 executors, 2 registries and 2
deployers, each its own process and port, on PostgreSQL and Redis, under steady load through both gateways.

Killing (kill -9) an executor, a dispatcher, a registry, a gateway and the leading deployer, one at a time,
loses no accepted request (the load's client retries UNAVAILABLE on the other gateway, as a client of several
gateways does); a deploy started before the deployer failover completes after it; an executor started mid-test
takes traffic within seconds; and everything published and deployed is still there after a full restart."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.loadgen import LoadProcess
from tests.e2e.release_skills import write_skill
from tests.e2e.topology import Topology, free_port

SKILL = "com.example.topology"
RATE = 120.0
pytestmark = pytest.mark.timeout(300)


def wait_for(condition: object, seconds: float, what: str, topology: Topology) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}\n{topology.logs()}")
        time.sleep(0.1)


def leader(topology: Topology) -> str:
    """The name of the deployer that leads now (its log says so)."""
    leading = [n.name for n in topology.nodes.values() if n.service == "deployer" and n.alive()
               and re.search(rf"deployer {n.name} leads \(term", n.tail(400))]
    return leading[-1] if leading else ""


def executions(metrics_url: str) -> float:
    try:
        text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    except OSError:
        return 0.0
    return sum(float(m.group(1)) for m in re.finditer(r"^clawhub_skill_duration_seconds_count\{[^}]*\} (\S+)$",
                                                         text, re.M))


@pytest.fixture
def topology(tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str) -> Topology:
    t = Topology(tmp_path, database_url=postgres_url, redis_url=redis_url, redis_prefix=redis_prefix)
    try:
        t.start()
        yield t  # type: ignore[misc]
    finally:
        t.stop()


def test_killing_one_node_of_each_service_loses_no_call(topology: Topology, tmp_path: Path) -> None:
    for version in ("1.0.0", "2.0.0"):
        result = topology.cli("publish", str(write_skill(tmp_path / "skills" / version, SKILL, version)))
        assert result.returncode == 0, result.stdout + result.stderr
    result = topology.cli("deploy", f"{SKILL}@1.0.0", "--watch", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr + topology.logs()

    load = LoadProcess(topology.gateway, SKILL, tmp_path / "load.json", rate=RATE, concurrency=24,
                       retry_unavailable=4)
    try:
        for name in ("executor-1", "dispatcher-1", "registry-1", "gateway-1"):
            time.sleep(1.5)
            topology.nodes[name].kill()
        time.sleep(1.5)

        # A deploy in flight (a bake window keeps it going) when the leading deployer dies: the standby takes
        # over and completes it.
        first = leader(topology)
        assert first, topology.logs()
        result = topology.cli("deploy", f"{SKILL}@2.0.0", "--bake", "4s", "--no-wait")
        assert result.returncode == 0, result.stdout + result.stderr
        time.sleep(1.0)
        topology.nodes[first].kill()
        wait_for(lambda: leader(topology) not in ("", first), 20, "a standby deployer takes the lead", topology)

        def on_v2() -> bool:
            shown = topology.cli("status", SKILL)
            return shown.returncode == 0 and "2.0.0 ACTIVE" in shown.stdout.upper()

        wait_for(on_v2, 60, "the deploy started before the failover completes after it", topology)

        # A new executor joins: preloaded, then given traffic within seconds.
        metrics_port = free_port()
        topology.extra_env["CLAWHUB_EXECUTOR_METRICS_PORT"] = str(metrics_port)
        try:
            joined = topology.add_executor()
        finally:
            del topology.extra_env["CLAWHUB_EXECUTOR_METRICS_PORT"]
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: executions(url) >= 10, 20, f"{joined.name} takes traffic", topology)
        time.sleep(1.0)
    finally:
        summary = load.stop()
    print(f"topology load: {summary['total']} calls, {summary['failed']} failed, {summary['retried']} retried on "
          f"UNAVAILABLE, {summary['achieved_rate']} calls/s, p99 {summary['latency_ms']['p99']} ms")
    assert summary["failed"] == 0, f"{summary['failed']} failed calls: {summary['failures']}\n{topology.logs()}"
    assert summary["ok"] >= RATE * 10, summary["ok"]

    # Everything is still there after a full restart of the topology.
    topology.restart()
    shown = topology.cli("status", SKILL)
    assert shown.returncode == 0 and "2.0.0" in shown.stdout, shown.stdout + shown.stderr
    result = topology.cli("invoke", SKILL, "--input", '"again"')
    assert result.returncode == 0 and "ok 2.0.0" in result.stdout, result.stdout + result.stderr
    for version in ("1.0.0", "2.0.0"):
        resolved = topology.cli("resolve", f"{SKILL}@{version}")
        assert resolved.returncode == 0, resolved.stdout + resolved.stderr
