"""Which executors exist: the configured ones, the ones that registered (with a lease), the ones DNS names.

The deployer owns the executor set (docs/routing.md, "Executors joining and leaving"):

- An executor started with `CLAWHUB_EXECUTOR_REGISTER_WITH` calls `RegisterExecutor` about five times per lease
  (`Registrations`). Any deployer replica accepts the call: it only writes the lease to the store, where the
  leader reads it (so a registration that reaches a standby counts, and a new leader knows every lease at once).
  `DeregisterExecutor` (a graceful shutdown) deletes it; a lease that runs out is dropped.
- An entry `dns:///NAME:PORT` of `CLAWHUB_EXECUTOR_ADDRESSES` is resolved again every `dns_interval` seconds (a
  headless Kubernetes Service has one A record per ready pod): addresses that appear join, ones that vanish
  leave. A lookup that fails for a transient reason keeps the name's last addresses.
- The other entries are static, exactly as before: always members, never preloaded by this module.

`Membership` (the leader's background loop) preloads a joining executor with every version a route sends traffic
to or a running release uses (the LoadSkill path releases use) BEFORE it becomes a member; only then is it in the
fleet releases preload on and in the set published to dispatchers (`RouteHub.set_executors`, carried by
WatchRoutes), which pass it on to gateways. Were a release to start or a route to change while the executor loads,
it loads again before joining: see `_join`. So no call of a version reaches an executor before that version was
preloaded there.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from google.protobuf import duration_pb2

from services.deployer.backends import ExecutorFleet
from services.deployer.model import DeploymentRecord
from services.deployer.routes import RouteHub
from services.deployer.store import DeploymentStore
from services.runtime.errors import Reason, describe_error, invalid
from services.runtime.server import host_port
from services.runtime.settings import SettingsError
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.deployer")

DEFAULT_LEASE = 10.0
MIN_LEASE = 1.0
MAX_LEASE = 300.0
RECONCILE_INTERVAL = 1.0
DNS_INTERVAL = 5.0
DNS_TIMEOUT = 5.0
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0
# How long a (re)started leader waits for the executors it finds leases of to be preloaded again before it
# publishes its first set: publishing without them would take them from every dispatcher for that time.
SETTLE_TIMEOUT = 10.0
MAX_ADDRESS_CHARS = 255
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.%A-Za-z]+\]")

# host and port → the host's addresses (IP literals); raises OSError when the name cannot be resolved.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, through the system resolver. A name that does not exist (a headless
    Service without ready pods) resolves to none; any other failure raises OSError."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        if err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise
    return sorted({str(info[4][0]) for info in infos})


def split_addresses(entries: Iterable[str]) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """`CLAWHUB_EXECUTOR_ADDRESSES` entries → (static host:port addresses, DNS names with their port).

    `dns:///NAME:PORT` (also `dns:NAME:PORT`, and `dns://AUTHORITY/NAME:PORT`, whose authority is ignored: the
    system resolver answers) is a name to follow; anything else is one executor. Raises SettingsError."""
    static: list[str] = []
    names: list[tuple[str, int]] = []
    for entry in entries:
        if not entry.startswith("dns:"):
            static.append(entry)
            continue
        target = entry[len("dns:"):]
        if target.startswith("//"):
            target = target[2:].partition("/")[2]
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"CLAWHUB_EXECUTOR_ADDRESSES: {entry!r} needs a port: dns:///NAME:PORT")
        names.append((host.strip("[]"), int(port)))
    return tuple(static), tuple(names)


def static_addresses(entries: Iterable[str]) -> tuple[str, ...]:
    """The entries that name one executor each (a dispatcher's own list: the deployer resolves DNS names and
    publishes what it found)."""
    return tuple(entry for entry in entries if not entry.startswith("dns:"))


def address_problem(address: str) -> str | None:
    """Why `address` is not one executor's host:port (None when it is)."""
    if not address:
        return "an address is required (host:port at which the platform reaches the executor)"
    if len(address) > MAX_ADDRESS_CHARS:
        return f"the address is {len(address)} characters; at most {MAX_ADDRESS_CHARS}"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{address!r} is not host:port"
    if not _HOST_RE.fullmatch(host):
        return f"{address!r}: {host!r} is not a host name or IP address (an IPv6 address goes in brackets)"
    return None


class Registrations:
    """RegisterExecutor / DeregisterExecutor: leases in the store (every replica serves them)."""

    def __init__(self, store: DeploymentStore, *, clock: Callable[[], int] = time.time_ns,
                 changed: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._clock = clock
        self._changed = changed

    async def register(self, request: internal_pb.RegisterExecutorRequest) -> internal_pb.RegisterExecutorResponse:
        problem = address_problem(request.address)
        if problem:
            raise invalid(Reason.INVALID_ARGUMENT, "address", problem)
        lease = DEFAULT_LEASE
        if request.HasField("lease"):
            lease = request.lease.ToNanoseconds() / 1e9
            if not MIN_LEASE <= lease <= MAX_LEASE:
                raise invalid(Reason.INVALID_ARGUMENT, "lease",
                              f"a lease of {lease:g}s; from {MIN_LEASE:g}s to {MAX_LEASE:g}s")
        await self._store.renew_executor_lease(request.address, self._clock() + int(lease * 1e9))
        self._changed()
        granted = duration_pb2.Duration()
        granted.FromNanoseconds(int(lease * 1e9))
        return internal_pb.RegisterExecutorResponse(lease=granted)

    async def deregister(self, request: internal_pb.DeregisterExecutorRequest,
                         ) -> internal_pb.DeregisterExecutorResponse:
        problem = address_problem(request.address)
        if problem:
            raise invalid(Reason.INVALID_ARGUMENT, "address", problem)
        await self._store.drop_executor_lease(request.address)
        log.info("executor %s deregistered", request.address)
        self._changed()
        return internal_pb.DeregisterExecutorResponse()


class Membership(BackgroundLoop):
    """The leader's loop: follows leases and DNS names, preloads joining executors, publishes the set."""

    task_name = "executor-membership"

    def __init__(self, fleet: ExecutorFleet, store: DeploymentStore, hub: RouteHub, *, static: tuple[str, ...],
                 dns_names: tuple[tuple[str, int], ...] = (), resolver: Resolver = resolve_dns,
                 running: Callable[[], Iterable[str]] = tuple, clock: Callable[[], int] = time.time_ns,
                 interval: float = RECONCILE_INTERVAL, dns_interval: float = DNS_INTERVAL,
                 retry_initial: float = RETRY_INITIAL, settle_timeout: float = SETTLE_TIMEOUT) -> None:
        super().__init__()
        self._fleet = fleet
        self._store = store
        self._hub = hub
        self._static = static
        self._dns_names = dns_names
        self._resolver = resolver
        # Ids of the deployments whose rollout or rollback runs now (Releaser.running).
        self.running = running
        self._clock = clock
        self._interval = interval
        self._dns_interval = dns_interval
        self._retry_initial = retry_initial
        self._settle_timeout = settle_timeout
        # Executors that joined (preloaded, published), and the ones being preloaded to join.
        self._members: set[str] = set()
        self._joining: dict[str, asyncio.Task[None]] = {}
        self._attempted: dict[str, asyncio.Event] = {}
        self._dns: dict[tuple[str, int], tuple[str, ...]] = {}
        self._next_dns = 0.0
        self._wake = asyncio.Event()
        self._published = False

    @property
    def members(self) -> tuple[str, ...]:
        """The executor set as published: the static ones in their configured order, then the others sorted."""
        return (*self._static, *sorted(self._members - set(self._static)))

    def wake(self) -> None:
        """Look at the leases now (a registration arrived) rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        # A new start (this deployer took the lead, maybe again): nothing is known to be preloaded until checked.
        self._members.clear()
        self._published = False
        self._fleet.set_addresses(self._static)
        try:
            while True:
                self._wake.clear()
                try:
                    await self.reconcile()
                    if not self._published:
                        await self._settle()
                except Exception:  # noqa: BLE001 - membership must outlive any single failure
                    log.exception("following the executors failed")
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except TimeoutError:
                    pass
        finally:
            for task in self._joining.values():
                task.cancel()
            await asyncio.gather(*self._joining.values(), return_exceptions=True)
            self._joining.clear()

    async def _settle(self) -> None:
        """The first publication: after the executors found at start had one chance to be preloaded."""
        waits = [asyncio.ensure_future(self._attempted[a].wait()) for a in self._joining if a in self._attempted]
        if waits:
            try:
                await asyncio.wait(waits, timeout=self._settle_timeout)
            finally:
                for waiter in waits:
                    waiter.cancel()
        self._published = True
        self._publish()

    async def reconcile(self) -> None:
        """One look at the leases and names: start joining the new executors, drop the departed ones."""
        now = self._clock()
        leases = await self._store.executor_leases()
        leased = set()
        for address, expires in leases.items():
            if expires > now:
                leased.add(address)
                continue
            log.warning("the lease of executor %s ran out %.1fs ago; dropping it", address, (now - expires) / 1e9)
            await self._store.drop_executor_lease(address, expired_by_ns=now)
        loop = asyncio.get_running_loop()
        if self._dns_names and loop.time() >= self._next_dns:
            self._next_dns = loop.time() + self._dns_interval
            await self._resolve()
        wanted = (leased | set(itertools.chain.from_iterable(self._dns.values()))) - set(self._static)
        for address in sorted(wanted - self._members - self._joining.keys()):
            log.info("executor %s is joining: preloading every deployed version on it", address)
            self._attempted[address] = asyncio.Event()
            self._joining[address] = asyncio.create_task(self._join(address), name=f"join-{address}")
        for address in sorted((self._members | self._joining.keys()) - wanted):
            await self._drop(address)

    async def _resolve(self) -> None:
        for host, port in self._dns_names:
            try:
                ips = await asyncio.wait_for(self._resolver(host, port), DNS_TIMEOUT)
            except (OSError, TimeoutError) as err:
                log.warning("resolving %s failed (%s); keeping its %d executors", host, err,
                            len(self._dns.get((host, port), ())))
                continue
            found = tuple(sorted(host_port(ip, port) for ip in ips))
            if found != self._dns.get((host, port)):
                log.info("%s resolves to %s", host, ", ".join(found) or "nothing")
            self._dns[(host, port)] = found

    def _signature(self) -> tuple[int, tuple[str, ...]]:
        """What a joining executor must have loaded, in brief: the route generation and the running releases."""
        return self._hub.generation, tuple(sorted(self.running()))

    async def _wanted(self) -> list[DeploymentRecord]:
        """Every version a route sends traffic to, and those a running release uses (its new version, and the
        stable one a canary falls back on or a rollback restores)."""
        running = set(self.running())
        owners = {self._hub.owner(route.skill) for route in self._hub.table.routes}
        pending = [i for i in (owners | running) if i]
        records: dict[str, DeploymentRecord] = {}
        while pending:
            deployment_id = pending.pop()
            if deployment_id in records:
                continue
            record = await self._store.get_deployment(deployment_id)
            if record is None:
                continue
            records[deployment_id] = record
            if record.previous_id and deployment_id in running:
                pending.append(record.previous_id)
        missing = self._hub.digests() - {r.digest for r in records.values()}
        if missing:
            log.warning("no deployment record for routed digests %s; a joining executor loads them on first use",
                        ", ".join(sorted(missing)))
        return sorted(records.values(), key=lambda r: (r.skill, r.version))

    async def _join(self, address: str) -> None:
        delay = self._retry_initial
        while True:
            signature = self._signature()
            loaded = 0
            try:
                records = await self._wanted()
                problems = [p for p in await asyncio.gather(*(self._load(address, r) for r in records)) if p]
                loaded = len(records)
            except Exception as exc:  # noqa: BLE001 - retried like a failed load
                problems = [describe_error(exc)]
            self._attempted[address].set()
            if not problems:
                # No await from the check to the publication: a release or route change that starts after the
                # check sees the executor in the fleet and preloads on it itself.
                if self._signature() == signature:
                    self._joining.pop(address, None)
                    self._members.add(address)
                    self._publish()
                    log.info("executor %s joined (%d version%s preloaded)", address, loaded, "" if loaded == 1 else "s")
                    return
                continue
            log.warning("executor %s cannot join yet (%s); trying again in %.1fs", address, "; ".join(problems)[:500],
                        delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _load(self, address: str, record: DeploymentRecord) -> str | None:
        """LoadSkill of one version on a joining executor; what went wrong, if anything."""
        try:
            await self._fleet.load(address, record)
        except grpc.aio.AioRpcError as err:
            return f"{record.skill}@{record.version}: {describe_error(err)}"
        return None

    async def _drop(self, address: str) -> None:
        task = self._joining.pop(address, None)
        self._attempted.pop(address, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.info("executor %s left before it joined", address)
        if address in self._members:
            self._members.discard(address)
            self._publish()
            log.info("executor %s left", address)
        await self._fleet.forget(address)

    def _publish(self) -> None:
        members = self.members
        self._fleet.set_addresses(members)
        if self._published:
            self._hub.set_executors(members)

