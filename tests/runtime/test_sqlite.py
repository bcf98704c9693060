"""The cancel-safe transactions both stores use (services/runtime/sqlite.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite
import pytest

from services.runtime.sqlite import read_transaction, write_transaction


@pytest.fixture
async def db(tmp_path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(tmp_path / "test.sqlite3", isolation_level=None)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("CREATE TABLE t (n INTEGER NOT NULL)")
    yield conn
    await conn.close()


async def count(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT COUNT(*) FROM t"))
    return int(rows[0][0])


async def test_transactions_cancelled_at_any_point_leave_the_connection_usable(db: aiosqlite.Connection) -> None:
    """aiosqlite runs a queued BEGIN even when the awaiting task is cancelled; a transaction left open then made
    every later one fail ("cannot start a transaction within a transaction") until a restart."""
    async def write(n: int) -> None:
        async with write_transaction(db):
            await db.execute("INSERT INTO t (n) VALUES (?)", (n,))
            await db.execute("INSERT INTO t (n) VALUES (?)", (n,))

    async def read() -> None:
        async with read_transaction(db):
            await count(db)

    for i in range(60):
        task = asyncio.ensure_future(write(i) if i % 2 else read())
        for _ in range(i % 7):  # cut off at different points: before, during and after BEGIN
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Every write landed whole or not at all, and the connection takes new transactions.
    assert await count(db) % 2 == 0
    before = await count(db)
    await write(100)
    assert await count(db) == before + 2
    with pytest.raises(RuntimeError):
        async with write_transaction(db):
            await db.execute("INSERT INTO t (n) VALUES (1)")
            raise RuntimeError("rolled back")
    assert await count(db) == before + 2
    assert db.in_transaction is False
