"""Every service of a real `clawhub up` serves Prometheus metrics, and they move with publish, deploy, invoke and
a rollback (docs/metrics.md)."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from google.protobuf import json_format

from services.runtime.metrics import METRIC_NAMES
from tests.e2e.conftest import Suite
from tests.e2e.release_skills import HEALTHY, MARKER, TRAP_ON_MARKER, write_skill
from tests.runtime.metrics_scrape import Samples, exposes, moved, scrape, total

SKILL = "com.test.metrics"
METRICS_LINE = re.compile(r"^(\S+)\s*\| clawhub (\S+) metrics on (http://\S+)$")

EVERY_SERVICE = {"clawhub_rpc_requests_total", "clawhub_rpc_errors_total", "clawhub_rpc_duration_seconds",
                 "process_cpu_seconds_total", "process_resident_memory_bytes"}


def metrics_urls(suite: Suite) -> dict[str, str]:
    """label → metrics URL, from the lines each service printed (relayed by `up` with its label)."""
    urls = {}
    for line in list(suite.log):
        match = METRICS_LINE.match(line.rstrip("\n"))
        if match:
            urls[match[1]] = match[3]
    return urls


def invoke(channel: grpc.Channel, value: str) -> grpc.StatusCode:
    request = gateway_pb.InvokeSkillRequest(name=SKILL)
    json_format.ParseDict(value, request.input)
    try:
        gateway_grpc.GatewayServiceStub(channel).InvokeSkill(request, timeout=20)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def scrape_all(urls: dict[str, str]) -> dict[str, Samples]:
    return {label: scrape(url) for label, url in urls.items()}


def test_every_service_serves_metrics_that_move(suite: Suite, tmp_path: Path) -> None:
    urls = metrics_urls(suite)
    assert set(urls) == set(suite.addresses), (urls, suite.addresses)
    # Free ports (the suite's gRPC ports are free ones), on the loopback interface by default; listed by the banner.
    assert all(url.startswith("http://127.0.0.1:") for url in urls.values()), urls
    log = "".join(suite.log)
    assert "Prometheus metrics (docs/metrics.md" in log
    for label, url in urls.items():
        assert re.search(rf"^  {re.escape(label)}\s+{re.escape(url)}$", log, re.MULTILINE), label
    before = scrape_all(urls)

    for version, mode in (("1.0.0", HEALTHY), ("1.1.0", TRAP_ON_MARKER)):
        published = suite.cli("publish", str(write_skill(tmp_path / version, SKILL, version, mode=mode)))
        assert published.returncode == 0, published.stderr
    deploy = suite.cli("deploy", f"{SKILL}@1.0.0")
    assert deploy.returncode == 0, deploy.stderr
    deploy = suite.cli("deploy", f"{SKILL}@1.1.0")
    assert deploy.returncode == 0, deploy.stderr
    with suite.channel() as channel:
        codes = [invoke(channel, "hello") for _ in range(8)] + [invoke(channel, MARKER) for _ in range(2)]
        assert codes == [grpc.StatusCode.OK] * 8 + [grpc.StatusCode.ABORTED] * 2, codes
        rollback = suite.cli("rollback", SKILL)
        assert rollback.returncode == 0, rollback.stderr
        assert invoke(channel, "after the rollback") == grpc.StatusCode.OK
    after = scrape_all(urls)

    for label, samples in after.items():
        missing = [name for name in EVERY_SERVICE if not exposes(samples, name)]
        assert not missing, (label, missing)
        assert total(samples, "process_resident_memory_bytes") > 0
        assert moved(before[label], samples, "process_cpu_seconds_total") > 0, label
    # Every name of METRIC_NAMES is served by some service.
    assert not [name for name in METRIC_NAMES if not any(exposes(samples, name) for samples in after.values())]

    gateway, dispatcher, deployer, registry = (after[s] for s in ("gateway", "dispatcher", "deployer", "registry"))
    invoke_labels = {"grpc_service": "clawhub.gateway.v1.GatewayService", "grpc_method": "InvokeSkill"}
    assert moved(before["gateway"], gateway, "clawhub_rpc_requests_total", **invoke_labels, grpc_code="OK") == 9
    assert moved(before["gateway"], gateway, "clawhub_rpc_errors_total", **invoke_labels,
                 grpc_code="ABORTED", reason="SKILL_TRAPPED") == 2
    assert moved(before["gateway"], gateway, "clawhub_rpc_duration_seconds_count", **invoke_labels) == 11
    # The relayed publish went through the gateway and the registry; the registry's database did work.
    assert moved(before["gateway"], gateway, "clawhub_rpc_requests_total", grpc_method="PublishSkill") == 2
    assert moved(before["registry"], registry, "clawhub_rpc_requests_total", grpc_method="PublishSkill") == 2
    assert moved(before["registry"], registry, "clawhub_db_query_duration_seconds_count", store="registry") > 0
    assert moved(before["deployer"], deployer, "clawhub_db_query_duration_seconds_count", store="deployer") > 0
    # Two releases went Active, one was rolled back by hand.
    assert moved(before["deployer"], deployer, "clawhub_releases_total", outcome="active") == 2
    assert moved(before["deployer"], deployer, "clawhub_rollbacks_total", cause="manual") == 1
    # Where calls are routed (the gateway, docs/routing.md): 9 good calls and 2 failures of the skill, so its
    # availability is 9/11 over both windows. The dispatcher routed none of them.
    skill = {"skill": SKILL}
    assert moved(before["gateway"], gateway, "clawhub_skill_requests_total", **skill, outcome="success") == 9
    assert moved(before["gateway"], gateway, "clawhub_skill_requests_total", **skill, outcome="failure") == 2
    assert moved(before["dispatcher"], dispatcher, "clawhub_skill_requests_total", **skill, outcome="success") == 0
    for window in ("5m", "1h"):
        labels = frozenset({**skill, "window": window}.items())
        assert gateway[("clawhub_skill_availability_ratio", labels)] == pytest.approx(9 / 11)
        assert gateway[("clawhub_skill_availability_requests", labels)] == 11
    # The dispatcher follows the gateway's reports: its ReportCalls ran.
    assert moved(before["dispatcher"], dispatcher, "clawhub_rpc_requests_total", grpc_method="ReportCalls") > 0
    # The executors ran the calls (and the smoke examples), per version; the trap counted by reason.
    executors = [label for label in after if label.startswith("executor")]
    ran = sum(moved(before[e], after[e], "clawhub_skill_invocations_total", **skill) for e in executors)
    assert ran >= 11
    trapped = sum(moved(before[e], after[e], "clawhub_skill_failures_total", **skill, version="1.1.0",
                        reason="SKILL_TRAPPED") for e in executors)
    assert trapped == 2
    assert sum(moved(before[e], after[e], "clawhub_executor_module_loads_total") for e in executors) > 0
    assert all(total(after[e], "clawhub_executor_threads") >= 1 for e in executors)
