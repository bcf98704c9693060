"""Both backends of the deployer's store, for the tests that run against each (sqlite and PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.deployer.pgstore import PostgresDeploymentStore
from services.deployer.secrets import KEY_FILE
from services.deployer.store import DeploymentStore, SqliteDeploymentStore
from services.runtime import postgres

BACKENDS = ("sqlite", "postgres")


@dataclass
class StoreBackend:
    """Opens the store of one test on `name`: a sqlite file in `directory`, or the test's PostgreSQL schema
    (`url`) with its key file in `directory`."""

    name: str
    directory: Path
    url: str = ""

    @property
    def key_file(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def sqlite_path(self) -> Path:
        return self.directory / "deployer.sqlite3"

    async def open(self, key_file: Path | None = None) -> DeploymentStore:
        if self.name == "sqlite":
            return await SqliteDeploymentStore.open(self.sqlite_path, key_file=key_file)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return await PostgresDeploymentStore.open(self.url, key_file or self.key_file)

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of a query run on the database itself (no store)."""
        if self.name == "sqlite":
            import sqlite3

            with sqlite3.connect(self.sqlite_path) as db:
                return [tuple(r) for r in db.execute(sql).fetchall()]
        conn = await postgres.connect(self.url, "deployer")
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()
