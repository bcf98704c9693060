"""File bundles: the read-only files a skill ships, as one uncompressed tar.

The CLI builds the bundle deterministically (entries sorted by path, mtime 0, uid/gid 0, no user or group
names, mode 0444, regular files only, no directory entries), so the same files always give the same bytes
and the same digest. The registry checks a bundle against the manifest's `files` before storing it; the
executor unpacks it read-only under `/skill` (`wasm.BUNDLE_GUEST_DIR`), creating parent directories itself.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

FILE_MODE = 0o444
MAX_PATH_LENGTH = 1024
_READ_CHUNK = 256 * 1024


class DeclaredFile(Protocol):
    """What a manifest says about one bundled file (clawhub.common.v1.BundledFile)."""

    @property
    def path(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def digest(self) -> str: ...


@dataclass(frozen=True)
class BundleEntry:
    """One file found in a bundle."""

    path: str
    size_bytes: int
    digest: str


def path_problem(path: str) -> str | None:
    """Why `path` is not a safe bundle path (relative, `/`-separated, no `.`/`..`/empty parts), or None."""
    if not path:
        return "the path is empty"
    if len(path) > MAX_PATH_LENGTH:
        return f"the path is longer than {MAX_PATH_LENGTH} characters"
    if "\0" in path or "\\" in path:
        return f"{path!r} contains a NUL or a backslash; use `/` between directories"
    if path.startswith("/"):
        return f"{path!r} is absolute; paths are relative to the skill directory"
    parts = path.split("/")
    if ".." in parts:
        return f"{path!r} contains `..`; a bundled file must stay inside the skill directory"
    if any(part in ("", ".") for part in parts):
        return f"{path!r} is not a plain relative path (no empty or `.` parts), such as data/words.txt"
    return None


def file_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(files: Mapping[str, bytes]) -> bytes:
    """The deterministic uncompressed tar of `files` (bundle path → content)."""
    buffer = io.BytesIO()
    # PAX keeps long and non-ASCII names exact; with mtime 0 and no user names its headers are deterministic.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            problem = path_problem(path)
            if problem:
                raise ValueError(problem)
            data = files[path]
            info = tarfile.TarInfo(path)
            info.type = tarfile.REGTYPE
            info.size = len(data)
            info.mtime = 0
            info.mode = FILE_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_entries(path: Path) -> tuple[list[BundleEntry], list[str]]:
    """The files in the bundle at `path`, hashed, and the problems found (not a plain tar, entries that are
    not regular files, unsafe or repeated paths). Reads the archive in a streaming way; never raises for bad
    input."""
    entries: list[BundleEntry] = []
    problems: list[str] = []
    seen: set[str] = set()
    try:
        # "r:" accepts only an uncompressed archive: a compressed one is refused, not unpacked.
        with tarfile.open(name=path, mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isreg():
                    problems.append(f"bundle entry {name!r} is not a regular file (only files may be bundled: "
                                    "no directories, links or devices)")
                    continue
                if problem := path_problem(name):
                    problems.append(f"bundle entry {name[:200]!r}: {problem}")
                    continue
                if name in seen:
                    problems.append(f"bundle entry {name!r} appears more than once")
                    continue
                seen.add(name)
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - isreg() members always have content
                    problems.append(f"bundle entry {name!r} cannot be read")
                    continue
                sha = hashlib.sha256()
                size = 0
                while chunk := handle.read(_READ_CHUNK):
                    sha.update(chunk)
                    size += len(chunk)
                entries.append(BundleEntry(name, size, "sha256:" + sha.hexdigest()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return entries, [*problems, f"the bundle is not a valid uncompressed tar archive: {detail}"]
    return entries, problems


def problems(path: Path, declared: Sequence[DeclaredFile]) -> list[str]:
    """Why the bundle at `path` does not hold exactly the manifest's `files`; empty when it does."""
    entries, found = read_entries(path)
    if found:
        return found
    result: list[str] = []
    actual = {e.path: e for e in entries}
    expected = {f.path: f for f in declared}
    for name in sorted(set(actual) - set(expected)):
        result.append(f"bundle entry {name!r} is not listed in the manifest's files")
    for name in sorted(set(expected) - set(actual)):
        result.append(f"the manifest lists file {name!r}, which the bundle does not contain")
    for name in sorted(set(expected) & set(actual)):
        want, got = expected[name], actual[name]
        if want.size_bytes != got.size_bytes:
            result.append(f"bundled file {name!r} is {got.size_bytes} bytes, the manifest says {want.size_bytes}")
        elif want.digest != got.digest:
            result.append(f"bundled file {name!r} has digest {got.digest}, the manifest says {want.digest}")
    return result
