"""Registry metadata on PostgreSQL (asyncpg), shared by every registry replica.

The logic is `store.SqlMetadataStore`'s, the same as sqlite's: this module supplies the transactions, the
translation of its `?` placeholders and the schema. Isolation matches the sqlite store's: every write
transaction first takes one transaction-level advisory lock (per schema), so writers are serialized across
every replica exactly as `BEGIN IMMEDIATE` serializes them on one sqlite file, and each read-modify-write
(a publish claiming name@version, a state transition, an overlapping namespace claim) sees the last committed
state of every other writer. Writers never wait on each other's row locks in another order, so there are no
deadlocks and no serialization failures to retry. Reads run in a `REPEATABLE READ READ ONLY` transaction: one
snapshot, so a version and its history agree, and they never wait for a writer.

`MIGRATIONS` creates and upgrades the schema (component `registry` of services/runtime/postgres.py's
`clawhub_schema`): append an entry to change it, never edit a released one. Text keys are `COLLATE "C"`, so
names order and compare by bytes, as in sqlite (the namespace-overlap range query relies on it). The blob
tables of services/registry/pgblobs.py are part of the same schema.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from services.registry.store import Sql, SqlMetadataStore
from services.runtime.postgres import migrate, open_pool, rows_affected

COMPONENT = "registry"

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # 1: the schema of sqlite's migrations 1 to 6, in one step.
        """CREATE TABLE skills (
            name TEXT COLLATE "C" PRIMARY KEY,
            create_time_ns BIGINT NOT NULL,
            update_time_ns BIGINT NOT NULL
        )""",
        """CREATE TABLE versions (
            name TEXT COLLATE "C" NOT NULL REFERENCES skills(name),
            version TEXT COLLATE "C" NOT NULL,
            digest TEXT NOT NULL,
            size_bytes BIGINT NOT NULL,
            manifest BYTEA NOT NULL,
            state TEXT NOT NULL,
            verification_errors TEXT NOT NULL DEFAULT '[]',
            create_time_ns BIGINT NOT NULL,
            bundle_digest TEXT NOT NULL DEFAULT '',
            yanked BOOLEAN NOT NULL DEFAULT FALSE,
            yank_reason TEXT NOT NULL DEFAULT '',
            signature_key_id TEXT NOT NULL DEFAULT '',
            signature BYTEA NOT NULL DEFAULT '\\x',
            publisher TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (name, version)
        )""",
        "CREATE INDEX versions_by_digest ON versions(digest)",
        "CREATE INDEX versions_by_state ON versions(state)",
        """CREATE TABLE transitions (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            time_ns BIGINT NOT NULL,
            reason TEXT NOT NULL,
            FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
        )""",
        "CREATE INDEX transitions_by_version ON transitions(name, version, id)",
        """CREATE TABLE tags (
            name TEXT COLLATE "C" NOT NULL,
            tag TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            PRIMARY KEY (name, tag),
            FOREIGN KEY (name, version) REFERENCES versions(name, version)
        )""",
        """CREATE TABLE publishers (
            name TEXT COLLATE "C" PRIMARY KEY,
            token_sha256 TEXT NOT NULL UNIQUE,
            create_time_ns BIGINT NOT NULL
        )""",
        """CREATE TABLE namespaces (
            name TEXT COLLATE "C" PRIMARY KEY,
            owner TEXT COLLATE "C" NOT NULL REFERENCES publishers(name),
            require_signatures BOOLEAN NOT NULL DEFAULT FALSE,
            create_time_ns BIGINT NOT NULL,
            update_time_ns BIGINT NOT NULL
        )""",
        """CREATE TABLE namespace_keys (
            namespace TEXT COLLATE "C" NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
            key_id TEXT COLLATE "C" NOT NULL,
            public_key BYTEA NOT NULL,
            create_time_ns BIGINT NOT NULL,
            PRIMARY KEY (namespace, key_id)
        )""",
        """CREATE TABLE blob_quarantine (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            digest TEXT NOT NULL,
            actual_digest TEXT NOT NULL,
            size_bytes BIGINT NOT NULL,
            path TEXT NOT NULL,
            detected_by TEXT NOT NULL,
            time_ns BIGINT NOT NULL,
            repair_time_ns BIGINT
        )""",
        "CREATE INDEX blob_quarantine_by_digest ON blob_quarantine(digest, repair_time_ns)",
        """CREATE TABLE api_keys (
            id TEXT COLLATE "C" PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            scopes TEXT NOT NULL,
            key_sha256 TEXT NOT NULL UNIQUE,
            created_by TEXT NOT NULL,
            create_time_ns BIGINT NOT NULL,
            revoke_time_ns BIGINT
        )""",
        """CREATE TABLE audit_events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            time_ns BIGINT NOT NULL,
            principal TEXT NOT NULL,
            method TEXT NOT NULL,
            target TEXT NOT NULL,
            request_id TEXT NOT NULL,
            outcome TEXT NOT NULL
        )""",
        # Blobs (services/registry/pgblobs.py): one row per stored copy of a digest, its bytes in chunk rows.
        # A copy found corrupt is quarantined (kept, with its time), not deleted; at most one live copy a digest.
        """CREATE TABLE blob_objects (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            digest TEXT COLLATE "C" NOT NULL,
            size_bytes BIGINT NOT NULL,
            chunk_bytes INTEGER NOT NULL,
            create_time_ns BIGINT NOT NULL,
            quarantine_time_ns BIGINT
        )""",
        "CREATE UNIQUE INDEX blob_objects_live ON blob_objects(digest) WHERE quarantine_time_ns IS NULL",
        """CREATE TABLE blob_chunks (
            object_id BIGINT NOT NULL REFERENCES blob_objects(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (object_id, seq)
        )""",
        # Uncompressed out-of-line storage: a ranged read (substring) fetches only the pages it needs.
        "ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
    ),
)

# Every write transaction takes this lock first (per schema, so that schemas in one database stay apart).
_WRITE_LOCK = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':clawhub-registry-write'))"
_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=512)
def dollar_placeholders(query: str) -> str:
    """`query` with its `?` placeholders numbered as PostgreSQL's `$1`, `$2`, … (no query of the store has a `?`
    inside a literal)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", query)


class PgSql:
    """`Sql` on an asyncpg connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def rows(self, query: str, params: Sequence[object] = ()) -> list[Any]:
        return list(await self._conn.fetch(dollar_placeholders(query), *params))

    async def row(self, query: str, params: Sequence[object] = ()) -> Any | None:
        return await self._conn.fetchrow(dollar_placeholders(query), *params)

    async def run(self, query: str, params: Sequence[object] = ()) -> int:
        return rows_affected(await self._conn.execute(dollar_placeholders(query), *params))


async def open_registry_pool(url: str) -> asyncpg.Pool:
    """A pool to `url` with the registry's schema migrated (ConnectionError, naming the redacted URL, when the
    server cannot be reached)."""
    pool = await open_pool(url, component=COMPONENT)
    try:
        await migrate(pool, COMPONENT, MIGRATIONS)
    except BaseException:
        await pool.close()
        raise
    return pool


class PostgresMetadataStore(SqlMetadataStore):
    """MetadataStore on PostgreSQL. No quarantine cache: another replica may quarantine or repair a blob."""

    def __init__(self, pool: asyncpg.Pool, *, owns_pool: bool = False) -> None:
        self._pool = pool
        self._owns_pool = owns_pool

    @classmethod
    async def open(cls, url: str) -> PostgresMetadataStore:
        """A store with a pool of its own (closed with it), the schema migrated."""
        return cls(await open_registry_pool(url), owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool:
            await self._pool.close()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Sql]:
        # asyncpg rolls the transaction back on any exception, cancellation included, and the pool resets a
        # connection released mid-transaction.
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_WRITE_LOCK)
            yield PgSql(conn)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Sql]:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield PgSql(conn)
