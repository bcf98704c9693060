"""Persistence: restarts, publishes interrupted by a stop, the metadata store, the blob store, settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiosqlite
import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.registry.blobs import BlobBackend, BlobStore
from services.registry.servicer import RegistryServicer
from services.registry.settings import Settings
from services.registry.store import (
    MIGRATIONS,
    IllegalTransition,
    NewVersion,
    SqliteMetadataStore,
    State,
    VersionNotFound,
    latest_version,
)
from services.registry.verify import Verifier
from services.runtime.auth import AuthSettings
from services.runtime.ratelimit.policy import RateLimitSettings
from services.runtime.settings import SettingsError
from tests.registry.conftest import Backend, Opener
from tests.registry.support import MODULE, check_error, digest, download, metadata, module, publish, wasm


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")


S = release_pb2


async def test_restart_keeps_everything(open_registry: Opener) -> None:
    first = await open_registry()
    good = await publish(first.stub, MODULE, version="1.0.0", description="kept")
    with pytest.raises(grpc.aio.AioRpcError):
        await publish(first.stub, b"garbage", version="1.1.0")
    await first.host.stop(grace=0.5)

    second = await open_registry()
    assert second.host.port != 0
    got = await second.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0.0"), timeout=5)
    assert got.skill_version == good.skill_version
    failed = await second.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="1.1.0"), timeout=5)
    assert failed.skill_version.state == S.RELEASE_STATE_FAILED
    assert failed.skill_version.verification_errors
    skill = (await second.stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)).skill
    assert (skill.latest_version, skill.description) == ("1.0.0", "kept")
    assert b"".join(await download(second.stub, digest(MODULE))) == MODULE
    # Immutability survives the restart too.
    again = await publish(second.stub, MODULE, version="1.0.0", description="kept")
    assert not again.created
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(second.stub, module("different"), version="1.0.0")
    check_error(caught.value, grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS")


def _new_version(data: bytes, version: str = "1.0.0", *, at_ns: int | None = None) -> NewVersion:
    manifest = skill_pb2.Manifest(name="com.acme.echo", version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1)
    now = time.time_ns() if at_ns is None else at_ns
    return NewVersion(name="com.acme.echo", version=version, digest=digest(data), size_bytes=len(data),
                      manifest=manifest.SerializeToString(), upload_started_ns=now, upload_completed_ns=now,
                      pending_reason="upload started", verifying_reason="upload complete")


async def place(blobs: BlobBackend, data: bytes) -> str:
    """Store `data` as a verified publish does; its digest."""
    blob = digest(data)
    async with blobs.upload(blob.removeprefix("sha256:")) as upload:
        await upload.write(data)
        await upload.finish()
        await upload.commit(blob)
    return blob


async def test_publishes_interrupted_by_a_stop_are_settled_on_start(open_registry: Opener, backend: Backend) -> None:
    # A previous run stopped mid-verification twice: once before the blob was placed, once after. An hour ago:
    # on a shared database, a younger publish may be another replica's, in flight (see test_postgres.py).
    blobs = await backend.blobs()
    store = await backend.store()
    an_hour_ago = time.time_ns() - 3600 * 10**9
    await store.begin_version(_new_version(MODULE, "1.0.0", at_ns=an_hour_ago))
    placed = module("placed")
    await store.begin_version(_new_version(placed, "2.0.0", at_ns=an_hour_ago))
    await place(blobs, placed)
    # One whose module imports from a dependency: its links cannot be re-checked after the fact.
    linked = wasm('(module (import "org.math" "add1" (func (param i32) (result i32)))'
                  ' (memory (export "memory") 1) (func (export "_start")))')
    new = _new_version(linked, "3.0.0", at_ns=an_hour_ago)
    manifest = skill_pb2.Manifest.FromString(new.manifest)
    manifest.dependencies.add(package="org.math", version_range="^1.0.0")
    await store.begin_version(replace(new, manifest=manifest.SerializeToString()))
    await place(blobs, linked)
    # And a temporary file of an upload that never finished (for files, where earlier versions staged them).
    leftover = (blobs.path_of(digest(MODULE)).parent / ".deadbeef.0000.tmp" if isinstance(blobs, BlobStore)
                else backend.data_dir / "blobs" / "tmp" / "deadbeef.0000.tmp")
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half an upload")
    await backend.close()

    client = await open_registry(**backend.settings)
    lost = (await client.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0.0"), timeout=5)).skill_version
    assert lost.state == S.RELEASE_STATE_FAILED
    assert "publish this version again" in lost.verification_errors[0]
    kept = (await client.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="2.0.0"), timeout=5)).skill_version
    assert kept.state == S.RELEASE_STATE_READY
    assert [t.to_state for t in kept.history] == [
        S.RELEASE_STATE_PENDING, S.RELEASE_STATE_VERIFYING, S.RELEASE_STATE_READY]
    assert not leftover.exists()
    unchecked = (await client.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="3.0.0"), timeout=5)).skill_version
    assert unchecked.state == S.RELEASE_STATE_FAILED
    assert "dependency links" in unchecked.verification_errors[0]
    # The lost one can be published again.
    assert (await publish(client.stub, MODULE, version="1.0.0")).created


async def test_store_state_machine(backend: Backend) -> None:
    store = await backend.store()
    record, created = await store.begin_version(_new_version(MODULE))
    assert created and record.state is State.VERIFYING
    assert [(t.from_state, t.to_state) for t in record.history] == [
        (None, State.PENDING), (State.PENDING, State.VERIFYING)]
    same, created = await store.begin_version(_new_version(module("other")))
    assert not created and same == record
    with pytest.raises(IllegalTransition):
        await store.transition("com.acme.echo", "1.0.0", State.PENDING, "backwards")
    ready = await store.transition("com.acme.echo", "1.0.0", State.READY, "ok")
    assert ready.state is State.READY and ready.history[-1].reason == "ok"
    with pytest.raises(IllegalTransition):
        await store.transition("com.acme.echo", "1.0.0", State.FAILED, "too late")
    with pytest.raises(VersionNotFound):
        await store.transition("com.acme.echo", "9.0.0", State.READY, "nothing there")
    # A FAILED version is replaced by the next publish, with a fresh history.
    await store.begin_version(_new_version(MODULE, "2.0.0"))
    await store.transition("com.acme.echo", "2.0.0", State.FAILED, "broken", errors=["broken"])
    again, created = await store.begin_version(_new_version(module("fixed"), "2.0.0"))
    assert created and again.digest == digest(module("fixed")) and len(again.history) == 2
    assert again.verification_errors == ()
    # Everything persists: the next run (or another replica) reads the same.
    assert (await (await backend.store()).get_version("com.acme.echo", "1.0.0")) == ready


async def test_sqlite_store_migrations(tmp_path: Path) -> None:
    path = tmp_path / "meta.sqlite3"
    store = await SqliteMetadataStore.open(path)
    await store.begin_version(_new_version(MODULE))
    ready = await store.transition("com.acme.echo", "1.0.0", State.READY, "ok")
    await store.close()

    async with aiosqlite.connect(path) as db:
        async with db.execute("PRAGMA journal_mode") as cursor:
            assert (await cursor.fetchone()) == ("wal",)
        async with db.execute("SELECT MAX(version) FROM schema_version") as cursor:
            assert (await cursor.fetchone()) == (len(MIGRATIONS),)
    # Reopening applies nothing twice; a database from a newer registry is refused.
    store = await SqliteMetadataStore.open(path)
    assert (await store.get_version("com.acme.echo", "1.0.0")) == ready
    await store.close()
    async with aiosqlite.connect(path) as db:
        await db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS) + 1,))
        await db.commit()
    with pytest.raises(RuntimeError, match="newer"):
        await SqliteMetadataStore.open(path)


def test_latest_version_helper() -> None:
    assert latest_version([]) == ""
    assert latest_version(["1.0.0", "1.10.0", "1.9.0", "2.0.0-rc.1"]) == "1.10.0"
    assert latest_version(["1.0.0-alpha", "1.0.0-alpha.1", "0.1.0-rc.1"]) == "1.0.0-alpha.1"


async def test_cancelled_upload_leaves_nothing(backend: Backend) -> None:
    blobs = await backend.blobs()
    with pytest.raises(RuntimeError):
        async with blobs.upload("ab" * 32) as upload:
            await upload.write(b"partial")
            await upload.finish()
            raise RuntimeError("client went away")
    assert [p for p in (backend.data_dir / "blobs").rglob("*") if p.is_file()] == []
    assert await blobs.stored() == []


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CLAWHUB_REGISTRY_HOST", "CLAWHUB_REGISTRY_PORT", "CLAWHUB_REGISTRY_DATA_DIR",
                 "CLAWHUB_REGISTRY_MAX_UPLOAD", "CLAWHUB_SHUTDOWN_GRACE", "CLAWHUB_USER_AUTH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLAWHUB_DATA_DIR", str(tmp_path))
    defaults = Settings.from_env()
    assert defaults == Settings(host="127.0.0.1", port=50052, data_dir=tmp_path / "registry",
                                max_upload_bytes=64 * 1024 * 1024, shutdown_grace_seconds=5.0,
                                auth=AuthSettings(enabled=True), rate_limits=RateLimitSettings.from_env({}))
    monkeypatch.setenv("CLAWHUB_REGISTRY_HOST", "0.0.0.0")
    monkeypatch.setenv("CLAWHUB_REGISTRY_PORT", "6000")
    monkeypatch.setenv("CLAWHUB_REGISTRY_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CLAWHUB_REGISTRY_MAX_UPLOAD", "512KiB")
    monkeypatch.setenv("CLAWHUB_SHUTDOWN_GRACE", "1.5")
    assert Settings.from_env() == Settings(host="0.0.0.0", port=6000, data_dir=tmp_path / "elsewhere",
                                           max_upload_bytes=512 * 1024, shutdown_grace_seconds=1.5,
                                           auth=AuthSettings(enabled=True),
                                           rate_limits=RateLimitSettings.from_env({}))
    monkeypatch.setenv("CLAWHUB_REGISTRY_MAX_UPLOAD", "lots")
    with pytest.raises(SettingsError):
        Settings.from_env()
    monkeypatch.setenv("CLAWHUB_REGISTRY_MAX_UPLOAD", "0")
    with pytest.raises(SettingsError):
        Settings.from_env()


class _StuckVerifier(Verifier):
    """Verification that blocks until cancelled, like a client deadline hitting a slow compile."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    async def verify(self, data: bytes, manifest: skill_pb2.Manifest) -> list[str]:
        self.started.set()
        await asyncio.Event().wait()
        return []


async def test_publish_cancelled_during_verification_is_recorded_failed(backend: Backend) -> None:
    blobs = await backend.blobs()
    store = await backend.store()
    verifier = _StuckVerifier()
    servicer = RegistryServicer(store, blobs, verifier, max_upload_bytes=1024 * 1024)

    async def requests() -> AsyncIterator[pb.PublishSkillRequest]:
        yield metadata(MODULE)
        yield pb.PublishSkillRequest(chunk=MODULE)

    call = asyncio.create_task(servicer.PublishSkill(requests(), None))
    await asyncio.wait_for(verifier.started.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    record = await store.get_version("com.acme.echo", "1.0.0")
    assert record is not None and record.state is State.FAILED
    assert "interrupted" in record.verification_errors[0]
    await blobs.close()
    assert [p for p in (backend.data_dir / "blobs").rglob("*") if p.is_file()] == []
    assert await blobs.stored() == []
