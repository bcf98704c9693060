"""The deployer's state on PostgreSQL (asyncpg): the `DeploymentStore` of deployers that share one database.

Same tables and same behaviour as the sqlite store (services/deployer/store.py), which holds everything that is
not SQL (sealing env values and routes with the keyring, building records from rows) in `SealedRows`: only the
queries differ. The schema is created whole by migration 1 of component `deployer` (services/runtime/postgres.py
applies it once however many replicas start together); the sqlite history of additions is not replayed.

Several deployer replicas use one database, and every one of them must seal and open with the same keys:
`deployer_keys` records the key id the replicas seal with, and a replica whose key file does not hold it
refuses to start (one line naming the key file) instead of sealing rows the others cannot open. Give every
replica the same key file (`CLAWHUB_DEPLOYER_SECRETS_KEY_FILE`, a Kubernetes Secret).

Route writes are fenced by the leadership epoch (services/deployer/leader.py): `save_route` changes the
table only while it is still at the writer's epoch, so a deployer whose leadership ended cannot push a
generation after its successor began.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
from clawhub.deployer.v1 import deployer_service_pb2 as pb

from services.deployer.model import DeploymentRecord, Transition
from services.deployer.secrets import REDACTOR, SecretsKeyError, install_log_redaction, load_keyring
from services.deployer.statemachine import ACTIVE, DEPLOYING, FAILED, IN_FLIGHT
from services.deployer.store import (
    _COLUMNS,
    _INSERT_COLUMNS,
    ConcurrentChange,
    LeaderRecord,
    RouteSnapshot,
    SealedRows,
    StoredRoute,
    fenced,
)
from services.runtime.postgres import migrate, open_pool, redact, rows_affected

log = logging.getLogger("clawhub.deployer")

COMPONENT = "deployer"

MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: the whole schema of sqlite migrations 1-10, plus the key id the replicas share.
    (
        """
        CREATE TABLE deployments (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            skill TEXT NOT NULL,
            version TEXT NOT NULL,
            digest TEXT NOT NULL,
            limits BYTEA NOT NULL,
            state INTEGER NOT NULL,
            previous_id TEXT NOT NULL DEFAULT '',
            previous_version TEXT NOT NULL DEFAULT '',
            create_ns BIGINT NOT NULL,
            update_ns BIGINT NOT NULL,
            env TEXT NOT NULL DEFAULT '{}',
            args TEXT NOT NULL DEFAULT '[]',
            bundle_digest TEXT NOT NULL DEFAULT '',
            capabilities TEXT NOT NULL DEFAULT '[]',
            plan TEXT NOT NULL DEFAULT '',
            verdict INTEGER NOT NULL DEFAULT 0,
            verdict_reason TEXT NOT NULL DEFAULT '',
            stats TEXT NOT NULL DEFAULT '',
            dependencies TEXT NOT NULL DEFAULT '[]',
            inherited_env TEXT NOT NULL DEFAULT '[]',
            rolled_back TEXT NOT NULL DEFAULT '',
            env_key TEXT NOT NULL DEFAULT '',
            input_schema TEXT,
            cache_ttl_ms BIGINT,
            env_digest TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX deployments_by_skill ON deployments (skill, seq)",
        "CREATE INDEX deployments_by_state ON deployments (state)",
        """
        CREATE TABLE transitions (
            deployment_id TEXT NOT NULL REFERENCES deployments (id),
            step INTEGER NOT NULL,
            from_state INTEGER NOT NULL,
            to_state INTEGER NOT NULL,
            time_ns BIGINT NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (deployment_id, step)
        )""",
        "CREATE INDEX transitions_by_time ON transitions (to_state, time_ns)",
        """
        CREATE TABLE requests (
            method TEXT NOT NULL,
            request_id TEXT NOT NULL,
            deployment_id TEXT NOT NULL,
            generation BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (method, request_id)
        )""",
        """
        CREATE TABLE routes (
            skill TEXT PRIMARY KEY,
            deployment_id TEXT NOT NULL,
            route BYTEA NOT NULL,
            route_key TEXT NOT NULL DEFAULT ''
        )""",
        """
        CREATE TABLE route_table (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation BIGINT NOT NULL,
            epoch BIGINT NOT NULL DEFAULT 0,
            leader_id TEXT NOT NULL DEFAULT '',
            leader_address TEXT NOT NULL DEFAULT ''
        )""",
        "INSERT INTO route_table (id, generation) VALUES (1, 0)",
        """
        CREATE TABLE deployment_events (
            deployment_id TEXT NOT NULL REFERENCES deployments (id),
            seq INTEGER NOT NULL,
            response BYTEA NOT NULL,
            PRIMARY KEY (deployment_id, seq)
        )""",
        """
        CREATE TABLE audit_events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            time_ns BIGINT NOT NULL,
            principal TEXT NOT NULL,
            method TEXT NOT NULL,
            target TEXT NOT NULL,
            request_id TEXT NOT NULL,
            outcome TEXT NOT NULL
        )""",
        """
        CREATE TABLE deployer_keys (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            key_id TEXT NOT NULL
        )""",
    ),
    # 2: as sqlite migration 11: the leases of registered executors (services/deployer/membership.py).
    (
        """
        CREATE TABLE executor_leases (
            address TEXT PRIMARY KEY,
            expires_ns BIGINT NOT NULL
        )""",
    ),
)

_HISTORY = ("SELECT deployment_id, from_state, to_state, time_ns, reason FROM transitions "
            "WHERE deployment_id = ANY($1::text[]) ORDER BY deployment_id, step")


class PostgresDeploymentStore(SealedRows):
    """asyncpg backend: a pool; each operation that writes several rows does so in one transaction."""

    def __init__(self, pool: asyncpg.Pool, keyring: Any) -> None:
        super().__init__(keyring)
        self._pool = pool

    @classmethod
    async def open(cls, url: str, key_file: Path) -> PostgresDeploymentStore:
        """Connect, migrate, and check the keys: SecretsKeyError (one line) when the key file is unusable, lacks
        a key stored rows need, or is not the one the other replicas seal with. Rows sealed with an older key of
        the file are re-sealed under its newest one."""
        install_log_redaction()
        pool = await open_pool(url, component=COMPONENT)
        try:
            await migrate(pool, COMPONENT, MIGRATIONS)
            async with pool.acquire() as conn, conn.transaction():
                # Replicas that open together check and re-seal one after the other.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':clawhub-deployer-keys'))")
                shared = await conn.fetchval("SELECT key_id FROM deployer_keys WHERE id = 1")
                sealed = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM deployments WHERE env_key != '') OR "
                                             "EXISTS (SELECT 1 FROM routes WHERE route_key != '')")
                keyring = load_keyring(key_file, create=shared is None and not sealed)
                store = cls(pool, keyring)
                await store._seal(conn, shared)
        except BaseException:
            await pool.close()
            raise
        log.info("deployer state on PostgreSQL at %s", redact(url))
        return store

    async def _seal(self, conn: Any, shared: str | None) -> None:
        keyring = self._keyring
        if shared is not None and shared not in keyring.ids:
            raise SecretsKeyError(
                f"deployer: the secrets key file {keyring.path} does not hold key {shared}, which the deployers "
                "of this database seal env values with; give every deployer replica the same key file "
                "(CLAWHUB_DEPLOYER_SECRETS_KEY_FILE, docs/security.md)")
        kids = {str(r[0]) for r in await conn.fetch(
            "SELECT DISTINCT env_key FROM deployments UNION SELECT DISTINCT route_key FROM routes")}
        for kid in sorted(kids - {"", *keyring.ids}):
            count = await conn.fetchval("SELECT (SELECT COUNT(*) FROM deployments WHERE env_key = $1) + "
                                        "(SELECT COUNT(*) FROM routes WHERE route_key = $1)", kid)
            raise self._unknown_key(kid, int(count))

        async def set_env(deployment_id: str, token: Any, kid: str) -> None:
            await conn.execute("UPDATE deployments SET env = $1, env_key = $2 WHERE id = $3", token, kid, deployment_id)

        async def set_route(skill: str, blob: Any, kid: str) -> None:
            await conn.execute("UPDATE routes SET route = $1, route_key = $2 WHERE skill = $3", blob, kid, skill)

        await self._reseal(await conn.fetch("SELECT id, env, env_key FROM deployments"),
                           await conn.fetch("SELECT skill, route, route_key FROM routes"), set_env, set_route)
        await conn.execute("INSERT INTO deployer_keys (id, key_id) VALUES (1, $1) "
                           "ON CONFLICT (id) DO UPDATE SET key_id = EXCLUDED.key_id", keyring.primary)

    async def close(self) -> None:
        await self._pool.close()

    async def append_audit(self, time_ns: int, principal: str, method: str, target: str, request_id: str,
                           outcome: str) -> None:
        await self._pool.execute(
            "INSERT INTO audit_events (time_ns, principal, method, target, request_id, outcome) "
            "VALUES ($1, $2, $3, $4, $5, $6)", time_ns, principal, method, target, request_id, outcome)

    async def list_audit(self, before: int | None, limit: int) -> list[tuple[int, int, str, str, str, str, str]]:
        rows = await self._pool.fetch(
            "SELECT seq, time_ns, principal, method, target, request_id, outcome FROM audit_events "
            "WHERE seq < $1 ORDER BY seq DESC LIMIT $2", before if before is not None else 2**62, limit)
        return [(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6])) for r in rows]

    async def create_deployment(self, record: DeploymentRecord, request_id: str = "") -> None:
        values = self._insert_values(record)
        marks = ", ".join(f"${n}" for n in range(1, len(values) + 1))
        async with self._pool.acquire() as conn, conn.transaction():
            seq = await conn.fetchval(f"INSERT INTO deployments ({_INSERT_COLUMNS}) VALUES ({marks}) RETURNING seq",
                                      *values)
            for step, transition in enumerate(record.history):
                await self._insert_transition(conn, record.id, step, transition)
            if request_id:
                await conn.execute("INSERT INTO requests (method, request_id, deployment_id) VALUES ('create', $1, $2)",
                                   request_id, record.id)
        record.seq = int(seq)

    @staticmethod
    async def _insert_transition(conn: Any, deployment_id: str, step: int, transition: Transition) -> None:
        await conn.execute(
            "INSERT INTO transitions (deployment_id, step, from_state, to_state, time_ns, reason) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            deployment_id, step, int(transition.from_state), int(transition.to_state), transition.time_ns,
            REDACTOR.redact(transition.reason))

    async def _hydrate(self, conn: Any, rows: Sequence[Any]) -> list[DeploymentRecord]:
        if not rows:
            return []
        histories: dict[str, list[Transition]] = {str(row[1]): [] for row in rows}
        for t in await conn.fetch(_HISTORY, list(histories)):
            histories[str(t[0])].append(self._transition(tuple(t)[1:]))
        return [self._record(row, histories[str(row[1])]) for row in rows]

    async def _select(self, where: str, *args: Any) -> list[DeploymentRecord]:
        # Rows and their transitions from one snapshot: a transition written in between is in both or neither.
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            return await self._hydrate(conn, await conn.fetch(f"SELECT {_COLUMNS} FROM deployments {where}", *args))

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        records = await self._select("WHERE id = $1", deployment_id)
        return records[0] if records else None

    async def list_deployments(self, skill: str, before_seq: int | None, limit: int) -> list[DeploymentRecord]:
        return await self._select("WHERE ($1 = '' OR skill = $1) AND seq < $2 ORDER BY seq DESC LIMIT $3",
                                  skill, before_seq if before_seq is not None else 2**62, limit)

    async def in_flight(self) -> list[DeploymentRecord]:
        return await self._select("WHERE state = ANY($1::integer[]) ORDER BY seq", [int(s) for s in IN_FLIGHT])

    async def add_transition(self, deployment_id: str, transition: Transition, epoch: int = 0) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # FOR SHARE: a term that begins meanwhile waits for this transaction (and fences the next one).
            status = await conn.execute(
                "UPDATE deployments SET state = $1, update_ns = $2 WHERE id = $3 AND state = $4 "
                "AND (SELECT epoch FROM route_table WHERE id = 1 FOR SHARE) = $5",
                int(transition.to_state), transition.time_ns, deployment_id, int(transition.from_state), epoch)
            if rows_affected(status) != 1:
                stored = await conn.fetchval("SELECT epoch FROM route_table WHERE id = 1")
                if int(stored) != epoch:
                    raise fenced(epoch, int(stored))
                raise ConcurrentChange(f"deployment {deployment_id} is not in state "
                                       f"{int(transition.from_state)} any more")
            step = await conn.fetchval("SELECT COUNT(*) FROM transitions WHERE deployment_id = $1", deployment_id)
            await self._insert_transition(conn, deployment_id, int(step), transition)

    async def save_analysis(self, record: DeploymentRecord) -> None:
        await self._pool.execute(
            "UPDATE deployments SET verdict = $1, verdict_reason = $2, stats = $3 WHERE id = $4",
            int(record.verdict), REDACTOR.redact(record.verdict_reason),
            record.stats.to_json() if record.stats else "", record.id)

    async def save_rolled_back(self, record: DeploymentRecord) -> None:
        await self._pool.execute("UPDATE deployments SET rolled_back = $1 WHERE id = $2",
                                 record.rolled_back.to_json() if record.rolled_back else "", record.id)

    async def append_event(self, deployment_id: str, event: pb.WatchDeploymentResponse, *, keep: bool,
                           limit: int) -> bool:
        blob = self._event_blob(event)
        async with self._pool.acquire() as conn:
            if not keep:
                count = await conn.fetchval("SELECT COUNT(*) FROM deployment_events WHERE deployment_id = $1",
                                            deployment_id)
                if int(count) >= limit:
                    return False
            await conn.execute("INSERT INTO deployment_events (deployment_id, seq, response) VALUES ($1, $2, $3)",
                               deployment_id, event.sequence, blob)
        return True

    async def list_events(self, deployment_id: str) -> list[pb.WatchDeploymentResponse]:
        rows = await self._pool.fetch(
            "SELECT response FROM deployment_events WHERE deployment_id = $1 ORDER BY seq", deployment_id)
        return [pb.WatchDeploymentResponse.FromString(bytes(row[0])) for row in rows]

    async def last_event_sequence(self, deployment_id: str) -> int:
        value = await self._pool.fetchval(
            "SELECT COALESCE(MAX(seq), 0) FROM deployment_events WHERE deployment_id = $1", deployment_id)
        return int(value)

    async def deploy_outcomes(self, skill: str, since_ns: int) -> list[tuple[int, bool]]:
        # As the sqlite store: Deploying → Active is a success, → Failed a failure.
        rows = await self._pool.fetch(
            "SELECT t.time_ns, t.to_state FROM transitions t JOIN deployments d ON d.id = t.deployment_id "
            "WHERE d.skill = $1 AND t.time_ns >= $2 AND ((t.from_state = $3 AND t.to_state = $4) OR t.to_state = $5) "
            "ORDER BY t.time_ns", skill, since_ns, int(DEPLOYING), int(ACTIVE), int(FAILED))
        return [(int(r[0]), int(r[1]) == ACTIVE) for r in rows]

    async def find_request(self, method: str, request_id: str) -> tuple[str, int] | None:
        row = await self._pool.fetchrow(
            "SELECT deployment_id, generation FROM requests WHERE method = $1 AND request_id = $2", method, request_id)
        return (str(row[0]), int(row[1])) if row is not None else None

    async def save_request(self, method: str, request_id: str, deployment_id: str, generation: int) -> None:
        await self._pool.execute(
            "INSERT INTO requests (method, request_id, deployment_id, generation) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (method, request_id) DO UPDATE SET deployment_id = EXCLUDED.deployment_id, "
            "generation = EXCLUDED.generation", method, request_id, deployment_id, generation)

    async def load_routes(self) -> RouteSnapshot:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            generation = await conn.fetchval("SELECT generation FROM route_table WHERE id = 1")
            rows = await conn.fetch("SELECT skill, deployment_id, route, route_key FROM routes")
        routes = {str(skill): StoredRoute(str(deployment_id), self._open_route(str(skill), bytes(blob), str(kid)))
                  for skill, deployment_id, blob, kid in rows}
        return RouteSnapshot(int(generation or 0), routes)

    async def save_route(self, generation: int, skill: str, entry: StoredRoute | None, epoch: int = 0) -> None:
        sealed = self._seal_route(entry.route) if entry is not None else None
        async with self._pool.acquire() as conn, conn.transaction():
            # The fencing token: only a writer of the current term moves the table, and only forward.
            status = await conn.execute(
                "UPDATE route_table SET generation = $1 WHERE id = 1 AND epoch = $2 AND generation < $1",
                generation, epoch)
            if rows_affected(status) != 1:
                row = await conn.fetchrow("SELECT epoch, generation FROM route_table WHERE id = 1")
                if int(row[0]) != epoch:
                    raise fenced(epoch, int(row[0]))
                raise ConcurrentChange(f"route generation {generation} is not above the stored {int(row[1])}")
            if entry is None or sealed is None:
                await conn.execute("DELETE FROM routes WHERE skill = $1", skill)
            else:
                await conn.execute(
                    "INSERT INTO routes (skill, deployment_id, route, route_key) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (skill) DO UPDATE SET deployment_id = EXCLUDED.deployment_id, "
                    "route = EXCLUDED.route, route_key = EXCLUDED.route_key",
                    skill, entry.deployment_id, sealed[1], sealed[0])

    async def begin_term(self, deployer_id: str, address: str) -> int:
        epoch = await self._pool.fetchval(
            "UPDATE route_table SET epoch = epoch + 1, leader_id = $1, leader_address = $2 WHERE id = 1 "
            "RETURNING epoch", deployer_id, address)
        return int(epoch)

    async def leader(self) -> LeaderRecord:
        row = await self._pool.fetchrow(
            "SELECT epoch, leader_id, leader_address, generation FROM route_table WHERE id = 1")
        return LeaderRecord(int(row[0]), str(row[1]), str(row[2]), int(row[3]))

    async def renew_executor_lease(self, address: str, expires_ns: int) -> None:
        await self._pool.execute(
            "INSERT INTO executor_leases (address, expires_ns) VALUES ($1, $2) "
            "ON CONFLICT (address) DO UPDATE SET expires_ns = EXCLUDED.expires_ns", address, expires_ns)

    async def drop_executor_lease(self, address: str, expired_by_ns: int | None = None) -> None:
        if expired_by_ns is None:
            await self._pool.execute("DELETE FROM executor_leases WHERE address = $1", address)
        else:
            await self._pool.execute("DELETE FROM executor_leases WHERE address = $1 AND expires_ns <= $2",
                                     address, expired_by_ns)

    async def executor_leases(self) -> dict[str, int]:
        rows = await self._pool.fetch("SELECT address, expires_ns FROM executor_leases")
        return {str(address): int(expires) for address, expires in rows}
