"""PostgreSQL for the services that keep metadata (registry, deployer) when a database URL is configured.

sqlite stays the embedded default; `CLAWHUB_DATABASE_URL` (or `CLAWHUB_REGISTRY_DATABASE_URL` /
`CLAWHUB_DEPLOYER_DATABASE_URL`, which win for their service) moves a service's metadata to PostgreSQL, where
every replica of it shares one state. This module holds what both services need: reading the setting, opening
an asyncpg pool, and applying a service's migrations exactly once however many replicas start together.

Migrations are numbered per component (`registry`, `deployer`) in one `clawhub_schema` table; a
transaction-level advisory lock serializes replicas that migrate at the same moment, and a database newer
than the code is refused rather than written with an old schema.

Each service keeps its tables in a schema of its own (`clawhub_registry`, `clawhub_deployer`), created on first
start, so both can share one database. Tests isolate themselves with a schema prefix per test: a URL ending
`?search_path=t_abc` puts the registry's tables in `t_abc_registry`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from typing import Any

import asyncpg

from services.runtime.settings import SettingsError, env_str

SCHEMES = ("postgres", "postgresql")


def database_url(service: str) -> str:
    """The PostgreSQL URL of `service`'s metadata: CLAWHUB_<SERVICE>_DATABASE_URL, else CLAWHUB_DATABASE_URL,
    else "" (the embedded sqlite default)."""
    own = f"CLAWHUB_{service.upper()}_DATABASE_URL"
    for name in (own, "CLAWHUB_DATABASE_URL"):
        url = env_str(name, "")
        if url:
            check_url(name, url)
            return url
    return ""


def check_url(name: str, url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise SettingsError(f"{name}={redact(url)!r} is not a PostgreSQL URL "
                            "(postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE)")


def redact(url: str) -> str:
    """`url` without its password, for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def component_target(url: str, component: str) -> tuple[str, str]:
    """The URL to connect to and the schema of `component`'s tables: `clawhub_<component>`, or
    `<search_path>_<component>` when the URL names a `search_path` (tests: a schema per test). Each service has a
    schema of its own, so the registry and the deployer can share one database (and name tables alike)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    base = next((v for k, v in query if k == "search_path"), "").split(",")[0].strip().strip('"') or "clawhub"
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "search_path"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), f"{base}_{component}"


async def ensure_schema(url: str, component: str, *, timeout: float = 10.0) -> tuple[str, str]:
    """Create `component`'s schema if it is not there (replicas starting together are fine); the URL to connect
    to and the schema."""
    target, schema = component_target(url, component)
    try:
        conn = await asyncpg.connect(target, timeout=timeout)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ConnectionError(f"cannot connect to PostgreSQL at {redact(url)}: {exc}") from exc
    try:
        # Only when it is missing: CREATE SCHEMA needs CREATE on the database even when the schema exists, which
        # a role given a schema made for it by the database's administrator does not have.
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('clawhub-schema:' || $1))", schema)
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConnectionError(
            f"PostgreSQL at {redact(url)}: cannot create the schema {schema} ({exc}); grant the user CREATE on the "
            f'database, or create it for the user first: CREATE SCHEMA "{schema}" AUTHORIZATION <user>') from exc
    finally:
        await conn.close()
    return target, schema


async def connect(url: str, component: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """One connection whose tables are `component`'s schema (tools and tests; the services use pools)."""
    target, schema = await ensure_schema(url, component, timeout=timeout)
    return await asyncpg.connect(target, timeout=timeout, server_settings={"search_path": schema})


async def open_pool(url: str, *, component: str, min_size: int = 1, max_size: int = 10,
                    timeout: float = 10.0) -> asyncpg.Pool:
    """A pool of connections to `url` whose tables are `component`'s schema, or a clear error naming the
    (redacted) URL."""
    target, schema = await ensure_schema(url, component, timeout=timeout)
    try:
        pool = await asyncpg.create_pool(target, min_size=min_size, max_size=max_size, timeout=timeout,
                                         command_timeout=60, server_settings={"search_path": schema})
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ConnectionError(f"cannot connect to PostgreSQL at {redact(url)}: {exc}") from exc
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool, component: str, migrations: Sequence[Sequence[str]]) -> int:
    """Apply the migrations of `component` not applied yet, in one transaction, under an advisory lock; return
    the schema version. A database migrated by newer code is refused (its schema is not this code's)."""
    async with pool.acquire() as conn, conn.transaction():
        # Replicas starting together wait here for the first one; the lock ends with the transaction.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':clawhub-migrate'))")
        await conn.execute("CREATE TABLE IF NOT EXISTS clawhub_schema ("
                           "component TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (component, version))")
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM clawhub_schema WHERE component = $1",
                                      component)
        if current > len(migrations):
            raise RuntimeError(f"the {component} database has schema version {current}, newer than this "
                               f"{component} understands ({len(migrations)}); upgrade the {component}")
        for number, statements in enumerate(migrations[current:], start=current + 1):
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO clawhub_schema (component, version) VALUES ($1, $2)", component, number)
    return len(migrations)


def rows_affected(status: str) -> int:
    """The row count of a command status such as `UPDATE 3` or `DELETE 0`."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.UniqueViolationError)


Record = Any  # asyncpg.Record: indexable by position and by name, as the sqlite rows the stores read
