"""The registry's catalogue (issue 4): dependency validation, yank, tags, search, dependency resolution."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from tests.registry.conftest import Backend
from tests.registry.support import Client, check_error, chunks, module, publish, publish_raw, violations


@pytest.fixture
def registry_overrides(backend: Backend) -> dict[str, object]:
    """Every test here runs on each storage backend (sqlite and files; PostgreSQL)."""
    return backend.settings


def dep(package: str, version_range: str, shared: bool = False) -> skill_pb2.Dependency:
    return skill_pb2.Dependency(package=package, version_range=version_range, is_shared=shared)


async def publish_with(stub: Any, name: str, version: str, deps: list[skill_pb2.Dependency] = (),  # type: ignore[assignment]
                       *, description: str = "", data: bytes | None = None,
                       limits: skill_pb2.Limits | None = None) -> pb.PublishSkillResponse:
    data = module(f"{name}@{version}") if data is None else data
    manifest = skill_pb2.Manifest(name=name, version=version, description=description,
                                  abi=skill_pb2.ABI_WASI_COMMAND_V1, dependencies=list(deps))
    if limits is not None:
        manifest.limits.CopyFrom(limits)
    meta = pb.PublishSkillRequest(metadata=pb.PublishSkillMetadata(
        manifest=manifest, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)))
    return await publish_raw(stub, [meta, *chunks(data, 64 * 1024)])


async def resolve(stub: Any, *requirements: skill_pb2.Dependency) -> list[tuple[str, str, bool, list[str]]]:
    response = await stub.ResolveDependencies(pb.ResolveDependenciesRequest(requirements=list(requirements)),
                                              timeout=10)
    return [(d.package, d.version, d.is_shared, list(d.required_by)) for d in response.dependencies]


# Dependencies validated at publish.

async def test_publish_refuses_bad_dependencies_naming_each_field(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_with(registry.stub, "com.acme.app", "1.0.0", [
            dep("com.acme.ok", "^1.2.3"),
            dep("Not A Name", "^1.0.0"),
            dep("com.acme.base", ">=1.0 <<2"),
            dep("com.acme.app", "1.x"),
        ])
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME")
    fields = violations(caught.value)
    assert set(fields) == {"metadata.manifest.dependencies[1].package",
                           "metadata.manifest.dependencies[2].version_range",
                           "metadata.manifest.dependencies[3].package"}
    assert "itself" in fields["metadata.manifest.dependencies[3].package"]
    # Nothing was stored.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await registry.stub.GetSkill(pb.GetSkillRequest(name="com.acme.app"), timeout=5)
    check_error(missing.value, grpc.StatusCode.NOT_FOUND, "SKILL_NOT_FOUND")


async def test_publish_refuses_a_negative_timeout(registry: Client) -> None:
    limits = skill_pb2.Limits()
    limits.timeout.FromMilliseconds(-5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_with(registry.stub, "com.acme.app", "1.0.0", limits=limits)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MANIFEST")
    assert "metadata.manifest.limits.timeout" in violations(caught.value)
    ok = skill_pb2.Limits()
    ok.timeout.FromMilliseconds(250)
    assert (await publish_with(registry.stub, "com.acme.app", "1.0.0", limits=ok)).created


# Yank.

async def test_yank_hides_a_version_from_latest_and_keeps_it_reserved(registry: Client) -> None:
    stub = registry.stub
    for version in ("1.0.0", "1.1.0"):
        await publish_with(stub, "com.acme.lib", version)
    response = await stub.YankSkillVersion(pb.YankSkillVersionRequest(
        name="com.acme.lib", version="1.1.0", yanked=True, reason="leaks memory", request_id="r1"), timeout=5)
    assert response.skill_version.yanked and response.skill_version.yank_reason == "leaks memory"
    skill = (await stub.GetSkill(pb.GetSkillRequest(name="com.acme.lib"), timeout=5)).skill
    assert skill.latest_version == "1.0.0" and skill.tags["latest"] == "1.0.0"

    # Reserved forever: other bytes are refused, the same bytes are an idempotent success.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_with(stub, "com.acme.lib", "1.1.0", data=module("other bytes"))
    check_error(caught.value, grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS")
    assert not (await publish_with(stub, "com.acme.lib", "1.1.0")).created

    # Still readable by exact version, and yanking again is idempotent.
    got = await stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.lib", version="1.1.0"), timeout=5)
    assert got.skill_version.yanked
    await stub.YankSkillVersion(pb.YankSkillVersionRequest(
        name="com.acme.lib", version="1.1.0", yanked=True, reason="leaks memory"), timeout=5)

    # Un-yank: latest follows it again, the reason is cleared.
    undone = await stub.YankSkillVersion(pb.YankSkillVersionRequest(
        name="com.acme.lib", version="1.1.0", yanked=False), timeout=5)
    assert not undone.skill_version.yanked and undone.skill_version.yank_reason == ""
    skill = (await stub.GetSkill(pb.GetSkillRequest(name="com.acme.lib"), timeout=5)).skill
    assert skill.latest_version == "1.1.0"


async def test_yank_errors(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.YankSkillVersion(pb.YankSkillVersionRequest(
            name="com.acme.none", version="1.0.0", yanked=True), timeout=5)
    check_error(caught.value, grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.YankSkillVersion(pb.YankSkillVersionRequest(
            name="com.acme.none", version="v1", yanked=True), timeout=5)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION")


async def test_resolution_skips_yanked_versions_unless_pinned_exactly(registry: Client) -> None:
    stub = registry.stub
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        await publish_with(stub, "com.acme.lib", version)
    await stub.YankSkillVersion(pb.YankSkillVersionRequest(name="com.acme.lib", version="1.2.0", yanked=True),
                                timeout=5)
    assert [r[1] for r in await resolve(stub, dep("com.acme.lib", "^1.0.0"))] == ["1.1.0"]
    assert [r[1] for r in await resolve(stub, dep("com.acme.lib", "1.2.0"))] == ["1.2.0"]
    assert [r[1] for r in await resolve(stub, dep("com.acme.lib", "=1.2.0", shared=True))] == ["1.2.0"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(stub, dep("com.acme.lib", ">=1.2.0"))
    check_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "DEPENDENCY_CONFLICT")
    assert "1.2.0 (yanked)" in (caught.value.details() or "")
    # Un-yanked, it is the highest again (the resolver's catalogue is refreshed).
    await stub.YankSkillVersion(pb.YankSkillVersionRequest(name="com.acme.lib", version="1.2.0"), timeout=5)
    assert [r[1] for r in await resolve(stub, dep("com.acme.lib", "^1.0.0"))] == ["1.2.0"]


# Tags.

async def test_tags_move_explicitly_and_latest_is_computed(registry: Client) -> None:
    stub = registry.stub
    for version in ("1.0.0", "1.1.0", "2.0.0-rc.1"):
        await publish_with(stub, "com.acme.lib", version, description=f"lib {version}")
    skill = (await stub.SetSkillTag(pb.SetSkillTagRequest(
        name="com.acme.lib", tag="stable", version="1.0.0", request_id="t1"), timeout=5)).skill
    assert dict(skill.tags) == {"latest": "1.1.0", "stable": "1.0.0"}
    await stub.SetSkillTag(pb.SetSkillTagRequest(name="com.acme.lib", tag="next", version="2.0.0-rc.1"), timeout=5)

    async def get(ref: str) -> str:
        response = await stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.lib", version=ref), timeout=5)
        return str(response.skill_version.version)

    assert [await get("stable"), await get("latest"), await get("next")] == ["1.0.0", "1.1.0", "2.0.0-rc.1"]
    # A new release moves `latest` but not `stable`.
    await publish_with(stub, "com.acme.lib", "1.2.0")
    assert [await get("stable"), await get("latest")] == ["1.0.0", "1.2.0"]
    # Moving a tag.
    await stub.SetSkillTag(pb.SetSkillTagRequest(name="com.acme.lib", tag="stable", version="1.2.0"), timeout=5)
    assert await get("stable") == "1.2.0"
    # Deleting it.
    skill = (await stub.DeleteSkillTag(pb.DeleteSkillTagRequest(name="com.acme.lib", tag="next"), timeout=5)).skill
    assert dict(skill.tags) == {"latest": "1.2.0", "stable": "1.2.0"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get("next")
    assert check_error(caught.value, grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")["tag"] == "next"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteSkillTag(pb.DeleteSkillTagRequest(name="com.acme.lib", tag="next"), timeout=5)
    check_error(caught.value, grpc.StatusCode.NOT_FOUND, "TAG_NOT_FOUND")


@pytest.mark.parametrize(("tag", "version", "code", "reason"), [
    ("latest", "1.0.0", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("Stable", "1.0.0", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("1st", "1.0.0", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("a" * 65, "1.0.0", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("stable", "9.9.9", grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND"),
    ("stable", "1.0", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
])
async def test_set_tag_errors(registry: Client, tag: str, version: str, code: grpc.StatusCode, reason: str) -> None:
    await publish_with(registry.stub, "com.acme.lib", "1.0.0")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.SetSkillTag(pb.SetSkillTagRequest(name="com.acme.lib", tag=tag, version=version),
                                        timeout=5)
    check_error(caught.value, code, reason)


async def test_a_failed_version_cannot_be_tagged(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await publish_with(registry.stub, "com.acme.lib", "1.0.0", data=b"\0asm not really")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.SetSkillTag(pb.SetSkillTagRequest(name="com.acme.lib", tag="stable", version="1.0.0"),
                                        timeout=5)
    check_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_READY")


# Search.

async def test_search_by_prefix_and_keyword_with_pagination(registry: Client) -> None:
    stub = registry.stub
    names = [f"com.acme.tool{i:02d}" for i in range(12)] + ["com.other.image", "org.acme.resize"]
    for i, name in enumerate(names):
        await publish(stub, module(name), name=name, description="Resize IMAGES" if i % 3 == 0 else "text utils")

    async def listing(**filters: Any) -> list[str]:
        found: list[str] = []
        token = ""
        while True:
            response = await stub.ListSkills(pb.ListSkillsRequest(page_size=2, page_token=token, **filters), timeout=5)
            assert len(response.skills) <= 2
            found += [s.name for s in response.skills]
            token = response.next_page_token
            if not token:
                return found

    assert await listing(prefix="com.acme.") == names[:12]
    imaging = [n for i, n in enumerate(names[:12]) if i % 3 == 0]
    assert await listing(query="images") == [*imaging, "com.other.image"]  # by description
    assert await listing(query="OTHER.IM") == ["com.other.image"]  # by name
    assert await listing(query="resize") == [*imaging, "com.other.image", "org.acme.resize"]
    assert await listing(prefix="com.acme.", query="image") == [n for i, n in enumerate(names[:12]) if i % 3 == 0]
    assert await listing(prefix="org.", query="images") == []  # its description says "text utils"
    assert await listing(prefix="org.") == ["org.acme.resize"]
    assert await listing() == sorted(names)

    # A token is bound to its filter.
    first = await stub.ListSkills(pb.ListSkillsRequest(page_size=2, prefix="com.acme."), timeout=5)
    plain = await stub.ListSkills(pb.ListSkillsRequest(page_size=2), timeout=5)
    for token, filters in ((first.next_page_token, {"prefix": "com."}),
                           (first.next_page_token, {}),
                           (first.next_page_token, {"prefix": "com.acme.", "query": "x"}),
                           (plain.next_page_token, {"prefix": "com.acme."})):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListSkills(pb.ListSkillsRequest(page_size=2, page_token=token, **filters), timeout=5)
        check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


# Dependency resolution.

async def test_resolve_dependencies_flattens_the_graph(registry: Client) -> None:
    stub = registry.stub
    for version in ("1.0.0", "1.4.0", "2.0.0"):
        await publish_with(stub, "com.acme.base", version)
    await publish_with(stub, "com.acme.json", "1.0.0", [dep("com.acme.base", "^1.0.0", shared=True)])
    await publish_with(stub, "com.acme.http", "3.1.0", [dep("com.acme.base", "~1.4", shared=True),
                                                        dep("com.acme.json", "1.x")])
    got = await resolve(stub, dep("com.acme.http", "^3.0.0"), dep("com.acme.base", "^2.0.0"))
    assert got == [
        ("com.acme.base", "1.4.0", True, ["com.acme.http@3.1.0", "com.acme.json@1.0.0"]),
        ("com.acme.base", "2.0.0", False, ["(root)"]),
        ("com.acme.http", "3.1.0", False, ["(root)"]),
        ("com.acme.json", "1.0.0", False, ["com.acme.http@3.1.0"]),
    ]
    response = await stub.ResolveDependencies(pb.ResolveDependenciesRequest(requirements=[
        dep("com.acme.http", "^3.0.0")]), timeout=5)
    base = next(d for d in response.dependencies if d.package == "com.acme.base")
    assert base.digest.startswith("sha256:")

    # By published version: its manifest's dependencies are the roots, itself left out.
    by_version = await stub.ResolveDependencies(pb.ResolveDependenciesRequest(
        name="com.acme.http", version="3.1.0"), timeout=5)
    assert [(d.package, d.version) for d in by_version.dependencies] == [
        ("com.acme.base", "1.4.0"), ("com.acme.json", "1.0.0")]


async def test_resolve_conflict_is_failed_precondition_with_the_chain(registry: Client) -> None:
    stub = registry.stub
    for version in ("1.0.0", "2.0.0"):
        await publish_with(stub, "com.acme.base", version)
    await publish_with(stub, "com.acme.a", "1.0.0", [dep("com.acme.base", "^1.0.0", shared=True)])
    await publish_with(stub, "com.acme.b", "1.0.0", [dep("com.acme.base", "^2.0.0", shared=True)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(stub, dep("com.acme.a", "1"), dep("com.acme.b", "1"))
    meta = check_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "DEPENDENCY_CONFLICT")
    assert meta == {"package": "com.acme.base"}
    details = caught.value.details() or ""
    assert "com.acme.a@1.0.0 requires com.acme.base ^1.0.0" in details
    assert "com.acme.b@1.0.0 requires com.acme.base ^2.0.0" in details


async def test_resolve_reports_a_cycle(registry: Client) -> None:
    stub = registry.stub
    # A cycle cannot be published in one go (a dependency must exist to be resolved, not to be published).
    await publish_with(stub, "com.acme.a", "1.0.0", [dep("com.acme.b", "^1.0.0")])
    await publish_with(stub, "com.acme.b", "1.0.0", [dep("com.acme.a", "^1.0.0")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(stub, dep("com.acme.a", "^1.0.0"))
    meta = check_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "DEPENDENCY_CONFLICT")
    assert meta["cycle"] == "com.acme.a -> com.acme.b -> com.acme.a"


async def test_resolve_request_errors(registry: Client) -> None:
    stub = registry.stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(stub, dep("com.acme.a", "^1"), dep("bad name", "^1"), dep("com.acme.c", "not a range"))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME")
    assert set(violations(caught.value)) == {"requirements[1].package", "requirements[2].version_range"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ResolveDependencies(pb.ResolveDependenciesRequest(), timeout=5)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ResolveDependencies(pb.ResolveDependenciesRequest(name="com.acme.a", version="1.0.0"), timeout=5)
    check_error(caught.value, grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(stub, dep("com.acme.missing", "^1"))
    check_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "DEPENDENCY_CONFLICT")


# The CLI (pointed straight at the registry: the gateway forwards these calls unchanged).

async def test_cli_yank_tag_search_resolve(registry: Client, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from services.cli.main import main

    stub = registry.stub
    await publish_with(stub, "com.acme.base", "1.0.0", description="base helpers")
    await publish_with(stub, "com.acme.base", "1.1.0", description="base helpers")
    await publish_with(stub, "com.acme.app", "1.0.0", [dep("com.acme.base", "^1.0.0", shared=True)],
                       description="the app")
    address = ["--gateway", f"127.0.0.1:{registry.host.port}", "--timeout", "5"]

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, [*argv, *address])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await cli("yank", "com.acme.base@1.1.0", "--reason", "broken")
    assert code == 0 and "yanked (broken)" in out
    code, out, _ = await cli("resolve", "com.acme.app@1.0.0")
    assert code == 0
    assert out.splitlines()[1].split()[:3] == ["com.acme.base", "1.0.0", "yes"]
    assert "com.acme.app@1.0.0" in out.splitlines()[1]
    code, out, _ = await cli("yank", "com.acme.base@1.1.0", "--undo")
    assert code == 0 and "no longer yanked" in out
    code, out, _ = await cli("tag", "com.acme.base", "stable", "1.0.0")
    assert code == 0 and "stable: 1.0.0" in out and "latest: 1.1.0" in out
    code, out, _ = await cli("search", "HELPERS")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["SKILL", "com.acme.base"]
    code, out, _ = await cli("search", "--prefix", "com.acme.a")
    assert [line.split()[0] for line in out.splitlines()] == ["SKILL", "com.acme.app"]
    code, _, err = await cli("tag", "com.acme.base", "latest", "1.0.0")
    assert code == 1 and "reserved" in err
    code, _, err = await cli("yank", "com.acme.base")
    assert code == 2 and "NAME@VERSION" in err  # a usage error
