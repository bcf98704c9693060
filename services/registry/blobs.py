"""Content-addressed blob stores: `BlobStore`, on disk (`blobs/sha256/ab/<64 hex>`), the default; and
`services/registry/pgblobs.py`'s, in PostgreSQL, which every registry replica shares. Both stage uploads the
same way (below, `StagingStore` and `Upload`), check every read of a whole blob the same way (`BlobReader`),
and answer the same `BlobBackend` interface, which is all the servicer and the integrity checks use.

An upload is gathered in memory and written to a temporary file under `blobs/tmp/` only once it outgrows a
small buffer (so a stream that stalls after its metadata holds no file descriptor and no file), hashed on the
way, fsynced, and only renamed into place (`os.replace`, atomic on one filesystem) once the caller has checked
the digest and verified the module, so a reader never sees a partial or unverified blob. An upload that fails,
is cancelled or times out removes its temporary file on the way out; a killed process leaves one that the next
start sweeps away. One registry process owns a data directory.

Bytes on disk can still rot, be truncated or be edited. Every read of a whole blob hashes it on the way
(`BlobReader.chunks` holds its last chunk back until the digest is confirmed), and a blob that fails is moved
to `blobs/quarantine/` (kept as evidence, never deleted) by `quarantine`; a publish of the same bytes puts
verified bytes back with `Upload.commit`.

A reader holds no file descriptor between chunks: each chunk is read with its own open, pread and close, so a
download whose client stops reading costs no descriptor however long it stalls (hundreds of stalled downloads
once ran the registry out of them). At most `MAX_CONCURRENT_READS` chunks are read at once, so readers never
hold more descriptors than that together (they come out of the reserve that limits.DescriptorBudget keeps).
Each open checks that the file is still the one `read` found; when a repair or a quarantine has
replaced it between two chunks, the read fails with BlobChanged rather than mix bytes of two files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeVar

from services.runtime.names import DIGEST_RE, SHA256_HEX_RE

log = logging.getLogger("clawhub.registry.blobs")

T = TypeVar("T")

# Small, so that a download whose client stopped reading holds little: the chunk being written is held in
# several copies (the chunk, the message, its encoding, gRPC's buffers). Measured per stalled download: about
# 320 KB at this size, 1.3 MB at 256 KiB; a 32 MiB blob still streams in a quarter of a second.
DOWNLOAD_CHUNK_BYTES = 64 * 1024
# Chunks read at once by every reader together: each holds a file descriptor while it reads.
MAX_CONCURRENT_READS = 8
# Small client chunks are gathered before a disk write so one upload costs a few thread hops, not thousands;
# an upload no larger than this never touches the disk before `finish`.
WRITE_BUFFER_BYTES = 1024 * 1024
_HASH_CHUNK_BYTES = 1024 * 1024
TMP_SUFFIX = ".tmp"
# Locks serializing the moves of one digest's file (placing verified bytes, quarantining corrupt ones):
# striped, so their number stays bounded however many blobs there are.
_LOCK_STRIPES = 64


class BlobNotFound(LookupError):
    """No blob is stored under a digest."""


FileIdentity = tuple[int, int]
"""Which stored copy of a blob was read, to tell whether the one stored now is still it: (device, inode) of a
file; (object id, 0) of a copy in PostgreSQL."""


class BlobChanged(Exception):
    """The stored copy of a blob was replaced or moved away (repaired, quarantined) while it was being read."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} was replaced while it was being read")
        self.digest = digest


class BlobCorrupt(Exception):
    """The bytes stored under a digest hash to another digest."""

    def __init__(self, digest: str, actual: str, size: int, identity: FileIdentity | None) -> None:
        super().__init__(f"blob {digest} holds {size} bytes that hash to {actual}")
        self.digest = digest
        self.actual = actual
        self.size = size
        self.identity = identity


class BlobCondition(StrEnum):
    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class BlobCheck:
    """What hashing a stored blob found."""

    digest: str
    condition: BlobCondition
    size: int = 0
    actual: str = ""
    identity: FileIdentity | None = None

    def corrupt(self) -> BlobCorrupt:
        return BlobCorrupt(self.digest, self.actual, self.size, self.identity)


def hex_of(digest: str) -> str:
    """The hex part of `sha256:<64 hex>`; ValueError for anything else (so no digest can name another path)."""
    if not DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return digest[len("sha256:"):]


def _fsync_dir(path: Path) -> None:
    # Makes a rename itself durable; without it a power loss can forget the new directory entry.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(stat: os.stat_result) -> FileIdentity:
    return (stat.st_dev, stat.st_ino)


class BlobBackend(Protocol):
    """What the servicer and the integrity checks need from a blob store (on disk or in PostgreSQL)."""

    async def open(self) -> None:
        """Prepare the store; remove what interrupted uploads left behind."""
        ...

    async def close(self) -> None: ...

    async def exists(self, digest: str) -> bool: ...

    async def existing(self, digests: Iterable[str]) -> set[str]:
        """Which of `digests` are stored."""
        ...

    def upload(self, expected_hex: str) -> Upload: ...

    async def read(self, digest: str) -> BlobReader:
        """A reader of a stored blob; raises BlobNotFound before any byte is sent."""
        ...

    async def check(self, digest: str) -> BlobCheck:
        """Hash the blob stored under `digest`: OK, MISSING or CORRUPT (with what it hashes to)."""
        ...

    async def stored(self) -> list[str]:
        """The digest of every stored blob, in order."""
        ...

    async def quarantine(self, digest: str, identity: FileIdentity | None,
                         moved: Callable[[str], Awaitable[None]] | None = None) -> str | None:
        """Set the copy of `digest` found corrupt (`identity`) aside, kept as evidence, and return where it
        went; None when it is gone or no longer that copy. `moved` runs after the move, under the same lock."""
        ...

    def local_file(self, digest: str) -> contextlib.AbstractAsyncContextManager[Path]:
        """A file holding the stored bytes of `digest`, as stored (for checks that read a path: a bundle's)."""
        ...


class StagingStore(ABC):
    """What both stores share: uploads staged in local temporary files under `tmp`, and the file and database
    work that must finish even when the task that started it is cancelled. A store places a finished upload
    with `_place`."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._reads = asyncio.Semaphore(MAX_CONCURRENT_READS)
        # Work that must finish even when the task that started it is cancelled (removing a temporary file, a
        # rename or a transaction under a lock): strong references until done, awaited by `close`.
        self._background: set[asyncio.Task[Any]] = set()

    def _sweep_tmp(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        for tmp in self._tmp.glob(f"*{TMP_SUFFIX}"):
            log.info("removing the leftover of an interrupted upload: %s", tmp)
            tmp.unlink(missing_ok=True)

    async def close(self) -> None:
        """Wait for the work still running in the background (cleanups of cancelled uploads)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _in_background(self, work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _shielded(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `work` to its end even when the caller is cancelled."""
        return await asyncio.shield(self._in_background(work))

    def upload(self, expected_hex: str) -> Upload:
        """A new upload of bytes expected to hash to `expected_hex` (named after it, for whoever looks)."""
        if not SHA256_HEX_RE.fullmatch(expected_hex):
            raise ValueError(f"not a sha256: {expected_hex[:80]!r}")
        return Upload(self, self._tmp / f"{expected_hex}.{secrets.token_hex(8)}{TMP_SUFFIX}")

    @abstractmethod
    async def _place(self, staged: Path, digest: str) -> None:
        """Put the finished upload staged at `staged` in place under `digest`, replacing what is there, and
        remove `staged` (also when placing fails). Runs to its end even when the caller is cancelled."""


class BlobStore(StagingStore):
    """Blobs under `root`, addressed by `sha256:<hex>` digests."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "tmp")
        self._root = root
        self._sha256 = root / "sha256"
        self._quarantine = root / "quarantine"
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    @property
    def root(self) -> Path:
        return self._root

    @property
    def quarantine_dir(self) -> Path:
        return self._quarantine

    async def open(self) -> None:
        """Create the layout and remove temporary files an interrupted upload left behind."""
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        for directory in (self._sha256, self._quarantine):
            directory.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()
        # Where earlier versions staged uploads (beside their final place).
        for tmp in self._sha256.glob(f"*/.*{TMP_SUFFIX}"):
            log.info("removing the leftover of an interrupted upload: %s", tmp)
            tmp.unlink(missing_ok=True)

    def path_of(self, digest: str) -> Path:
        hexdigest = hex_of(digest)
        return self._sha256 / hexdigest[:2] / hexdigest

    def _lock(self, digest: str) -> asyncio.Lock:
        return self._locks[int(hex_of(digest)[:2], 16) % _LOCK_STRIPES]

    async def exists(self, digest: str) -> bool:
        return await asyncio.to_thread(self.path_of(digest).is_file)

    async def existing(self, digests: Iterable[str]) -> set[str]:
        """Which of `digests` are stored (one thread hop for all of them)."""
        wanted = list(dict.fromkeys(digests))
        return await asyncio.to_thread(lambda: {d for d in wanted if self.path_of(d).is_file()})

    async def read(self, digest: str) -> BlobReader:
        """A reader of a stored blob; raises BlobNotFound before any byte is sent. It holds no open file."""
        path = self.path_of(digest)
        try:
            identity = await asyncio.to_thread(lambda: _identity(os.stat(path)))
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        return FileBlobReader(path, digest, identity, self._reads)

    @contextlib.asynccontextmanager
    async def local_file(self, digest: str) -> AsyncIterator[Path]:
        yield self.path_of(digest)

    async def check(self, digest: str) -> BlobCheck:
        """Hash the blob stored under `digest`: OK, MISSING or CORRUPT (with what it hashes to)."""
        path = self.path_of(digest)

        def hash_file() -> BlobCheck:
            hasher = hashlib.sha256()
            size = 0
            try:
                with path.open("rb") as handle:
                    identity = _identity(os.fstat(handle.fileno()))
                    while chunk := handle.read(_HASH_CHUNK_BYTES):
                        hasher.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                return BlobCheck(digest, BlobCondition.MISSING)
            return checked(digest, hasher, size, identity)

        return await asyncio.to_thread(hash_file)

    async def stored(self) -> list[str]:
        """The digest of every stored blob, in order."""
        def scan() -> list[str]:
            found = []
            for directory in sorted(self._sha256.iterdir()):
                if directory.is_dir():
                    found += ["sha256:" + p.name for p in sorted(directory.iterdir())
                              if SHA256_HEX_RE.fullmatch(p.name) and p.is_file()]
            return found

        return await asyncio.to_thread(scan)

    async def quarantine(self, digest: str, identity: FileIdentity | None,
                         moved: Callable[[str], Awaitable[None]] | None = None) -> str | None:
        """Move the blob stored under `digest` to the quarantine directory, kept as evidence; returns where it
        went. None when there is nothing to move: the file is gone, or it is no longer the file that was found
        corrupt (`identity`), because a publish has put verified bytes in its place meanwhile.

        `moved` (recording the quarantine) runs after the move under the same lock: a repair, which takes the
        lock to put verified bytes back, then always comes after the record it closes."""
        path = self.path_of(digest)
        target = self._quarantine / f"{hex_of(digest)}.{time.time_ns()}"

        def move() -> str | None:
            try:
                current = _identity(os.stat(path))
            except FileNotFoundError:
                return None
            if identity is not None and current != identity:
                return None
            os.replace(path, target)
            _fsync_dir(path.parent)
            _fsync_dir(target.parent)
            return str(target)

        async def then(target: str | None) -> None:
            if target is not None and moved is not None:
                await moved(target)

        return await self._locked(digest, move, then)

    async def _place(self, staged: Path, digest: str) -> None:
        final = self.path_of(digest)

        def move() -> None:
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
            except BaseException:
                staged.unlink(missing_ok=True)
                raise
            _fsync_dir(final.parent)

        await self._locked(digest, move)

    async def _locked(self, digest: str, fn: Callable[[], T],
                      then: Callable[[T], Awaitable[None]] | None = None) -> T:
        """Run `fn` in a thread under the digest's lock, then `then` with its result under the same lock. Both
        run to their end even when the caller is cancelled, and the lock is held until then: a move is never
        half-known to the next one."""
        lock = self._lock(digest)

        async def work() -> T:
            async with lock:
                result = await asyncio.to_thread(fn)
                if then is not None:
                    await then(result)
                return result

        return await self._shielded(work)


def checked(digest: str, hasher: Any, size: int, identity: FileIdentity | None) -> BlobCheck:
    """What hashing the `size` stored bytes of `digest` into `hasher` found: OK or CORRUPT."""
    actual = "sha256:" + hasher.hexdigest()
    condition = BlobCondition.OK if actual == digest else BlobCondition.CORRUPT
    return BlobCheck(digest, condition, size, actual, identity)


class BlobReader(ABC):
    """A stored blob, read in chunks and checked against its digest on the way. It holds nothing between
    chunks (no open file, no database connection): each chunk is read on its own (`_read_at`), at most
    MAX_CONCURRENT_READS at once in a store."""

    def __init__(self, digest: str, identity: FileIdentity, reads: asyncio.Semaphore | None = None) -> None:
        self.digest = digest
        self.identity = identity
        self._reads = reads or asyncio.Semaphore(MAX_CONCURRENT_READS)

    @abstractmethod
    async def _read_at(self, offset: int, size: int, hasher: Any) -> tuple[bytes, int]:
        """Up to `size` bytes at `offset` (added to `hasher`), and the size of the blob now; BlobChanged when
        the copy that `read` found is no longer the stored one."""

    async def chunks(self, chunk_size: int = DOWNLOAD_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The blob's bytes. The last chunk (the one that reaches the end of the blob) is held back until the
        whole blob has hashed to its digest, so a reader never gets a complete corrupt blob: on a mismatch it
        gets BlobCorrupt instead (having received strictly fewer bytes than the blob holds; none for a blob of
        one chunk). BlobChanged when the blob is replaced or moved away meanwhile (a repair or a quarantine:
        reading again gives the answer). Nothing is read ahead: a reader whose consumer stalls holds no chunk
        besides the one it handed over."""
        hasher = hashlib.sha256()
        offset = 0
        while True:
            async with self._reads:
                data, total = await self._read_at(offset, chunk_size, hasher)
            offset += len(data)
            if data and offset < total:
                yield data
                continue
            # The end of the blob: one edited in place (longer, shorter or other bytes) fails here.
            actual = "sha256:" + hasher.hexdigest()
            if actual != self.digest or offset != total:
                raise BlobCorrupt(self.digest, actual, offset, self.identity)
            if data:
                yield data
            return

    async def read_all(self) -> bytes:
        """Every byte, checked (raises BlobCorrupt and BlobChanged like `chunks`)."""
        return b"".join([chunk async for chunk in self.chunks()])


class FileBlobReader(BlobReader):
    """A blob on disk: each chunk is read with its own open, pread and close (see the module docstring)."""

    def __init__(self, path: Path, digest: str, identity: FileIdentity,
                 reads: asyncio.Semaphore | None = None) -> None:
        super().__init__(digest, identity, reads)
        self._path = path

    def _pread(self, offset: int, size: int) -> tuple[bytes, int]:
        """Up to `size` bytes at `offset`, and the size of the file now."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobChanged(self.digest) from None
        try:
            stat = os.fstat(fd)
            if _identity(stat) != self.identity:
                raise BlobChanged(self.digest)
            return os.pread(fd, size, offset), stat.st_size
        finally:
            os.close(fd)

    async def _read_at(self, offset: int, size: int, hasher: Any) -> tuple[bytes, int]:
        def read_and_hash() -> tuple[bytes, int]:
            data, file_size = self._pread(offset, size)
            hasher.update(data)  # in the thread too: hashlib releases the GIL on large inputs
            return data, file_size

        return await asyncio.to_thread(read_and_hash)


class Upload:
    """Bytes received, hashed on the way and staged in a temporary file. Use as an async context manager: on
    exit, an upload that was not committed is removed, whatever the reason (error, cancellation, timeout).

    The temporary file is created only when the bytes outgrow the write buffer (or at `finish`), and closed at
    `finish`: an upload holds at most one file descriptor, and none while it waits for bytes under the buffer.
    Every file operation runs in a thread that is allowed to finish even when the upload's task is cancelled;
    the removal waits for it, so a file opened just as the client went away is still removed."""

    def __init__(self, store: StagingStore, path: Path) -> None:
        self._store = store
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._handle: IO[bytes] | None = None
        self._spilled = False
        self._digest = ""
        # The whole content, when it fit in the buffer: verification reads it from memory, not from disk.
        self._data: bytes | None = None
        self._pending: asyncio.Future[object] | None = None
        self._done = False

    async def __aenter__(self) -> Upload:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._done:
            return
        self._done = True
        pending = self._pending

        async def discard() -> None:
            if pending is not None:
                await asyncio.wait([pending])
            await asyncio.to_thread(self._discard_sync)

        # In the background and shielded: a second cancellation of this task must not stop the removal.
        await asyncio.shield(self._store._in_background(discard))

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        future: asyncio.Future[T] = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._pending = future  # type: ignore[assignment]
        return await asyncio.shield(future)

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= WRITE_BUFFER_BYTES:
            data = self._take()
            self._spilled = True
            await self._run(self._write_sync, data)

    def _take(self) -> bytes:
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        return data

    def _write_sync(self, data: bytes) -> None:
        if self._handle is None:
            self._handle = self.path.open("xb")
        self._hash.update(data)
        self._handle.write(data)

    async def finish(self) -> str:
        """Write and fsync everything received and close the file; returns the digest `sha256:<hex>` of the
        bytes. Calling it again returns the same digest."""
        if self._digest:
            return self._digest
        data = self._take()
        if not self._spilled:
            self._data = data

        def sync() -> None:
            self._write_sync(data)
            assert self._handle is not None
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

        await self._run(sync)
        self._digest = "sha256:" + self._hash.hexdigest()
        return self._digest

    async def read_all(self) -> bytes:
        """The bytes received (after finish), for verification."""
        if self._data is not None:
            return self._data
        return await self._run(self.path.read_bytes)

    async def commit(self, digest: str) -> None:
        """Put the finished upload in place under `digest` (which the caller has checked), replacing what is
        there: identical bytes of another skill (harmless), or a corrupt or missing blob (the repair)."""
        assert self._digest, "finish() first"
        # Set first: once placing is under way (it finishes even if this task is cancelled), the exit handler
        # must not delete the file from under it; a placing that fails removes the file itself.
        self._done = True
        await self._store._place(self.path, digest)

    def _discard_sync(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
        self.path.unlink(missing_ok=True)
