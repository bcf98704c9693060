"""The gateway names the caller to the services behind it (`x-clawhub-peer`) by host, without the port of the
connection, for IPv4 and IPv6 callers alike: the registry's per-caller bounds count a caller once however many
connections it opens."""

from __future__ import annotations

import socket

import grpc
import pytest
from clawhub.registry.v1 import registry_service_pb2 as registry_pb

from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.runtime.channels import PEER_METADATA, peer_host
from services.runtime.server import ServiceHost, create_server
from tests.conftest import Starter

REGISTRY = registry_pb.DESCRIPTOR.services_by_name["RegistryService"].full_name


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.7:5123", "ipv4:10.0.0.7"),
    ("ipv6:[::1]:5123", "ipv6:[::1]"),
    # What gRPC 1.85 reports.
    ("ipv6:%5B::1%5D:50536", "ipv6:[::1]"),
    ("ipv6:%5Bfe80::1%25eth0%5D:80", "ipv6:[fe80::1%eth0]"),
    ("unix:/run/clawhub.sock", "unix:/run/clawhub.sock"),
])
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_an_ipv6_caller_is_one_caller_over_many_connections(start_service: Starter) -> None:
    seen: list[str] = []

    async def get_skill(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.extend(v for k, v in context.invocation_metadata() or () if k == PEER_METADATA)
        return b""

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            REGISTRY, {"GetSkill": grpc.unary_unary_rpc_method_handler(get_skill)}),))

    async def build() -> ServiceHost:
        return create_server("registry", [REGISTRY], host="127.0.0.1", port=0, register=register)

    registry = await start_service(build())
    gateway = await start_service(build_gateway(GatewaySettings(
        host="[::1]", port=0, dispatcher_address="127.0.0.1:1", registry_address=f"127.0.0.1:{registry.port}",
        deployer_address="127.0.0.1:1", grace_seconds=0.2)))
    for _ in range(3):
        # A channel of its own (no shared subchannel): a new connection, from a new port.
        async with grpc.aio.insecure_channel(f"[::1]:{gateway.port}",
                                             options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            await channel.unary_unary(f"/{REGISTRY}/GetSkill")(b"", timeout=5)
    assert seen == ["ipv6:[::1]"] * 3
