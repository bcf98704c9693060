"""Persistence of deployments and the route table: the `DeploymentStore` protocol and its aiosqlite backend.
The PostgreSQL backend (services/deployer/pgstore.py) shares everything that is not SQL (`SealedRows`).

The route table is stored per skill (which deployment serves it and its `Route`) plus one global generation
number, so a restarted deployer serves the same table at the same generation. Schema changes are appended to
`MIGRATIONS`; `schema_version` records how many have been applied.

Deploy-time env values are secrets (services/deployer/secrets.py): a deployment's `env` column and a route's
`route` blob (its targets carry the values) are Fernet tokens, each with the id of the key that sealed it
(`env_key`, `route_key`); reasons and logged events are redacted before they are written. The directory is
0700 and the database files 0600 whatever the umask; deleted content is zeroed (`secure_delete`), and a
database that held plain or old-key values is vacuumed and its WAL truncated once they are re-sealed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
from clawhub.common.v1 import routing_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from google.protobuf import json_format

from services.deployer.analysis import Tally
from services.deployer.model import DeploymentRecord, RolledBack, Transition, Verdict
from services.deployer.plan import Plan
from services.deployer.secrets import KEY_FILE, REDACTOR, Keyring, SecretsKeyError, install_log_redaction, load_keyring
from services.deployer.statemachine import ACTIVE, DEPLOYING, FAILED, IN_FLIGHT, State
from services.runtime import metrics
from services.runtime.datadir import private_dir, private_files
from services.runtime.sqlite import write_transaction

log = logging.getLogger("clawhub.deployer")


@dataclass(frozen=True)
class StoredRoute:
    """One skill's entry of the route table: the deployment that serves it and the route itself."""

    deployment_id: str
    route: routing_pb2.Route


@dataclass(frozen=True)
class RouteSnapshot:
    generation: int
    routes: dict[str, StoredRoute]


class DeploymentStore(Protocol):
    """Where deployments, their transitions, idempotency keys and the route table are kept."""

    async def close(self) -> None: ...

    async def create_deployment(self, record: DeploymentRecord, request_id: str = "") -> None:
        """Store a new deployment (and its first transitions); `request_id` maps to it for retries."""
        ...

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None: ...

    async def list_deployments(self, skill: str, before_seq: int | None, limit: int,
                               ) -> list[DeploymentRecord]:
        """Newest first; `skill` empty for every skill; only those with seq < before_seq when given."""
        ...

    async def in_flight(self) -> list[DeploymentRecord]:
        """Deployments left Deploying or RollingBack, oldest first."""
        ...

    async def add_transition(self, deployment_id: str, transition: Transition, epoch: int = 0) -> None:
        """Persist a transition; fails with ConcurrentChange if the stored state is not its from_state, with
        Fenced if the leadership term `epoch` is over (another deployer drives the releases now)."""
        ...

    async def find_request(self, method: str, request_id: str) -> tuple[str, int] | None:
        """(deployment id, generation) recorded for an idempotency key of `method`."""
        ...

    async def save_analysis(self, record: DeploymentRecord) -> None:
        """Persist the record's analysis verdict, its reason and the new version's stats."""
        ...

    async def deploy_outcomes(self, skill: str, since_ns: int) -> list[tuple[int, bool]]:
        """(time, succeeded) of every rollout of the skill that ended at or after `since_ns`, oldest first."""
        ...

    async def save_request(self, method: str, request_id: str, deployment_id: str, generation: int) -> None: ...

    async def save_rolled_back(self, record: DeploymentRecord) -> None:
        """Persist the record's `rolled_back`."""
        ...

    async def append_event(self, deployment_id: str, event: pb.WatchDeploymentResponse, *, keep: bool,
                           limit: int) -> bool:
        """Add an event (its `sequence` set) to the deployment's log, unless the log already holds `limit`
        events and `keep` is false; whether it was added."""
        ...

    async def list_events(self, deployment_id: str) -> list[pb.WatchDeploymentResponse]:
        """The deployment's event log, in sequence order."""
        ...

    async def last_event_sequence(self, deployment_id: str) -> int:
        """The highest sequence number in the deployment's log; 0 when it is empty."""
        ...

    async def load_routes(self) -> RouteSnapshot: ...

    async def append_audit(self, time_ns: int, principal: str, method: str, target: str, request_id: str,
                           outcome: str) -> None: ...

    async def list_audit(self, before: int | None, limit: int) -> list[tuple[int, int, str, str, str, str, str]]: ...

    async def save_route(self, generation: int, skill: str, entry: StoredRoute | None, epoch: int = 0) -> None:
        """Set (or with None, remove) one skill's route and the table's generation, atomically; Fenced (nothing
        written) unless the table is still at leadership `epoch` and below `generation`."""
        ...

    async def begin_term(self, deployer_id: str, address: str) -> int:
        """Start a new leadership term (call while holding the leadership): the next epoch, recorded in the route
        table with who holds it; every route write of an older term fails from now on."""
        ...

    async def leader(self) -> LeaderRecord:
        """Who holds the current leadership term, and the route table's generation."""
        ...

    async def renew_executor_lease(self, address: str, expires_ns: int) -> None:
        """Record (or extend) a registered executor's lease until `expires_ns` (services/deployer/membership.py)."""
        ...

    async def drop_executor_lease(self, address: str, expired_by_ns: int | None = None) -> None:
        """Forget an executor's lease: at once (None: it deregistered), or only if it ran out by `expired_by_ns`
        (a renewal that raced the cleanup wins)."""
        ...

    async def executor_leases(self) -> dict[str, int]:
        """Every stored lease: executor address → when it runs out (nanoseconds since the epoch)."""
        ...


@dataclass(frozen=True)
class LeaderRecord:
    """The route table's fencing token (the leadership epoch), who took it, and the table's generation."""

    epoch: int
    deployer_id: str
    address: str
    generation: int


class ConcurrentChange(RuntimeError):
    """The stored state of a deployment is not the one a transition starts from."""


class Fenced(ConcurrentChange):
    """A route write of a deployer whose leadership term is over (another deployer began a newer one)."""


def fenced(epoch: int, stored: int) -> Fenced:
    return Fenced(f"route table write refused: this deployer's leadership term {epoch} is over (the table is at "
                  f"term {stored}); another deployer leads")


MIGRATIONS: Sequence[str] = (
    # 1: deployments, their transitions, idempotency keys, the route table.
    """
    CREATE TABLE deployments (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        skill TEXT NOT NULL,
        version TEXT NOT NULL,
        digest TEXT NOT NULL,
        limits BLOB NOT NULL,
        state INTEGER NOT NULL,
        previous_id TEXT NOT NULL DEFAULT '',
        previous_version TEXT NOT NULL DEFAULT '',
        create_ns INTEGER NOT NULL,
        update_ns INTEGER NOT NULL
    );
    CREATE INDEX deployments_by_skill ON deployments (skill, seq);
    CREATE INDEX deployments_by_state ON deployments (state);
    CREATE TABLE transitions (
        deployment_id TEXT NOT NULL REFERENCES deployments (id),
        step INTEGER NOT NULL,
        from_state INTEGER NOT NULL,
        to_state INTEGER NOT NULL,
        time_ns INTEGER NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (deployment_id, step)
    );
    CREATE TABLE requests (
        method TEXT NOT NULL,
        request_id TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        generation INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (method, request_id)
    );
    CREATE TABLE routes (
        skill TEXT PRIMARY KEY,
        deployment_id TEXT NOT NULL,
        route BLOB NOT NULL
    );
    CREATE TABLE route_table (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        generation INTEGER NOT NULL
    );
    INSERT INTO route_table (id, generation) VALUES (1, 0);
    """,
    # 2: what a deployment grants its skill (issue 3): env values (JSON object), the manifest's args and
    # capabilities (JSON arrays), the file bundle's digest.
    """
    ALTER TABLE deployments ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE deployments ADD COLUMN args TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE deployments ADD COLUMN bundle_digest TEXT NOT NULL DEFAULT '';
    ALTER TABLE deployments ADD COLUMN capabilities TEXT NOT NULL DEFAULT '[]';
    """,
    # 3: release analysis (issue 5): the resolved plan (strategy + thresholds, JSON; '' before plans), the
    # analysis verdict and its reason, the new version's stats (JSON). The index serves the circuit breaker.
    """
    ALTER TABLE deployments ADD COLUMN plan TEXT NOT NULL DEFAULT '';
    ALTER TABLE deployments ADD COLUMN verdict INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deployments ADD COLUMN verdict_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE deployments ADD COLUMN stats TEXT NOT NULL DEFAULT '';
    CREATE INDEX transitions_by_time ON transitions (to_state, time_ns);
    """,
    # 4: the dependency resolution pinned at deploy (issue 4): JSON array of ResolvedDependency objects.
    """
    ALTER TABLE deployments ADD COLUMN dependencies TEXT NOT NULL DEFAULT '[]';
    """,
    # 5: each deployment's event log (issue 10), so a watcher that joins late (or after the end, or after a
    # restart) is shown what already happened: serialized WatchDeploymentResponses by sequence number. The env
    # names kept from the previous deployment (JSON array) and the manual rollback that took the deployment's
    # traffic (JSON object; '' when none).
    """
    CREATE TABLE deployment_events (
        deployment_id TEXT NOT NULL REFERENCES deployments (id),
        seq INTEGER NOT NULL,
        response BLOB NOT NULL,
        PRIMARY KEY (deployment_id, seq)
    );
    ALTER TABLE deployments ADD COLUMN inherited_env TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE deployments ADD COLUMN rolled_back TEXT NOT NULL DEFAULT '';
    """,
    # 6: env values encrypted at rest (issue 11): the id of the key that sealed a deployment's `env` (a Fernet
    # token from now on) and a route's `route` blob; '' marks a row still in plain text, which the store seals
    # when it opens (`_seal`). The Python step redacts the plain values from the text already written.
    """
    ALTER TABLE deployments ADD COLUMN env_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE routes ADD COLUMN route_key TEXT NOT NULL DEFAULT '';
    """,
    # 7: the audit log of deploys and rollbacks (issue 11): who, what, when, request id, outcome.
    """
    CREATE TABLE audit_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ns INTEGER NOT NULL,
        principal TEXT NOT NULL,
        method TEXT NOT NULL,
        target TEXT NOT NULL,
        request_id TEXT NOT NULL,
        outcome TEXT NOT NULL
    );
    """,
    # 8: the version's input_schema (issue 11), carried in its route targets so the gateway validates inputs
    # without the registry; NULL for deployments made before (their targets leave the field unset).
    """
    ALTER TABLE deployments ADD COLUMN input_schema TEXT;
    """,
    # 9: the version's result-cache TTL in milliseconds (issue 13), carried in its route targets for the
    # gateway's cache; NULL: not cached (a version that declares none, or a deployment made before). And the
    # keyed hash of its env values that the cache key includes ('' before: such targets are not cached).
    """
    ALTER TABLE deployments ADD COLUMN cache_ttl_ms INTEGER;
    ALTER TABLE deployments ADD COLUMN env_digest TEXT NOT NULL DEFAULT '';
    """,
    # 10: leader election (issue 15): the route table's fencing token, the leadership epoch, and who holds it.
    # A sqlite deployer is the only one, always at epoch 0; the columns keep both backends' tables alike.
    """
    ALTER TABLE route_table ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE route_table ADD COLUMN leader_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE route_table ADD COLUMN leader_address TEXT NOT NULL DEFAULT '';
    """,
    # 11: executors that registered (issue 15, discovery): the lease each one renews; any deployer replica writes
    # it, the leader preloads and publishes the executors whose lease runs.
    """
    CREATE TABLE executor_leases (
        address TEXT PRIMARY KEY,
        expires_ns INTEGER NOT NULL
    );
    """,
)

_COLUMNS = ("seq, id, skill, version, digest, limits, state, previous_id, previous_version, "
            "create_ns, update_ns, env, args, bundle_digest, capabilities, plan, verdict, verdict_reason, stats, "
            "dependencies, inherited_env, rolled_back, env_key, input_schema, cache_ttl_ms, env_digest")


async def _redact_plain_text(db: aiosqlite.Connection) -> None:
    """Migration 6's data step: env values in plain text may have reached reasons and logged events (a smoke
    example printing its secret); replace them there before the values themselves are sealed."""
    values: set[str] = set()
    for (env,) in await db.execute_fetchall("SELECT env FROM deployments WHERE env_key = ''"):
        values.update(str(v) for v in json.loads(env or "{}").values())
    REDACTOR.add(values)
    if not values:
        return
    for rowid, reason in list(await db.execute_fetchall("SELECT rowid, reason FROM transitions")):
        if REDACTOR.redact(reason) != reason:
            await db.execute("UPDATE transitions SET reason = ? WHERE rowid = ?", (REDACTOR.redact(reason), rowid))
    for rowid, reason in list(await db.execute_fetchall("SELECT rowid, verdict_reason FROM deployments")):
        if REDACTOR.redact(reason) != reason:
            await db.execute("UPDATE deployments SET verdict_reason = ? WHERE rowid = ?",
                             (REDACTOR.redact(reason), rowid))
    for rowid, blob in list(await db.execute_fetchall("SELECT rowid, response FROM deployment_events")):
        event = pb.WatchDeploymentResponse.FromString(bytes(blob))
        cleaned = REDACTOR.redact_message(event).SerializeToString()
        if cleaned != bytes(blob):
            await db.execute("UPDATE deployment_events SET response = ? WHERE rowid = ?", (cleaned, rowid))


# Steps in Python run after a migration's SQL, in its transaction.
_DATA_STEPS: dict[int, Callable[[aiosqlite.Connection], Awaitable[None]]] = {6: _redact_plain_text}


def dependencies_to_json(dependencies: Sequence[skill_pb2.ResolvedDependency]) -> str:
    return json.dumps([json_format.MessageToDict(d, preserving_proto_field_name=True) for d in dependencies])


def dependencies_from_json(text: str) -> list[skill_pb2.ResolvedDependency]:
    return [json_format.ParseDict(d, skill_pb2.ResolvedDependency()) for d in json.loads(text or "[]")]


SealedUpdate = Callable[[str, Any, str], Awaitable[None]]


class SealedRows:
    """What both backends do alike around their SQL: seal and open env values and routes with the keyring,
    re-seal old rows under the newest key, build records from rows (columns in `_COLUMNS` order)."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def _unknown_key(self, kid: str, rows: int) -> SecretsKeyError:
        keyring = self._keyring
        return SecretsKeyError(
            f"deployer: the secrets key file {keyring.path} does not hold key {kid}, which encrypted the env "
            f"values of {rows} stored deployments and routes; restore the key file that was in "
            f"use (or add that key back as a line of it), or point CLAWHUB_DEPLOYER_SECRETS_KEY_FILE at it "
            "(docs/security.md)")

    async def _reseal(self, deployments: Sequence[Any], routes: Sequence[Any], set_env: SealedUpdate,
                      set_route: SealedUpdate) -> int:
        """Open every (id, env, env_key) deployment and (skill, route, route_key) route row, learn the values
        (for redaction), and write back under the newest key (`set_env(id, token, kid)`,
        `set_route(skill, blob, kid)`) those that are plain or sealed with an older key; how many were."""
        resealed = 0
        for deployment_id, env_text, kid in deployments:
            env = self._open_env(str(deployment_id), env_text, str(kid))
            REDACTOR.add(env.values())
            if kid != self._keyring.primary:
                new_kid, token = self._seal_env(str(deployment_id), env)
                await set_env(str(deployment_id), token, new_kid)
                resealed += 1
        for skill, blob, kid in routes:
            route = self._open_route(str(skill), bytes(blob), str(kid))
            if kid != self._keyring.primary:
                new_kid, sealed = self._seal_route(route)
                await set_route(str(skill), sealed, new_kid)
                resealed += 1
        if resealed:
            log.info("sealed the env values of %d stored deployments and routes with key %s of %s", resealed,
                     self._keyring.primary, self._keyring.path)
        return resealed

    def _insert_values(self, record: DeploymentRecord) -> tuple[Any, ...]:
        """The values of `_INSERT_COLUMNS` for a new deployment (its env sealed; its values learnt for
        redaction)."""
        REDACTOR.add(record.env.values())
        kid, sealed_env = self._seal_env(record.id, record.env)
        return (record.id, record.skill, record.version, record.digest,
                record.limits.SerializeToString(), int(record.state), record.previous_id,
                record.previous_version, record.create_ns, record.update_ns,
                sealed_env, kid, json.dumps(record.args), record.bundle_digest,
                json.dumps(record.capabilities), record.plan.to_json() if record.plan else "",
                dependencies_to_json(record.dependencies), json.dumps(sorted(record.inherited_env)),
                record.input_schema, record.cache_ttl_ms, record.env_digest)

    def _record(self, row: Any, history: list[Transition]) -> DeploymentRecord:
        """A deployment from its row (`_COLUMNS`) and its transitions."""
        limits = skill_pb2.Limits()
        limits.ParseFromString(bytes(row[5]))
        return DeploymentRecord(
            seq=int(row[0]), id=row[1], skill=row[2], version=row[3], digest=row[4], limits=limits,
            state=State(int(row[6])), history=history, previous_id=row[7], previous_version=row[8],
            create_ns=int(row[9]), update_ns=int(row[10]), env=self._open_env(row[1], row[11], str(row[22])),
            args=list(json.loads(row[12])), bundle_digest=str(row[13]), capabilities=list(json.loads(row[14])),
            plan=Plan.from_json(str(row[15])), verdict=Verdict(int(row[16])), verdict_reason=str(row[17]),
            stats=Tally.from_json(str(row[18])), dependencies=dependencies_from_json(str(row[19])),
            inherited_env=list(json.loads(row[20])), rolled_back=RolledBack.from_json(str(row[21])),
            input_schema=None if row[23] is None else str(row[23]),
            cache_ttl_ms=None if row[24] is None else int(row[24]), env_digest=str(row[25]))

    @staticmethod
    def _transition(row: Any) -> Transition:
        """A transition from its (from_state, to_state, time_ns, reason) row."""
        return Transition(State(int(row[0])), State(int(row[1])), int(row[2]), str(row[3]))

    @staticmethod
    def _event_blob(event: pb.WatchDeploymentResponse) -> bytes:
        copy = pb.WatchDeploymentResponse()
        copy.CopyFrom(event)
        return REDACTOR.redact_message(copy).SerializeToString()

    def _seal_env(self, deployment_id: str, env: dict[str, str]) -> tuple[str, str]:
        # The deployment id is sealed with the values: a token copied onto another row does not decrypt there.
        plaintext = json.dumps({"deployment": deployment_id, "env": env}, sort_keys=True).encode()
        kid, token = self._keyring.encrypt(plaintext)
        return kid, token.decode("ascii")

    def _open_env(self, deployment_id: str, text: str, kid: str) -> dict[str, str]:
        if not kid:  # plain, from before migration 6: sealed by `_seal` on open
            return {str(k): str(v) for k, v in json.loads(text or "{}").items()}
        what = f"deployment {deployment_id}"
        data = json.loads(self._keyring.decrypt(kid, text.encode("ascii"), what=what))
        if data.get("deployment") != deployment_id:
            raise SecretsKeyError(f"deployer: the sealed env values stored with {what} belong to another deployment "
                                  "(the database was altered); restore it from a backup")
        return {str(k): str(v) for k, v in data["env"].items()}

    def _seal_route(self, route: routing_pb2.Route) -> tuple[str, bytes]:
        return self._keyring.encrypt(route.SerializeToString())

    def _open_route(self, skill: str, blob: bytes, kid: str) -> routing_pb2.Route:
        route = routing_pb2.Route()
        route.ParseFromString(self._keyring.decrypt(kid, blob, what=f"the route of {skill}") if kid else blob)
        if route.skill and route.skill != skill:
            raise SecretsKeyError(f"deployer: the sealed route stored for {skill} belongs to {route.skill} "
                                  "(the database was altered); restore it from a backup")
        return route


_INSERT_COLUMNS = ("id, skill, version, digest, limits, state, previous_id, previous_version, create_ns, update_ns, "
                   "env, env_key, args, bundle_digest, capabilities, plan, dependencies, inherited_env, input_schema, "
                   "cache_ttl_ms, env_digest")


class SqliteDeploymentStore(SealedRows):
    """aiosqlite (WAL) backend. One connection; a lock keeps each operation's statements together."""

    def __init__(self, db: aiosqlite.Connection, keyring: Keyring) -> None:
        super().__init__(keyring)
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, key_file: Path | None = None) -> SqliteDeploymentStore:
        """Open (creating, migrating) the database at `path`, with env values sealed by the keys of `key_file`
        (default: `secrets.key` next to the database; created when missing and nothing is sealed yet).
        SecretsKeyError (one line) when the key file is unusable or lacks a key the database needs."""
        private_dir(path.parent)
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        # sqlite gives the -wal and -shm files the mode of the database file: create it 0600 first.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        private_files(*files)
        install_log_redaction()
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) where several writes
        # must land together.
        db = await aiosqlite.connect(path, isolation_level=None)
        metrics.observe_queries(db, "deployer")  # clawhub_db_query_duration_seconds
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            # Deleted and overwritten content is zeroed, not left in free pages; temporary tables and
            # VACUUM's copy stay in memory, not in a file outside this directory.
            await db.execute("PRAGMA secure_delete=ON")
            await db.execute("PRAGMA temp_store=MEMORY")
            await cls._migrate(db)
            sealed = list(await db.execute_fetchall(
                "SELECT 1 FROM deployments WHERE env_key != '' UNION ALL "
                "SELECT 1 FROM routes WHERE route_key != '' LIMIT 1"))
            keyring = load_keyring(key_file or path.parent / KEY_FILE, create=not sealed)
            store = cls(db, keyring)
            if await store._seal():
                # Plain or old-key values are gone from the tables; rewrite the file and empty the WAL so
                # that no copy of them stays behind in free pages or old frames.
                await db.execute("VACUUM")
            await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            private_files(*files)
        except BaseException:
            await db.close()
            raise
        return store

    async def _seal(self) -> bool:
        """Check that every sealed row decrypts, learn its values (for redaction), and re-seal under the
        newest key the rows that are plain (from before migration 6) or sealed with an older key; whether any
        was. Runs before the store serves, so needs no lock."""
        db, keyring = self._db, self._keyring
        kids = {str(r[0]) for r in await db.execute_fetchall(
            "SELECT DISTINCT env_key FROM deployments UNION SELECT DISTINCT route_key FROM routes")}
        for kid in sorted(kids - {"", *keyring.ids}):
            rows = list(await db.execute_fetchall(
                "SELECT (SELECT COUNT(*) FROM deployments WHERE env_key = ?) + "
                "(SELECT COUNT(*) FROM routes WHERE route_key = ?)", (kid, kid)))
            raise self._unknown_key(kid, int(rows[0][0]))

        async def set_env(deployment_id: str, token: Any, kid: str) -> None:
            await db.execute("UPDATE deployments SET env = ?, env_key = ? WHERE id = ?", (token, kid, deployment_id))

        async def set_route(skill: str, blob: Any, kid: str) -> None:
            await db.execute("UPDATE routes SET route = ?, route_key = ? WHERE skill = ?", (blob, kid, skill))

        async with write_transaction(db):
            resealed = await self._reseal(
                list(await db.execute_fetchall("SELECT id, env, env_key FROM deployments")),
                list(await db.execute_fetchall("SELECT skill, route, route_key FROM routes")), set_env, set_route)
        return resealed > 0

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = list(await db.execute_fetchall("SELECT version FROM schema_version"))
        current = int(rows[0][0]) if rows else 0
        if current > len(MIGRATIONS):
            raise RuntimeError(f"deployer database schema version {current} is newer than this deployer "
                               f"({len(MIGRATIONS)}); upgrade the deployer")
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            statements = [s.strip() for s in script.split(";") if s.strip()]
            async with write_transaction(db):
                for statement in statements:
                    await db.execute(statement)
                step = _DATA_STEPS.get(number)
                if step is not None:
                    await step(db)
                await db.execute("DELETE FROM schema_version")
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))

    async def close(self) -> None:
        await self._db.close()

    async def append_audit(self, time_ns: int, principal: str, method: str, target: str, request_id: str,
                           outcome: str) -> None:
        async with self._lock, write_transaction(self._db):
            await self._db.execute(
                "INSERT INTO audit_events (time_ns, principal, method, target, request_id, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?)", (time_ns, principal, method, target, request_id, outcome))

    async def list_audit(self, before: int | None, limit: int) -> list[tuple[int, int, str, str, str, str, str]]:
        """Audit events, newest first, below sequence number `before`: (seq, time_ns, principal, method, target,
        request_id, outcome)."""
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT seq, time_ns, principal, method, target, request_id, outcome FROM audit_events "
                "WHERE seq < ? ORDER BY seq DESC LIMIT ?", (before if before is not None else 2**62, limit))
        return [(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6])) for r in rows]

    async def create_deployment(self, record: DeploymentRecord, request_id: str = "") -> None:
        values = self._insert_values(record)
        async with self._lock:
            async with write_transaction(self._db):
                cursor = await self._db.execute(
                    f"INSERT INTO deployments ({_INSERT_COLUMNS}) VALUES ({', '.join('?' for _ in values)})", values)
                record.seq = int(cursor.lastrowid or 0)
                for step, transition in enumerate(record.history):
                    await self._insert_transition(record.id, step, transition)
                if request_id:
                    await self._db.execute(
                        "INSERT INTO requests (method, request_id, deployment_id) VALUES ('create', ?, ?)",
                        (request_id, record.id))

    async def _insert_transition(self, deployment_id: str, step: int, transition: Transition) -> None:
        await self._db.execute(
            "INSERT INTO transitions (deployment_id, step, from_state, to_state, time_ns, reason) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (deployment_id, step, int(transition.from_state), int(transition.to_state), transition.time_ns,
             REDACTOR.redact(transition.reason)))

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM deployments WHERE id = ?", (deployment_id,)))
            records = await self._hydrate(rows)
        return records[0] if records else None

    async def list_deployments(self, skill: str, before_seq: int | None, limit: int,
                               ) -> list[DeploymentRecord]:
        clauses, params = [], []
        if skill:
            clauses.append("skill = ?")
            params.append(skill)
        if before_seq is not None:
            clauses.append("seq < ?")
            params.append(str(before_seq))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM deployments {where} ORDER BY seq DESC LIMIT ?", (*params, limit)))
            return await self._hydrate(rows)

    async def in_flight(self) -> list[DeploymentRecord]:
        marks = ", ".join("?" for _ in IN_FLIGHT)
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM deployments WHERE state IN ({marks}) ORDER BY seq",
                tuple(int(s) for s in IN_FLIGHT)))
            return await self._hydrate(rows)

    async def _hydrate(self, rows: list[Any]) -> list[DeploymentRecord]:
        records = []
        for row in rows:
            history = [self._transition(t) for t in await self._db.execute_fetchall(
                "SELECT from_state, to_state, time_ns, reason FROM transitions "
                "WHERE deployment_id = ? ORDER BY step", (row[1],))]
            records.append(self._record(row, history))
        return records

    async def add_transition(self, deployment_id: str, transition: Transition, epoch: int = 0) -> None:
        async with self._lock:
            async with write_transaction(self._db):
                cursor = await self._db.execute(
                    "UPDATE deployments SET state = ?, update_ns = ? WHERE id = ? AND state = ? "
                    "AND (SELECT epoch FROM route_table WHERE id = 1) = ?",
                    (int(transition.to_state), transition.time_ns, deployment_id, int(transition.from_state), epoch))
                if cursor.rowcount != 1:
                    rows = list(await self._db.execute_fetchall("SELECT epoch FROM route_table WHERE id = 1"))
                    if int(rows[0][0]) != epoch:
                        raise fenced(epoch, int(rows[0][0]))
                    raise ConcurrentChange(f"deployment {deployment_id} is not in state "
                                           f"{int(transition.from_state)} any more")
                rows = list(await self._db.execute_fetchall(
                    "SELECT COUNT(*) FROM transitions WHERE deployment_id = ?", (deployment_id,)))
                await self._insert_transition(deployment_id, int(rows[0][0]), transition)

    async def save_analysis(self, record: DeploymentRecord) -> None:
        async with self._lock:
            await self._db.execute(
                "UPDATE deployments SET verdict = ?, verdict_reason = ?, stats = ? WHERE id = ?",
                (int(record.verdict), REDACTOR.redact(record.verdict_reason),
                 record.stats.to_json() if record.stats else "", record.id))

    async def save_rolled_back(self, record: DeploymentRecord) -> None:
        async with self._lock:
            await self._db.execute(
                "UPDATE deployments SET rolled_back = ? WHERE id = ?",
                (record.rolled_back.to_json() if record.rolled_back else "", record.id))

    async def append_event(self, deployment_id: str, event: pb.WatchDeploymentResponse, *, keep: bool,
                           limit: int) -> bool:
        blob = self._event_blob(event)
        async with self._lock:
            if not keep:
                rows = list(await self._db.execute_fetchall(
                    "SELECT COUNT(*) FROM deployment_events WHERE deployment_id = ?", (deployment_id,)))
                if int(rows[0][0]) >= limit:
                    return False
            await self._db.execute(
                "INSERT INTO deployment_events (deployment_id, seq, response) VALUES (?, ?, ?)",
                (deployment_id, event.sequence, blob))
            return True

    async def list_events(self, deployment_id: str) -> list[pb.WatchDeploymentResponse]:
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                "SELECT response FROM deployment_events WHERE deployment_id = ? ORDER BY seq", (deployment_id,)))
        return [pb.WatchDeploymentResponse.FromString(bytes(row[0])) for row in rows]

    async def last_event_sequence(self, deployment_id: str) -> int:
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                "SELECT COALESCE(MAX(seq), 0) FROM deployment_events WHERE deployment_id = ?", (deployment_id,)))
        return int(rows[0][0])

    async def deploy_outcomes(self, skill: str, since_ns: int) -> list[tuple[int, bool]]:
        # A rollout ends Deploying → Active (success) or RollingBack → Failed (failure); a manual rollback
        # (Active → RollingBack → Active) is neither.
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                "SELECT t.time_ns, t.to_state FROM transitions t JOIN deployments d ON d.id = t.deployment_id "
                "WHERE d.skill = ? AND t.time_ns >= ? AND ((t.from_state = ? AND t.to_state = ?) OR t.to_state = ?) "
                "ORDER BY t.time_ns",
                (skill, since_ns, int(DEPLOYING), int(ACTIVE), int(FAILED))))
        return [(int(r[0]), int(r[1]) == ACTIVE) for r in rows]

    async def find_request(self, method: str, request_id: str) -> tuple[str, int] | None:
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                "SELECT deployment_id, generation FROM requests WHERE method = ? AND request_id = ?",
                (method, request_id)))
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    async def save_request(self, method: str, request_id: str, deployment_id: str, generation: int) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT OR REPLACE INTO requests (method, request_id, deployment_id, generation) "
                "VALUES (?, ?, ?, ?)", (method, request_id, deployment_id, generation))

    async def load_routes(self) -> RouteSnapshot:
        async with self._lock:
            generation_rows = list(await self._db.execute_fetchall(
                "SELECT generation FROM route_table WHERE id = 1"))
            rows = list(await self._db.execute_fetchall("SELECT skill, deployment_id, route, route_key FROM routes"))
        routes = {}
        for skill, deployment_id, blob, kid in rows:
            routes[str(skill)] = StoredRoute(str(deployment_id), self._open_route(str(skill), bytes(blob), str(kid)))
        return RouteSnapshot(int(generation_rows[0][0]) if generation_rows else 0, routes)

    async def save_route(self, generation: int, skill: str, entry: StoredRoute | None, epoch: int = 0) -> None:
        async with self._lock:
            async with write_transaction(self._db):
                cursor = await self._db.execute(
                    "UPDATE route_table SET generation = ? WHERE id = 1 AND epoch = ? AND generation < ?",
                    (generation, epoch, generation))
                if cursor.rowcount != 1:
                    rows = list(await self._db.execute_fetchall("SELECT epoch, generation FROM route_table"))
                    if int(rows[0][0]) != epoch:
                        raise fenced(epoch, int(rows[0][0]))
                    raise ConcurrentChange(f"route generation {generation} is not above the stored "
                                           f"{int(rows[0][1])}")
                if entry is None:
                    await self._db.execute("DELETE FROM routes WHERE skill = ?", (skill,))
                else:
                    kid, sealed = self._seal_route(entry.route)
                    await self._db.execute(
                        "INSERT OR REPLACE INTO routes (skill, deployment_id, route, route_key) VALUES (?, ?, ?, ?)",
                        (skill, entry.deployment_id, sealed, kid))

    async def begin_term(self, deployer_id: str, address: str) -> int:
        async with self._lock, write_transaction(self._db):
            await self._db.execute("UPDATE route_table SET epoch = epoch + 1, leader_id = ?, leader_address = ? "
                                   "WHERE id = 1", (deployer_id, address))
            rows = list(await self._db.execute_fetchall("SELECT epoch FROM route_table WHERE id = 1"))
        return int(rows[0][0])

    async def leader(self) -> LeaderRecord:
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                "SELECT epoch, leader_id, leader_address, generation FROM route_table WHERE id = 1"))
        return LeaderRecord(int(rows[0][0]), str(rows[0][1]), str(rows[0][2]), int(rows[0][3]))

    async def renew_executor_lease(self, address: str, expires_ns: int) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT INTO executor_leases (address, expires_ns) VALUES (?, ?) "
                "ON CONFLICT (address) DO UPDATE SET expires_ns = excluded.expires_ns", (address, expires_ns))

    async def drop_executor_lease(self, address: str, expired_by_ns: int | None = None) -> None:
        async with self._lock:
            if expired_by_ns is None:
                await self._db.execute("DELETE FROM executor_leases WHERE address = ?", (address,))
            else:
                await self._db.execute("DELETE FROM executor_leases WHERE address = ? AND expires_ns <= ?",
                                       (address, expired_by_ns))

    async def executor_leases(self) -> dict[str, int]:
        async with self._lock:
            rows = list(await self._db.execute_fetchall("SELECT address, expires_ns FROM executor_leases"))
        return {str(address): int(expires) for address, expires in rows}
