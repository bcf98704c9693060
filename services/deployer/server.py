"""Composition root of the deployer: store, route hub, releaser, clients, servicer, server."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as internal_grpc
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as pb_grpc

from services.deployer.backends import ExecutorFleet, GrpcExecutorFleet, GrpcRegistry, VersionSource
from services.deployer.events import EventBus
from services.deployer.releases import Releaser
from services.deployer.routes import RouteHub
from services.deployer.servicer import DeployerServicer
from services.deployer.settings import Settings
from services.deployer.store import SqliteDeploymentStore
from services.runtime.auth import Authenticator, RegistryResolver, UserAuthInterceptor
from services.runtime.channels import channel, outgoing
from services.runtime.datadir import lock_data_dir
from services.runtime.identity import outgoing_security
from services.runtime.policy import PUBLIC_RULES
from services.runtime.server import Closer, ServiceHost, create_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeployerService"].full_name
# The route-table and stats feeds of dispatchers; served here, never relayed by the gateway.
INTERNAL_SERVICE_NAME = internal_pb.DESCRIPTOR.services_by_name["DeployerInternalService"].full_name
DB_FILE = "deployer.sqlite3"


@dataclass
class DeployerHost(ServiceHost):
    """A ServiceHost that ends its long-lived streams (WatchRoutes, WatchDeployment) when it stops.

    Without this, the drain would wait the whole grace period for watch streams that never end on their
    own; ended with UNAVAILABLE, dispatchers reconnect at once (to this deployer's successor).
    """

    before_drain: list[Closer] = field(default_factory=list)

    async def stop(self, grace: float | None = None) -> None:
        if not self._stopped:
            await self.health.enter_graceful_shutdown()
            for hook in self.before_drain:
                await hook()
        await super().stop(grace)


async def build_server(settings: Settings, *, registry: VersionSource | None = None,
                       fleet: ExecutorFleet | None = None, clock: Callable[[], int] = time.time_ns,
                       ) -> DeployerHost:
    """Open the store, load the route table, settle deployments left in flight, and build the server.

    `registry` and `fleet` default to gRPC clients of `settings.registry_address` and
    `settings.executor_addresses`; other implementations may be passed instead (the host closes them).
    `clock` (nanoseconds since the epoch) times transitions and the circuit breaker; tests move it.
    The data directory is locked first (DataDirInUse when another live process holds it), released last.
    Its calls carry its platform token.
    """
    with outgoing(outgoing_security(settings.identity, settings.tls)):
        return await _build(settings, registry=registry, fleet=fleet, clock=clock)


async def _build(settings: Settings, *, registry: VersionSource | None, fleet: ExecutorFleet | None,
                 clock: Callable[[], int]) -> DeployerHost:
    lock = lock_data_dir(settings.data_dir, owner="deployer", variable="CLAWHUB_DEPLOYER_DATA_DIR")
    try:
        store = await SqliteDeploymentStore.open(settings.data_dir / DB_FILE, key_file=settings.key_file)
    except BaseException:
        lock.release()
        raise
    registry = registry or GrpcRegistry(settings.registry_address)
    fleet = fleet or GrpcExecutorFleet(settings.executor_addresses, load_timeout=settings.load_timeout)
    try:
        hub = RouteHub(store)
        await hub.load()
        events = EventBus()
        releaser = Releaser(store, hub, events, fleet, ack_timeout=settings.ack_timeout, clock=clock,
                            breaker_settings=settings.breaker, progress_interval=settings.progress_interval)
        await releaser.settle()
        servicer = DeployerServicer(store, hub, events, releaser, registry,
                                    registry_timeout=settings.registry_timeout, defaults=settings.release)

        # Users' permissions, checked again here (the gateway checked them first; keys are resolved by the
        # registry, each answer cached for at most a second), and the audit log of deploys and rollbacks.
        keys = channel(settings.registry_address)
        users = UserAuthInterceptor(
            Authenticator(settings.auth, RegistryResolver(keys)),
            {m: r for m, r in PUBLIC_RULES.items() if m.startswith(f"/{SERVICE_NAME}/")},
            audit=servicer.record_audit, platform_exempt=True, enforce=settings.auth.enabled)

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_DeployerServiceServicer_to_server(servicer, server)
            internal_grpc.add_DeployerInternalServiceServicer_to_server(servicer, server)

        base = create_server("deployer", [SERVICE_NAME, INTERNAL_SERVICE_NAME], host=settings.host, port=settings.port,
                             grace_seconds=settings.grace, register=register, identity=settings.identity,
                             interceptors=[users],
                             tls=settings.tls.server, rate_limits=settings.rate_limits, metrics=settings.metrics)
    except BaseException:
        await registry.close()
        await fleet.close()
        await store.close()
        lock.release()
        raise
    host = DeployerHost(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ServiceHost)})

    async def end_streams() -> None:
        hub.close()
        events.close()

    host.before_drain.append(end_streams)
    host.closers.extend([releaser.close, registry.close, fleet.close, store.close, lock.close, keys.close])
    return host
