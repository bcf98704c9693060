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
from services.deployer.leader import (
    ElectionSettings,
    Leadership,
    PostgresElection,
    SoleLeader,
    advertised,
    default_deployer_id,
)
from services.deployer.membership import Membership, Registrations, Resolver, resolve_dns, split_addresses
from services.deployer.pgstore import PostgresDeploymentStore
from services.deployer.releases import Releaser
from services.deployer.routes import RouteHub
from services.deployer.servicer import DeployerServicer
from services.deployer.settings import Settings
from services.deployer.store import DeploymentStore, SqliteDeploymentStore
from services.runtime.auth import Authenticator, RegistryResolver, UserAuthInterceptor
from services.runtime.channels import channel, outgoing
from services.runtime.datadir import lock_data_dir
from services.runtime.errors import Reason, ServiceError
from services.runtime.identity import outgoing_security
from services.runtime.policy import PUBLIC_RULES
from services.runtime.server import Closer, ServiceHost, StartupError, create_server

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
                       resolver: Resolver = resolve_dns) -> DeployerHost:
    """Open the store, load the route table, settle deployments left in flight, and build the server.

    `registry` and `fleet` default to gRPC clients of `settings.registry_address` and
    `settings.executor_addresses`; other implementations may be passed instead (the host closes them).
    `clock` (nanoseconds since the epoch) times transitions and the circuit breaker; tests move it.
    The data directory is locked first (DataDirInUse when another live process holds it), released last.
    Its calls carry its platform token. `resolver` looks up the `dns:///NAME:PORT` entries of the executor
    addresses (services/deployer/membership.py; tests pass their own).
    """
    with outgoing(outgoing_security(settings.identity, settings.tls)):
        return await _build(settings, registry=registry, fleet=fleet, clock=clock, resolver=resolver)


async def _build(settings: Settings, *, registry: VersionSource | None, fleet: ExecutorFleet | None,
                 clock: Callable[[], int], resolver: Resolver) -> DeployerHost:
    lock = lock_data_dir(settings.data_dir, owner="deployer", variable="CLAWHUB_DEPLOYER_DATA_DIR")
    try:
        # PostgreSQL when configured (every replica shares it; services/deployer/pgstore.py), else sqlite.
        store: DeploymentStore = (
            await PostgresDeploymentStore.open(settings.database_url, settings.key_file) if settings.database_url
            else await SqliteDeploymentStore.open(settings.data_dir / DB_FILE, key_file=settings.key_file))
    except (ConnectionError, RuntimeError) as exc:
        # An unreachable database or one a newer deployer migrated: one line naming the (redacted) URL.
        lock.release()
        raise StartupError(f"deployer: {exc} (CLAWHUB_DEPLOYER_DATABASE_URL, else CLAWHUB_DATABASE_URL)") from None
    except BaseException:
        lock.release()
        raise
    election: PostgresElection | None = None
    try:
        # In the try: a bad address must still close the store (a sqlite store's thread keeps the process alive).
        registry = registry or GrpcRegistry(settings.registry_address)
        static, dns_names = split_addresses(settings.executor_addresses)
        fleet = fleet or GrpcExecutorFleet(static, load_timeout=settings.load_timeout)
        hub = RouteHub(store)
        await hub.load()
        events = EventBus()
        releaser = Releaser(store, hub, events, fleet, ack_timeout=settings.ack_timeout, clock=clock,
                            breaker_settings=settings.breaker, progress_interval=settings.progress_interval)
        # On PostgreSQL only the elected replica leads (services/deployer/leader.py): it settles and resumes
        # releases when it takes the lead; a sqlite deployer is the only one and leads from the start.
        election = _election(settings, store, hub, releaser, lambda: membership) if settings.database_url else None
        leadership: Leadership = election or SoleLeader(settings.deployer_id or default_deployer_id())
        if election is None:
            await releaser.settle()
        servicer = DeployerServicer(store, hub, events, releaser, registry,
                                    registry_timeout=settings.registry_timeout, defaults=settings.release,
                                    leadership=leadership)
        # Executors that join and leave at run time (registration, DNS): services/deployer/membership.py.
        membership = Membership(fleet, store, hub, static=static, dns_names=dns_names, resolver=resolver,
                                running=releaser.running, dns_interval=settings.dns_interval)
        servicer.registrations = Registrations(store, changed=membership.wake)

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
        if election is not None:
            election.advertise(settings.advertise_address or advertised(settings.host, base.port))
            await election.campaign()  # a replica alone on its database leads before it serves
    except BaseException:
        if election is not None:
            await election.stop()
        if registry is not None:
            await registry.close()
        if fleet is not None:
            await fleet.close()
        await store.close()
        lock.release()
        raise
    host = DeployerHost(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ServiceHost)})

    async def end_streams() -> None:
        hub.close()
        events.close()

    if election is not None:
        # Leading starts and stops the membership loop; a drain hands the lead over at once.
        host.before_drain.append(election.stop)
        host.on_start.append(election.start)
    else:
        host.before_drain.append(membership.stop)
        host.on_start.append(membership.start)
    host.before_drain.append(end_streams)
    host.closers.extend([releaser.close, registry.close, fleet.close, store.close, lock.close, keys.close])
    return host


def _election(settings: Settings, store: DeploymentStore, hub: RouteHub, releaser: Releaser,
              membership: Callable[[], Membership]) -> PostgresElection:
    """The leader election of the replicas on `settings.database_url`, and what taking and losing the lead does."""

    async def elected(epoch: int) -> None:
        await hub.begin(epoch)
        await releaser.settle(resume=True)
        await membership().start()

    async def deposed() -> None:
        hub.depose(ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.NOT_LEADER,
                                "this deployer stopped leading; watch the routes on the new leader",
                                retry_after_seconds=0.2))
        await membership().stop()
        await releaser.stand_down()

    async def leader() -> tuple[str, str]:
        record = await store.leader()
        return record.deployer_id, record.address

    async def standby() -> None:
        # Reads (which version serves, at what weight) follow the leader's route table.
        if (await store.leader()).generation != hub.generation:
            await hub.load()

    election = PostgresElection(
        settings.database_url,
        ElectionSettings(settings.deployer_id or default_deployer_id(), settings.advertise_address,
                         settings.election_interval, settings.lease_timeout),
        begin_term=lambda: store.begin_term(election.deployer_id, election.address),
        leader=leader, elected=elected, deposed=deposed, standby=standby, leading=releaser.adopt)
    hub.on_fenced = election.fenced
    return election
