"""Every RPC of every service refuses unknown enum values, unset required enums and oversize strings before its
handler runs (services/runtime/fieldcheck.py, run by the ErrorInterceptor); every enum field of every request
has a decision, required or optional, so a new one without a decision fails here."""

from __future__ import annotations

import hashlib
import importlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import routing_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor

from services.deployer.server import build_server as build_deployer
from services.deployer.settings import Settings as DeployerSettings
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime import fieldcheck
from services.runtime.errors import Reason, bad_request, error_info
from tests.conftest import Starter

ROOT = Path(__file__).resolve().parents[2]


def all_services() -> Iterator[ServiceDescriptor]:
    """Every service of every clawhub proto (from the generated code, so a new service is included), and the
    standard ones every port serves (health, reflection)."""
    for path in sorted((ROOT / "gen" / "clawhub").rglob("*_pb2.py")):
        module = importlib.import_module(".".join(path.relative_to(ROOT / "gen").with_suffix("").parts))
        yield from module.DESCRIPTOR.services_by_name.values()
    importlib.import_module("grpc_health.v1.health_pb2")
    importlib.import_module("grpc_reflection.v1alpha.reflection_pb2")
    pool = descriptor_pool.Default()
    yield pool.FindServiceByName("grpc.health.v1.Health")
    yield pool.FindServiceByName("grpc.reflection.v1alpha.ServerReflection")


def enum_fields(descriptor: Descriptor, seen: set[str]) -> Iterator[str]:
    if descriptor.full_name in seen or descriptor.full_name.startswith("google.protobuf."):
        return
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_ENUM:
            yield field.full_name
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            yield from enum_fields(field.message_type, seen)


def test_every_enum_field_of_every_request_is_required_or_optional() -> None:
    found: dict[str, str] = {}
    services = list(all_services())
    assert len(services) >= 8
    for service in services:
        for method in service.methods:
            for name in enum_fields(method.input_type, set()):
                found.setdefault(name, f"{service.full_name}/{method.name}")
    undecided = {name: rpc for name, rpc in found.items() if name not in fieldcheck.ENUM_FIELDS}
    assert not undecided, ("enum fields of requests with no entry in services/runtime/fieldcheck.py ENUM_FIELDS "
                           f"(True: required, `*_UNSPECIFIED` refused; False: optional): {undecided}")
    assert "clawhub.common.v1.Manifest.abi" in found


def test_the_tables_name_fields_that_exist() -> None:
    list(all_services())  # imports every generated module
    pool = descriptor_pool.Default()
    for name in [*fieldcheck.ENUM_FIELDS, *fieldcheck.STRING_LIMITS]:
        message, _, field = name.rpartition(".")
        assert field in pool.FindMessageTypeByName(message).fields_by_name, name


def test_unknown_values_and_paths_in_nested_and_repeated_messages() -> None:
    table = routing_pb2.RouteTable(routes=[routing_pb2.Route(skill="a", targets=[
        routing_pb2.RouteTarget(version="1.0.0"), routing_pb2.RouteTarget(role=7)])])  # type: ignore[arg-type]
    [(reason, path, problem)] = fieldcheck.problems(table)
    assert (reason, path) == (Reason.INVALID_ENUM_VALUE, "routes[0].targets[1].role")
    assert "7 is not a value of clawhub.common.v1.RouteTargetRole" in problem
    assert "ROUTE_TARGET_ROLE_CANDIDATE" in problem
    # An optional enum may be unset.
    assert fieldcheck.problems(routing_pb2.RouteTarget()) == []
    # Strings in a google.protobuf.Value (an invocation's JSON input) are bounded by the input limit instead.
    request = gateway_pb.InvokeSkillRequest(name="com.acme.x")
    request.input.string_value = "x" * 100_000
    assert fieldcheck.problems(request) == []


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def check(err: grpc.aio.AioRpcError, reason: str, field: str) -> str:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    info = error_info(err)
    assert info is not None and info.reason == reason, err.details()
    assert info.metadata["field"] == field
    request = bad_request(err)
    assert request is not None and field in [v.field for v in request.field_violations]
    return err.details() or ""


@pytest.fixture
async def registry(start_service: Starter, tmp_path: Path) -> AsyncIterator[registry_grpc.RegistryServiceStub]:
    host = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", shutdown_grace_seconds=0.2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        yield registry_grpc.RegistryServiceStub(channel)


async def publish_manifest(stub: registry_grpc.RegistryServiceStub, manifest: skill_pb2.Manifest,
                           ) -> grpc.aio.AioRpcError:
    async def stream() -> AsyncIterator[registry_pb.PublishSkillRequest]:
        yield registry_pb.PublishSkillRequest(metadata=registry_pb.PublishSkillMetadata(
            manifest=manifest, sha256=hashlib.sha256(b"x").hexdigest(), size_bytes=1))
        yield registry_pb.PublishSkillRequest(chunk=b"x")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.PublishSkill(stream(), timeout=10)
    return caught.value


async def test_a_real_registry_refuses_unknown_and_unset_enums_and_oversize_strings(
        registry: registry_grpc.RegistryServiceStub) -> None:
    base = dict(name="com.acme.echo", version="1.0.0")
    details = check(await publish_manifest(registry, skill_pb2.Manifest(**base, abi=42)),  # type: ignore[arg-type]
                    "INVALID_MANIFEST", "metadata.manifest.abi")
    assert "42 is not a value of clawhub.common.v1.Abi" in details and "ABI_MEMORY_V1" in details
    details = check(await publish_manifest(registry, skill_pb2.Manifest(**base)),
                    "INVALID_MANIFEST", "metadata.manifest.abi")
    assert "required" in details and "ABI_UNSPECIFIED" not in details.split("(")[0]
    details = check(await publish_manifest(registry, skill_pb2.Manifest(
        **base, abi=skill_pb2.ABI_WASI_COMMAND_V1, capabilities=["files", "c" * 5000])),
        "FIELD_TOO_LONG", "metadata.manifest.capabilities[1]")
    assert "5000 characters; at most 4096" in details
    # A field with its own, larger bound.
    check(await publish_manifest(registry, skill_pb2.Manifest(
        **base, abi=skill_pb2.ABI_WASI_COMMAND_V1, input_schema="x" * (fieldcheck.MAX_SCHEMA_BYTES + 1))),
        "FIELD_TOO_LONG", "metadata.manifest.input_schema")
    # The registry still serves.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.GetSkill(registry_pb.GetSkillRequest(name="com.acme.none"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Every request type, unary calls too: an oversize tag name.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.GetSkill(registry_pb.GetSkillRequest(name="n" * 10_000), timeout=5)
    check(caught.value, "FIELD_TOO_LONG", "name")


async def test_a_real_gateway_refuses_an_oversize_name_before_any_hop(start_service: Starter) -> None:
    dead = dead_address()  # nothing behind the gateway: the refusal cannot come from there
    host = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address=dead, registry_address=dead, deployer_address=dead,
        grace_seconds=0.2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway_grpc.GatewayServiceStub(channel).InvokeSkill(
                gateway_pb.InvokeSkillRequest(name="a" * 5000), timeout=5)
    assert "at most 4096" in check(caught.value, "FIELD_TOO_LONG", "name")


async def test_a_real_deployer_refuses_an_oversize_env_value(start_service: Starter, tmp_path: Path) -> None:
    dead = dead_address()
    host = await start_service(build_deployer(DeployerSettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "deployer", registry_address=dead,
        executor_addresses=(dead,), grace=0.2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await deployer_grpc.DeployerServiceStub(channel).CreateDeployment(deployer_pb.CreateDeploymentRequest(
                skill="com.acme.echo", version="1.0.0", env={"TOKEN": "v" * 40_000}), timeout=5)
    assert "at most 32768" in check(caught.value, "FIELD_TOO_LONG", "env[TOKEN]")
