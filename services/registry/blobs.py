"""Content-addressed blob store on disk: `blobs/sha256/ab/<64 hex>`.

An upload is written to a temporary file in the directory of its expected digest while it is hashed, fsynced,
and only renamed into place (`os.replace`, atomic on one filesystem) once the caller has checked the digest
and verified the module, so a reader never sees a partial or unverified blob and a failed or interrupted
upload leaves nothing behind but a temporary file that the next start sweeps away. One registry process
owns a data directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import IO

log = logging.getLogger("clawhub.registry.blobs")

DOWNLOAD_CHUNK_BYTES = 256 * 1024
# Small client chunks are gathered before a disk write so one upload costs a few thread hops, not thousands.
_WRITE_BUFFER_BYTES = 1024 * 1024
_TMP_SUFFIX = ".tmp"


class BlobNotFound(LookupError):
    """No blob is stored under a digest."""


def _hex_of(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexdigest


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; without it a power loss can forget the new directory entry.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Blobs under `root`, addressed by `sha256:<hex>` digests."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._sha256 = root / "sha256"

    @property
    def root(self) -> Path:
        return self._root

    async def open(self) -> None:
        """Create the layout and remove temporary files an interrupted upload left behind."""
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        self._sha256.mkdir(parents=True, exist_ok=True)
        for tmp in self._sha256.glob(f"*/.*{_TMP_SUFFIX}"):
            log.info("removing the leftover of an interrupted upload: %s", tmp)
            tmp.unlink(missing_ok=True)

    def path_of(self, digest: str) -> Path:
        hexdigest = _hex_of(digest)
        return self._sha256 / hexdigest[:2] / hexdigest

    async def exists(self, digest: str) -> bool:
        return await asyncio.to_thread(self.path_of(digest).is_file)

    def upload(self, expected_hex: str) -> Upload:
        """A new upload, staged next to where a blob with the expected digest will live."""
        directory = self._sha256 / expected_hex[:2]
        return Upload(self, directory / f".{expected_hex}.{secrets.token_hex(8)}{_TMP_SUFFIX}")

    async def read(self, digest: str) -> BlobReader:
        """Open a blob for streaming; raises BlobNotFound before any byte is sent."""
        path = self.path_of(digest)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        return BlobReader(handle)


class BlobReader:
    """An open blob, read in chunks off the event loop."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    async def chunks(self, chunk_size: int = DOWNLOAD_CHUNK_BYTES) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await asyncio.to_thread(self._handle.read, chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            self._handle.close()

    def close(self) -> None:
        self._handle.close()


class Upload:
    """Bytes streamed into a temporary file and hashed on the way. Use as an async context manager: on exit,
    an upload that was not committed is removed."""

    def __init__(self, store: BlobStore, path: Path) -> None:
        self._store = store
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._handle: IO[bytes] | None = None
        self._done = False

    async def __aenter__(self) -> Upload:
        def create() -> IO[bytes]:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self.path.open("xb")

        self._handle = await asyncio.to_thread(create)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._done:
            # Also runs on cancellation (a client that went away): never leave a half upload behind.
            await asyncio.to_thread(self._discard_sync)

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= _WRITE_BUFFER_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        await asyncio.to_thread(self._write_sync, data)

    def _write_sync(self, data: bytes) -> None:
        assert self._handle is not None
        self._hash.update(data)
        self._handle.write(data)

    async def finish(self) -> str:
        """Flush and fsync everything received; returns the digest `sha256:<hex>` of the bytes."""
        await self._flush()

        def sync() -> None:
            assert self._handle is not None
            self._handle.flush()
            os.fsync(self._handle.fileno())

        await asyncio.to_thread(sync)
        return "sha256:" + self._hash.hexdigest()

    async def read_all(self) -> bytes:
        """The bytes received so far (after finish), for verification."""
        return await asyncio.to_thread(self.path.read_bytes)

    async def commit(self, digest: str) -> Path:
        """Move the finished upload into place under `digest` (which the caller has checked)."""
        final = self._store.path_of(digest)

        def move() -> None:
            assert self._handle is not None
            self._handle.close()
            final.parent.mkdir(parents=True, exist_ok=True)
            # Identical content may already be there (another skill with the same bytes): replacing it with
            # the same bytes is harmless and keeps this path simple.
            os.replace(self.path, final)
            _fsync_dir(final.parent)

        # Set first: once the move is under way (a thread finishes it even if this task is cancelled), the
        # exit handler must not delete the file from under it.
        self._done = True
        await asyncio.to_thread(move)
        return final

    def _discard_sync(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self.path.unlink(missing_ok=True)
        self._done = True
