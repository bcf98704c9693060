"""Lookups and listings: not-found errors, AIP-158 pagination, SemVer ordering, latest version."""

from __future__ import annotations

import base64

import grpc
import pytest
from clawhub.registry.v1 import registry_internal_pb2 as internal_pb
from clawhub.registry.v1 import registry_service_pb2 as pb

from tests.registry.conftest import Backend
from tests.registry.support import MODULE, Client, check_error, module, publish, still_serving, violations


@pytest.fixture
def registry_overrides(backend: Backend) -> dict[str, object]:
    """Every test here runs on each storage backend (sqlite and files; PostgreSQL)."""
    return backend.settings


async def test_lookups_of_missing_things(registry: Client) -> None:
    await publish(registry.stub, MODULE, name="com.acme.echo", version="1.0.0")
    stub = registry.stub
    cases = [
        (stub.GetSkill(pb.GetSkillRequest(name="com.acme.nope"), timeout=5),
         "SKILL_NOT_FOUND", {"name": "com.acme.nope"}),
        (stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.echo", version="9.9.9"), timeout=5),
         "VERSION_NOT_FOUND", {"name": "com.acme.echo", "version": "9.9.9"}),
        (stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.nope", version="1.0.0"), timeout=5),
         "VERSION_NOT_FOUND", {"name": "com.acme.nope", "version": "1.0.0"}),
        (stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.nope"), timeout=5),
         "SKILL_NOT_FOUND", {"name": "com.acme.nope"}),
    ]
    for call, reason, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert check_error(caught.value, grpc.StatusCode.NOT_FOUND, reason) == expected

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.DownloadBlob(internal_pb.DownloadBlobRequest(digest="sha256:" + "0" * 64), timeout=5):
            pass
    assert check_error(caught.value, grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND") == {
        "digest": "sha256:" + "0" * 64}
    await still_serving(stub)


async def test_an_unknown_skill_name_suggests_close_published_names(registry: Client) -> None:
    stub = registry.stub
    for name in ("com.example.uppercase", "com.example.reverse", "com.example.foo"):
        await publish(stub, MODULE, name=name, version="1.0.0")
    calls = [
        (stub.GetSkill(pb.GetSkillRequest(name="com.example.uppercas"), timeout=5), "SKILL_NOT_FOUND"),
        (stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.example.uppercas"), timeout=5),
         "SKILL_NOT_FOUND"),
        (stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.example.uppercas", version="latest"), timeout=5),
         "SKILL_NOT_FOUND"),
        # A version of an unknown skill (what a deploy asks the registry) keeps its reason, and says why.
        (stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.example.uppercas", version="1.0.0"), timeout=5),
         "VERSION_NOT_FOUND"),
        (stub.ResolveDependencies(pb.ResolveDependenciesRequest(name="com.example.uppercas", version="1.0.0"),
                                  timeout=5), "VERSION_NOT_FOUND"),
    ]
    for call, reason in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        meta = check_error(caught.value, grpc.StatusCode.NOT_FOUND, reason)
        assert meta["did_you_mean"] == "com.example.uppercase"
        assert "no skill named 'com.example.uppercas' (did you mean com.example.uppercase?)" in (
            caught.value.details() or "")
    # Nothing close: no suggestion, and no empty `did_you_mean`.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSkill(pb.GetSkillRequest(name="org.other.thing"), timeout=5)
    assert check_error(caught.value, grpc.StatusCode.NOT_FOUND, "SKILL_NOT_FOUND") == {"name": "org.other.thing"}
    assert "did you mean" not in (caught.value.details() or "")
    # A name published after an earlier lookup is suggested too.
    await publish(stub, MODULE, name="org.other.things", version="1.0.0")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSkill(pb.GetSkillRequest(name="org.other.thing"), timeout=5)
    assert check_error(caught.value, grpc.StatusCode.NOT_FOUND, "SKILL_NOT_FOUND")["did_you_mean"] == (
        "org.other.things")


@pytest.mark.parametrize(("call", "reason", "field"), [
    ("GetSkill", "INVALID_NAME", "name"),
    ("GetSkillVersion", "INVALID_NAME", "name"),
    ("GetSkillVersionBadVersion", "INVALID_VERSION", "version"),
    ("ListSkillVersions", "INVALID_NAME", "name"),
    ("DownloadBlob", "INVALID_DIGEST", "digest"),
    ("DownloadBlobUpper", "INVALID_DIGEST", "digest"),
])
async def test_malformed_lookups(registry: Client, call: str, reason: str, field: str) -> None:
    stub = registry.stub

    async def run() -> None:
        if call == "GetSkill":
            await stub.GetSkill(pb.GetSkillRequest(name="not a name"), timeout=5)
        elif call == "GetSkillVersion":
            await stub.GetSkillVersion(pb.GetSkillVersionRequest(name="", version="1.0.0"), timeout=5)
        elif call == "GetSkillVersionBadVersion":
            await stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0"),
                                       timeout=5)
        elif call == "ListSkillVersions":
            await stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="COM.ACME"), timeout=5)
        else:
            bad = "sha256:abc" if call == "DownloadBlob" else "sha256:" + "A" * 64
            async for _ in stub.DownloadBlob(internal_pb.DownloadBlobRequest(digest=bad), timeout=5):
                pass

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run()
    assert check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, reason)["field"] == field
    assert field in violations(caught.value)
    await still_serving(stub)


async def test_list_skills_pages_through_seven_skills(registry: Client) -> None:
    names = [f"com.acme.skill{i}" for i in (5, 2, 7, 1, 4, 3, 6)]
    for name in names:
        await publish(registry.stub, MODULE, name=name)

    seen: list[str] = []
    pages: list[int] = []
    token = ""
    while True:
        page = await registry.stub.ListSkills(pb.ListSkillsRequest(page_size=3, page_token=token), timeout=5)
        seen += [s.name for s in page.skills]
        pages.append(len(page.skills))
        token = page.next_page_token
        if not token:
            break
    assert pages == [3, 3, 1]
    assert seen == sorted(names)

    everything = await registry.stub.ListSkills(pb.ListSkillsRequest(), timeout=5)
    assert [s.name for s in everything.skills] == sorted(names) and everything.next_page_token == ""
    # Exactly one page's worth: no token pointing at an empty page.
    exact = await registry.stub.ListSkills(pb.ListSkillsRequest(page_size=7), timeout=5)
    assert len(exact.skills) == 7 and exact.next_page_token == ""
    # Over the maximum is coerced, not refused.
    huge = await registry.stub.ListSkills(pb.ListSkillsRequest(page_size=100_000), timeout=5)
    assert len(huge.skills) == 7


async def test_list_skills_when_empty(registry: Client) -> None:
    page = await registry.stub.ListSkills(pb.ListSkillsRequest(page_size=3), timeout=5)
    assert list(page.skills) == [] and page.next_page_token == ""


@pytest.mark.parametrize("token", [
    "garbage!!", "bm90LWEtdG9rZW4=", base64.urlsafe_b64encode(b"versions/com.acme.a@1.0.0").decode(), "\u00e9"])
async def test_bad_page_tokens(registry: Client, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.ListSkills(pb.ListSkillsRequest(page_token=token), timeout=5)
    assert check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")["field"] == "page_token"
    await still_serving(registry.stub)


async def test_negative_page_size(registry: Client) -> None:
    await publish(registry.stub, MODULE)
    for call in (registry.stub.ListSkills(pb.ListSkillsRequest(page_size=-1), timeout=5),
                 registry.stub.ListSkillVersions(
                     pb.ListSkillVersionsRequest(name="com.acme.echo", page_size=-5), timeout=5)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")["field"] == "page_size"


ORDER = ["2.0.0-rc.1", "2.0.0-alpha.beta", "2.0.0-alpha.1", "2.0.0-alpha", "1.10.0", "1.2.0", "1.0.0",
         "1.0.0-beta.11", "1.0.0-beta.2", "0.9.9"]


async def test_versions_are_listed_newest_first_by_semver(registry: Client) -> None:
    shuffled = ["1.0.0", "2.0.0-alpha", "1.10.0", "0.9.9", "2.0.0-rc.1", "1.0.0-beta.2", "1.2.0",
                "2.0.0-alpha.1", "1.0.0-beta.11", "2.0.0-alpha.beta"]
    assert sorted(shuffled) != ORDER
    for version in shuffled:
        await publish(registry.stub, module(version), version=version)

    listed = await registry.stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.echo"), timeout=5)
    assert [v.version for v in listed.skill_versions] == ORDER

    # Paged, the same order.
    seen: list[str] = []
    token = ""
    while True:
        page = await registry.stub.ListSkillVersions(
            pb.ListSkillVersionsRequest(name="com.acme.echo", page_size=3, page_token=token), timeout=5)
        seen += [v.version for v in page.skill_versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == ORDER

    # Latest is the highest release, not the highest prerelease.
    skill = (await registry.stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)).skill
    assert skill.latest_version == "1.10.0"


async def test_version_page_token_is_bound_to_its_skill(registry: Client) -> None:
    for name in ("com.acme.a", "com.acme.b"):
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            await publish(registry.stub, module(name + version), name=name, version=version)
    page = await registry.stub.ListSkillVersions(
        pb.ListSkillVersionsRequest(name="com.acme.a", page_size=2), timeout=5)
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.ListSkillVersions(
            pb.ListSkillVersionsRequest(name="com.acme.b", page_token=page.next_page_token), timeout=5)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    # A ListSkills token is not a ListSkillVersions token either.
    skills = await registry.stub.ListSkills(pb.ListSkillsRequest(page_size=1), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.ListSkillVersions(
            pb.ListSkillVersionsRequest(name="com.acme.a", page_token=skills.next_page_token), timeout=5)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_latest_version_rules(registry: Client) -> None:
    # Only prereleases: the highest prerelease.
    for version in ("1.0.0-alpha", "1.0.0-rc.1", "0.9.0-beta"):
        await publish(registry.stub, module(version), name="com.acme.pre", version=version)
    # A release that failed verification does not count.
    await publish(registry.stub, MODULE, name="com.acme.mixed", version="1.0.0", description="good")
    with pytest.raises(grpc.aio.AioRpcError):
        await publish(registry.stub, b"not wasm", name="com.acme.mixed", version="2.0.0", description="bad")

    async def latest(name: str) -> tuple[str, str]:
        skill = (await registry.stub.GetSkill(pb.GetSkillRequest(name=name), timeout=5)).skill
        return skill.latest_version, skill.description

    assert (await latest("com.acme.pre"))[0] == "1.0.0-rc.1"
    assert await latest("com.acme.mixed") == ("1.0.0", "good")
    listed = await registry.stub.ListSkills(pb.ListSkillsRequest(), timeout=5)
    assert [(s.name, s.latest_version) for s in listed.skills] == [
        ("com.acme.mixed", "1.0.0"), ("com.acme.pre", "1.0.0-rc.1")]
