"""The platform's own traffic (issue 11): in the default `clawhub up`, the internal ports answer only the
platform's own services. A client that connects straight to the dispatcher, an executor, the deployer or the
registry without a platform token is UNAUTHENTICATED; each service's secrets reach only that service."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_internal_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_internal_grpc
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.executor.v1 import executor_service_pb2 as executor_pb
from clawhub.executor.v1 import executor_service_pb2_grpc as executor_grpc
from clawhub.registry.v1 import registry_internal_pb2 as registry_internal_pb
from clawhub.registry.v1 import registry_internal_pb2_grpc as registry_internal_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.errors import error_info
from services.runtime.identity import SERVICE_METADATA
from services.runtime.wasm import sha256_digest
from tests.e2e.conftest import ROOT, Suite, start_up, stop_up, suite_env

ANY_DIGEST = sha256_digest(b"code nobody published")
UPPERCASE = ROOT / "examples" / "skills" / "uppercase"


def refused(call: object, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
            reason: str = "PLATFORM_CREDENTIALS_REQUIRED") -> dict[str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        if callable(call):
            call()
    err = caught.value
    assert err.code() == code, (err.code(), err.details())  # type: ignore[attr-defined]
    info = error_info(err)
    assert info is not None and info.reason == reason, (info, err.details())  # type: ignore[attr-defined]
    return dict(info.metadata)


def token(suite: Suite, service: str) -> tuple[tuple[str, str]]:
    return ((SERVICE_METADATA, (suite.data_dir / "secrets" / f"{service}.token").read_text().strip()),)


@pytest.fixture
def deployed(suite: Suite) -> Suite:
    for args in (("publish", str(UPPERCASE)), ("deploy", "com.example.uppercase@1.0.0")):
        result = suite.cli(*args)
        assert result.returncode == 0, result.stderr
    return suite


def test_the_internal_ports_refuse_callers_without_platform_credentials(deployed: Suite) -> None:
    suite = deployed
    address = suite.addresses
    executor = next(a for label, a in address.items() if label.startswith("executor"))
    with grpc.insecure_channel(address["dispatcher"]) as ch:
        stub = dispatcher_grpc.DispatcherServiceStub(ch)
        refused(lambda: stub.Dispatch(dispatcher_pb.DispatchRequest(skill="com.example.uppercase", input=b'"x"'),
                                      timeout=10))
        refused(lambda: stub.GetRouteTable(dispatcher_pb.GetRouteTableRequest(), timeout=10))
    with grpc.insecure_channel(executor) as ch:
        stub = executor_grpc.ExecutorServiceStub(ch)
        # An arbitrary digest, and the one deployed: neither runs for a stranger.
        refused(lambda: stub.Execute(executor_pb.ExecuteRequest(digest=ANY_DIGEST, input=b"x"), timeout=10))
        refused(lambda: stub.UnloadSkill(executor_pb.UnloadSkillRequest(digest=ANY_DIGEST), timeout=10))
        refused(lambda: stub.LoadSkill(executor_pb.LoadSkillRequest(digest=ANY_DIGEST), timeout=10))
    with grpc.insecure_channel(address["deployer"]) as ch:
        internal = deployer_internal_grpc.DeployerInternalServiceStub(ch)
        # Fake statistics that would fail any release: 100 of 100 calls failed.
        fake = deployer_internal_pb.ReportStatsRequest(dispatcher_id="intruder", reports=[
            deployer_internal_pb.VersionStatsReport(skill="com.example.uppercase", version="1.0.0", requests=100,
                                                    failures=100)])
        refused(lambda: internal.ReportStats(fake, timeout=10))
        # A subscriber that would never acknowledge (stalling every deploy) cannot subscribe.
        refused(lambda: next(internal.WatchRoutes(deployer_internal_pb.WatchRoutesRequest(dispatcher_id="intruder"),
                                                  timeout=10)))
        refused(lambda: internal.AcknowledgeRoutes(
            deployer_internal_pb.AcknowledgeRoutesRequest(dispatcher_id="intruder", generation=1), timeout=10))
        refused(lambda: deployer_grpc.DeployerServiceStub(ch).ListDeployments(
            deployer_pb.ListDeploymentsRequest(), timeout=10))
    with grpc.insecure_channel(address["registry"]) as ch:
        refused(lambda: registry_grpc.RegistryServiceStub(ch).GetSkillVersion(
            registry_pb.GetSkillVersionRequest(name="com.example.uppercase", version="1.0.0"), timeout=10))
        refused(lambda: next(registry_internal_grpc.RegistryInternalServiceStub(ch).DownloadBlob(
            registry_internal_pb.DownloadBlobRequest(digest=ANY_DIGEST), timeout=10)))
    # A made-up token is no better than none.
    with grpc.insecure_channel(executor) as ch:
        refused(lambda: executor_grpc.ExecutorServiceStub(ch).Execute(
            executor_pb.ExecuteRequest(digest=ANY_DIGEST), metadata=((SERVICE_METADATA, "chs_dispatcher_guess"),),
            timeout=10))
    # Probes and reflection stay open.
    for label, target in address.items():
        with grpc.insecure_channel(target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, label
    listed = suite.grpcurl("list", address=address["executor-1"])
    assert listed.returncode == 0 and "clawhub.executor.v1.ExecutorService" in listed.stdout, listed.stderr
    # The walkthrough still works: the gateway's calls carry its token.
    invoked = suite.cli("invoke", "com.example.uppercase", "--input", '"still works"')
    assert invoked.returncode == 0 and "STILL WORKS" in invoked.stdout, invoked.stderr
    # A token entry a client sends to the gateway is dropped, not relayed (the gateway sends its own).
    from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
    from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
    with suite.channel() as ch:
        request = gateway_pb.InvokeSkillRequest(name="com.example.uppercase")
        request.input.string_value = "relayed"
        response = gateway_grpc.GatewayServiceStub(ch).InvokeSkill(
            request, metadata=((SERVICE_METADATA, "chs_dispatcher_forged"),), timeout=20)
        assert response.output.string_value == "RELAYED"
        listed = registry_grpc.RegistryServiceStub(ch).ListSkills(
            registry_pb.ListSkillsRequest(), metadata=((SERVICE_METADATA, "forged"),), timeout=20)
        assert listed.skills


def test_a_platform_service_may_call_only_what_the_policy_grants_it(deployed: Suite) -> None:
    suite = deployed
    executor = suite.addresses["executor-1"]
    with grpc.insecure_channel(executor) as ch:
        stub = executor_grpc.ExecutorServiceStub(ch)
        # The deployer loads and unloads; it never runs calls.
        meta = refused(lambda: stub.Execute(executor_pb.ExecuteRequest(digest=ANY_DIGEST),
                                            metadata=token(suite, "deployer"), timeout=10),
                       grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_ALLOWED")
        assert meta["permission"] == "clawhub.executor.v1.ExecutorService/Execute" and meta["service"] == "deployer"
        # The gateway's and the dispatcher's tokens are admitted (both route calls: docs/routing.md); a bare
        # digest still does not run (no skill named).
        for service in ("gateway", "dispatcher"):
            refused(lambda service=service: stub.Execute(executor_pb.ExecuteRequest(digest=ANY_DIGEST, input=b"x"),
                                         metadata=token(suite, service), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        # The gateway may not load or unload modules.
        refused(lambda: stub.UnloadSkill(executor_pb.UnloadSkillRequest(digest=ANY_DIGEST),
                                         metadata=token(suite, "gateway"), timeout=10),
                grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_ALLOWED")
    with grpc.insecure_channel(suite.addresses["deployer"]) as ch:
        internal = deployer_internal_grpc.DeployerInternalServiceStub(ch)
        refused(lambda: internal.ReportStats(deployer_internal_pb.ReportStatsRequest(dispatcher_id="x"),
                                             metadata=token(suite, "executor"), timeout=10),
                grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_ALLOWED")
    with grpc.insecure_channel(suite.addresses["dispatcher"]) as ch:
        # The operator's debugging view needs a platform credential, and shows env keys, never values.
        table = dispatcher_grpc.DispatcherServiceStub(ch).GetRouteTable(
            dispatcher_pb.GetRouteTableRequest(), metadata=token(suite, "gateway"), timeout=10).route_table
        assert table.routes


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _children(pid: int) -> dict[int, str]:
    """Every service process under `pid`: pid → module (`services.registry`)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == pid and len(command) > 2 and command[1] == b"-m":
            found[int(entry.name)] = command[2].decode()
    return found


@pytest.fixture
def with_admin(tmp_path: Path) -> Iterator[Suite]:
    running = start_up(tmp_path / "data", executors=1,
                       env=suite_env(CLAWHUB_REGISTRY_ADMIN_TOKEN="admin-secret-for-the-registry-only"))
    yield running
    stop_up(running)


def test_each_service_gets_only_its_own_secrets(with_admin: Suite) -> None:
    secrets = with_admin.data_dir / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    children = _children(with_admin.process.pid)
    assert sorted(children.values()) == sorted(f"services.{s}" for s in
                                               ("registry", "executor", "deployer", "dispatcher", "gateway"))
    for pid, module in children.items():
        service = module.removeprefix("services.")
        env = _environ(pid)
        values = "\n".join(env.values())
        # No secret in any environment: the admin token travels as a file path, to the registry alone.
        assert "admin-secret-for-the-registry-only" not in values, module
        assert "chs_" not in values, module
        assert env["CLAWHUB_SERVICE_TOKEN_FILE"] == str(secrets / f"{service}.token"), module
        assert ("CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE" in env) == (service == "registry"), module
        assert "CLAWHUB_REGISTRY_ADMIN_TOKEN" not in env, module
    # The admin token still works (the registry read it from its file).
    created = with_admin.cli("publisher", "create", "acme", "--admin-token", "admin-secret-for-the-registry-only")
    assert created.returncode == 0, created.stderr
    # A restart reuses the tokens.
    before = (secrets / "gateway.token").read_text()
    assert stop_up(with_admin) == 0
    again = start_up(with_admin.data_dir, executors=1)
    try:
        assert (secrets / "gateway.token").read_text() == before
        searched = again.cli("search", "x")
        assert searched.returncode == 0, searched.stderr
    finally:
        stop_up(again)


def test_up_refuses_nothing_when_internal_auth_is_off(tmp_path: Path) -> None:
    """`CLAWHUB_INTERNAL_AUTH=off` (a mesh that authenticates the services itself): no tokens, open ports."""
    running = start_up(tmp_path / "data", executors=1, env=suite_env(CLAWHUB_INTERNAL_AUTH="off"))
    try:
        # No service tokens: the only secret is the users' admin key (docs/security.md, "Users, keys and roles").
        assert [p.name for p in (tmp_path / "data" / "secrets").iterdir()] == ["admin.key"]
        with grpc.insecure_channel(running.addresses["registry"]) as ch:
            listed = registry_grpc.RegistryServiceStub(ch).ListSkills(registry_pb.ListSkillsRequest(), timeout=10)
        assert list(listed.skills) == []
    finally:
        stop_up(running)
    assert os.environ.get("CLAWHUB_INTERNAL_AUTH") is None
