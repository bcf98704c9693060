"""One process per data directory: an exclusive lock on `DIR/clawhub.lock`, held while the process runs.

Two registries (or two deployers) on one directory would each take its sqlite database and blobs for their
own: two route-table sources with disagreeing generations, settles racing each other. So the registry, the
deployer and `clawhub up` itself lock their directory before touching anything in it, and refuse to start
when another live process holds it, naming that process.

`flock(2)` locks belong to the open file, and the kernel drops them when the holder exits, however it exits
(kill -9 included): a lock is never stale, and there is nothing to clean up. The file's content only says
who holds it (pid, command line, since when), for the refusal's message; it is not the lock. The lock file
is opened close-on-exec, so a process the holder starts does not inherit it.

The executors' cache (`CLAWHUB_EXECUTOR_DATA_DIR`) takes no lock on purpose: `up --executors N` shares one
between its executors, and that is safe, because every entry is content-addressed, written under a
temporary name and renamed into place, and checked when read (see services/executor/artifacts.py and
bundles.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.runtime.server import StartupError

LOCK_FILE = "clawhub.lock"
# The holder writes its details right after taking the lock; a refused process that reads them in between
# sees an empty or stale file and looks again for this long.
_READ_PATIENCE_SECONDS = 1.0
_MAX_COMMAND_CHARS = 300


@dataclass(frozen=True)
class Holder:
    """Who holds a data directory, as it recorded itself."""

    pid: int
    command: str
    since: str

    def describe(self) -> str:
        alive = "" if _alive(self.pid) else ", no longer running (a process it started may hold the lock)"
        return f"pid {self.pid} ({self.command}), since {self.since}{alive}"


class DataDirInUse(StartupError):
    """Another live process holds the data directory."""

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


class DataDirLock:
    """A held lock; `release` (or `close`, as a ServiceHost closer) gives it up. Exiting does too."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd >= 0:
            # Closing drops the lock. The file stays: deleting it would let a process that opened it just
            # before lock an unlinked file while a third one locks a new file of the same name.
            os.close(self._fd)
            self._fd = -1

    async def close(self) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_data_dir(directory: Path, *, owner: str, variable: str) -> DataDirLock:
    """Lock `directory` (created if missing; mode 0700 either way, see `private_dir`) for this process, or
    raise DataDirInUse naming the holder.

    `owner` names the refused service in the message (`registry`), `variable` the setting that moves it
    to another directory."""
    private_dir(directory)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a lock file from an older version was 0644
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        who = holder.describe() if holder else "another process (it has not recorded its pid)"
        raise DataDirInUse(
            f"{owner}: data directory {directory} is in use by {who}; one directory serves one {owner} "
            f"at a time (two would corrupt each other's state). Stop that process, or set {variable} to "
            "another directory", holder) from None
    except BaseException:
        os.close(fd)
        raise
    record = json.dumps({"pid": os.getpid(), "command": _command_line(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode() + b"\n", 0)
    return DataDirLock(path, fd)


def private_dir(directory: Path) -> None:
    """Create `directory` with mode 0700, or take group and other access away from an existing one (the
    services' databases hold what other local users must not read: deploy-time secrets, tokens)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        directory.chmod(mode & 0o700)


def private_files(*paths: Path) -> None:
    """Mode 0600 (at most) for those of `paths` that exist, whatever the umask made them."""
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            path.chmod(mode & 0o600)


def holder_of(directory: Path) -> Holder | None:
    """Who holds `directory`'s lock now, or None when nobody does (for tools and tests)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> Holder | None:
    deadline = time.monotonic() + _READ_PATIENCE_SECONDS
    while True:
        holder = _parse(os.pread(fd, 4096, 0))
        if (holder is not None and _alive(holder.pid)) or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


def _parse(raw: bytes) -> Holder | None:
    try:
        data = json.loads(raw)
        return Holder(pid=int(data["pid"]), command=str(data["command"]), since=str(data["since"]))
    except (ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _command_line() -> str:
    # orig_argv keeps `python -m services.registry` as typed, where argv[0] would be a file path.
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    return command if len(command) <= _MAX_COMMAND_CHARS else command[:_MAX_COMMAND_CHARS] + "…"
