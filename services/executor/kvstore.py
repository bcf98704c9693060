"""The `kv` capability's store: a small key-value store per skill, shared by its versions and by every
executor that uses the same backend, isolated from every other skill.

A skill's keys live in a namespace named by the skill (its reverse-DNS name), so two skills can never see
each other's keys, whatever bytes they use as keys; every version of one skill shares its namespace (state
survives upgrades and rollbacks). Keys and values are bytes. Operations: get, put (optionally with a
time-to-live), delete, list the keys that start with a prefix.

Bounded per skill (`KvLimits`), each limit refused with its own ErrorInfo reason:

- a key is 1 to `max_key_bytes` bytes (`KV_INVALID_ARGUMENT` when empty, `KV_KEY_TOO_LARGE` when longer);
- a value is at most `max_value_bytes` (`KV_VALUE_TOO_LARGE`);
- at most `max_keys` live keys (`KV_TOO_MANY_KEYS`, for a put of a new key; overwriting is fine);
- at most `max_total_bytes`, counting every live key and value (`KV_STORE_FULL`).

An expired key is gone: get, list and delete never see it, and it no longer counts against the limits.
Expiry is decided by the store's clock (`clock`, milliseconds; injectable for tests), not by the backend's,
so both backends behave alike.

Backends (`open_store` picks one from the executor's settings):

- `SqliteBackend` (the default): a file in the executor's data dir, in WAL mode, one connection per worker
  thread, with a busy timeout. Every put is one `BEGIN IMMEDIATE` transaction (limits checked and the row
  written under sqlite's write lock), so several executor processes on one host can share the file safely
  (`up --executors N` shares the data dir). Not for executors on several hosts: sqlite over a network file
  system is not safe; use Redis there.
- `RedisBackend` (when `CLAWHUB_KV_REDIS_URL` is set): per skill a hash of its keys, a sorted set of
  expiry times and a byte counter, all under `CLAWHUB_KV_REDIS_PREFIX` with the skill in a hash tag (one
  cluster slot per skill); each operation is one Lua script, so limits hold across any number of
  executors. The synchronous client is used: calls run on the executor's worker threads.
- `MemoryBackend`: in process, for scratch namespaces (smoke examples, which must not touch a skill's real
  state) and tests.

Every backend failure is `ServiceError(UNAVAILABLE, KV_UNAVAILABLE)`: the guest sees an error code and the
call goes on.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from services.runtime.errors import Reason, ServiceError

Clock = Callable[[], int]  # milliseconds since the epoch


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class KvLimits:
    """What one skill may keep (see the module docstring)."""

    max_key_bytes: int = 256
    max_value_bytes: int = 64 * 1024
    max_keys: int = 1000
    max_total_bytes: int = 1024 * 1024


def _full(reason: Reason, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message,
                        metadata={k: str(v) for k, v in metadata.items()})


def too_many_keys(skill: str, count: int, limits: KvLimits) -> ServiceError:
    return _full(Reason.KV_TOO_MANY_KEYS,
                 f"the skill {skill} already keeps {count} keys, its limit; delete some or let them expire",
                 skill=skill, keys=count, max_keys=limits.max_keys)


def store_full(skill: str, total: int, limits: KvLimits) -> ServiceError:
    return _full(Reason.KV_STORE_FULL,
                 f"the put would make the skill {skill} keep {total} bytes of keys and values, over its limit "
                 f"of {limits.max_total_bytes} bytes", skill=skill, bytes=total,
                 max_total_bytes=limits.max_total_bytes)


def unavailable(what: str, exc: BaseException) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.KV_UNAVAILABLE,
                        f"the key-value store is unavailable ({what}): {type(exc).__name__}: {exc}"[:400],
                        metadata={"backend": what})


class KvBackend(Protocol):
    """Storage of every skill's namespace. `now` is the store's clock (ms); a key whose expiry (ms since the
    epoch) is at or before `now` does not exist. `put` checks `max_keys` and `max_total_bytes` atomically with
    the write (the size limits of one key and value are checked before it is called)."""

    name: str

    def get(self, skill: str, key: bytes, now: int) -> bytes | None: ...

    def put(self, skill: str, key: bytes, value: bytes, expires: int | None, now: int, limits: KvLimits) -> None: ...

    def delete(self, skill: str, key: bytes, now: int) -> bool: ...

    def keys(self, skill: str, prefix: bytes, now: int) -> list[bytes]: ...

    def close(self) -> None: ...


class KvStore:
    """Every skill's namespace over one backend, with the limits and the clock."""

    def __init__(self, backend: KvBackend, limits: KvLimits | None = None, clock: Clock = wall_clock_ms) -> None:
        self.backend = backend
        self.limits = limits or KvLimits()
        self.clock = clock

    def namespace(self, skill: str) -> KvNamespace:
        """The namespace of skill `skill` (a reverse-DNS name; the executor passes the call's skill)."""
        if not skill:
            raise ValueError("a key-value namespace needs a skill name")
        return KvNamespace(self, skill)

    def close(self) -> None:
        self.backend.close()


class KvNamespace:
    """One skill's keys. Methods raise ServiceError with a KV_* reason; they block (call them off the event
    loop: the sandbox calls them on the worker thread running the skill)."""

    def __init__(self, store: KvStore, skill: str) -> None:
        self.store = store
        self.skill = skill

    def _key(self, key: bytes) -> bytes:
        limits = self.store.limits
        if not key:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.KV_INVALID_ARGUMENT,
                               "a key is at least one byte", metadata={"skill": self.skill})
        if len(key) > limits.max_key_bytes:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.KV_KEY_TOO_LARGE,
                               f"the key is {len(key)} bytes, over the limit of {limits.max_key_bytes}",
                               metadata={"skill": self.skill, "key_bytes": str(len(key)),
                                         "max_key_bytes": str(limits.max_key_bytes)})
        return key

    def get(self, key: bytes) -> bytes | None:
        return self.store.backend.get(self.skill, self._key(key), self.store.clock())

    def put(self, key: bytes, value: bytes, ttl_ms: int = 0) -> None:
        """Set `key` to `value`, expiring `ttl_ms` milliseconds from now (0: never; it replaces any expiry
        the key had)."""
        key = self._key(key)
        limits = self.store.limits
        if ttl_ms < 0:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.KV_INVALID_ARGUMENT,
                               f"the time-to-live is {ttl_ms} ms; it is 0 (never expires) or positive",
                               metadata={"skill": self.skill, "ttl_ms": str(ttl_ms)})
        if len(value) > limits.max_value_bytes:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.KV_VALUE_TOO_LARGE,
                               f"the value is {len(value)} bytes, over the limit of {limits.max_value_bytes}",
                               metadata={"skill": self.skill, "value_bytes": str(len(value)),
                                         "max_value_bytes": str(limits.max_value_bytes)})
        now = self.store.clock()
        self.store.backend.put(self.skill, key, value, now + ttl_ms if ttl_ms else None, now, limits)

    def delete(self, key: bytes) -> bool:
        """Remove `key`; whether it existed."""
        return self.store.backend.delete(self.skill, self._key(key), self.store.clock())

    def keys(self, prefix: bytes = b"") -> list[bytes]:
        """The live keys starting with `prefix`, in byte order."""
        if len(prefix) > self.store.limits.max_key_bytes:
            return []
        return sorted(self.store.backend.keys(self.skill, prefix, self.store.clock()))


class MemoryBackend:
    """Namespaces in a dict, behind a lock: scratch state for smoke examples, and tests."""

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[bytes, tuple[bytes, int | None]]] = {}

    def _live(self, skill: str, now: int) -> dict[bytes, tuple[bytes, int | None]]:
        space = self._data.setdefault(skill, {})
        for key in [k for k, (_, e) in space.items() if e is not None and e <= now]:
            del space[key]
        return space

    def get(self, skill: str, key: bytes, now: int) -> bytes | None:
        with self._lock:
            found = self._live(skill, now).get(key)
            return None if found is None else found[0]

    def put(self, skill: str, key: bytes, value: bytes, expires: int | None, now: int, limits: KvLimits) -> None:
        with self._lock:
            space = self._live(skill, now)
            old = space.get(key)
            if old is None and len(space) >= limits.max_keys:
                raise too_many_keys(skill, len(space), limits)
            total = sum(len(k) + len(v) for k, (v, _) in space.items())
            total += len(key) + len(value) - (0 if old is None else len(key) + len(old[0]))
            if total > limits.max_total_bytes:
                raise store_full(skill, total, limits)
            space[key] = (value, expires)

    def delete(self, skill: str, key: bytes, now: int) -> bool:
        with self._lock:
            return self._live(skill, now).pop(key, None) is not None

    def keys(self, skill: str, prefix: bytes, now: int) -> list[bytes]:
        with self._lock:
            return [k for k in self._live(skill, now) if k.startswith(prefix)]

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    skill TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    expires_ms INTEGER,
    PRIMARY KEY (skill, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (skill, expires_ms) WHERE expires_ms IS NOT NULL;
"""
_LIVE = "(expires_ms IS NULL OR expires_ms > ?)"


class SqliteBackend:
    """Every namespace in one sqlite file (see the module docstring for why several processes may share it)."""

    name = "sqlite"

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        db = self._db()
        db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        """This thread's connection: sqlite connections are not shared between threads while in use."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise unavailable(f"sqlite {self.path}", exc) from None
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def _run(self, what: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._db()
        try:
            return what(db)
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise unavailable(f"sqlite {self.path.name}", exc) from None

    def get(self, skill: str, key: bytes, now: int) -> bytes | None:
        row = self._run(lambda db: db.execute(
            f"SELECT value FROM kv WHERE skill = ? AND key = ? AND {_LIVE}", (skill, key, now)).fetchone())
        return None if row is None else bytes(row[0])

    def put(self, skill: str, key: bytes, value: bytes, expires: int | None, now: int, limits: KvLimits) -> None:
        def write(db: sqlite3.Connection) -> None:
            # IMMEDIATE takes the write lock first: no other process can change the counts between the check
            # and the write.
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM kv WHERE skill = ? AND expires_ms <= ?", (skill, now))
                count, total = db.execute(
                    "SELECT count(*), coalesce(sum(length(key) + length(value)), 0) FROM kv WHERE skill = ?",
                    (skill,)).fetchone()
                old = db.execute("SELECT length(key) + length(value) FROM kv WHERE skill = ? AND key = ?",
                                 (skill, key)).fetchone()
                if old is None and count >= limits.max_keys:
                    raise too_many_keys(skill, count, limits)
                total += len(key) + len(value) - (0 if old is None else old[0])
                if total > limits.max_total_bytes:
                    raise store_full(skill, total, limits)
                db.execute("INSERT INTO kv (skill, key, value, expires_ms) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (skill, key) DO UPDATE SET value = excluded.value, "
                           "expires_ms = excluded.expires_ms", (skill, key, value, expires))
                db.execute("COMMIT")
            except ServiceError:
                db.execute("ROLLBACK")
                raise

        self._run(write)

    def delete(self, skill: str, key: bytes, now: int) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            cursor = db.execute(f"DELETE FROM kv WHERE skill = ? AND key = ? AND {_LIVE}", (skill, key, now))
            found = cursor.rowcount > 0
            if not found:  # an expired row: gone too
                db.execute("DELETE FROM kv WHERE skill = ? AND key = ?", (skill, key))
            return found

        return bool(self._run(remove))

    def keys(self, skill: str, prefix: bytes, now: int) -> list[bytes]:
        rows = self._run(lambda db: db.execute(
            f"SELECT key FROM kv WHERE skill = ? AND {_LIVE} AND substr(key, 1, ?) = ? ORDER BY key",
            (skill, now, len(prefix), prefix)).fetchall() if prefix else db.execute(
            f"SELECT key FROM kv WHERE skill = ? AND {_LIVE} ORDER BY key", (skill, now)).fetchall())
        return [bytes(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()


# Drops a skill's expired keys: its data hash (KEYS[1]), expiry set (KEYS[2]) and byte counter (KEYS[3]) as of
# ARGV[1] (now, ms). Prepended to every script.
_PURGE = """
local d, x, n = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', x, '-inf', now)
for _, k in ipairs(gone) do
  local size = redis.call('HSTRLEN', d, k)
  if redis.call('HDEL', d, k) == 1 then redis.call('DECRBY', n, size + string.len(k)) end
end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', x, '-inf', now) end
"""
_GET = _PURGE + "return redis.call('HGET', d, ARGV[2])"
# ARGV: now, key, value, expires ('' for none), max_keys, max_total_bytes. Returns {0, total} when written,
# {1, count} over the key count, {2, total} over the byte total.
_PUT = _PURGE + """
local k, v = ARGV[2], ARGV[3]
local old = 0
local exists = redis.call('HEXISTS', d, k) == 1
if exists then old = redis.call('HSTRLEN', d, k) + string.len(k) end
if not exists then
  local count = redis.call('HLEN', d)
  if count >= tonumber(ARGV[5]) then return {1, count} end
end
local total = tonumber(redis.call('GET', n) or '0')
local after = total - old + string.len(k) + string.len(v)
if after > tonumber(ARGV[6]) then return {2, after} end
redis.call('HSET', d, k, v)
redis.call('INCRBY', n, after - total)
if ARGV[4] == '' then redis.call('ZREM', x, k) else redis.call('ZADD', x, ARGV[4], k) end
return {0, after}
"""
_DELETE = _PURGE + """
local k = ARGV[2]
local size = redis.call('HSTRLEN', d, k)
if redis.call('HDEL', d, k) == 0 then return 0 end
redis.call('DECRBY', n, size + string.len(k))
redis.call('ZREM', x, k)
return 1
"""
_KEYS = _PURGE + "return redis.call('HKEYS', d)"


class RedisBackend:
    """Every namespace in Redis under `prefix` (see the module docstring); shared by every executor."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "clawhub:kv:", *, timeout: float = 1.0) -> None:
        import redis  # only when configured

        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError,)
        self.prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._get = self._client.register_script(_GET)
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._keys = self._client.register_script(_KEYS)

    def _names(self, skill: str) -> list[str]:
        # The hash tag keeps a skill's three keys in one cluster slot (skill names have no braces).
        base = f"{self.prefix}{{{skill}}}"
        return [f"{base}:data", f"{base}:expiry", f"{base}:bytes"]

    def _call(self, script: Any, skill: str, *args: object) -> Any:
        try:
            return script(keys=self._names(skill), args=list(args))
        except self._errors as exc:
            raise unavailable("redis", exc) from None

    def get(self, skill: str, key: bytes, now: int) -> bytes | None:
        found = self._call(self._get, skill, now, key)
        return None if found is None else bytes(found)

    def put(self, skill: str, key: bytes, value: bytes, expires: int | None, now: int, limits: KvLimits) -> None:
        outcome, amount = self._call(self._put, skill, now, key, value, "" if expires is None else expires,
                                     limits.max_keys, limits.max_total_bytes)
        if outcome == 1:
            raise too_many_keys(skill, int(amount), limits)
        if outcome == 2:
            raise store_full(skill, int(amount), limits)

    def delete(self, skill: str, key: bytes, now: int) -> bool:
        return bool(self._call(self._delete, skill, now, key))

    def keys(self, skill: str, prefix: bytes, now: int) -> list[bytes]:
        return [bytes(k) for k in self._call(self._keys, skill, now) if bytes(k).startswith(prefix)]

    def close(self) -> None:
        self._client.close()


def open_store(*, data_dir: Path, redis_url: str = "", redis_prefix: str = "clawhub:kv:",
               limits: KvLimits | None = None, clock: Clock = wall_clock_ms) -> KvStore:
    """The executor's store: Redis when `redis_url` is set, else sqlite at `data_dir/kv.sqlite3`."""
    backend: KvBackend = (RedisBackend(redis_url, redis_prefix) if redis_url
                          else SqliteBackend(data_dir / "kv.sqlite3"))
    return KvStore(backend, limits, clock)


def scratch_store(limits: KvLimits | None = None, clock: Clock = wall_clock_ms) -> KvStore:
    """An empty in-memory store (smoke examples run against one, never against the skill's real state)."""
    return KvStore(MemoryBackend(), limits, clock)
