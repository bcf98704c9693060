"""Composition root of the gateway."""

from __future__ import annotations

from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb

from services.gateway.proxy import proxy_handler
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import Settings
from services.runtime.channels import channel
from services.runtime.server import ServiceHost, create_server

GATEWAY_SERVICE = pb.DESCRIPTOR.services_by_name["GatewayService"]
REGISTRY_SERVICE = registry_pb.DESCRIPTOR.services_by_name["RegistryService"]
DEPLOYER_SERVICE = deployer_pb.DESCRIPTOR.services_by_name["DeployerService"]
# The route-table feed and the stats feed are for dispatchers only.
INTERNAL_DEPLOYER_METHODS = ("WatchRoutes", "AcknowledgeRoutes", "ReportStats")


async def build_server(settings: Settings) -> ServiceHost:
    dispatcher = channel(settings.dispatcher_address)
    registry = channel(settings.registry_address)
    deployer = channel(settings.deployer_address)
    servicer = GatewayServicer(settings, dispatcher, registry)

    def register(server: object) -> None:
        pb_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers((  # type: ignore[attr-defined]
            proxy_handler(REGISTRY_SERVICE, registry, upstream="registry", address=settings.registry_address,
                          default_timeout=settings.forward_timeout),
            proxy_handler(DEPLOYER_SERVICE, deployer, upstream="deployer", address=settings.deployer_address,
                          default_timeout=settings.forward_timeout, hidden=INTERNAL_DEPLOYER_METHODS),
        ))

    host = create_server(
        "gateway",
        (GATEWAY_SERVICE.full_name, REGISTRY_SERVICE.full_name, DEPLOYER_SERVICE.full_name),
        host=settings.host, port=settings.port, grace_seconds=settings.grace_seconds, register=register,
    )

    async def close_channels() -> None:
        for ch in (dispatcher, registry, deployer):
            await ch.close()

    host.closers.append(close_channels)
    return host
