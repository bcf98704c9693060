"""Registry blobs in PostgreSQL, the store every registry replica shares when a database is configured.

A blob is content-addressed as on disk: one row of `blob_objects` per stored copy of a digest (its size and
chunk size), its bytes in `blob_chunks` rows of CHUNK_BYTES. Uploads are staged in local temporary files
exactly as for the file store (blobs.StagingStore), and placed in one transaction once verified, so no
replica ever reads a partial or unverified blob.

Reads are checked as on disk (blobs.BlobReader): every read of a whole blob hashes it on the way and holds
its last chunk back until the digest is confirmed, and a mismatch (a chunk edited, truncated or missing)
raises BlobCorrupt, which the integrity checks handle as for a file: the copy is quarantined (its row marked
with the time, kept as evidence, never deleted) and recorded, and a publish of the same bytes puts a verified
copy back. A reader holds no connection between chunks: each chunk is one query for a slice of one chunk row
(stored uncompressed, so the slice reads only its pages), at most blobs.MAX_CONCURRENT_READS at once; a
copy replaced or quarantined between two chunks fails the read with BlobChanged, as a replaced file does.

Placing and quarantining a digest take a transaction-level advisory lock on it, so that replicas repairing
and quarantining the same blob at once are serialized as the file store's per-digest locks serialize them in
one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import IO, Any

import asyncpg

from services.registry.blobs import (
    TMP_SUFFIX,
    BlobChanged,
    BlobCheck,
    BlobCondition,
    BlobNotFound,
    BlobReader,
    FileIdentity,
    StagingStore,
    checked,
    hex_of,
)
from services.registry.pgstore import COMPONENT, MIGRATIONS
from services.runtime.postgres import migrate

# Bytes per chunk row.
CHUNK_BYTES = 1024 * 1024
_LOCK = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':clawhub-blob:' || $1))"
_LIVE = "SELECT id, size_bytes, chunk_bytes FROM blob_objects WHERE digest = $1 AND quarantine_time_ns IS NULL"


def where_quarantined(object_id: int) -> str:
    """Where a quarantined copy stays, as the quarantine record names it."""
    return f"postgresql:blob_objects/{object_id}"


class PostgresBlobStore(StagingStore):
    """Blobs in the tables `blob_objects` and `blob_chunks` of `pool`'s database (the registry's schema,
    services/registry/pgstore.py), uploads staged under `tmp` on this machine."""

    def __init__(self, pool: asyncpg.Pool, tmp: Path) -> None:
        super().__init__(tmp)
        self._pool = pool

    async def open(self) -> None:
        """Migrate the registry's schema (nothing when the metadata store did it), create the staging directory
        and remove temporary files an interrupted upload left behind."""
        await migrate(self._pool, COMPONENT, MIGRATIONS)
        await asyncio.to_thread(self._sweep_tmp)

    async def exists(self, digest: str) -> bool:
        hex_of(digest)
        async with self._pool.acquire() as conn:
            return await conn.fetchrow(_LIVE, digest) is not None

    async def existing(self, digests: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(digests))
        for digest in wanted:
            hex_of(digest)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT digest FROM blob_objects WHERE digest = ANY($1::text[]) "
                                    "AND quarantine_time_ns IS NULL", wanted)
        return {str(row[0]) for row in rows}

    async def read(self, digest: str) -> BlobReader:
        hex_of(digest)
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_LIVE, digest)
        if row is None:
            raise BlobNotFound(digest)
        return PostgresBlobReader(self._pool, digest, (int(row["id"]), 0), int(row["chunk_bytes"]), self._reads)

    async def check(self, digest: str) -> BlobCheck:
        hex_of(digest)
        hasher = hashlib.sha256()
        size = 0
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(_LIVE, digest)
            if row is None:
                return BlobCheck(digest, BlobCondition.MISSING)
            async for data in _chunks_of(conn, int(row["id"])):
                await asyncio.to_thread(hasher.update, data)
                size += len(data)
        return checked(digest, hasher, size, (int(row["id"]), 0))

    async def stored(self) -> list[str]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT digest FROM blob_objects WHERE quarantine_time_ns IS NULL ORDER BY digest")
        return [str(row[0]) for row in rows]

    @contextlib.asynccontextmanager
    async def local_file(self, digest: str) -> AsyncIterator[Path]:
        path = self._tmp / f"{hex_of(digest)}.{secrets.token_hex(8)}.copy{TMP_SUFFIX}"
        try:
            async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(_LIVE, digest)
                if row is None:
                    raise BlobNotFound(digest)
                handle: IO[bytes] = await asyncio.to_thread(path.open, "xb")
                try:
                    async for data in _chunks_of(conn, int(row["id"])):
                        await asyncio.to_thread(handle.write, data)
                finally:
                    await asyncio.to_thread(handle.close)
            yield path
        finally:
            await asyncio.to_thread(path.unlink, True)

    async def quarantine(self, digest: str, identity: FileIdentity | None,
                         moved: Callable[[str], Awaitable[None]] | None = None) -> str | None:
        """Mark the live copy of `digest` quarantined (kept as evidence); see BlobBackend.quarantine. `moved`
        runs inside the transaction, under the digest's lock: a repair on any replica comes after it."""
        hex_of(digest)

        async def work() -> str | None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(_LOCK, digest)
                row = await conn.fetchrow(_LIVE, digest)
                if row is None or (identity is not None and (int(row["id"]), 0) != identity):
                    return None
                await conn.execute("UPDATE blob_objects SET quarantine_time_ns = $2 WHERE id = $1", row["id"],
                                   time.time_ns())
                where = where_quarantined(int(row["id"]))
                if moved is not None:
                    await moved(where)
                return where

        return await self._shielded(work)

    async def _place(self, staged: Path, digest: str) -> None:
        hex_of(digest)

        async def work() -> None:
            try:
                handle: IO[bytes] = await asyncio.to_thread(staged.open, "rb")
                try:
                    size = (await asyncio.to_thread(staged.stat)).st_size
                    async with self._pool.acquire() as conn, conn.transaction():
                        await conn.execute(_LOCK, digest)
                        # What was there (identical bytes, or a copy corrupt without anyone knowing yet) goes;
                        # a quarantined copy stays, as evidence.
                        await conn.execute("DELETE FROM blob_objects WHERE digest = $1 AND quarantine_time_ns IS NULL",
                                           digest)
                        object_id = await conn.fetchval(
                            "INSERT INTO blob_objects (digest, size_bytes, chunk_bytes, create_time_ns) "
                            "VALUES ($1, $2, $3, $4) RETURNING id", digest, size, CHUNK_BYTES, time.time_ns())
                        seq = 0
                        while data := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                            await conn.execute("INSERT INTO blob_chunks (object_id, seq, data) VALUES ($1, $2, $3)",
                                               object_id, seq, data)
                            seq += 1
                finally:
                    await asyncio.to_thread(handle.close)
            finally:
                await asyncio.to_thread(staged.unlink, True)

        await self._shielded(work)


async def _chunks_of(conn: asyncpg.Connection, object_id: int) -> AsyncIterator[bytes]:
    """The chunk rows of a copy in order, one at a time (inside a transaction)."""
    async for row in conn.cursor("SELECT data FROM blob_chunks WHERE object_id = $1 ORDER BY seq", object_id,
                                 prefetch=1):
        yield bytes(row[0])


class PostgresBlobReader(BlobReader):
    """A blob in PostgreSQL: each chunk is one query for a slice of one chunk row; nothing is held between."""

    def __init__(self, pool: asyncpg.Pool, digest: str, identity: FileIdentity, chunk_bytes: int,
                 reads: asyncio.Semaphore | None = None) -> None:
        super().__init__(digest, identity, reads)
        self._pool = pool
        self._chunk_bytes = chunk_bytes

    async def _read_at(self, offset: int, size: int, hasher: Any) -> tuple[bytes, int]:
        seq, within = divmod(offset, self._chunk_bytes)
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT o.size_bytes, substring(c.data FROM $3 FOR $4) AS data FROM blob_objects o "
                "LEFT JOIN blob_chunks c ON c.object_id = o.id AND c.seq = $2 "
                "WHERE o.id = $1 AND o.quarantine_time_ns IS NULL",
                self.identity[0], seq, within + 1, min(size, self._chunk_bytes - within))
        if row is None:
            raise BlobChanged(self.digest)
        # A missing chunk row reads as nothing: the end comes early and the digest check fails.
        data = bytes(row["data"]) if row["data"] is not None else b""
        hasher.update(data)
        return data, int(row["size_bytes"])
