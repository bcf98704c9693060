"""Composition root of the gateway."""

from __future__ import annotations

from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_internal_pb
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import access_pb2 as access_pb
from clawhub.registry.v1 import registry_internal_pb2 as registry_internal_pb
from clawhub.registry.v1 import registry_service_pb2 as registry_pb

from services.gateway.dataplane import CallReporter, DataPlaneFollower, default_client_id
from services.gateway.proxy import proxy_handler, refusing_handler
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import Settings
from services.gateway.upstreams import UpstreamHealth
from services.runtime.auth import Authenticator, RegistryResolver, UserAuthInterceptor, method_descriptors
from services.runtime.callstats import SkillCallDeltas, VersionStats
from services.runtime.channels import ENVELOPE_BYTES, PUBLISH_MESSAGE_BYTES, InvocationLimits, channel, outgoing
from services.runtime.executors import ExecutorPicker, GrpcExecutorClient
from services.runtime.identity import outgoing_security
from services.runtime.leaderchannel import LeaderChannel
from services.runtime.policy import PUBLIC_RULES
from services.runtime.routing import Router, RouteState
from services.runtime.server import ServiceHost, create_server

GATEWAY_SERVICE = pb.DESCRIPTOR.services_by_name["GatewayService"]
REGISTRY_SERVICE = registry_pb.DESCRIPTOR.services_by_name["RegistryService"]
DEPLOYER_SERVICE = deployer_pb.DESCRIPTOR.services_by_name["DeployerService"]
ACCESS_SERVICE = access_pb.DESCRIPTOR.services_by_name["AccessService"]
# Every service the public port serves: each of their methods has a rule in the policy table.
PUBLIC_SERVICES = (GATEWAY_SERVICE, REGISTRY_SERVICE, ACCESS_SERVICE, DEPLOYER_SERVICE)
DISPATCHER_SERVICE = "clawhub.dispatcher.v1.DispatcherService"
# The public port relays only the public services, and its reflection lists and describes only them. The
# internal services are refused (UNIMPLEMENTED / METHOD_NOT_EXPOSED): the route-table and stats feeds are for
# dispatchers, and blob downloads for executors, which fetch modules from the registry directly (on the public
# port they would only let strangers stream every blob, each stream holding a registry descriptor and relay
# buffers). The relayed response streams are small, and a caller that stops reading holds at most what the
# HTTP/2 windows take (the relay writes with backpressure, services/runtime/errors.py): WatchDeployment sends
# one deployment's events (each the deployment record and a line, as many as the release has steps and
# executors; the stream ends when the release settles), VerifyBlobs is for admins (the registry refuses
# anyone else before it streams anything) and sends progress counts.
INTERNAL_SERVICES = (deployer_internal_pb.DESCRIPTOR.services_by_name["DeployerInternalService"],
                     registry_internal_pb.DESCRIPTOR.services_by_name["RegistryInternalService"])


async def build_server(settings: Settings) -> ServiceHost:
    """The gateway; its calls to the services behind it carry its platform token (its own port is public:
    callers are users, not services)."""
    with outgoing(outgoing_security(settings.identity, settings.tls)):
        return await _build(settings)


async def _build(settings: Settings) -> ServiceHost:
    # One dispatcher at a time (the next one listed when it fails): acknowledgements go to the dispatcher whose
    # data-plane stream the gateway follows.
    dispatcher = channel(settings.dispatcher_address, max_send_bytes=settings.max_input_bytes + ENVELOPE_BYTES,
                         max_receive_bytes=settings.max_output_bytes + ENVELOPE_BYTES, policy="pick_first")
    # A publish message the registry would refuse is refused here, before it crosses another hop.
    registry = channel(settings.registry_address, max_send_bytes=PUBLISH_MESSAGE_BYTES)
    # Writes go to the leading deployer when a standby names it (services/runtime/leaderchannel.py).
    deployer = LeaderChannel(channel(settings.deployer_address), channel)
    # The proxyless data path (docs/routing.md): routes and executors from the dispatcher's stream, calls
    # straight to the executor, the calls reported back.
    client_id = settings.gateway_id or default_client_id()
    routes, picker, stats, skills = RouteState(), ExecutorPicker(), VersionStats(), SkillCallDeltas()
    executors = GrpcExecutorClient(sizes=InvocationLimits.from_env(), stream=settings.executor_calls == "stream")
    router = Router(routes, executors, picker, retries=settings.retries, default_timeout=settings.invoke_timeout,
                    stats=stats, skills=skills, service="gateway")
    direct = settings.routing == "direct"
    servicer = GatewayServicer(settings, dispatcher, registry, deployer, router=router if direct else None,
                               ready=lambda: follower.ready)
    follower = DataPlaneFollower(dispatcher, client_id, routes, picker, executors,
                                 on_table=servicer.schemas.follow)
    reporter = CallReporter(dispatcher, client_id, stats, skills, interval=settings.stats_interval)
    servicer.report_calls = reporter.report
    # Users: every public method is checked here, before it is invoked or relayed (and again by the registry or
    # deployer that owns it). Keys are resolved by the registry, each answer cached for at most a second.
    users = UserAuthInterceptor(Authenticator(settings.auth, RegistryResolver(registry)), PUBLIC_RULES,
                                descriptors=method_descriptors(*PUBLIC_SERVICES), enforce=settings.auth.enabled)

    def register(server: object) -> None:
        pb_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers((  # type: ignore[attr-defined]
            proxy_handler(REGISTRY_SERVICE, registry, upstream="registry", address=settings.registry_address,
                          default_timeout=settings.forward_timeout),
            proxy_handler(ACCESS_SERVICE, registry, upstream="registry", address=settings.registry_address,
                          default_timeout=settings.forward_timeout),
            proxy_handler(DEPLOYER_SERVICE, deployer, upstream="deployer", address=settings.deployer_address,
                          default_timeout=settings.forward_timeout),
            *(refusing_handler(service) for service in INTERNAL_SERVICES),
        ))

    host = create_server(
        "gateway",
        tuple(service.full_name for service in PUBLIC_SERVICES),
        host=settings.host, port=settings.port, grace_seconds=settings.grace_seconds, register=register,
        max_receive_bytes=settings.max_request_bytes, max_send_bytes=settings.max_response_bytes, public=True,
        interceptors=[users] if settings.auth.enabled else [],
        identity=settings.identity, check_callers=False, tls=settings.tls.server, rate_limits=settings.rate_limits,
        metrics=settings.metrics,
        internal_addresses=(settings.dispatcher_address, settings.registry_address, settings.deployer_address),
    )

    # The relayed names report the real registry's and deployer's health, GatewayService the dispatcher's
    # (services/gateway/upstreams.py).
    mirrors = [UpstreamHealth(host.health, dispatcher, GATEWAY_SERVICE.full_name, upstream="dispatcher",
                              address=settings.dispatcher_address, upstream_service=DISPATCHER_SERVICE,
                              routes_held=(lambda: follower.ready) if direct else None),
               UpstreamHealth(host.health, registry, REGISTRY_SERVICE.full_name, upstream="registry",
                              address=settings.registry_address),
               UpstreamHealth(host.health, registry, ACCESS_SERVICE.full_name, upstream="registry",
                              address=settings.registry_address),
               UpstreamHealth(host.health, deployer, DEPLOYER_SERVICE.full_name, upstream="deployer",
                              address=settings.deployer_address)]

    async def close_channels() -> None:
        for mirror in mirrors:
            await mirror.stop()
        await follower.stop()
        await reporter.stop()
        await reporter.report()  # the calls of the last interval
        for ch in (dispatcher, registry, deployer):
            await ch.close()
        await executors.close()

    host.end_streams.append(servicer.log_follows.close)
    if direct:
        host.on_start.extend((follower.start, reporter.start))
    host.on_start.extend(mirror.start for mirror in mirrors)
    host.closers.append(close_channels)
    host.closers.append(servicer.cache.close)
    return host
