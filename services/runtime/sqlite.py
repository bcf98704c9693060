"""Transactions on an aiosqlite connection that stay correct when the task running them is cancelled.

aiosqlite queues each statement on the connection's thread as soon as it is awaited and runs it even if the
awaiting task is cancelled meanwhile (a caller that goes away, a deadline, gRPC refusing an oversized
message). A `BEGIN` run that way, with its task gone before the `try` that ends the transaction, leaves the
connection inside a transaction, and every later one fails ("cannot start a transaction within a
transaction") until a restart. So `BEGIN` is issued inside the `try` here, and the transaction is always
ended: the statements queued behind it (ROLLBACK, COMMIT) run in order on the same thread.

The connections are opened with `isolation_level=None` (autocommit), so transactions are only the explicit
ones below. Callers serialize the users of one connection themselves (an asyncio.Lock per connection).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator

import aiosqlite


@contextlib.asynccontextmanager
async def write_transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any exception, cancellation included."""
    try:
        await db.execute("BEGIN IMMEDIATE")
        yield db
    except BaseException:
        with contextlib.suppress(sqlite3.OperationalError):  # BEGIN itself failed: nothing to roll back
            await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")


@contextlib.asynccontextmanager
async def read_transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """`BEGIN` … `COMMIT`: the reads inside see one snapshot (a record and its history agree)."""
    try:
        await db.execute("BEGIN")
        yield db
    finally:
        with contextlib.suppress(sqlite3.OperationalError):  # BEGIN itself failed: nothing to end
            await db.execute("COMMIT")
