"""Internal identity: service tokens, the server interceptor, and the one policy table."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

import clawhub
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.dispatcher.settings import Settings as DispatcherSettings
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.channels import Outgoing, channel
from services.runtime.errors import error_info
from services.runtime.identity import (
    PlatformIdentity,
    calling_service,
    load_identity,
    token_digest,
    write_credentials,
)
from services.runtime.policy import INTERNAL_CALLERS
from services.runtime.server import create_server
from services.runtime.settings import SettingsError
from tests.conftest import Starter

# The packages whose services are served on internal ports (the gateway's port is public).
INTERNAL_PACKAGES = ("dispatcher", "executor", "deployer", "registry")


def internal_methods() -> set[str]:
    methods = set()
    for package in INTERNAL_PACKAGES:
        module_path = Path(clawhub.__path__[0]) / package / "v1"
        for info in pkgutil.iter_modules([str(module_path)]):
            if info.name.endswith("_pb2"):
                module = importlib.import_module(f"clawhub.{package}.v1.{info.name}")
                for service in module.DESCRIPTOR.services_by_name.values():
                    methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return methods


def test_every_internal_method_has_an_entry_in_the_policy_table() -> None:
    methods = internal_methods()
    assert len(methods) > 20
    assert sorted(methods - set(INTERNAL_CALLERS)) == [], "methods without a policy entry (services/runtime/policy.py)"
    assert sorted(set(INTERNAL_CALLERS) - methods) == [], "policy entries for methods that do not exist"
    services = {"gateway", "dispatcher", "executor", "deployer", "registry"}
    assert all(callers <= services for callers in INTERNAL_CALLERS.values())


def test_the_table_grants_what_the_platform_calls_and_no_more() -> None:
    # Gateways call executors directly (docs/routing.md); the dispatcher's Dispatch does too.
    assert INTERNAL_CALLERS["/clawhub.executor.v1.ExecutorService/Execute"] == {"gateway", "dispatcher"}
    for method in ("WatchDataPlane", "AcknowledgeDataPlane", "ReportCalls"):
        assert INTERNAL_CALLERS[f"/clawhub.dispatcher.v1.DataPlaneService/{method}"] == {"gateway"}
    assert INTERNAL_CALLERS["/clawhub.executor.v1.ExecutorService/UnloadSkill"] == {"deployer"}
    assert INTERNAL_CALLERS["/clawhub.executor.v1.ExecutorService/LoadSkill"] == {"deployer"}
    for method in ("WatchRoutes", "AcknowledgeRoutes", "ReportStats"):
        assert INTERNAL_CALLERS[f"/clawhub.deployer.v1.DeployerInternalService/{method}"] == {"dispatcher"}
    assert INTERNAL_CALLERS["/clawhub.registry.v1.RegistryInternalService/DownloadBlob"] == {"executor"}


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    write_credentials(tmp_path / "secrets")
    return tmp_path / "secrets"


def identity(secrets: Path, service: str) -> PlatformIdentity:
    return load_identity(service, secrets / f"{service}.token", secrets / "identities.json")


def test_credentials_are_private_and_reused(secrets: Path) -> None:
    assert (secrets.stat().st_mode & 0o777) == 0o700
    tokens = {}
    for service in ("gateway", "dispatcher", "executor", "deployer", "registry"):
        path = secrets / f"{service}.token"
        assert (path.stat().st_mode & 0o777) == 0o600
        tokens[service] = path.read_text().strip()
        assert tokens[service].startswith(f"chs_{service}_") and len(tokens[service]) > 40
    identities = json.loads((secrets / "identities.json").read_text())
    assert identities == {token_digest(t): s for s, t in tokens.items()}
    write_credentials(secrets)
    assert (secrets / "gateway.token").read_text().strip() == tokens["gateway"]


def test_from_env_refuses_to_start_without_credentials(monkeypatch: pytest.MonkeyPatch, secrets: Path) -> None:
    for name in ("CLAWHUB_SERVICE_TOKEN_FILE", "CLAWHUB_PLATFORM_IDENTITIES_FILE", "CLAWHUB_INTERNAL_AUTH"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError) as caught:
        DispatcherSettings.from_env()
    assert "CLAWHUB_SERVICE_TOKEN_FILE" in str(caught.value) and "CLAWHUB_INTERNAL_AUTH=off" in str(caught.value)
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")
    assert DispatcherSettings.from_env().identity is None
    monkeypatch.delenv("CLAWHUB_INTERNAL_AUTH")
    monkeypatch.setenv("CLAWHUB_SERVICE_TOKEN_FILE", str(secrets / "dispatcher.token"))
    monkeypatch.setenv("CLAWHUB_PLATFORM_IDENTITIES_FILE", str(secrets / "identities.json"))
    loaded = DispatcherSettings.from_env().identity
    assert loaded is not None and loaded.service == "dispatcher"
    assert "chs_" not in repr(DispatcherSettings.from_env())
    # Another service's token is not this one's.
    with pytest.raises(SettingsError, match="is not the registry's"):
        RegistrySettings.from_env()
    # The gateway checks no callers: its token is enough.
    monkeypatch.setenv("CLAWHUB_SERVICE_TOKEN_FILE", str(secrets / "gateway.token"))
    monkeypatch.delenv("CLAWHUB_PLATFORM_IDENTITIES_FILE")
    gateway = GatewaySettings.from_env().identity
    assert gateway is not None and gateway.token.startswith("chs_gateway_")


def test_a_token_file_others_can_read_is_refused(monkeypatch: pytest.MonkeyPatch, secrets: Path) -> None:
    path = secrets / "dispatcher.token"
    path.chmod(0o644)
    monkeypatch.setenv("CLAWHUB_SERVICE_TOKEN_FILE", str(path))
    monkeypatch.setenv("CLAWHUB_PLATFORM_IDENTITIES_FILE", str(secrets / "identities.json"))
    with pytest.raises(SettingsError) as caught:
        DispatcherSettings.from_env()
    assert "readable by other users (mode 0644)" in str(caught.value) and "chmod 600" in str(caught.value)
    monkeypatch.setenv("CLAWHUB_SERVICE_TOKEN_FILE", str(secrets / "missing.token"))
    with pytest.raises(SettingsError, match="cannot read it"):
        DispatcherSettings.from_env()


async def test_the_registry_admits_only_the_services_the_table_names(start_service: Starter, secrets: Path,
                                                                     tmp_path: Path) -> None:
    from clawhub.registry.v1 import registry_internal_pb2 as internal_pb
    from clawhub.registry.v1 import registry_internal_pb2_grpc as internal_grpc
    from clawhub.registry.v1 import registry_service_pb2 as pb
    from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc

    host = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", identity=identity(secrets, "registry"))))
    address = f"127.0.0.1:{host.port}"

    async def status(security: Outgoing | None, call: Any) -> tuple[grpc.StatusCode, str]:
        async with channel(address, security=security) as ch:
            try:
                await call(ch)
            except grpc.aio.AioRpcError as err:
                info = error_info(err)
                return err.code(), info.reason if info else ""
            return grpc.StatusCode.OK, ""

    def as_service(service: str) -> Outgoing:
        return Outgoing(token=identity(secrets, service).token)

    def get_version(ch: grpc.aio.Channel) -> Any:
        return pb_grpc.RegistryServiceStub(ch).GetSkillVersion(
            pb.GetSkillVersionRequest(name="com.acme.x", version="1.0.0"), timeout=5)

    def list_skills(ch: grpc.aio.Channel) -> Any:
        return pb_grpc.RegistryServiceStub(ch).ListSkills(pb.ListSkillsRequest(), timeout=5)

    async def download(ch: grpc.aio.Channel) -> Any:
        async for _ in internal_grpc.RegistryInternalServiceStub(ch).DownloadBlob(
                internal_pb.DownloadBlobRequest(digest="sha256:" + "0" * 64), timeout=5):
            pass

    unauthenticated = (grpc.StatusCode.UNAUTHENTICATED, "PLATFORM_CREDENTIALS_REQUIRED")
    denied = (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_ALLOWED")
    assert await status(None, get_version) == unauthenticated
    assert await status(Outgoing(token="chs_executor_made-up"), get_version) == unauthenticated
    assert await status(None, download) == unauthenticated
    assert (await status(as_service("executor"), get_version))[0] == grpc.StatusCode.NOT_FOUND
    assert await status(as_service("executor"), list_skills) == denied
    assert await status(as_service("gateway"), list_skills) == (grpc.StatusCode.OK, "")
    assert await status(as_service("gateway"), download) == denied
    assert (await status(as_service("executor"), download))[0] == grpc.StatusCode.NOT_FOUND
    # Probes need no token.
    async with channel(address) as ch:
        checked = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
    # A refusal names the permission.
    async with channel(address, security=as_service("executor")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_skills(ch)
    info = error_info(caught.value)
    assert info is not None and info.metadata["permission"] == "clawhub.registry.v1.RegistryService/ListSkills"
    assert info.metadata["service"] == "executor" and info.metadata["allowed"] == "gateway"


async def test_a_servicer_learns_its_caller(start_service: Starter, secrets: Path) -> None:
    method = "/clawhub.dispatcher.v1.DispatcherService/GetRouteTable"

    async def handler(request: bytes, context: Any) -> bytes:
        return (calling_service() or "").encode()

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "clawhub.dispatcher.v1.DispatcherService",
            {"GetRouteTable": grpc.unary_unary_rpc_method_handler(handler)}),))

    async def build() -> Any:
        return create_server("dispatcher", ["clawhub.dispatcher.v1.DispatcherService"], host="127.0.0.1", port=0,
                             register=register, identity=identity(secrets, "dispatcher"))

    host = await start_service(build())
    for service in ("gateway", "deployer"):
        async with channel(f"127.0.0.1:{host.port}", security=Outgoing(token=identity(secrets, service).token)) as ch:
            assert await ch.unary_unary(method)(b"", timeout=5) == service.encode()
