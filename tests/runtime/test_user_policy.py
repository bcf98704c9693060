"""The public half of the policy table: every RPC of every public service, against every role, through a real
gateway in front of a real registry (both with users' auth on)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.registry.v1 import access_pb2

from services.gateway.server import PUBLIC_SERVICES
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.auth import AuthSettings, Principal
from services.runtime.errors import error_info
from services.runtime.policy import PERMISSIONS, PUBLIC_RULES, ROLES
from tests.conftest import Starter

# What each role may call, written out (not derived from ROLES), so a change to the table is a change here too.
VIEWER = {"GetSkill", "ListSkills", "GetSkillVersion", "ListSkillVersions", "ResolveDependencies", "GetNamespace",
          "ListNamespaces", "GetDeployment", "ListDeployments", "GetSkillStats"}
EXPECTED: dict[str, set[str]] = {
    "viewer": VIEWER,
    "invoker": VIEWER | {"InvokeSkill"},
    "publisher": VIEWER | {"PublishSkill", "YankSkillVersion", "SetSkillTag", "DeleteSkillTag", "UpdateNamespace"},
    "operator": VIEWER | {"CreateDeployment", "Rollback", "WatchDeployment", "TailSkillLogs"},
    "admin": {m.name for s in PUBLIC_SERVICES for m in s.methods},
}


def all_methods() -> list[tuple[str, object]]:
    return [(f"/{s.full_name}/{m.name}", m) for s in PUBLIC_SERVICES for m in s.methods]


def test_every_public_rpc_has_a_rule_and_no_rule_is_stale() -> None:
    methods = {path for path, _ in all_methods()}
    assert sorted(methods - set(PUBLIC_RULES)) == []
    assert sorted(set(PUBLIC_RULES) - methods) == []
    for role, granted in ROLES.items():
        assert granted <= PERMISSIONS, role
    assert set(EXPECTED) == set(ROLES)


@pytest.mark.parametrize("role", list(ROLES))
def test_each_role_is_allowed_exactly_its_rpcs(role: str) -> None:
    principal = Principal("p", "key", frozenset({role}))
    allowed = {path.rpartition("/")[2] for path, rule in PUBLIC_RULES.items() if principal.allows(rule.permission)}
    assert allowed == EXPECTED[role]


def test_scopes_limit_calls_that_name_a_skill_on_dot_boundaries() -> None:
    operator = Principal("p", "key", frozenset({"operator"}), ("com.acme",))
    assert operator.allows("deployments.create", "com.acme.tool")
    assert operator.allows("deployments.create", "com.acme")
    assert not operator.allows("deployments.create", "com.acmes.tool")
    assert not operator.allows("deployments.create", "com.example.tool")
    assert operator.allows("deployments.read")  # a call that names no skill: the permission alone


@pytest.fixture
async def gateway(tmp_path: Path, start_service: Starter) -> AsyncIterator[tuple[grpc.aio.Channel, dict[str, str]]]:
    """A registry and a gateway with users' auth on (no dispatcher or deployer: a call the gateway lets through
    to them fails UNAVAILABLE), and a key of each role."""
    auth = AuthSettings(enabled=True)
    admin_token = "admin-token-for-the-policy-test-0123456789"
    registry = await start_service(build_registry(RegistrySettings(
        port=0, data_dir=tmp_path / "registry", admin_token=admin_token, auth=auth)))
    gw = await start_service(build_gateway(GatewaySettings(
        port=0, registry_address=f"127.0.0.1:{registry.port}", dispatcher_address="127.0.0.1:1",
        deployer_address="127.0.0.1:1", forward_timeout=2.0, auth=auth)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    from clawhub.registry.v1 import access_pb2_grpc

    access = access_pb2_grpc.AccessServiceStub(channel)
    keys = {}
    for role in ROLES:
        created = await access.CreateApiKey(
            access_pb2.CreateApiKeyRequest(name=f"{role}-key", role=access_pb2.Role.Value("ROLE_" + role.upper())),
            metadata=(("authorization", f"Bearer {admin_token}"),), timeout=10)
        keys[role] = created.secret
    yield channel, keys
    await channel.close()


async def _call(channel: grpc.aio.Channel, path: str, method: object, token: str | None) -> grpc.aio.AioRpcError | None:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    client_streaming = method.client_streaming  # type: ignore[attr-defined]
    server_streaming = method.server_streaming  # type: ignore[attr-defined]
    try:
        if client_streaming:
            async def one() -> AsyncIterator[bytes]:
                yield b""
            await channel.stream_unary(path)(one(), metadata=metadata, timeout=5)
        elif server_streaming:
            async for _ in channel.unary_stream(path)(b"", metadata=metadata, timeout=5):
                pass
        else:
            await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as err:
        return err
    return None


async def test_every_rpc_of_every_public_service_against_every_role(
        gateway: tuple[grpc.aio.Channel, dict[str, str]]) -> None:
    channel, keys = gateway
    wrong = []
    for path, method in all_methods():
        name = path.rpartition("/")[2]
        err = await _call(channel, path, method, None)
        info = error_info(err) if err else None
        if err is None or err.code() != grpc.StatusCode.UNAUTHENTICATED or info is None \
                or info.reason != "CREDENTIALS_REQUIRED":
            wrong.append(f"anonymous {name}: {err and err.code()} {info and info.reason}")
        for role, key in keys.items():
            err = await _call(channel, path, method, key)
            info = error_info(err) if err else None
            denied = err is not None and info is not None and info.reason == "PERMISSION_DENIED"
            if denied != (name not in EXPECTED[role]):
                wrong.append(f"{role} {name}: {'denied' if denied else 'allowed'} ({err and err.code()})")
            if denied:
                assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
                assert info is not None and info.metadata["permission"] == PUBLIC_RULES[path].permission
            elif err is not None:
                assert err.code() != grpc.StatusCode.UNAUTHENTICATED, (role, name, err)
    assert wrong == []
