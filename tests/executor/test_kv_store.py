"""The `kv` store (services/executor/kvstore.py) on each backend: isolation between skills, every limit with
its reason, TTL expiry on an injected clock, listing by prefix, and sharing between processes' stores.

Redis comes from CLAWHUB_TEST_REDIS_URL, else a throwaway redis-server, else those cases are skipped
(tests/conftest.py); each test keeps its keys under a prefix of its own, deleted afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from services.executor.kvstore import (
    KvBackend,
    KvLimits,
    KvNamespace,
    KvStore,
    MemoryBackend,
    RedisBackend,
    SqliteBackend,
    open_store,
)
from services.executor.settings import Settings
from services.runtime.errors import Reason, ServiceError

LIMITS = KvLimits(max_key_bytes=16, max_value_bytes=64, max_keys=4, max_total_bytes=200)


class Clock:
    """Milliseconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


Factory = Callable[[], KvStore]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Factory, Clock]]:
    """Make stores over one backend's data (two of them stand for two executor processes), and the clock."""
    clock = Clock()
    made: list[KvStore] = []
    shared_memory = MemoryBackend()

    def make() -> KvStore:
        backend: KvBackend
        if request.param == "memory":
            backend = shared_memory
        elif request.param == "sqlite":
            backend = SqliteBackend(tmp_path / "kv.sqlite3")
        else:
            backend = RedisBackend(request.getfixturevalue("redis_url"),
                                   request.getfixturevalue("redis_prefix"))
        store = KvStore(backend, LIMITS, clock)
        made.append(store)
        return store

    yield make, clock
    for store in made:
        store.close()


def refused(reason: Reason, action: Callable[[], object]) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        action()
    assert caught.value.reason == reason, caught.value
    return caught.value


def test_get_put_delete_and_overwrite(stores: tuple[Factory, Clock]) -> None:
    kv = stores[0]().namespace("com.acme.one")
    assert kv.get(b"k") is None
    kv.put(b"k", b"v1")
    assert kv.get(b"k") == b"v1"
    kv.put(b"k", b"")  # an empty value is a value
    assert kv.get(b"k") == b""
    assert kv.delete(b"k") is True
    assert kv.delete(b"k") is False
    assert kv.get(b"k") is None
    # Keys are bytes, any bytes.
    kv.put(b"\x00\xff\n", b"\x01")
    assert kv.get(b"\x00\xff\n") == b"\x01"


def test_skills_are_isolated_and_versions_share(stores: tuple[Factory, Clock]) -> None:
    make, _ = stores
    store = make()
    one, other = store.namespace("com.acme.one"), store.namespace("com.acme.other")
    one.put(b"count", b"1")
    other.put(b"count", b"99")
    assert one.get(b"count") == b"1" and other.get(b"count") == b"99"
    assert one.keys() == [b"count"] and other.keys() == [b"count"]
    other.delete(b"count")
    assert one.get(b"count") == b"1"
    # A namespace that would be another's prefix is still its own.
    assert store.namespace("com.acme.on").keys() == []
    # The limits are per skill: `one` filling its key count leaves `other` free.
    for i in range(LIMITS.max_keys - 1):
        one.put(b"k%d" % i, b"")
    refused(Reason.KV_TOO_MANY_KEYS, lambda: one.put(b"more", b""))
    other.put(b"mine", b"fine")
    # Another store over the same data (another executor process) sees the same namespaces.
    assert make().namespace("com.acme.one").get(b"count") == b"1"


def test_every_limit_is_refused_with_its_reason(stores: tuple[Factory, Clock]) -> None:
    kv = stores[0]().namespace("com.acme.limits")
    refused(Reason.KV_INVALID_ARGUMENT, lambda: kv.put(b"", b"v"))
    refused(Reason.KV_INVALID_ARGUMENT, lambda: kv.get(b""))
    refused(Reason.KV_INVALID_ARGUMENT, lambda: kv.put(b"k", b"v", ttl_ms=-1))
    error = refused(Reason.KV_KEY_TOO_LARGE, lambda: kv.put(b"k" * 17, b"v"))
    assert error.metadata["max_key_bytes"] == "16" and "17 bytes" in error.message
    refused(Reason.KV_KEY_TOO_LARGE, lambda: kv.get(b"k" * 17))
    kv.put(b"k" * 16, b"v" * 64)  # exactly at both limits
    error = refused(Reason.KV_VALUE_TOO_LARGE, lambda: kv.put(b"k", b"v" * 65))
    assert error.metadata["max_value_bytes"] == "64"
    # Total bytes (keys and values): 80 + 61 stored; 65 more would make 206 > 200.
    kv.put(b"a", b"x" * 60)
    error = refused(Reason.KV_STORE_FULL, lambda: kv.put(b"b", b"x" * 64))
    assert error.metadata["max_total_bytes"] == "200"
    assert kv.get(b"b") is None  # nothing of a refused put is kept
    # Overwriting with a smaller value frees room; the total counts the new value, not both.
    kv.put(b"k" * 16, b"")
    kv.put(b"b", b"x" * 64)
    # Key count: 3 keys; a 4th is fine, a 5th is refused, overwriting one of the 4 is fine.
    kv.put(b"c", b"")
    error = refused(Reason.KV_TOO_MANY_KEYS, lambda: kv.put(b"d", b""))
    assert error.metadata["max_keys"] == "4"
    kv.put(b"c", b"again")
    # Deleting frees a key slot.
    kv.delete(b"c")
    kv.put(b"d", b"")
    assert sorted(kv.keys()) == [b"a", b"b", b"d", b"k" * 16]


def test_ttl_expiry(stores: tuple[Factory, Clock]) -> None:
    make, clock = stores
    kv = make().namespace("com.acme.ttl")
    kv.put(b"session", b"s", ttl_ms=1000)
    kv.put(b"forever", b"f")
    clock.now += 999
    assert kv.get(b"session") == b"s"
    clock.now += 1
    assert kv.get(b"session") is None
    assert kv.keys() == [b"forever"]
    assert kv.delete(b"session") is False
    # A put replaces the expiry: with a TTL, then without.
    kv.put(b"forever", b"f", ttl_ms=10)
    kv.put(b"forever", b"f")
    clock.now += 100
    assert kv.get(b"forever") == b"f"
    # Expired keys no longer count against the limits.
    for i in range(LIMITS.max_keys - 1):
        kv.put(b"t%d" % i, b"x" * 40, ttl_ms=5)
    refused(Reason.KV_TOO_MANY_KEYS, lambda: kv.put(b"new", b""))
    clock.now += 5
    for i in range(LIMITS.max_keys - 1):
        kv.put(b"n%d" % i, b"y" * 40)
    assert len(kv.keys()) == LIMITS.max_keys


def test_list_by_prefix_in_byte_order(stores: tuple[Factory, Clock]) -> None:
    kv = stores[0]().namespace("com.acme.list")
    for key in (b"user:2", b"user:10", b"users", b"admin"):
        kv.put(key, b"")
    assert kv.keys(b"user:") == [b"user:10", b"user:2"]
    assert kv.keys(b"user") == [b"user:10", b"user:2", b"users"]
    assert kv.keys() == [b"admin", b"user:10", b"user:2", b"users"]
    assert kv.keys(b"nobody") == []
    assert kv.keys(b"x" * 100) == []  # longer than any key can be


def test_concurrent_puts_never_exceed_the_key_limit(stores: tuple[Factory, Clock]) -> None:
    """Limits are checked atomically with the write: many writers (threads, over two stores standing for two
    processes) racing for the last slots never get past the limit."""
    make, _ = stores
    namespaces = [make().namespace("com.acme.race") for _ in range(2)]
    outcomes: list[bool] = []

    def writer(index: int) -> None:
        kv = namespaces[index % 2]
        try:
            kv.put(b"w%d" % index, b"")
            outcomes.append(True)
        except ServiceError as exc:
            assert exc.reason == Reason.KV_TOO_MANY_KEYS
            outcomes.append(False)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == LIMITS.max_keys
    assert len(namespaces[0].keys()) == LIMITS.max_keys


def test_sqlite_is_in_wal_mode_in_the_data_dir(tmp_path: Path) -> None:
    store = open_store(data_dir=tmp_path / "executor")
    try:
        assert isinstance(store.backend, SqliteBackend)
        store.namespace("com.acme.x").put(b"k", b"v")
        assert (tmp_path / "executor" / "kv.sqlite3").is_file()
        assert store.backend._db().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_redis_keys_live_under_the_prefix_and_an_outage_is_unavailable(redis_url: str, redis_prefix: str) -> None:
    store = open_store(data_dir=Path("/nonexistent"), redis_url=redis_url, redis_prefix=redis_prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        assert isinstance(store.backend, RedisBackend)
        store.namespace("com.acme.x").put(b"k", b"v", ttl_ms=60_000)
        names = sorted(k.decode() for k in client.scan_iter(match=f"{redis_prefix}*"))
        assert names == [f"{redis_prefix}{{com.acme.x}}:{part}" for part in ("bytes", "data", "expiry")]
    finally:
        store.close()
        client.close()
    down = KvStore(RedisBackend("redis://127.0.0.1:1/0", redis_prefix, timeout=0.2))
    try:
        error = refused(Reason.KV_UNAVAILABLE, lambda: down.namespace("com.acme.x").get(b"k"))
        assert "redis" in error.message
    finally:
        down.close()


def test_settings_pick_the_backend_and_limits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLAWHUB_KV_REDIS_URL", "redis://kv.example:6379/2")
    monkeypatch.setenv("CLAWHUB_KV_REDIS_PREFIX", "mine:")
    monkeypatch.setenv("CLAWHUB_KV_MAX_KEY_BYTES", "32")
    monkeypatch.setenv("CLAWHUB_KV_MAX_VALUE_BYTES", "1KiB")
    monkeypatch.setenv("CLAWHUB_KV_MAX_KEYS", "7")
    monkeypatch.setenv("CLAWHUB_KV_MAX_BYTES", "2MiB")
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")
    s = Settings.from_env()
    assert (s.kv_redis_url, s.kv_redis_prefix) == ("redis://kv.example:6379/2", "mine:")
    assert (s.kv_max_key_bytes, s.kv_max_value_bytes, s.kv_max_keys, s.kv_max_total_bytes) == (32, 1024, 7, 2 << 20)
    d = Settings()
    assert (d.kv_redis_url, d.kv_redis_prefix, d.kv_max_keys) == ("", "clawhub:kv:", 1000)


def test_a_namespace_needs_a_skill() -> None:
    with pytest.raises(ValueError):
        KvStore(MemoryBackend()).namespace("")
    assert isinstance(KvStore(MemoryBackend()).namespace("a.b"), KvNamespace)
