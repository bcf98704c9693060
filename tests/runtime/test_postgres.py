"""The shared PostgreSQL pieces: the URL setting, migrations applied once however many replicas start."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime import postgres
from services.runtime.settings import SettingsError

MIGRATIONS = (
    ("CREATE TABLE things (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE)",),
    ("ALTER TABLE things ADD COLUMN size BIGINT NOT NULL DEFAULT 0",),
)


def test_the_service_variable_wins_over_the_shared_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWHUB_REGISTRY_DATABASE_URL", raising=False)
    monkeypatch.delenv("CLAWHUB_DATABASE_URL", raising=False)
    assert postgres.database_url("registry") == ""
    monkeypatch.setenv("CLAWHUB_DATABASE_URL", "postgresql://u@db/shared")
    assert postgres.database_url("registry") == "postgresql://u@db/shared"
    monkeypatch.setenv("CLAWHUB_REGISTRY_DATABASE_URL", "postgres://u@db/own")
    assert postgres.database_url("registry") == "postgres://u@db/own"
    monkeypatch.setenv("CLAWHUB_REGISTRY_DATABASE_URL", "mysql://u:secret@db/own")
    with pytest.raises(SettingsError) as caught:
        postgres.database_url("registry")
    assert "secret" not in str(caught.value) and "not a PostgreSQL URL" in str(caught.value)


def test_redact_hides_the_password() -> None:
    assert postgres.redact("postgresql://app:s3cret@db:5432/clawhub") == "postgresql://app:***@db:5432/clawhub"
    assert postgres.redact("postgresql://app@db/clawhub") == "postgresql://app@db/clawhub"


async def test_an_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError) as caught:
        await postgres.open_pool("postgresql://app:s3cret@127.0.0.1:1/clawhub", component="things", timeout=2)
    assert "127.0.0.1:1" in str(caught.value) and "s3cret" not in str(caught.value)


async def test_replicas_migrating_together_apply_each_migration_once(postgres_url: str) -> None:
    pools = [await postgres.open_pool(postgres_url, component="things", max_size=2) for _ in range(4)]
    try:
        versions = await asyncio.gather(*(postgres.migrate(p, "things", MIGRATIONS) for p in pools))
        assert versions == [2, 2, 2, 2]
        async with pools[0].acquire() as conn:
            applied = await conn.fetch("SELECT version FROM clawhub_schema WHERE component = 'things' ORDER BY 1")
            assert [r["version"] for r in applied] == [1, 2]
            await conn.execute("INSERT INTO things (name, size) VALUES ('a', 3)")
        # Again: nothing to do, nothing lost.
        assert await postgres.migrate(pools[1], "things", MIGRATIONS) == 2
        async with pools[1].acquire() as conn:
            assert await conn.fetchval("SELECT size FROM things WHERE name = 'a'") == 3
    finally:
        for p in pools:
            await p.close()


async def test_a_database_newer_than_the_code_is_refused(postgres_url: str) -> None:
    pool = await postgres.open_pool(postgres_url, component="things")
    try:
        await postgres.migrate(pool, "things", MIGRATIONS)
        with pytest.raises(RuntimeError, match="newer than this things understands"):
            await postgres.migrate(pool, "things", MIGRATIONS[:1])
    finally:
        await pool.close()


def test_rows_affected() -> None:
    assert postgres.rows_affected("UPDATE 3") == 3
    assert postgres.rows_affected("DELETE 0") == 0
    assert postgres.rows_affected("INSERT 0 1") == 1


async def test_a_role_that_may_not_create_schemas_starts_on_the_schema_made_for_it(postgres_url: str) -> None:
    """Least privilege: the database's administrator creates the service's schema for its role, which has no
    CREATE on the database (PostgreSQL's default for a role that does not own it). Starting must not need it."""
    import urllib.parse
    import uuid

    import asyncpg

    role = f"clawhub_test_{uuid.uuid4().hex[:10]}"
    target, schema = postgres.component_target(postgres_url, "things")
    admin = await asyncpg.connect(target, timeout=10)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{role}"')
        parts = urllib.parse.urlsplit(postgres_url)
        as_role = urllib.parse.urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))
        pool = await postgres.open_pool(as_role, component="things", timeout=5)
        try:
            assert await postgres.migrate(pool, "things", MIGRATIONS) == len(MIGRATIONS)
            assert await pool.fetchval("SELECT current_schema()") == schema
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_a_role_that_may_not_create_its_schema_gets_one_clear_error(postgres_url: str) -> None:
    """Without CREATE on the database and without a schema made for it, starting fails with one error that says
    what to grant or create (the services print it as their one startup line), not asyncpg's traceback."""
    import urllib.parse
    import uuid

    import asyncpg

    role = f"clawhub_test_{uuid.uuid4().hex[:10]}"
    target, schema = postgres.component_target(postgres_url, "things")
    admin = await asyncpg.connect(target, timeout=10)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD \'s3cret\'')
        parts = urllib.parse.urlsplit(postgres_url)
        as_role = urllib.parse.urlunsplit(
            parts._replace(netloc=f"{role}:s3cret@{parts.netloc.rsplit('@', 1)[-1]}"))
        with pytest.raises(ConnectionError) as caught:
            await postgres.open_pool(as_role, component="things", timeout=5)
        message = str(caught.value)
        assert f"cannot create the schema {schema}" in message and "AUTHORIZATION" in message, message
        assert "s3cret" not in message
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
