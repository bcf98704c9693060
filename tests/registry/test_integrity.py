"""Integrity (issue 9): full-match validation of every name, and blobs that rot on disk.

A trailing newline used to pass name and version validation (`$` matches before a final "\\n"), so
`1.0.0\\n` was published beside `1.0.0`, became `latest` and was served. A flipped byte in a stored blob went
unnoticed: the registry said READY, served the bad bytes, and a republish of the right ones changed nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_internal_pb2 as internal_pb
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.registry.blobs import DOWNLOAD_CHUNK_BYTES
from services.runtime import signing
from tests.registry.conftest import Backend, Opener
from tests.registry.support import Client, check_error, digest, download, metadata, module, publish, publish_raw
from tests.registry.test_bundles import BUNDLE, READER, stream
from tests.registry.test_bundles import manifest as bundle_manifest


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")


ADMIN = "admin-token-for-integrity-tests-0123456789"
AUTH = (("authorization", f"Bearer {ADMIN}"),)
SUFFIXES = ["\n", "\r\n", " ", "\t"]


def big_module(size: int, tag: str = "") -> bytes:
    """A valid WASI command of about `size` bytes (several download chunks)."""
    return module(tag + "y" * size, pages=size // 65536 + 2)


def blob_path(client: Client, blob_digest: str) -> Path:
    hexdigest = blob_digest.removeprefix("sha256:")
    return client.settings.data_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest


def quarantined_files(client: Client) -> list[Path]:
    return sorted((client.settings.data_dir / "blobs" / "quarantine").glob("*"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return check_error(caught.value, code, reason)


async def version_of(client: Client, version: str = "1.0.0", name: str = "com.acme.echo") -> pb.SkillVersion:
    response = await client.stub.GetSkillVersion(pb.GetSkillVersionRequest(name=name, version=version), timeout=5)
    return response.skill_version


async def download_until_error(client: Client, blob_digest: str) -> tuple[int, grpc.aio.AioRpcError]:
    """Bytes received before the stream failed, and the failure."""
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in client.stub.DownloadBlob(internal_pb.DownloadBlobRequest(digest=blob_digest), timeout=10):
            received += len(response.chunk)
    return received, caught.value


# Full-match validation.

@pytest.mark.parametrize("suffix", SUFFIXES, ids=repr)
async def test_trailing_whitespace_is_refused_in_every_name_version_tag_and_digest(
        registry: Client, suffix: str) -> None:
    stub = registry.stub
    data = module("a")
    await publish(stub, data)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    # Publish.
    for meta, reason in (({"name": "com.acme.echo" + suffix}, "INVALID_NAME"),
                         ({"version": "2.0.0" + suffix}, "INVALID_VERSION"),
                         ({"sha256": hashlib.sha256(data).hexdigest() + suffix}, "INVALID_DIGEST")):
        await refused(publish(stub, data, **meta), invalid, reason)
    # Every read and change that takes a name, version, tag or digest.
    name, version = "com.acme.echo", "1.0.0"
    calls: list[tuple[Any, str]] = [
        (stub.GetSkill(pb.GetSkillRequest(name=name + suffix), timeout=5), "INVALID_NAME"),
        (stub.GetSkillVersion(pb.GetSkillVersionRequest(name=name + suffix, version=version), timeout=5),
         "INVALID_NAME"),
        (stub.GetSkillVersion(pb.GetSkillVersionRequest(name=name, version=version + suffix), timeout=5),
         "INVALID_VERSION"),
        (stub.GetSkillVersion(pb.GetSkillVersionRequest(name=name, version="latest" + suffix), timeout=5),
         "INVALID_VERSION"),
        (stub.ListSkillVersions(pb.ListSkillVersionsRequest(name=name + suffix), timeout=5), "INVALID_NAME"),
        (stub.YankSkillVersion(pb.YankSkillVersionRequest(name=name, version=version + suffix, yanked=True),
                               timeout=5), "INVALID_VERSION"),
        (stub.SetSkillTag(pb.SetSkillTagRequest(name=name, tag="stable" + suffix, version=version), timeout=5),
         "INVALID_ARGUMENT"),
        (stub.SetSkillTag(pb.SetSkillTagRequest(name=name, tag="stable", version=version + suffix), timeout=5),
         "INVALID_VERSION"),
        (stub.DeleteSkillTag(pb.DeleteSkillTagRequest(name=name, tag="stable" + suffix), timeout=5),
         "INVALID_ARGUMENT"),
        (stub.ResolveDependencies(pb.ResolveDependenciesRequest(name=name, version=version + suffix), timeout=5),
         "INVALID_VERSION"),
        (stub.ResolveDependencies(pb.ResolveDependenciesRequest(requirements=[
            skill_pb2.Dependency(package=name + suffix, version_range="^1.0.0")]), timeout=5), "INVALID_NAME"),
        (stub.DownloadBlob(internal_pb.DownloadBlobRequest(digest=digest(data) + suffix), timeout=5).read(),
         "INVALID_DIGEST"),
    ]
    for call, reason in calls:
        await refused(call, invalid, reason)
    skill = (await stub.GetSkill(pb.GetSkillRequest(name=name), timeout=5)).skill
    assert dict(skill.tags) == {"latest": "1.0.0"}


async def test_a_version_with_a_trailing_newline_is_never_published_nor_latest(registry: Client) -> None:
    stub = registry.stub
    original, impostor = module("original"), module("impostor")
    await publish(stub, original)
    await refused(publish(stub, impostor, version="1.0.0\n"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION")
    assert (await version_of(registry, "latest")).digest == digest(original)
    listed = await stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.echo"), timeout=5)
    assert [v.version for v in listed.skill_versions] == ["1.0.0"]


# Digits of other scripts: `\d` in a `str` pattern matches them and int() reads them, so `1.0.1` followed by an
# Arabic-Indic zero passed as a version (sorting as 1.0.10, so it became `latest`) and `^1.0.` followed by an
# Arabic-Indic one as a range. Every validator is ASCII-only now.
ARABIC_INDIC_ZERO, ARABIC_INDIC_ONE = "\u0660", "\u0661"


async def test_a_version_with_a_non_ascii_digit_is_never_published_nor_latest(registry: Client) -> None:
    stub = registry.stub
    original, impostor = module("original"), module("impostor")
    await publish(stub, original, version="1.0.1")
    for version in ("1.0.1" + ARABIC_INDIC_ZERO, "1.0." + ARABIC_INDIC_ONE, ARABIC_INDIC_ONE + ".0.0",
                    "1.0.0-rc.1" + ARABIC_INDIC_ZERO, "1.0.0+build" + ARABIC_INDIC_ZERO):
        await refused(publish(stub, impostor, version=version), grpc.StatusCode.INVALID_ARGUMENT,
                      "INVALID_VERSION")
        await refused(stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.echo", version=version),
                                           timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION")
    assert (await version_of(registry, "latest")).digest == digest(original)
    listed = await stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.echo"), timeout=5)
    assert [v.version for v in listed.skill_versions] == ["1.0.1"]


async def test_non_ascii_digits_and_spaces_are_refused_in_names_ranges_and_tags(registry: Client) -> None:
    stub = registry.stub
    data = module("dependent")
    await publish(stub, module("base"), name="com.acme.base")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await refused(publish(stub, data, name="com.acme.echo" + ARABIC_INDIC_ZERO), invalid, "INVALID_NAME")
    await refused(publish(stub, data, name="com.acme" + ARABIC_INDIC_ONE + ".echo"), invalid, "INVALID_NAME")
    for text in ("^1.0." + ARABIC_INDIC_ONE, ">=1.0.0 <" + ARABIC_INDIC_ONE + ".0.0", "1.x ||" + "\u3000" + "2.x",
                 "1.0.0" + "\u2003" + "-" + "\u2003" + "2.0.0", "^1.0.0" + "\u00a0"):
        request = metadata(data, name="com.acme.dependent")
        request.metadata.manifest.dependencies.add(package="com.acme.base", version_range=text)
        err = await refused(publish_raw(stub, [request, pb.PublishSkillRequest(chunk=data)]), invalid,
                            "INVALID_MANIFEST")
        assert err["field"] == "metadata.manifest.dependencies[0].version_range"
        await refused(stub.ResolveDependencies(pb.ResolveDependenciesRequest(requirements=[
            skill_pb2.Dependency(package="com.acme.base", version_range=text)]), timeout=5), invalid,
            "INVALID_ARGUMENT")
    await refused(stub.SetSkillTag(pb.SetSkillTagRequest(name="com.acme.base", tag="stable" + ARABIC_INDIC_ZERO,
                                                         version="1.0.0"), timeout=5), invalid, "INVALID_ARGUMENT")
    await refused(stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.base",
                                                                 version="stable" + ARABIC_INDIC_ZERO), timeout=5),
                  invalid, "INVALID_VERSION")
    # The ASCII spellings still work.
    request = metadata(data, name="com.acme.dependent")
    request.metadata.manifest.dependencies.add(package="com.acme.base", version_range="^1.0.0")
    assert (await publish_raw(stub, [request, pb.PublishSkillRequest(chunk=data)])).created


@pytest.mark.parametrize("suffix", ["\n", " "], ids=repr)
async def test_trailing_whitespace_is_refused_in_publisher_namespace_and_key_names(
        open_registry: Opener, suffix: str) -> None:
    stub = (await open_registry(admin_token=ADMIN)).stub
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await refused(stub.CreatePublisher(pb.CreatePublisherRequest(name="acme" + suffix), timeout=5, metadata=AUTH),
                  invalid, "INVALID_NAME")
    await stub.CreatePublisher(pb.CreatePublisherRequest(name="acme"), timeout=5, metadata=AUTH)
    await refused(stub.CreateNamespace(pb.CreateNamespaceRequest(name="com.acme" + suffix, owner="acme"),
                                       timeout=5, metadata=AUTH), invalid, "INVALID_NAME")
    await refused(stub.CreateNamespace(pb.CreateNamespaceRequest(name="com.acme", owner="acme" + suffix),
                                       timeout=5, metadata=AUTH), invalid, "INVALID_NAME")
    public = signing.raw_public_key(signing.generate())
    await stub.CreateNamespace(pb.CreateNamespaceRequest(name="com.acme", owner="acme", public_keys=[public]),
                               timeout=5, metadata=AUTH)
    await refused(stub.GetNamespace(pb.GetNamespaceRequest(name="com.acme" + suffix), timeout=5),
                  invalid, "INVALID_NAME")
    await refused(stub.UpdateNamespace(pb.UpdateNamespaceRequest(
        name="com.acme", remove_key_ids=[signing.key_id(public) + suffix]), timeout=5, metadata=AUTH),
        invalid, "INVALID_ARGUMENT")
    data = module("signed")
    request = metadata(data, name="com.acme.echo")
    request.metadata.signature.CopyFrom(pb.Signature(key_id=signing.key_id(public) + suffix, signature=b"s" * 64))

    async def requests() -> Any:
        yield request
        yield pb.PublishSkillRequest(chunk=data)

    await refused(stub.PublishSkill(requests(), timeout=5, metadata=AUTH), invalid, "SIGNATURE_INVALID")
    namespace = (await stub.GetNamespace(pb.GetNamespaceRequest(name="com.acme"), timeout=5)).namespace
    assert [k.key_id for k in namespace.keys] == [signing.key_id(public)]


# Blobs that rot on disk.

async def test_a_flipped_byte_is_data_loss_quarantined_shown_and_repaired_by_a_republish(registry: Client) -> None:
    stub = registry.stub
    data = big_module(3 * DOWNLOAD_CHUNK_BYTES + 1000)
    blob = digest(data)
    await publish(stub, data)
    path = blob_path(registry, blob)
    # The last byte: a reader that streamed first and checked after would have sent every byte by then.
    flip_byte(path, len(data) - 1)
    corrupt = path.read_bytes()

    received, err = await download_until_error(registry, blob)
    info = check_error(err, grpc.StatusCode.DATA_LOSS, "BLOB_CORRUPT")
    assert info["digest"] == blob and blob in (err.details() or "")
    assert received < len(data)
    # Moved aside as evidence, recorded, and shown on the version, which stays READY.
    assert not path.exists()
    assert [p.read_bytes() for p in quarantined_files(registry)] == [corrupt]
    version = await version_of(registry)
    assert version.state == release_pb2.RELEASE_STATE_READY
    assert len(version.problems) == 1
    problem = version.problems[0]
    assert f"module blob {blob} failed its digest check on " in problem
    assert "quarantined; publish the same bytes again to repair it" in problem
    listed = await stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.echo"), timeout=5)
    assert list(listed.skill_versions[0].problems) == [problem]
    # Still DATA_LOSS (not "no such blob") until repaired.
    received, err = await download_until_error(registry, blob)
    assert check_error(err, grpc.StatusCode.DATA_LOSS, "BLOB_CORRUPT")["digest"] == blob and received == 0

    repaired = await publish(stub, data)
    assert not repaired.created and repaired.repaired
    assert list(repaired.skill_version.problems) == []
    assert b"".join(await download(stub, blob)) == data
    assert list((await version_of(registry)).problems) == []
    assert len(quarantined_files(registry)) == 1  # the evidence stays
    again = await publish(stub, data)
    assert not again.created and not again.repaired


async def test_a_republish_notices_and_repairs_a_corrupt_blob_nobody_downloaded(registry: Client) -> None:
    data = module("quiet")
    blob = digest(data)
    await publish(registry.stub, data)
    path = blob_path(registry, blob)
    flip_byte(path, 10)
    response = await publish(registry.stub, data)
    assert not response.created and response.repaired
    assert path.read_bytes() == data
    assert len(quarantined_files(registry)) == 1
    assert b"".join(await download(registry.stub, blob)) == data


async def test_a_missing_module_or_bundle_blob_is_a_problem_until_a_republish(registry: Client) -> None:
    requests = stream(READER, BUNDLE, bundle_manifest())
    await publish_raw(registry.stub, requests)
    version = await version_of(registry, name="com.acme.greeter")
    assert list(version.problems) == []
    blob_path(registry, version.bundle_digest).unlink()
    blob_path(registry, version.digest).unlink()
    problems = list((await version_of(registry, name="com.acme.greeter")).problems)
    assert problems == [
        f"module blob {version.digest} is missing from the registry's blob store; publish the same bytes again "
        "to restore it",
        f"file bundle blob {version.bundle_digest} is missing from the registry's blob store; publish the same "
        "bytes again to restore it"]
    await refused(registry.stub.DownloadBlob(internal_pb.DownloadBlobRequest(digest=version.digest), timeout=5).read(),
                  grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND")
    response = await publish_raw(registry.stub, requests)
    assert response.repaired and list(response.skill_version.problems) == []
    assert b"".join(await download(registry.stub, version.bundle_digest)) == BUNDLE


async def verify_blobs(client: Client) -> list[pb.VerifyBlobsResponse]:
    return [r async for r in client.stub.VerifyBlobs(pb.VerifyBlobsRequest(), timeout=30, metadata=AUTH)]


async def test_the_scrub_hashes_every_blob_quarantines_the_corrupt_and_reports_per_version(
        open_registry: Opener) -> None:
    client = await open_registry(admin_token=ADMIN)
    stub = client.stub
    intact, rotten, lost = module("intact"), module("rotten"), module("lost")
    for version, data in (("1.0.0", intact), ("2.0.0", rotten), ("3.0.0", lost)):
        await publish(stub, data, version=version)
    # The same bytes under a second name: one blob, two versions that need it.
    await publish(stub, rotten, name="com.acme.twin")
    await refused(stub.VerifyBlobs(pb.VerifyBlobsRequest(), timeout=5).read(), grpc.StatusCode.PERMISSION_DENIED,
                  "ADMIN_REQUIRED")
    clean = await verify_blobs(client)
    assert clean[-1].done and clean[-1].blobs_checked == clean[-1].blobs_total == 3
    assert [p for r in clean for p in r.problems] == []

    flip_byte(blob_path(client, digest(rotten)), 5)
    blob_path(client, digest(lost)).unlink()
    responses = await verify_blobs(client)
    final = responses[-1]
    assert final.done and final.blobs_total == 2 and final.blobs_checked == 2 and final.blobs_quarantined == 1
    assert sum(1 for r in responses if r.done) == 1
    found = sorted((p.name, p.version, p.role, p.digest, p.condition) for r in responses for p in r.problems)
    assert found == [
        ("com.acme.echo", "2.0.0", pb.BLOB_ROLE_MODULE, digest(rotten), pb.BLOB_CONDITION_CORRUPT),
        ("com.acme.echo", "3.0.0", pb.BLOB_ROLE_MODULE, digest(lost), pb.BLOB_CONDITION_MISSING),
        ("com.acme.twin", "1.0.0", pb.BLOB_ROLE_MODULE, digest(rotten), pb.BLOB_CONDITION_CORRUPT),
    ]
    assert not blob_path(client, digest(rotten)).exists() and len(quarantined_files(client)) == 1
    assert "failed its digest check" in (await version_of(client, "1.0.0", "com.acme.twin")).problems[0]
    # A second scrub reports the quarantined blob as such, and quarantines nothing new.
    again = await verify_blobs(client)
    assert again[-1].blobs_quarantined == 0
    assert sorted((p.version, p.condition) for r in again for p in r.problems if p.name == "com.acme.echo") == [
        ("2.0.0", pb.BLOB_CONDITION_QUARANTINED), ("3.0.0", pb.BLOB_CONDITION_MISSING)]
    # Republishing the right bytes repairs both; the scrub is clean again.
    await publish(stub, rotten, version="2.0.0")
    await publish(stub, lost, version="3.0.0")
    final = (await verify_blobs(client))[-1]
    assert final.blobs_checked == 3 and [p for r in await verify_blobs(client) for p in r.problems] == []
    assert list((await version_of(client, "1.0.0", "com.acme.twin")).problems) == []


async def test_a_corrupt_blob_no_version_needs_is_quarantined_too(open_registry: Opener) -> None:
    client = await open_registry(admin_token=ADMIN)
    stray = client.settings.data_dir / "blobs" / "sha256" / ("ab" + "0" * 62)[:2] / ("ab" + "0" * 62)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"not what the name says")
    problems = [p for r in await verify_blobs(client) for p in r.problems]
    assert [(p.name, p.role, p.condition) for p in problems] == [("", pb.BLOB_ROLE_UNUSED, pb.BLOB_CONDITION_CORRUPT)]
    assert not stray.exists() and len(quarantined_files(client)) == 1


async def test_the_periodic_scrub_finds_and_logs_a_corrupt_blob(open_registry: Opener,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    client = await open_registry(scrub_interval_seconds=0.2)
    data = module("periodic")
    await publish(client.stub, data)
    flip_byte(blob_path(client, digest(data)), 3)
    caplog.set_level(logging.INFO, logger="clawhub.registry.integrity")
    deadline = time.monotonic() + 20
    while not (await version_of(client)).problems:
        assert time.monotonic() < deadline, "the periodic scrub never quarantined the blob"
        await asyncio.sleep(0.05)
    assert not blob_path(client, digest(data)).exists()
    while not any("scrub:" in r.getMessage() and "problem(s)" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the periodic scrub never logged its summary"
        await asyncio.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"blob {digest(data)} failed its digest check (found by scrub" in m for m in messages)
    assert any(m.startswith("scrub: com.acme.echo@1.0.0: module blob") for m in messages)


def test_scrub_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.registry.settings import Settings
    from services.runtime.settings import SettingsError

    monkeypatch.delenv("CLAWHUB_REGISTRY_SCRUB_INTERVAL", raising=False)
    assert Settings.from_env().scrub_interval_seconds == 86400.0
    monkeypatch.setenv("CLAWHUB_REGISTRY_SCRUB_INTERVAL", "0")
    assert Settings.from_env().scrub_interval_seconds == 0
    for bad in ("-1", "nan", "soon"):
        monkeypatch.setenv("CLAWHUB_REGISTRY_SCRUB_INTERVAL", bad)
        with pytest.raises(SettingsError, match="CLAWHUB_REGISTRY_SCRUB_INTERVAL"):
            Settings.from_env()


# Races between the moves of one blob.

async def test_a_repair_racing_a_quarantine_closes_its_record(backend: Backend) -> None:
    """A download moves a corrupt blob to quarantine and, while its record is being written (a busy writer),
    a republish repairs the blob. The record used to be written after the lock, so it could land after the
    repair had closed nothing: the blob was back but its quarantine stayed open (NOT RUNNABLE until the next
    scrub). Now the record is written under the lock the repair waits for (on PostgreSQL, the digest's advisory
    lock, which a repair on any replica waits for)."""
    from services.registry.blobs import BlobCorrupt
    from services.registry.integrity import Integrity
    from services.registry.store import QuarantineRecord

    blobs = await backend.blobs()
    store = await backend.store()
    integrity = Integrity(store, blobs)
    data = module("raced")
    blob = digest(data)
    async with blobs.upload(blob.removeprefix("sha256:")) as upload:
        await upload.write(data)
        await upload.finish()
        await upload.commit(blob)
    await backend.flip_byte(blob, 10)
    with pytest.raises(BlobCorrupt) as caught:
        await (await blobs.read(blob)).read_all()

    recording, repair_closed = asyncio.Event(), asyncio.Event()
    record_quarantine, mark_repaired = store.record_quarantine, store.mark_repaired

    async def slow_record(record: QuarantineRecord) -> None:
        recording.set()
        # Before the fix, the repair runs to its end meanwhile; after it, the repair waits for this record
        # (so this wait runs out).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(repair_closed.wait(), 0.5)
        await record_quarantine(record)

    async def mark(digest_: str) -> int:
        repair_closed.set()
        return await mark_repaired(digest_)

    store.record_quarantine = slow_record  # type: ignore[method-assign]
    store.mark_repaired = mark  # type: ignore[method-assign]
    quarantine = asyncio.ensure_future(integrity.quarantine(caught.value, "download"))
    await asyncio.wait_for(recording.wait(), 5)  # the file is moved, its record on the way
    async with blobs.upload(blob.removeprefix("sha256:")) as upload:
        await upload.write(data)
        await upload.finish()
        assert await integrity.restore(upload, blob, "com.acme.echo@1.0.0")
    assert await quarantine is not None
    assert await store.quarantined([blob]) == {}
    assert await (await blobs.read(blob)).read_all() == data


async def test_a_commit_that_cannot_move_its_file_removes_it(tmp_path: Path) -> None:
    """The exit handler leaves the temporary file to the move once a commit starts; a move that failed used to
    leave it there until the next start."""
    from services.registry.blobs import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    await blobs.open()
    data = module("blocked")
    blob = digest(data)
    blobs.path_of(blob).mkdir(parents=True)  # a directory where the blob goes: the rename fails
    with pytest.raises(IsADirectoryError):
        async with blobs.upload(blob.removeprefix("sha256:")) as upload:
            await upload.write(data)
            await upload.finish()
            await upload.commit(blob)
    await blobs.close()
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
