"""The registry's storage contract, run against every backend (`backend`: sqlite and files; PostgreSQL).

Each test drives a MetadataStore or a blob store the way the servicer does and checks what it answers: the
same answers, in the same order, from both backends.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from clawhub.common.v1 import skill_pb2

from services.registry.blobs import BlobBackend, BlobChanged, BlobCondition, BlobCorrupt, BlobNotFound
from services.registry.store import (
    AlreadyExists,
    ApiKeyRecord,
    BlobReference,
    CatalogEntry,
    NamespaceOverlap,
    NewVersion,
    NotFound,
    QuarantineRecord,
    SqlMetadataStore,
    State,
    VersionNotFound,
)
from tests.registry.conftest import Backend
from tests.registry.support import digest


def new_version(name: str, version: str, *, data: bytes = b"", description: str = "",
                at_ns: int | None = None) -> NewVersion:
    manifest = skill_pb2.Manifest(name=name, version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1,
                                  description=description)
    now = time.time_ns() if at_ns is None else at_ns
    data = data or f"{name}@{version}".encode()
    return NewVersion(name=name, version=version, digest=digest(data), size_bytes=len(data),
                      manifest=manifest.SerializeToString(), upload_started_ns=now, upload_completed_ns=now,
                      pending_reason="upload started", verifying_reason="upload complete")


async def ready(store: SqlMetadataStore, name: str, version: str, **kwargs: object) -> None:
    await store.begin_version(new_version(name, version, **kwargs))  # type: ignore[arg-type]
    await store.transition(name, version, State.READY, "verified")


async def test_versions_in_semver_order_latest_tags_and_yanks(backend: Backend) -> None:
    store = await backend.store()
    for version in ("1.0.0", "1.10.0", "1.9.0", "2.0.0-rc.1", "1.0.0+build.2"):
        await ready(store, "com.acme.echo", version)
    await store.begin_version(new_version("com.acme.echo", "3.0.0"))  # still VERIFYING

    page = await store.list_versions("com.acme.echo", after=None, limit=3)
    assert page is not None and page.more
    assert [v.version for v in page.items] == ["3.0.0", "2.0.0-rc.1", "1.10.0"]
    rest = await store.list_versions("com.acme.echo", after="1.10.0", limit=10)
    assert rest is not None and not rest.more
    assert [v.version for v in rest.items] == ["1.9.0", "1.0.0+build.2", "1.0.0"]
    assert await store.list_versions("com.acme.nothing", after=None, limit=10) is None

    skill = await store.get_skill("com.acme.echo")
    assert skill is not None and skill.latest_version == "1.10.0"
    assert skill_pb2.Manifest.FromString(skill.latest_manifest).version == "1.10.0"
    yanked = await store.set_yanked("com.acme.echo", "1.10.0", True, "broken")
    assert yanked.yanked and yanked.yank_reason == "broken"
    assert (await store.get_skill("com.acme.echo")).latest_version == "1.9.0"  # type: ignore[union-attr]
    assert not (await store.set_yanked("com.acme.echo", "1.10.0", False, "ignored")).yank_reason
    with pytest.raises(VersionNotFound):
        await store.set_yanked("com.acme.echo", "9.9.9", True, "")

    tagged = await store.set_tag("com.acme.echo", "stable", "1.9.0")
    assert tagged.tags == {"stable": "1.9.0"}
    assert (await store.set_tag("com.acme.echo", "stable", "1.0.0")).tags == {"stable": "1.0.0"}
    assert (await store.set_tag("com.acme.echo", "beta", "2.0.0-rc.1")).tags == {"beta": "2.0.0-rc.1",
                                                                                  "stable": "1.0.0"}
    assert (await store.delete_tag("com.acme.echo", "beta")).tags == {"stable": "1.0.0"}  # type: ignore[union-attr]
    assert await store.delete_tag("com.acme.echo", "beta") is None

    assert sorted(e.version for e in await store.catalog()) == ["1.0.0", "1.0.0+build.2", "1.10.0", "1.9.0",
                                                                "2.0.0-rc.1"]
    entry = next(e for e in await store.catalog() if e.version == "1.9.0")
    assert entry == CatalogEntry("com.acme.echo", "1.9.0", digest(b"com.acme.echo@1.9.0"), entry.manifest, False)
    refs = await store.blob_references()
    assert refs[0] == BlobReference("com.acme.echo", "1.0.0", digest(b"com.acme.echo@1.0.0"), "")
    assert [r.version for r in refs] == sorted(r.version for r in refs) and len(refs) == 5
    assert [v.version for v in await store.unsettled_versions()] == ["3.0.0"]


async def test_skills_list_and_search_in_byte_order(backend: Backend) -> None:
    store = await backend.store()
    # `-` sorts before `.` in bytes (and `Z` before `a`); a collation by language would order them otherwise.
    names = ["org.b.c", "org.b-c", "org.bc", "com.acme.echo", "com.acme.zed", "com.acme-tools.x", "com.acmez.y"]
    for name in names:
        await ready(store, name, "1.0.0", description=f"the {name.split('.')[-1]} skill")
    listed = await store.list_skills(after=None, limit=4)
    assert listed.more and [s.name for s in listed.items] == sorted(names)[:4]
    rest = await store.list_skills(after=listed.items[-1].name, limit=10)
    assert not rest.more and [s.name for s in rest.items] == sorted(names)[4:]
    assert await store.skill_names(limit=3) == sorted(names)[:3]

    by_prefix = await store.search_skills(after=None, limit=10, prefix="com.acme.", query="")
    assert [s.name for s in by_prefix.items] == ["com.acme.echo", "com.acme.zed"]
    by_word = await store.search_skills(after=None, limit=10, prefix="", query="ZED SKILL")
    assert [s.name for s in by_word.items] == ["com.acme.zed"]
    first = await store.search_skills(after=None, limit=1, prefix="org.", query="skill")
    assert first.more and [s.name for s in first.items] == ["org.b-c"]


async def test_publishers_and_namespaces(backend: Backend) -> None:
    store = await backend.store()
    assert (await store.create_publisher("acme", "a" * 64)).name == "acme"
    await store.create_publisher("other", "b" * 64)
    with pytest.raises(AlreadyExists):
        await store.create_publisher("acme", "c" * 64)
    assert await store.publisher_by_token("a" * 64) == "acme"
    assert await store.publisher_by_token("d" * 64) is None

    with pytest.raises(NotFound):
        await store.create_namespace("com.nobody", "nobody", False, [])
    acme = await store.create_namespace("com.acme", "acme", True, [("k1", b"key one"), ("k1", b"again")])
    assert acme.require_signatures and [(k.key_id, k.public_key) for k in acme.keys] == [("k1", b"key one")]
    with pytest.raises(AlreadyExists):
        await store.create_namespace("com.acme", "acme", False, [])
    with pytest.raises(NamespaceOverlap) as inside:
        await store.create_namespace("com.acme.tools", "other", False, [])
    assert (inside.value.other, inside.value.owner) == ("com.acme", "acme")
    # Not inside: `com.acme-x` and `com.acmex` only start with the same characters.
    await store.create_namespace("com.acme-x", "other", False, [])
    await store.create_namespace("com.acmex", "other", False, [])
    with pytest.raises(NamespaceOverlap):
        await store.create_namespace("com", "other", False, [])
    await store.create_namespace("com.acme.tools", "acme", False, [])  # the owner may nest its own

    governing = await store.governing_namespace("com.acme.tools.hammer")
    assert governing is not None and governing.name == "com.acme.tools"
    assert (await store.governing_namespace("com.acme.echo")).name == "com.acme"  # type: ignore[union-attr]
    assert await store.governing_namespace("org.acme.echo") is None
    page = await store.list_namespaces(after=None, limit=2)
    assert page.more and [n.name for n in page.items] == ["com.acme", "com.acme-x"]
    rest = await store.list_namespaces(after="com.acme-x", limit=5)
    assert [n.name for n in rest.items] == ["com.acme.tools", "com.acmex"] and not rest.more

    with pytest.raises(NotFound):
        await store.update_namespace("com.acme", add_keys=[("k2", b"two")], remove_key_ids=["nope"],
                                     require_signatures=False)
    unchanged = await store.get_namespace("com.acme")
    assert unchanged == acme  # the failed update changed nothing
    updated = await store.update_namespace("com.acme", add_keys=[("k2", b"two")], remove_key_ids=["k1"],
                                           require_signatures=False)
    assert [k.key_id for k in updated.keys] == ["k2"] and not updated.require_signatures
    assert updated.key("k2") is not None and updated.update_time_ns >= acme.update_time_ns
    with pytest.raises(NotFound):
        await store.update_namespace("com.none", add_keys=[], remove_key_ids=[], require_signatures=None)


async def test_api_keys_and_the_audit_log(backend: Backend) -> None:
    store = await backend.store()
    for n in range(3):
        await store.create_api_key(ApiKeyRecord(f"id{n}", f"key {n}", "publisher", ("com.acme.*",), "admin",
                                                1000 + n), f"{n}" * 64)
    first = await store.list_api_keys(before=None, limit=2)
    assert [k.id for k in first.items] == ["id2", "id1"] and first.more
    rest = await store.list_api_keys(before="id1", limit=2)
    assert [k.id for k in rest.items] == ["id0"] and not rest.more
    assert await store.api_key_by_sha256("1" * 64) == ApiKeyRecord("id1", "key 1", "publisher", ("com.acme.*",),
                                                                   "admin", 1001)
    revoked = await store.revoke_api_key("id1")
    assert revoked is not None and revoked.revoke_time_ns is not None
    assert (await store.revoke_api_key("id1")).revoke_time_ns == revoked.revoke_time_ns  # type: ignore[union-attr]
    assert await store.revoke_api_key("nope") is None

    for n in range(5):
        await store.append_audit(2000 + n, "alice", "/m", f"target {n}", f"r{n}", "OK")
    page = await store.list_audit(before=None, limit=3)
    assert [e.target for e in page.items] == ["target 4", "target 3", "target 2"] and page.more
    older = await store.list_audit(before=page.items[-1].seq, limit=3)
    assert [e.target for e in older.items] == ["target 1", "target 0"] and not older.more


async def test_quarantine_records(backend: Backend) -> None:
    store = await backend.store()
    blob = digest(b"rotten")
    assert await store.quarantined([blob]) == {}
    assert await store.mark_repaired(blob) == 0
    first = QuarantineRecord(blob, digest(b"x"), 6, "where 1", "download", 1)
    second = QuarantineRecord(blob, digest(b"y"), 6, "where 2", "scrub", 2)
    await store.record_quarantine(first)
    await store.record_quarantine(second)
    assert await store.quarantined([blob, digest(b"fine")]) == {blob: second}
    assert await store.mark_repaired(blob) == 2
    assert await store.quarantined([blob]) == {}


async def place(blobs: BlobBackend, data: bytes) -> str:
    blob = digest(data)
    async with blobs.upload(blob.removeprefix("sha256:")) as upload:
        await upload.write(data)
        assert await upload.finish() == blob
        await upload.commit(blob)
    return blob


async def test_blobs_stored_read_in_chunks_and_checked(backend: Backend) -> None:
    blobs = await backend.blobs()
    # More than one PostgreSQL chunk row (1 MiB), in download chunks that do not divide it.
    data = os.urandom(2 * 1024 * 1024 + 12345)
    small = b"small blob"
    blob, small_blob = await place(blobs, data), await place(blobs, small)
    missing = digest(b"never stored")
    assert await blobs.exists(blob) and not await blobs.exists(missing)
    assert await blobs.existing([blob, small_blob, missing, blob]) == {blob, small_blob}
    assert await blobs.stored() == sorted([blob, small_blob])

    reader = await blobs.read(blob)
    parts = [part async for part in reader.chunks(100_000)]
    assert b"".join(parts) == data and all(0 < len(p) <= 100_000 for p in parts)
    assert await (await blobs.read(small_blob)).read_all() == small
    check = await blobs.check(blob)
    assert (check.condition, check.size, check.actual) == (BlobCondition.OK, len(data), blob)
    assert (await blobs.check(missing)).condition is BlobCondition.MISSING
    async with blobs.local_file(small_blob) as path:
        assert path.read_bytes() == small
    with pytest.raises(BlobNotFound):
        await blobs.read(missing)
    with pytest.raises(ValueError):
        await blobs.read("sha256:../../etc/passwd")
    # Placing the same bytes again (another skill's identical module) keeps one blob.
    await place(blobs, small)
    assert await blobs.stored() == sorted([blob, small_blob])


async def test_a_corrupt_blob_is_detected_quarantined_and_repaired(backend: Backend) -> None:
    blobs = await backend.blobs()
    data = os.urandom(1024 * 1024 + 70_000)
    blob = await place(blobs, data)
    # In the second PostgreSQL chunk row, and in a download chunk before the last.
    await backend.flip_byte(blob, 1024 * 1024 + 5)

    received = 0
    with pytest.raises(BlobCorrupt) as caught:
        async for part in (await blobs.read(blob)).chunks(64 * 1024):
            received += len(part)
    assert received < len(data)
    corrupt = caught.value
    assert corrupt.digest == blob and corrupt.size == len(data) and corrupt.actual != blob
    check = await blobs.check(blob)
    assert (check.condition, check.actual, check.identity) == (BlobCondition.CORRUPT, corrupt.actual,
                                                               corrupt.identity)

    recorded: list[str] = []

    async def moved(where: str) -> None:
        recorded.append(where)

    where = await blobs.quarantine(blob, corrupt.identity, moved)
    assert where is not None and recorded == [where]
    assert await blobs.quarantine(blob, corrupt.identity) is None  # already moved
    assert not await blobs.exists(blob) and await blobs.stored() == []
    assert (await blobs.check(blob)).condition is BlobCondition.MISSING
    with pytest.raises(BlobNotFound):
        await blobs.read(blob)

    await place(blobs, data)  # the repair
    assert await (await blobs.read(blob)).read_all() == data
    # A quarantine of the copy found corrupt no longer applies to the repaired one.
    assert await blobs.quarantine(blob, corrupt.identity) is None
    assert await (await blobs.read(blob)).read_all() == data


async def test_a_blob_replaced_while_read_fails_the_read_with_blob_changed(backend: Backend) -> None:
    blobs = await backend.blobs()
    data = os.urandom(300_000)
    blob = await place(blobs, data)
    chunks = (await blobs.read(blob)).chunks(64 * 1024)
    assert len(await anext(chunks)) == 64 * 1024
    await place(blobs, data)  # a repair puts another copy in place
    with pytest.raises(BlobChanged):
        await anext(chunks)
    assert await (await blobs.read(blob)).read_all() == data


async def test_concurrent_uploads_of_one_blob(backend: Backend) -> None:
    blobs = await backend.blobs()
    data = os.urandom(1536 * 1024)
    await asyncio.gather(*[place(blobs, data) for _ in range(4)])
    assert await blobs.stored() == [digest(data)]
    assert hashlib.sha256(await (await blobs.read(digest(data))).read_all()).hexdigest() == digest(data)[7:]
    assert [p for p in (backend.data_dir / "blobs" / "tmp").iterdir()] == []
