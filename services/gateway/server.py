"""Composition root of the gateway."""

from __future__ import annotations

from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb

from services.gateway.proxy import proxy_handler
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import Settings
from services.gateway.upstreams import UpstreamHealth
from services.runtime.channels import ENVELOPE_BYTES, PUBLISH_MESSAGE_BYTES, channel
from services.runtime.server import ServiceHost, create_server

GATEWAY_SERVICE = pb.DESCRIPTOR.services_by_name["GatewayService"]
REGISTRY_SERVICE = registry_pb.DESCRIPTOR.services_by_name["RegistryService"]
DEPLOYER_SERVICE = deployer_pb.DESCRIPTOR.services_by_name["DeployerService"]
DISPATCHER_SERVICE = "clawhub.dispatcher.v1.DispatcherService"
# The route-table feed and the stats feed are for dispatchers only.
INTERNAL_DEPLOYER_METHODS = ("WatchRoutes", "AcknowledgeRoutes", "ReportStats")
# Blob downloads are for executors, which fetch modules from the registry directly. On the public port they
# would only let strangers stream every blob (each stream holding a registry descriptor and relay buffers).
# The remaining relayed response streams are small, and a caller that stops reading holds at most what the
# HTTP/2 windows take (the relay writes with backpressure, services/runtime/errors.py): WatchDeployment sends
# one deployment's events (each the deployment record and a line, as many as the release has steps and
# executors; the stream ends when the release settles), VerifyBlobs is for admins (the registry refuses
# anyone else before it streams anything) and sends progress counts.
INTERNAL_REGISTRY_METHODS = ("DownloadBlob",)


async def build_server(settings: Settings) -> ServiceHost:
    dispatcher = channel(settings.dispatcher_address, max_send_bytes=settings.max_input_bytes + ENVELOPE_BYTES,
                         max_receive_bytes=settings.max_output_bytes + ENVELOPE_BYTES)
    # A publish message the registry would refuse is refused here, before it crosses another hop.
    registry = channel(settings.registry_address, max_send_bytes=PUBLISH_MESSAGE_BYTES)
    deployer = channel(settings.deployer_address)
    servicer = GatewayServicer(settings, dispatcher, registry)

    def register(server: object) -> None:
        pb_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers((  # type: ignore[attr-defined]
            proxy_handler(REGISTRY_SERVICE, registry, upstream="registry", address=settings.registry_address,
                          default_timeout=settings.forward_timeout, hidden=INTERNAL_REGISTRY_METHODS),
            proxy_handler(DEPLOYER_SERVICE, deployer, upstream="deployer", address=settings.deployer_address,
                          default_timeout=settings.forward_timeout, hidden=INTERNAL_DEPLOYER_METHODS),
        ))

    host = create_server(
        "gateway",
        (GATEWAY_SERVICE.full_name, REGISTRY_SERVICE.full_name, DEPLOYER_SERVICE.full_name),
        host=settings.host, port=settings.port, grace_seconds=settings.grace_seconds, register=register,
        max_receive_bytes=settings.max_request_bytes, max_send_bytes=settings.max_response_bytes, public=True,
        internal_addresses=(settings.dispatcher_address, settings.registry_address, settings.deployer_address),
    )

    # The relayed names report the real registry's and deployer's health, GatewayService the dispatcher's
    # (services/gateway/upstreams.py).
    mirrors = [UpstreamHealth(host.health, dispatcher, GATEWAY_SERVICE.full_name, upstream="dispatcher",
                              address=settings.dispatcher_address, upstream_service=DISPATCHER_SERVICE),
               UpstreamHealth(host.health, registry, REGISTRY_SERVICE.full_name, upstream="registry",
                              address=settings.registry_address),
               UpstreamHealth(host.health, deployer, DEPLOYER_SERVICE.full_name, upstream="deployer",
                              address=settings.deployer_address)]

    async def close_channels() -> None:
        for mirror in mirrors:
            await mirror.stop()
        for ch in (dispatcher, registry, deployer):
            await ch.close()

    host.on_start.extend(mirror.start for mirror in mirrors)
    host.closers.append(close_channels)
    return host
