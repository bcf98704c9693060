"""The gateway's grpc.health.v1 status for the services it relays follows the real registry and deployer, and
GatewayService the dispatcher's, while its overall status stays SERVING."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import routing_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.server import DEPLOYER_SERVICE, GATEWAY_SERVICE, REGISTRY_SERVICE
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from tests.conftest import Starter
from tests.deployer.fakes import FakeDeployer, Fakes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def until(stub: health_pb2_grpc.HealthStub, service: str, wanted: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while (got := await status(stub, service)) != wanted:
        assert time.monotonic() < deadline, f"{service} stayed {got}, expected {wanted}"
        await asyncio.sleep(0.05)


async def test_relayed_names_follow_the_real_upstreams(start_service: Starter, tmp_path: Path) -> None:
    registry_settings = RegistrySettings(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "registry",
                                         shutdown_grace_seconds=0.2)
    registry = await start_service(build_registry(registry_settings))
    # Nothing listens where the deployer should be.
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=f"127.0.0.1:{registry.port}",
        deployer_address=f"127.0.0.1:{free_port()}", dispatcher_address=f"127.0.0.1:{free_port()}",
        grace_seconds=0.2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await until(health, DEPLOYER_SERVICE.full_name, NOT_SERVING)
        await until(health, REGISTRY_SERVICE.full_name, SERVING)

        await registry.stop(grace=0.2)
        await until(health, REGISTRY_SERVICE.full_name, NOT_SERVING)
        # The gateway process itself still serves; invoking needs no registry, but it needs the dispatcher, and
        # none is reachable here.
        assert await status(health, "") == SERVING
        await until(health, GATEWAY_SERVICE.full_name, NOT_SERVING)

        # A registry back on the same address is seen again.
        await start_service(build_registry(dataclasses.replace(registry_settings)))
        await until(health, REGISTRY_SERVICE.full_name, SERVING)


@pytest.mark.parametrize("routing", ["direct", "dispatcher"])
async def test_gateway_service_follows_the_dispatcher_until_it_routes_itself(start_service: Starter,
                                                                            routing: str) -> None:
    """Before the dispatcher's routes arrive (or when every call goes through the dispatcher), invoking needs
    the dispatcher, and GatewayService follows its health. A gateway that routes itself keeps serving with the
    last routes it received when the dispatcher goes away (docs/routing.md)."""
    from services.dispatcher.server import build_server as build_dispatcher
    from services.dispatcher.settings import Settings as DispatcherSettings

    dispatcher_port = free_port()
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=f"127.0.0.1:{free_port()}",
        deployer_address=f"127.0.0.1:{free_port()}", dispatcher_address=f"127.0.0.1:{dispatcher_port}",
        grace_seconds=0.2, routing=routing)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await until(health, GATEWAY_SERVICE.full_name, NOT_SERVING)
        # A deployer with a (here empty) route table: the dispatcher passes it on, and the gateway has routes.
        deployer = await Fakes(start_service).deployer(FakeDeployer(routing_pb2.RouteTable(generation=1)))
        dispatcher = await start_service(build_dispatcher(DispatcherSettings(
            host="127.0.0.1", port=dispatcher_port, deployer_address=f"127.0.0.1:{deployer.port}",
            executor_addresses=(), grace=0.2)))
        await until(health, GATEWAY_SERVICE.full_name, SERVING)
        await asyncio.sleep(2.5)  # the gateway gets the routes (its reconnection backoff is at most 2 s)
        await dispatcher.stop(grace=0.2)
        if routing == "direct":
            await asyncio.sleep(2.5)  # more than two health checks of the dispatcher
            assert await status(health, GATEWAY_SERVICE.full_name) == SERVING
        else:
            await until(health, GATEWAY_SERVICE.full_name, NOT_SERVING)
        assert await status(health, "") == SERVING
