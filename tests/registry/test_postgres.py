"""The registry on PostgreSQL: replicas sharing one database (metadata and blobs), publishes racing across
them, corrupt chunks, and a registry server configured by CLAWHUB_DATABASE_URL. Skipped, with the reason,
where CLAWHUB_TEST_DATABASE_URL names no server (.ci/run sets it)."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.registry.blobs import BlobCorrupt
from services.registry.pgblobs import CHUNK_BYTES
from services.registry.pgstore import MIGRATIONS, PostgresMetadataStore
from services.registry.server import build_server
from services.registry.settings import Settings
from services.registry.store import State
from services.runtime import postgres
from services.runtime.server import StartupError
from tests.conftest import Starter
from tests.registry.conftest import Backend, Opener
from tests.registry.support import Client, RegistryStub, check_error, digest, download, module, publish
from tests.registry.test_backends import new_version, place
from tests.registry.test_integrity import big_module, download_until_error, version_of


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")


@pytest.fixture
def pg(postgres_url: str, tmp_path: Path) -> Backend:
    """PostgreSQL only; closed by the test's `replicas` use."""
    return Backend("postgresql", tmp_path / "registry", postgres_url)


async def replicas(open_registry: Opener, url: str, tmp_path: Path, count: int = 2) -> list[Client]:
    """`count` registry servers on one database, each with a data directory of its own (staged uploads)."""
    return [await open_registry(database_url=url, data_dir=tmp_path / f"replica{n}") for n in range(count)]


async def test_two_store_replicas_see_each_others_writes(pg: Backend) -> None:
    try:
        one, two = await pg.store(), await pg.store()
        await one.begin_version(new_version("com.acme.echo", "1.0.0"))
        assert (await two.get_version("com.acme.echo", "1.0.0")).state is State.VERIFYING  # type: ignore[union-attr]
        await two.transition("com.acme.echo", "1.0.0", State.READY, "verified by replica two")
        skill = await one.get_skill("com.acme.echo")
        assert skill is not None and skill.latest_version == "1.0.0"
        await two.create_publisher("acme", "a" * 64)
        await one.create_namespace("com.acme", "acme", False, [("k1", b"key")])
        assert (await two.governing_namespace("com.acme.echo")).owner == "acme"  # type: ignore[union-attr]

        # Quarantines too: no replica may keep a stale idea of them (the sqlite store caches them in memory).
        from services.registry.store import QuarantineRecord
        blob = digest(b"x")
        assert await two.quarantined([blob]) == {}
        record = QuarantineRecord(blob, digest(b"y"), 1, "somewhere", "download", 1)
        await one.record_quarantine(record)
        assert await two.quarantined([blob]) == {blob: record}
        assert await two.mark_repaired(blob) == 1
        assert await one.quarantined([blob]) == {}

        # Blobs placed by one replica are read, checked and quarantined by the other.
        blobs_one = await pg.blobs(pg.data_dir / "one")
        blobs_two = await pg.blobs(pg.data_dir / "two")
        data = b"z" * (CHUNK_BYTES + 10)
        placed = await place(blobs_one, data)
        assert await (await blobs_two.read(placed)).read_all() == data
        await pg.flip_byte(placed, 3)
        with pytest.raises(BlobCorrupt) as caught:
            await (await blobs_two.read(placed)).read_all()
        assert await blobs_two.quarantine(placed, caught.value.identity) is not None
        assert not await blobs_one.exists(placed)
    finally:
        await pg.close()


async def test_concurrent_publishes_of_one_version_from_two_store_replicas_one_wins(pg: Backend) -> None:
    try:
        stores = [await pg.store() for _ in range(2)]
        for round_ in range(5):
            version = f"1.0.{round_}"
            attempts = [stores[n % 2].begin_version(new_version("com.acme.echo", version, data=f"{n}".encode()))
                        for n in range(6)]
            results = await asyncio.gather(*attempts)
            winners = [record for record, created in results if created]
            assert len(winners) == 1
            # The losers were told about the winner, not about a version of their own.
            assert all(record.digest == winners[0].digest for record, _ in results)
            stored = await stores[1].get_version("com.acme.echo", version)
            assert stored is not None and stored.digest == winners[0].digest and len(stored.history) == 2
    finally:
        await pg.close()


async def test_concurrent_publishes_from_two_registry_replicas_one_wins(open_registry: Opener, postgres_url: str,
                                                                        tmp_path: Path) -> None:
    one, two = await replicas(open_registry, postgres_url, tmp_path)
    first, second = module("first"), module("second")
    outcomes = await asyncio.gather(publish(one.stub, first), publish(two.stub, second), return_exceptions=True)
    published = [o for o in outcomes if isinstance(o, pb.PublishSkillResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(published) == 1 and len(refused) == 1, outcomes
    assert published[0].created
    check_error(refused[0], grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS")
    winner = published[0].skill_version.digest
    assert winner in (digest(first), digest(second))
    # Both replicas say the same, and serve the winner's bytes.
    for client in (one, two):
        assert (await version_of(client)).digest == winner
        assert digest(b"".join(await download(client.stub, winner))) == winner


async def test_a_corrupt_chunk_is_data_loss_on_every_replica_until_a_republish(open_registry: Opener,
                                                                               postgres_url: str, pg: Backend,
                                                                               tmp_path: Path) -> None:
    one, two = await replicas(open_registry, postgres_url, tmp_path)
    data = big_module(CHUNK_BYTES + 300_000)  # two chunk rows
    blob = digest(data)
    await publish(one.stub, data)
    await pg.flip_byte(blob, CHUNK_BYTES + 1000)

    received, err = await download_until_error(two, blob)
    info = check_error(err, grpc.StatusCode.DATA_LOSS, "BLOB_CORRUPT")
    assert info["digest"] == blob and received < len(data)
    # Quarantined in the shared database: the other replica refuses it too, and both show the problem.
    received, err = await download_until_error(one, blob)
    assert check_error(err, grpc.StatusCode.DATA_LOSS, "BLOB_CORRUPT")["digest"] == blob and received == 0
    for client in (one, two):
        version = await version_of(client)
        assert version.state == release_pb2.RELEASE_STATE_READY
        assert [p for p in version.problems if f"module blob {blob} failed its digest check" in p]
    conn = await postgres.connect(postgres_url, "registry")
    try:
        kept = await conn.fetch("SELECT id FROM blob_objects WHERE digest = $1 AND quarantine_time_ns IS NOT NULL",
                                blob)
        path = await conn.fetchval("SELECT path FROM blob_quarantine WHERE digest = $1", blob)
    finally:
        await conn.close()
    assert len(kept) == 1 and path == f"postgresql:blob_objects/{kept[0]['id']}"  # the evidence stays

    repaired = await publish(two.stub, data)
    assert not repaired.created and repaired.repaired
    for client in (one, two):
        assert b"".join(await download(client.stub, blob)) == data
        assert list((await version_of(client)).problems) == []


async def test_a_starting_replica_leaves_another_replicas_publish_in_flight_alone(
        open_registry: Opener, postgres_url: str, pg: Backend, tmp_path: Path) -> None:
    try:
        store = await pg.store()
        await store.begin_version(new_version("com.acme.echo", "1.0.0"))  # now: perhaps in flight elsewhere
        await store.begin_version(new_version("com.acme.echo", "0.9.0", at_ns=time.time_ns() - 3600 * 10**9))
    finally:
        await pg.close()
    client = (await replicas(open_registry, postgres_url, tmp_path, count=1))[0]
    assert (await version_of(client, "1.0.0")).state == release_pb2.RELEASE_STATE_VERIFYING
    assert (await version_of(client, "0.9.0")).state == release_pb2.RELEASE_STATE_FAILED


async def test_a_registry_configured_by_clawhub_database_url_publishes_and_serves(
        start_service: Starter, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A password in the URL (the test server trusts any): it must never reach the log.
    parts = urllib.parse.urlsplit(postgres_url)
    with_password = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:s3cret@{parts.hostname}:"
                                                                  f"{parts.port or 5432}"))
    monkeypatch.delenv("CLAWHUB_REGISTRY_DATABASE_URL", raising=False)
    monkeypatch.setenv("CLAWHUB_DATABASE_URL", with_password)
    monkeypatch.setenv("CLAWHUB_REGISTRY_PORT", "0")
    monkeypatch.setenv("CLAWHUB_RATE_LIMITS", "off")
    channels: list[grpc.aio.Channel] = []
    caplog.set_level(logging.INFO, logger="clawhub.registry")
    try:
        stubs = []
        for n in range(2):
            monkeypatch.setenv("CLAWHUB_REGISTRY_DATA_DIR", str(tmp_path / f"replica{n}"))
            settings = Settings.from_env()
            assert settings.database_url == with_password and "s3cret" not in repr(settings)
            host = await start_service(build_server(settings))
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{host.port}"))
            stubs.append(RegistryStub(channels[-1]))
        data = module("served")
        assert (await publish(stubs[0], data, description="on postgres")).created
        for stub in stubs:
            skill = (await stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)).skill
            assert (skill.latest_version, skill.description) == ("1.0.0", "on postgres")
            assert b"".join(await download(stub, digest(data))) == data
        # Nothing of it is on the local disk: only the (empty) staging directory.
        assert [p for p in tmp_path.rglob("*") if p.is_file() and "blobs" in p.parts] == []
        started = [r.getMessage() for r in caplog.records if "on PostgreSQL at" in r.getMessage()]
        assert len(started) == 2 and "postgres:***@" in started[0]
        assert all("s3cret" not in r.getMessage() for r in caplog.records)
    finally:
        for channel in channels:
            await channel.close()


async def test_the_registry_variable_wins_and_an_unreachable_database_stops_the_start(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    monkeypatch.setenv("CLAWHUB_REGISTRY_DATABASE_URL", postgres_url)
    assert Settings.from_env().database_url == postgres_url
    monkeypatch.delenv("CLAWHUB_REGISTRY_DATABASE_URL")
    settings = Settings(port=0, data_dir=tmp_path / "registry", database_url=Settings.from_env().database_url)
    started = time.monotonic()
    with pytest.raises(StartupError) as caught:
        await build_server(settings)
    assert "cannot connect to PostgreSQL at postgresql://nobody@127.0.0.1:1/nowhere" in str(caught.value)
    assert "CLAWHUB_DATABASE_URL" in str(caught.value) and time.monotonic() - started < 15
    # The data directory was released: a registry can start there now.
    host = await build_server(Settings(port=0, data_dir=tmp_path / "registry", database_url=postgres_url))
    await host.start()
    await host.stop(grace=0.1)


async def test_postgres_migrations_apply_once_and_refuse_a_newer_schema(postgres_url: str, tmp_path: Path) -> None:
    stores = await asyncio.gather(*[PostgresMetadataStore.open(postgres_url) for _ in range(3)])
    for store in stores:
        await store.close()
    conn = await postgres.connect(postgres_url, "registry")
    try:
        versions = await conn.fetch("SELECT version FROM clawhub_schema WHERE component = 'registry' ORDER BY 1")
        assert [r[0] for r in versions] == list(range(1, len(MIGRATIONS) + 1))
        await conn.execute("INSERT INTO clawhub_schema (component, version) VALUES ('registry', $1)",
                           len(MIGRATIONS) + 1)
    finally:
        await conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        await PostgresMetadataStore.open(postgres_url)
    with pytest.raises(StartupError, match="newer"):
        await build_server(Settings(port=0, data_dir=tmp_path / "registry", database_url=postgres_url))


async def test_a_publish_of_a_version_another_replica_is_still_verifying_is_not_a_success(
        open_registry: Opener, postgres_url: str, pg: Backend, tmp_path: Path) -> None:
    """One registry replica records name@version VERIFYING and verifies it; the client's retry with the same bytes
    reaches another replica. On one registry the retry waits for the first publish's outcome; across replicas it
    must not answer OK for a version whose verification has not ended (and may still fail): UNAVAILABLE /
    PUBLISH_IN_PROGRESS, to be retried. Once the first publish has its outcome, the retry gets it (here FAILED:
    the retry publishes the version again, and it passes)."""
    from services.registry.store import NewVersion
    from tests.registry.support import metadata

    data = module("in-flight")
    manifest = metadata(data).metadata.manifest
    now = time.time_ns()
    try:
        store = await pg.store()
        await store.begin_version(NewVersion(
            name=manifest.name, version=manifest.version, digest=digest(data), size_bytes=len(data),
            manifest=manifest.SerializeToString(deterministic=True), upload_started_ns=now,
            upload_completed_ns=now, pending_reason="upload started", verifying_reason="upload complete"))
        client = (await replicas(open_registry, postgres_url, tmp_path, count=1))[0]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish(client.stub, data)
        info = check_error(caught.value, grpc.StatusCode.UNAVAILABLE, "PUBLISH_IN_PROGRESS")
        assert info["state"] == "VERIFYING"
        await store.transition(manifest.name, manifest.version, State.FAILED, "the other replica's verification failed")
    finally:
        await pg.close()
    published = await publish(client.stub, data)
    assert published.created and published.skill_version.state == release_pb2.RELEASE_STATE_READY


async def test_running_replicas_settle_what_a_killed_replica_left_in_flight(pg: Backend, tmp_path: Path) -> None:
    """No restart needed: a replica's periodic settle finishes a publish another replica left VERIFYING when it
    was killed, once it is older than any publish in flight; a younger one is left alone."""
    from services.registry.server import PeriodicSettle
    from services.registry.verify import Verifier

    try:
        store = await pg.store()
        blobs = await pg.blobs()
        await store.begin_version(new_version("com.acme.echo", "1.0.0"))  # young: perhaps in flight elsewhere
        await store.begin_version(new_version("com.acme.echo", "0.9.0", at_ns=time.time_ns() - 3600 * 10**9))
        settle = PeriodicSettle(store, blobs, Verifier(), 60.0, older_than=300.0, pending_older_than=900.0)
        await settle.settle_once()
        old = await store.get_version("com.acme.echo", "0.9.0")
        young = await store.get_version("com.acme.echo", "1.0.0")
        assert old is not None and old.state.value == "FAILED", old
        assert young is not None and young.state.value == "VERIFYING", young
    finally:
        await pg.close()
