"""Skill file bundles: fetched by digest, sha256 re-checked, unpacked once into a private read-only dir.

A bundle is an uncompressed tar of the skill's read-only files. It comes through the same `ModuleSource`
as modules (the registry's blob store) and is as untrusted: the bytes must hash to the digest, and the
archive may hold only regular files and directories with relative paths that stay inside the bundle
(no absolute paths, no `..`, no links, devices or fifos): one bad member refuses the whole bundle. The
unpacked tree is made read-only and renamed into place atomically, so a directory under its final name
is always complete; a restarted executor reuses it. The sandbox then preopens it read-only at `/skill`,
where wasmtime also refuses `..` and absolute paths.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import grpc

from services.executor.singleflight import SingleFlight
from services.executor.source import ModuleSource, fetch_verified
from services.runtime.bundle import path_problem
from services.runtime.errors import Reason, ServiceError

log = logging.getLogger("clawhub.executor.bundles")

# What `files` without a bundle sees at /skill: an empty read-only directory.
EMPTY = "empty"
# A bundle is a handful of data files; this many entries is an attack on the executor's disk, not data.
MAX_MEMBERS = 10_000


class BundleRejected(Exception):
    """The archive is not a safe bundle; the message says why."""


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """The registry verified the bundle; this re-check before unpacking uses the same rules."""
    if problem := path_problem(member.name):
        return problem
    if member.issparse() or not member.isreg():
        return f"{member.name!r} is not a regular file (directories, links, devices and fifos are refused)"
    return None


def unpack(data: bytes, target: Path) -> None:
    """Unpack the tar `data` into the new directory `target` and make it read-only. Raises
    BundleRejected, leaving nothing behind."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                members = archive.getmembers()
                if len(members) > MAX_MEMBERS:
                    raise BundleRejected(f"{len(members)} entries; a bundle holds at most {MAX_MEMBERS}")
                for member in members:
                    problem = _member_problem(member)
                    if problem:
                        raise BundleRejected(problem)
                # The data filter re-checks paths and links and drops modes we would not want.
                archive.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise BundleRejected(f"not a readable tar archive: {exc}") from None
        _make_read_only(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # another process unpacking the same digest won the race
                raise
            _remove(tmp)
    except BaseException:
        _remove(tmp)
        raise


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o555)
    os.chmod(root, 0o555)


def _remove(path: Path) -> None:
    """Delete a (possibly read-only) tree, best effort."""
    if not path.exists():
        return
    for dirpath, _, _ in os.walk(path):
        try:
            os.chmod(dirpath, 0o755)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


class BundleCache:
    """Unpacked bundles by digest under `directory`; concurrent requests for one digest share a load."""

    def __init__(self, source: ModuleSource, directory: Path) -> None:
        self._source = source
        self.directory = directory
        self._loading: SingleFlight[str, Path] = SingleFlight()
        # Digests known to be unpacked, so a call costs no filesystem check.
        self._ready: set[str] = set()

    def path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.directory / f"{algorithm}-{hexdigest}"

    async def empty(self) -> Path:
        path = self.directory / EMPTY
        if not path.is_dir():
            await asyncio.to_thread(unpack, _EMPTY_TAR, path)
        return path

    async def get(self, digest: str) -> Path:
        """The host directory holding the bundle `digest`. Raises ServiceError (NOT_FOUND,
        INVALID_ARGUMENT, UNAVAILABLE, DATA_LOSS)."""
        path = self.path(digest)
        if digest in self._ready:
            return path
        if path.is_dir():  # unpacked by an earlier process
            self._ready.add(digest)
            return path
        return await self._loading.do(digest, lambda: self._load(digest, path))

    async def _load(self, digest: str, path: Path) -> Path:
        data = await fetch_verified(self._source, digest, what="bundle", key="bundle_digest")
        try:
            await asyncio.to_thread(unpack, data, path)
        except BundleRejected as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MODULE_INVALID,
                               f"the file bundle {digest} is refused: {exc}",
                               metadata={"bundle_digest": digest, "problems": str(exc)[:1024]}) from None
        log.info("unpacked bundle %s (%d bytes)", digest[:19], len(data))
        self._ready.add(digest)
        return path

    async def close(self) -> None:
        await self._loading.close()


def _empty_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:"):
        pass
    return buffer.getvalue()


_EMPTY_TAR = _empty_tar()
