"""Leader election between deployer replicas that share one PostgreSQL database.

Exactly one replica, the leader, drives releases and pushes routes (CreateDeployment, Rollback, and the
dispatchers' WatchRoutes, AcknowledgeRoutes and ReportStats); the others, standbys, serve the reads from the
database (GetDeployment, ListDeployments, WatchDeployment from the stored events, ListAuditEvents) and refuse
the rest with UNAVAILABLE / NOT_LEADER naming the leader (`leader_id`, `leader_address`), so that a client
retries on the leader: dispatchers follow that address (services/dispatcher/routes.py).

Why a session advisory lock and not a lease row: PostgreSQL releases a session lock the moment the session
ends, so a leader that dies (kill -9, a crashed host once TCP notices) frees it without waiting for a lease
to expire, and there is no clock to trust across machines. The lock is held on a connection of its own (not a
pooled one, which could hand it to another task or drop it); the election's timing covers what a lease's
expiry would:

- the leader's connection asks the server to notice a silent client: TCP keepalives (idle 1 s, every 1 s)
  and `tcp_user_timeout`, so that a half-open session of a vanished leader ends (and frees the lock) within
  about `lease_timeout` seconds;
- the leader itself runs `SELECT 1` on that connection every `interval` seconds, and steps down when one
  does not answer within half of `lease_timeout`: a leader cut off from the database stops leading before the
  server gives the lock away;
- a standby tries the lock every `interval` seconds: after a leader's death it leads within `interval` (a
  closed connection) or about `lease_timeout` + `interval` (a vanished one).

Timing is not proof, so route writes are fenced as well: each term begins by incrementing the route table's
`epoch` (`DeploymentStore.begin_term`), and a route generation is written only while the table is still at the
writer's epoch. A deposed leader that has not noticed yet gets `Fenced` from its first write and steps down;
two deployers never push conflicting generations.

On taking over, the new leader loads the route table and resumes every release left in flight from its
persisted state (`Releaser.settle(resume=True)`). With sqlite there is one deployer by definition: `SoleLeader`
always leads, at epoch 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc

from services.runtime.errors import Reason, ServiceError, describe_error
from services.runtime.postgres import ensure_schema, redact

log = logging.getLogger("clawhub.deployer")

LOCK_KEY = "hashtext(current_schema() || ':clawhub-deployer-leader')"


def default_deployer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def advertised(host: str, port: int) -> str:
    """host:port as others reach it: this machine's name when listening on every interface."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass(frozen=True)
class ElectionSettings:
    deployer_id: str
    """This replica's name in refusals and in the route table (`CLAWHUB_DEPLOYER_ID`, default hostname-pid)."""
    address: str
    """Where the others send a client this replica leads for (`CLAWHUB_DEPLOYER_ADVERTISE_ADDRESS`)."""
    interval: float = 1.0
    """Seconds between a standby's attempts at the lock and between the leader's heartbeats
    (`CLAWHUB_DEPLOYER_ELECTION_INTERVAL`, default 1)."""
    lease_timeout: float = 5.0
    """Seconds of silence after which a leader's session counts as dead (`CLAWHUB_DEPLOYER_LEASE_TIMEOUT`,
    default 5): the database ends a silent leader's session, and a leader whose heartbeat is unanswered for
    half of it steps down."""


class Leadership:
    """What the servicer asks: whether this replica leads, and who does when it does not."""

    def __init__(self, deployer_id: str) -> None:
        self.deployer_id = deployer_id
        self.is_leader = False
        self.epoch = 0
        self.leader_id = ""
        self.leader_address = ""

    def require(self, what: str) -> None:
        """NOT_LEADER unless this replica leads: `what` (a write, the route feed) only the leader does."""
        if self.is_leader:
            return
        who = f"{self.leader_id} at {self.leader_address}" if self.leader_address else "not known yet"
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE, Reason.NOT_LEADER,
            f"this deployer ({self.deployer_id}) is a standby: {what} is done by the leading deployer ({who}); "
            "retry there", metadata={"deployer_id": self.deployer_id, "leader_id": self.leader_id,
                                     "leader_address": self.leader_address},
            retry_after_seconds=0.2)

    async def start(self) -> None:
        """Begin following the election (after the server started)."""

    async def stop(self) -> None:
        """Stop leading (if it does) and leave the election."""

    def fenced(self) -> None:
        """A route write found a newer term: this replica no longer leads."""


class SoleLeader(Leadership):
    """The only deployer of its (sqlite) state: leads from the start, at epoch 0."""

    def __init__(self, deployer_id: str) -> None:
        super().__init__(deployer_id)
        self.is_leader = True
        self.leader_id = deployer_id


Elected = Callable[[int], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]


class PostgresElection(Leadership):
    """The session advisory lock of the database's deployers, held on a dedicated connection.

    `elected(epoch)` runs when this replica takes the lead (load the routes, resume releases), `deposed()`
    when it loses it (stop releases, end the route streams), `standby()` on every round a standby waits
    (follow the leader's route table for the reads), `leading()` on every round the leader keeps the lead
    (take up releases nobody drives). `begin_term()` starts a term and returns its epoch.
    """

    def __init__(self, url: str, settings: ElectionSettings, *, begin_term: Callable[[], Awaitable[int]],
                 leader: Callable[[], Awaitable[tuple[str, str]]], elected: Elected, deposed: Hook,
                 standby: Hook, leading: Hook) -> None:
        super().__init__(settings.deployer_id)
        self._url = url
        self._settings = settings
        self._begin_term = begin_term
        self._leader = leader
        self._elected = elected
        self._deposed = deposed
        self._standby = standby
        self._leading = leading
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stepping_down: asyncio.Task[None] | None = None
        self._transition = asyncio.Lock()

    async def _connect(self) -> Any:
        timeout = self._settings.lease_timeout
        # Server-side: end the session of a client that went silent (a dead host, a cut network) instead of
        # holding its lock until the kernel gives up on the connection (hours).
        keepalive_count = max(1, round(timeout) - 1)
        try:
            target, schema = await ensure_schema(self._url, "deployer", timeout=max(timeout, 2.0))
            return await asyncpg.connect(target, timeout=max(timeout, 2.0), server_settings={
                "search_path": schema,
                "application_name": f"clawhub-deployer-leader:{self.deployer_id}"[:63],
                "tcp_keepalives_idle": "1", "tcp_keepalives_interval": "1",
                "tcp_keepalives_count": str(keepalive_count), "tcp_user_timeout": str(int(timeout * 1000))})
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise ConnectionError(f"cannot connect to PostgreSQL at {redact(self._url)}: {exc}") from exc

    async def campaign(self) -> bool:
        """One round: a standby tries the lock (and takes the lead when it gets it), a leader checks it still
        holds it (and steps down when it cannot tell). Whether this replica leads afterwards."""
        async with self._transition:
            try:
                if self.is_leader and (self._conn is None or self._conn.is_closed()):
                    # The lock went with the session: a new connection would not hold it.
                    raise ConnectionError("the connection holding the lock was closed")
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._connect()
                if self.is_leader:
                    await asyncio.wait_for(self._conn.fetchval("SELECT 1"), self._settings.lease_timeout / 2)
                    leads = True
                else:
                    leads = False
                    got = await asyncio.wait_for(
                        self._conn.fetchval(f"SELECT pg_try_advisory_lock({LOCK_KEY})"),
                        self._settings.lease_timeout / 2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, TimeoutError) as exc:
                if self.is_leader:
                    log.warning("deployer %s lost its leadership lock connection (%s); stepping down",
                                self.deployer_id, describe_error(exc))
                    await self._lose()
                else:
                    log.warning("deployer %s cannot reach the election's database: %s", self.deployer_id,
                                describe_error(exc))
                    await self._drop_connection()
                return False
            if leads:
                try:
                    await self._leading()
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("deployer %s: %s", self.deployer_id, describe_error(exc))
                return True
            if got:
                try:
                    self.epoch = await self._begin_term()
                    self.leader_id, self.leader_address = self.deployer_id, self._settings.address
                    log.info("deployer %s leads (term %d), advertised at %s", self.deployer_id, self.epoch,
                             self._settings.address)
                    await self._elected(self.epoch)
                    self.is_leader = True
                except Exception as exc:  # noqa: BLE001 - give the lock back; another replica may do better
                    log.exception("deployer %s could not take the lead: %s", self.deployer_id, describe_error(exc))
                    self.is_leader = True  # so that _lose runs the deposed hook on what was started
                    await self._lose()
                    return False
                return True
            try:
                self.leader_id, self.leader_address = await self._leader()
                await self._standby()
            except Exception as exc:  # noqa: BLE001 - a standby's view refreshes on the next round
                log.warning("deployer %s could not follow the leader: %s", self.deployer_id, describe_error(exc))
            return False

    async def _lose(self) -> None:
        """Stop leading: the deposed hook first (no release runs on), then the lock's connection (which frees
        the lock if the database still counts it as held)."""
        was = self.is_leader
        self.is_leader = False
        self.leader_id = self.leader_address = ""
        if was:
            try:
                await self._deposed()
            except Exception:  # noqa: BLE001 - the connection still goes
                log.exception("deployer %s: error while stepping down", self.deployer_id)
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except (Exception, TimeoutError):  # noqa: BLE001 - a dead connection cannot close politely
                conn.terminate()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.interval)
            await self.campaign()

    @property
    def address(self) -> str:
        return self._settings.address

    def advertise(self, address: str) -> None:
        """Where this replica is reached when it leads (known once its port is bound)."""
        self._settings = dataclasses.replace(self._settings, address=address)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deployer-election")

    def fenced(self) -> None:
        # Called from inside a release's route push: stepping down cancels the releases, so not in that task.
        if self.is_leader and (self._stepping_down is None or self._stepping_down.done()):
            log.warning("deployer %s was fenced off the route table (a newer term began); stepping down",
                        self.deployer_id)
            self._stepping_down = asyncio.create_task(self._step_down())

    async def _step_down(self) -> None:
        async with self._transition:
            if self.is_leader:
                await self._lose()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._stepping_down is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._stepping_down
        async with self._transition:
            await self._lose()
