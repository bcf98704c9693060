"""Fixtures for registry tests: a real registry on 127.0.0.1:0 over a temporary data directory, and `backend`,
the registry's storage on each backend in turn (sqlite and files; PostgreSQL, from `postgres_url`, skipped
with its reason where no server is configured)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.registry.blobs import BlobBackend, BlobStore
from services.registry.pgblobs import PostgresBlobStore
from services.registry.pgstore import PostgresMetadataStore
from services.registry.server import DATABASE_FILE, build_server
from services.registry.settings import Settings
from services.registry.store import SqliteMetadataStore, SqlMetadataStore
from services.runtime import postgres
from services.runtime.postgres import open_pool
from tests.conftest import Starter
from tests.registry.support import Client, RegistryStub

Opener = Callable[..., Awaitable[Client]]


@pytest.fixture
def registry_overrides() -> dict[str, Any]:
    """Settings of every registry `open_registry` starts; a test module that overrides this fixture with
    `backend.settings` runs on each storage backend."""
    return {}


@pytest.fixture
async def open_registry(start_service: Starter, tmp_path: Any,
                        registry_overrides: dict[str, Any]) -> AsyncIterator[Opener]:
    """Start a registry (settings overridable by keyword) over tmp_path/registry and connect to it."""
    channels: list[grpc.aio.Channel] = []

    async def open_(**overrides: Any) -> Client:
        settings = Settings(**{"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "registry",
                               "shutdown_grace_seconds": 0.5, **registry_overrides, **overrides})
        host = await start_service(build_server(settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        channels.append(channel)
        return Client(host=host, stub=RegistryStub(channel), settings=settings)

    yield open_
    for channel in channels:
        await channel.close()


@pytest.fixture
async def registry(open_registry: Opener) -> Client:
    return await open_registry()


@dataclass
class Backend:
    """Where a test keeps the registry's metadata and blobs: sqlite and files under `data_dir`, or the
    PostgreSQL database at `database_url` (uploads still staged under `data_dir`). Everything it opens is
    closed after the test."""

    name: str
    data_dir: Path
    database_url: str = ""
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, Any]:
        """The Settings overrides of a registry server on this backend."""
        return {"database_url": self.database_url, "data_dir": self.data_dir}

    async def store(self) -> SqlMetadataStore:
        """A new store instance (another on the same backend is another replica, or the next run)."""
        store: SqlMetadataStore
        if self.database_url:
            store = await PostgresMetadataStore.open(self.database_url)
        else:
            store = await SqliteMetadataStore.open(self.data_dir / DATABASE_FILE)
        self._closers.append(store.close)
        return store

    async def blobs(self, data_dir: Path | None = None) -> BlobBackend:
        """A new blob store instance, opened (staging its uploads under `data_dir`, default the backend's)."""
        blobs: BlobBackend
        if self.database_url:
            pool = await open_pool(self.database_url, component="registry")
            self._closers.append(pool.close)
            blobs = PostgresBlobStore(pool, (data_dir or self.data_dir) / "blobs" / "tmp")
        else:
            blobs = BlobStore((data_dir or self.data_dir) / "blobs")
        await blobs.open()
        self._closers.append(blobs.close)
        return blobs

    async def flip_byte(self, blob_digest: str, offset: int) -> None:
        """Corrupt the stored copy of a blob: flip the low bit of the byte at `offset`, behind the store's back."""
        hexdigest = blob_digest.removeprefix("sha256:")
        if not self.database_url:
            path = self.data_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest
            data = bytearray(path.read_bytes())
            data[offset] ^= 0x01
            path.write_bytes(bytes(data))
            return
        conn = await postgres.connect(self.database_url, "registry")
        try:
            changed = await conn.execute(
                "UPDATE blob_chunks c SET data = set_byte(c.data, $2 % o.chunk_bytes, "
                "get_byte(c.data, $2 % o.chunk_bytes) # 1) FROM blob_objects o "
                "WHERE o.digest = $1 AND o.quarantine_time_ns IS NULL AND c.object_id = o.id "
                "AND c.seq = $2 / o.chunk_bytes", blob_digest, offset)
        finally:
            await conn.close()
        assert changed == "UPDATE 1", changed

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()
        self._closers.clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """"" for sqlite and files; a PostgreSQL URL of this test alone (or the test is skipped, saying why)."""
    return str(request.getfixturevalue("postgres_url")) if request.param == "postgresql" else ""


@pytest.fixture
async def backend(backend_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
    """The registry's storage on each backend in turn, under tmp_path/registry (where `open_registry` runs)."""
    opened = Backend("postgresql" if backend_url else "sqlite", tmp_path / "registry", backend_url)
    yield opened
    await opened.close()
