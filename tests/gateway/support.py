"""A real invocation chain for gateway tests: registry (with a published skill) → executor, dispatcher →
executor, gateway → dispatcher. Only the deployer is a stand-in (FakeDeployer serving a route table to the
published digest); the release path is covered by tests/deployer and tests/e2e."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.cli import manifest
from services.dispatcher.server import build_server as build_dispatcher
from services.dispatcher.settings import Settings as DispatcherSettings
from services.executor.server import build_server as build_executor
from services.executor.settings import Settings as ExecutorSettings
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.errors import error_info, status_of
from services.runtime.server import ServiceHost
from tests.conftest import Starter
from tests.deployer.fakes import FakeDeployer, Fakes, eventually

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "examples" / "skills" / "echo-memory"
ECHO_SKILL = "com.example.echo-memory"


@dataclass
class Chain:
    registry: ServiceHost
    executor: ServiceHost
    dispatcher: ServiceHost
    deployer: ServiceHost
    gateway: ServiceHost
    channel: grpc.aio.Channel
    stub: gateway_grpc.GatewayServiceStub
    # The stand-in deployer's feed: set_table changes the dispatcher's routes.
    routes: FakeDeployer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def internal_addresses(self) -> list[str]:
        return [f"127.0.0.1:{h.port}" for h in (self.registry, self.executor, self.dispatcher, self.deployer)]


async def publish_dir(stub: Any, directory: Path) -> registry_pb.SkillVersion:
    package = manifest.load(directory)

    async def stream() -> AsyncIterator[registry_pb.PublishSkillRequest]:
        yield registry_pb.PublishSkillRequest(metadata=registry_pb.PublishSkillMetadata(
            manifest=package.manifest, sha256=hashlib.sha256(package.module).hexdigest(),
            size_bytes=len(package.module)))
        yield registry_pb.PublishSkillRequest(chunk=package.module)

    response = await stub.PublishSkill(stream(), timeout=10)
    return response.skill_version  # type: ignore[no-any-return]


async def start_chain(start_service: Starter, tmp_path: Path, *, skill_dir: Path = ECHO,
                      **gateway_settings: Any) -> Chain:
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", shutdown_grace_seconds=0.5)))
    registry_address = f"127.0.0.1:{registry.port}"
    async with grpc.aio.insecure_channel(registry_address) as ch:
        version = await publish_dir(registry_grpc.RegistryServiceStub(ch), skill_dir)
    executor = await start_service(build_executor(ExecutorSettings(
        host="127.0.0.1", port=0, registry_address=registry_address, threads=2, queue=16,
        data_dir=tmp_path / "executor", grace_seconds=0.5)))
    table = routing_pb2.RouteTable(generation=1, routes=[routing_pb2.Route(skill=version.name, targets=[
        routing_pb2.RouteTarget(version=version.version, digest=version.digest, weight=100,
                                limits=version.manifest.limits, capabilities=version.manifest.capabilities,
                                role=routing_pb2.ROUTE_TARGET_ROLE_STABLE)])])
    routes = FakeDeployer(table)
    deployer = await Fakes(start_service).deployer(routes)
    dispatcher = await start_service(build_dispatcher(DispatcherSettings(
        host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{deployer.port}",
        executor_addresses=(f"127.0.0.1:{executor.port}",), dispatcher_id="gateway-tests", retries=1,
        dispatch_timeout=10.0, grace=0.2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{dispatcher.port}") as ch:
        stub = dispatcher_grpc.DispatcherServiceStub(ch)

        async def routed() -> bool:
            response = await stub.GetRouteTable(dispatcher_pb.GetRouteTableRequest(), timeout=5)
            return bool(response.route_table.generation == 1)

        await eventually(routed)
    gateway = await start_service(build_gateway(GatewaySettings(**{
        "host": "127.0.0.1", "port": 0, "dispatcher_address": f"127.0.0.1:{dispatcher.port}",
        "registry_address": registry_address, "deployer_address": f"127.0.0.1:{deployer.port}",
        "grace_seconds": 0.5, **gateway_settings})))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}",
                                        options=[("grpc.max_receive_message_length", -1)])
    return Chain(registry, executor, dispatcher, deployer, gateway, channel,
                 gateway_grpc.GatewayServiceStub(channel), routes)


def assert_no_address(err: grpc.aio.AioRpcError, addresses: list[str]) -> None:
    """No internal address (nor any 127.0.0.1 host:port) in the message, the ErrorInfo or any metadata."""
    texts = [err.details() or ""]
    status = status_of(err)
    if status is not None:
        texts.append(status.message)
        texts += [str(detail) for detail in status.details]
    info = error_info(err)
    if info is not None:
        texts += [f"{k}={v}" for k, v in info.metadata.items()]
    texts += [f"{k}={v!r}" for k, v in (err.trailing_metadata() or ())]
    texts += [f"{k}={v!r}" for k, v in (err.initial_metadata() or ())]
    joined = "\n".join(texts)
    for address in addresses:
        assert address not in joined, joined
    assert "127.0.0.1" not in joined and "ipv4:" not in joined, joined
