"""The deployer's store survives callers that go away mid-write."""

from __future__ import annotations

import asyncio
from pathlib import Path

from clawhub.common.v1 import routing_pb2

from services.deployer.store import SqliteDeploymentStore, StoredRoute


async def test_a_write_cancelled_while_its_transaction_opens_leaves_the_store_working(tmp_path: Path) -> None:
    """aiosqlite runs a queued BEGIN even when the awaiting task is cancelled; a transaction left open then made
    every later write fail ("cannot start a transaction within a transaction") until a restart."""
    store = await SqliteDeploymentStore.open(tmp_path / "deployer.sqlite3")
    try:
        entry = StoredRoute("d1", routing_pb2.Route(skill="com.acme.x"))
        for i in range(60):
            task = asyncio.ensure_future(store.save_route(i + 1, "com.acme.x", entry))
            for _ in range(i % 6):  # cut off at different points: before, during and after BEGIN
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await store.save_route(100, "com.acme.x", entry)
        snapshot = await store.load_routes()
        assert snapshot.generation == 100 and "com.acme.x" in snapshot.routes
    finally:
        await store.close()
