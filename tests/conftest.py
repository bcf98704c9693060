"""Shared fixtures: real servers on 127.0.0.1:0, wasm modules built from WAT, Redis."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis
import wasmtime

from services.runtime.server import ServiceHost

Starter = Callable[[Awaitable[ServiceHost]], Awaitable[ServiceHost]]

# Services a test starts from its environment (`python -m services.<name>`, `Settings.from_env()`) run without
# users' authentication unless the test turns it on, as the Settings dataclasses default; suites started with
# `clawhub up` (tests/e2e/conftest.py) get the real default, on. The CLI's credentials file (and `up`'s copy of
# the admin key) goes to a directory of this test session, never the user's ~/.config.
os.environ.setdefault("CLAWHUB_USER_AUTH", "off")
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="clawhub-test-config-")
# One wasmtime compilation cache for the session (services/runtime/wasm.py), in this process and every suite it
# starts: the 18 MiB Python components take 5-30 s to compile, and many tests load the same ones. A test that
# means to measure or exercise a cold compile removes the variable from the environment it uses.
if "CLAWHUB_WASMTIME_CACHE" not in os.environ:
    os.environ["CLAWHUB_WASMTIME_CACHE"] = _wasmtime_cache = tempfile.mkdtemp(prefix="clawhub-test-wasmtime-")
    atexit.register(shutil.rmtree, _wasmtime_cache, True)


@pytest.fixture
async def start_service() -> AsyncIterator[Starter]:
    """Start ServiceHosts built by a service's build_server; every one is stopped after the test."""
    started: list[ServiceHost] = []

    async def start(building: Awaitable[ServiceHost]) -> ServiceHost:
        host = await building
        await host.start()
        started.append(host)
        return host

    yield start
    for host in reversed(started):
        await host.stop(grace=0.5)


def wat(text: str) -> bytes:
    """Compile WebAssembly text to a binary module."""
    return bytes(wasmtime.wat2wasm(text))


# Redis, for the tests of what shares state through it (rate-limit buckets). A test that needs Redis takes
# `redis_url` (CLAWHUB_TEST_REDIS_URL when set, else a throwaway redis-server for the session, else the test is
# skipped) and keeps its keys under `redis_prefix`, unique to the test and deleted after it: a shared database
# is never flushed. A test that stops Redis takes `throwaway_redis`, its own server, never the shared one.
REDIS_URL_VARIABLE = "CLAWHUB_TEST_REDIS_URL"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A throwaway `redis-server` on 127.0.0.1 (no persistence) that a test may kill and start again on the
    same port."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """Stop it at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get(REDIS_URL_VARIABLE, "").strip()
    if url:
        yield url
        return
    binary = redis_server_binary()
    if binary is None:
        pytest.skip(f"needs Redis: set {REDIS_URL_VARIABLE} or install redis-server")
    server = RedisServer(binary)
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHDB: the database may be shared)."""
    prefix = f"clawhub-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def throwaway_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may kill and start again."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("needs the redis-server binary (a test that kills Redis never uses a shared server)")
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# PostgreSQL, for the storage suites that run against both backends and the leader election. A test takes
# `postgres_url`: a URL whose tables live in a schema of that test alone (dropped after it), in a database of
# this test run (created from CLAWHUB_TEST_DATABASE_URL's server, dropped at the end of the run). Without
# CLAWHUB_TEST_DATABASE_URL the tests are skipped with the reason; .ci/run sets it, so CI never skips them.
DATABASE_URL_VARIABLE = "CLAWHUB_TEST_DATABASE_URL"


def _with_database(url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The URL of a fresh database for this test run, dropped afterwards (never a shared one)."""
    server = os.environ.get(DATABASE_URL_VARIABLE, "").strip()
    if not server:
        pytest.skip(f"needs PostgreSQL: set {DATABASE_URL_VARIABLE} to a server URL "
                    "(postgresql://USER@HOST:PORT/postgres); the tests create and drop a database of their own")
    import asyncio

    import asyncpg

    name = f"clawhub_test_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(server, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(server, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def postgres_url(postgres_database: str) -> AsyncIterator[str]:
    """A URL whose tables go to schemas of this test alone (`?search_path=t_abc`: the registry's in
    `t_abc_registry`), dropped after the test."""
    import asyncio

    import asyncpg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_database, timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    separator = "&" if "?" in postgres_database else "?"
    yield f"{postgres_database}{separator}search_path={schema}"
    conn = await asyncpg.connect(postgres_database, timeout=10)
    try:
        # The services' schemas are named after it (`t_abc_registry`: services/runtime/postgres.py).
        # Services of the test may still be running here (fixtures set up before this one stop after it), so
        # a drop can be chosen as a deadlock victim against their queries: it is tried again.
        for (name,) in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname = $1 OR nspname LIKE $2",
                                        schema, f"{schema}\\_%"):
            for attempt in range(10):
                try:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
                    break
                except asyncpg.exceptions.DeadlockDetectedError:
                    if attempt == 9:
                        raise
                    await asyncio.sleep(0.1)
    finally:
        await conn.close()
