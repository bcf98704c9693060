"""The warm tier: precompiled modules on disk, so a restarted executor skips fetching and compiling.

An artifact is `Module.serialize()` output under a name made of the module digest and a hash of
everything that makes native code incompatible (wasmtime version, engine settings, CPU architecture), so
an upgraded executor or a changed engine never even opens an old file: it simply misses.

`Module.deserialize` trusts its input (it maps native code), so each file starts with the sha256 of the
rest (then the size of the original module, for the hot cache's accounting) and is verified before
deserializing (which is why this reads the file rather than using `deserialize_file`): a truncated or
corrupted artifact is deleted and the module recompiled, never run. Files are written to a temporary
name and renamed, so readers never see half a file. The directory belongs to the executor: anyone who
can write to it can run code in the executor.

A component (`component-v1`) is stored the same way, with bit 63 of the size set (`COMPONENT_FLAG`); `load`
hands it back verified but not deserialized (`SerializedComponent`): the sandbox's component runner
deserializes it with its own engine (services/executor/components.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import struct
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import wasmtime
from wasmtime import component as wc

log = logging.getLogger("clawhub.executor.artifacts")

SUFFIX = ".cwasm"
_HASH_BYTES = 32
_SIZE = struct.Struct("<Q")
COMPONENT_FLAG = 1 << 63


@dataclass(frozen=True)
class SerializedComponent:
    """A verified component artifact (`Component.serialize()` output), for `Sandbox.link` to deserialize."""

    data: bytes


def _wasmtime_version() -> str:
    try:
        return metadata.version("wasmtime")
    except metadata.PackageNotFoundError:  # pragma: no cover - wasmtime is always installed here
        return "unknown"


def engine_fingerprint(engine_settings: str) -> str:
    """16 hex digits naming the wasmtime version, engine settings and machine an artifact is for."""
    text = f"wasmtime={_wasmtime_version()};machine={platform.machine()};{engine_settings}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ArtifactCache:
    """Serialized modules by digest for one engine configuration, in `directory`."""

    def __init__(self, directory: Path, engine_settings: str) -> None:
        self.directory = directory
        self.fingerprint = engine_fingerprint(engine_settings)

    def path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.directory / f"{algorithm}-{hexdigest}-{self.fingerprint}{SUFFIX}"

    def load(self, engine: wasmtime.Engine, digest: str) -> tuple[wasmtime.Module | SerializedComponent, int] | None:
        """The module stored for `digest` and the size of its original bytes, or None when there is
        none or it is unusable (then deleted). Blocking file I/O: call it off the event loop."""
        path = self.path(digest)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read artifact %s: %s", path.name, exc)
            return None
        rest = blob[_HASH_BYTES:]
        if len(rest) <= _SIZE.size or hashlib.sha256(rest).digest() != blob[:_HASH_BYTES]:
            log.warning("artifact %s is corrupt; deleting it", path.name)
            self._delete(path)
            return None
        (size,) = _SIZE.unpack_from(rest)
        if size & COMPONENT_FLAG:
            return SerializedComponent(rest[_SIZE.size:]), size & ~COMPONENT_FLAG
        try:
            return wasmtime.Module.deserialize(engine, rest[_SIZE.size:]), size
        except wasmtime.WasmtimeError as exc:
            log.warning("artifact %s is not loadable (%s); deleting it", path.name,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error")
            self._delete(path)
            return None

    def store(self, digest: str, module: wasmtime.Module, size_bytes: int) -> None:
        """Write `module` for `digest` atomically. Failures are logged, never raised: the warm tier is
        an optimisation."""
        path = self.path(digest)
        try:
            flag = COMPONENT_FLAG if isinstance(module, wc.Component) else 0
            rest = _SIZE.pack(size_bytes | flag) + bytes(module.serialize())
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(hashlib.sha256(rest).digest())
                    fh.write(rest)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                self._delete(Path(tmp))
                raise
        except (OSError, wasmtime.WasmtimeError) as exc:
            log.warning("cannot write artifact for %s: %s", digest[:19], exc)

    def delete(self, digest: str) -> None:
        self._delete(self.path(digest))

    @staticmethod
    def _delete(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete %s: %s", path, exc)
