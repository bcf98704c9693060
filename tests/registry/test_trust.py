"""Trust (issue 4): publishers and tokens, namespaces, Ed25519 signatures checked at publish."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.registry.settings import Settings
from services.runtime import signing
from services.runtime.settings import SettingsError
from tests.registry.conftest import Opener
from tests.registry.support import Client, check_error, chunks, module, still_serving, violations


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")


ADMIN = "admin-token-for-tests-0123456789"


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def manifest(name: str, version: str = "1.0.0", description: str = "") -> skill_pb2.Manifest:
    return skill_pb2.Manifest(name=name, version=version, description=description,
                              abi=skill_pb2.ABI_WASI_COMMAND_V1)


def sign(key: Ed25519PrivateKey, man: skill_pb2.Manifest, data: bytes) -> pb.Signature:
    subject = signing.Subject(name=man.name, version=man.version, digest="sha256:" + hashlib.sha256(data).hexdigest(),
                              bundle_digest="", manifest=signing.manifest_bytes(man))
    return pb.Signature(key_id=signing.key_id(signing.raw_public_key(key)), signature=signing.sign(key, subject))


async def publish(stub: Any, man: skill_pb2.Manifest, *, token: str | None = None,
                  signature: pb.Signature | None = None, data: bytes | None = None) -> pb.PublishSkillResponse:
    data = module(f"{man.name}@{man.version}") if data is None else data
    meta = pb.PublishSkillMetadata(manifest=man, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    if signature is not None:
        meta.signature.CopyFrom(signature)
    requests = [pb.PublishSkillRequest(metadata=meta), *chunks(data, 64 * 1024)]

    async def stream() -> Any:
        for request in requests:
            yield request

    response: pb.PublishSkillResponse = await stub.PublishSkill(
        stream(), timeout=10, metadata=auth(token) if token is not None else None)
    return response


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return check_error(caught.value, code, reason)


async def create_publisher(stub: Any, name: str) -> str:
    response = await stub.CreatePublisher(pb.CreatePublisherRequest(name=name), timeout=5, metadata=auth(ADMIN))
    assert response.publisher.name == name
    return str(response.token)


async def create_namespace(stub: Any, name: str, owner: str, *, require_signatures: bool = False,
                           keys: tuple[bytes, ...] = ()) -> pb.Namespace:
    response = await stub.CreateNamespace(pb.CreateNamespaceRequest(
        name=name, owner=owner, require_signatures=require_signatures, public_keys=list(keys)),
        timeout=5, metadata=auth(ADMIN))
    return response.namespace


@pytest.fixture
async def trusted(open_registry: Opener) -> Client:
    return await open_registry(admin_token=ADMIN)


# Admin calls.

async def test_admin_calls_are_refused_when_no_admin_token_is_configured(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.stub.CreatePublisher(pb.CreatePublisherRequest(name="acme"), timeout=5,
                                            metadata=auth("anything"))
    check_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_TOKEN_NOT_CONFIGURED")
    assert "CLAWHUB_REGISTRY_ADMIN_TOKEN" in (caught.value.details() or "")
    await refused(registry.stub.CreateNamespace(pb.CreateNamespaceRequest(name="com.acme", owner="acme"),
                                                timeout=5), grpc.StatusCode.PERMISSION_DENIED,
                  "ADMIN_TOKEN_NOT_CONFIGURED")
    # Open names still publish as before (the README walkthrough needs no token).
    assert (await publish(registry.stub, manifest("com.example.open"))).created
    assert not (await registry.stub.ListNamespaces(pb.ListNamespacesRequest(), timeout=5)).namespaces


async def test_admin_calls_need_the_admin_token(trusted: Client) -> None:
    stub = trusted.stub
    request = pb.CreatePublisherRequest(name="acme")
    await refused(stub.CreatePublisher(request, timeout=5), grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    await refused(stub.CreatePublisher(request, timeout=5, metadata=auth("wrong")), grpc.StatusCode.PERMISSION_DENIED,
                  "ADMIN_REQUIRED")
    # Not a bearer token at all.
    await refused(stub.CreatePublisher(request, timeout=5, metadata=(("authorization", f"Basic {ADMIN}"),)),
                  grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    token = await create_publisher(stub, "acme")
    assert token.startswith("clawhub_") and len(token) > 40
    # A publisher's token is not the admin's.
    await refused(stub.CreatePublisher(pb.CreatePublisherRequest(name="other"), timeout=5, metadata=auth(token)),
                  grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    await refused(stub.CreatePublisher(request, timeout=5, metadata=auth(ADMIN)), grpc.StatusCode.ALREADY_EXISTS,
                  "PUBLISHER_EXISTS")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreatePublisher(pb.CreatePublisherRequest(name="Not Valid"), timeout=5, metadata=auth(ADMIN))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME")
    assert "name" in violations(caught.value)
    assert await create_publisher(stub, "other") != token


async def test_tokens_are_stored_only_as_hashes(trusted: Client) -> None:
    token = await create_publisher(trusted.stub, "acme")
    await trusted.host.stop(grace=0.5)
    stored = b"".join(p.read_bytes() for p in trusted.settings.data_dir.glob("registry.sqlite3*"))
    assert b"acme" in stored
    assert token.encode() not in stored and ADMIN.encode() not in stored
    assert hashlib.sha256(token.encode()).hexdigest().encode() in stored


# Namespaces.

async def test_publishing_in_a_namespace_needs_its_owners_token(trusted: Client) -> None:
    stub = trusted.stub
    acme, other = await create_publisher(stub, "acme"), await create_publisher(stub, "other")
    await create_namespace(stub, "com.acme", "acme")
    for name in ("com.acme.echo", "com.acme.tools.deep", "com.acme"):
        meta = await refused(publish(stub, manifest(name)), grpc.StatusCode.PERMISSION_DENIED, "NAMESPACE_NOT_OWNED")
        assert meta["skill"] == name and meta["namespace"] == "com.acme" and meta["owner"] == "acme"
    await refused(publish(stub, manifest("com.acme.echo"), token=other), grpc.StatusCode.PERMISSION_DENIED,
                  "NAMESPACE_NOT_OWNED")
    await refused(publish(stub, manifest("com.acme.echo"), token="clawhub_not-a-real-token"),
                  grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    # A wrong token is refused even for an open name: a typo must not turn into an anonymous publish.
    await refused(publish(stub, manifest("com.example.open"), token="typo"), grpc.StatusCode.UNAUTHENTICATED,
                  "INVALID_TOKEN")
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)
    # `com.acmex` is not inside `com.acme`: dot boundaries.
    assert (await publish(stub, manifest("com.acmex.tool"))).created
    response = await publish(stub, manifest("com.acme.echo"), token=acme)
    assert response.created and response.skill_version.publisher == "acme"
    assert not response.skill_version.HasField("signature")
    assert "unsigned" in response.skill_version.history[-1].reason
    by_admin = await publish(stub, manifest("com.acme.echo", "1.0.1"), token=ADMIN)
    assert by_admin.skill_version.publisher == "(admin)"


async def test_a_registry_can_require_every_name_in_a_namespace(open_registry: Opener) -> None:
    client = await open_registry(admin_token=ADMIN, require_namespace=True)
    meta = await refused(publish(client.stub, manifest("com.example.open")), grpc.StatusCode.PERMISSION_DENIED,
                         "NAMESPACE_REQUIRED")
    assert meta["skill"] == "com.example.open"
    token = await create_publisher(client.stub, "example")
    await refused(publish(client.stub, manifest("com.example.open"), token=token), grpc.StatusCode.PERMISSION_DENIED,
                  "NAMESPACE_REQUIRED")
    await create_namespace(client.stub, "com.example", "example")
    assert (await publish(client.stub, manifest("com.example.open"), token=token)).created


async def test_overlapping_claims_of_another_publisher_are_refused(trusted: Client) -> None:
    stub = trusted.stub
    await create_publisher(stub, "acme")
    await create_publisher(stub, "other")
    await create_namespace(stub, "com.acme.tools", "acme")
    meta = await refused(create_namespace(stub, "com.acme", "other"), grpc.StatusCode.FAILED_PRECONDITION,
                         "NAMESPACE_OVERLAP")
    assert meta == {"namespace": "com.acme", "conflicts_with": "com.acme.tools", "owner": "acme"}
    await refused(create_namespace(stub, "com.acme.tools.x", "other"), grpc.StatusCode.FAILED_PRECONDITION,
                  "NAMESPACE_OVERLAP")
    await refused(create_namespace(stub, "com.acme.tools", "acme"), grpc.StatusCode.ALREADY_EXISTS, "NAMESPACE_EXISTS")
    await refused(create_namespace(stub, "com.nobody", "nobody"), grpc.StatusCode.NOT_FOUND, "PUBLISHER_NOT_FOUND")
    await refused(create_namespace(stub, "com", "acme"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME")
    await refused(create_namespace(stub, "com.acme", "acme", keys=(b"short",)), grpc.StatusCode.INVALID_ARGUMENT,
                  "INVALID_ARGUMENT")
    # The owner may nest, around and inside its own; another publisher may take a sibling.
    await create_namespace(stub, "com.acme", "acme")
    await create_namespace(stub, "com.acme.tools.secure", "acme", require_signatures=True)
    await create_namespace(stub, "com.acmex", "other")
    governing = await stub.GetNamespace(pb.GetNamespaceRequest(skill="com.acme.tools.secure.x"), timeout=5)
    assert governing.namespace.name == "com.acme.tools.secure" and governing.namespace.require_signatures
    assert (await stub.GetNamespace(pb.GetNamespaceRequest(skill="com.acme.other"), timeout=5)).namespace.name == \
        "com.acme"
    await refused(stub.GetNamespace(pb.GetNamespaceRequest(skill="org.free.x"), timeout=5), grpc.StatusCode.NOT_FOUND,
                  "NAMESPACE_NOT_FOUND")
    await refused(stub.GetNamespace(pb.GetNamespaceRequest(), timeout=5), grpc.StatusCode.INVALID_ARGUMENT,
                  "INVALID_ARGUMENT")
    names, token = [], ""
    while True:
        page = await stub.ListNamespaces(pb.ListNamespacesRequest(page_size=2, page_token=token), timeout=5)
        names += [n.name for n in page.namespaces]
        token = page.next_page_token
        if not token:
            break
    assert names == ["com.acme", "com.acme.tools", "com.acme.tools.secure", "com.acmex"]
    await refused(stub.ListNamespaces(pb.ListNamespacesRequest(page_token="bogus"), timeout=5),
                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    await still_serving(stub)


async def test_yank_and_tags_of_a_namespaced_skill_need_its_owner(trusted: Client) -> None:
    stub = trusted.stub
    acme, other = await create_publisher(stub, "acme"), await create_publisher(stub, "other")
    await create_namespace(stub, "com.acme", "acme")
    await publish(stub, manifest("com.acme.echo"), token=acme)
    yank = pb.YankSkillVersionRequest(name="com.acme.echo", version="1.0.0", yanked=True, reason="bad")
    tag = pb.SetSkillTagRequest(name="com.acme.echo", tag="stable", version="1.0.0")
    untag = pb.DeleteSkillTagRequest(name="com.acme.echo", tag="stable")
    for token in (None, other):
        metadata = auth(token) if token else None
        for call in (stub.YankSkillVersion(yank, timeout=5, metadata=metadata),
                     stub.SetSkillTag(tag, timeout=5, metadata=metadata)):
            meta = await refused(call, grpc.StatusCode.PERMISSION_DENIED, "NAMESPACE_NOT_OWNED")
            assert meta["namespace"] == "com.acme"
    assert (await stub.SetSkillTag(tag, timeout=5, metadata=auth(acme))).skill.tags["stable"] == "1.0.0"
    await refused(stub.DeleteSkillTag(untag, timeout=5, metadata=auth(other)), grpc.StatusCode.PERMISSION_DENIED,
                  "NAMESPACE_NOT_OWNED")
    await stub.DeleteSkillTag(untag, timeout=5, metadata=auth(ADMIN))
    assert (await stub.YankSkillVersion(yank, timeout=5, metadata=auth(acme))).skill_version.yanked
    # Open names keep open yank and tags.
    await publish(stub, manifest("com.example.open"))
    await stub.YankSkillVersion(pb.YankSkillVersionRequest(name="com.example.open", version="1.0.0", yanked=True),
                                timeout=5)


async def test_only_the_owner_or_admin_updates_a_namespace(trusted: Client) -> None:
    stub = trusted.stub
    acme, other = await create_publisher(stub, "acme"), await create_publisher(stub, "other")
    await create_namespace(stub, "com.acme", "acme")
    public = signing.raw_public_key(signing.generate())
    add = pb.UpdateNamespaceRequest(name="com.acme", add_public_keys=[public], require_signatures=True)
    for metadata in (None, auth(other)):
        await refused(stub.UpdateNamespace(add, timeout=5, metadata=metadata), grpc.StatusCode.PERMISSION_DENIED,
                      "NAMESPACE_NOT_OWNED")
    await refused(stub.UpdateNamespace(pb.UpdateNamespaceRequest(name="com.acme", add_public_keys=[b"\0" * 31]),
                                       timeout=5, metadata=auth(acme)),
                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    await refused(stub.UpdateNamespace(pb.UpdateNamespaceRequest(name="com.nothing"), timeout=5, metadata=auth(acme)),
                  grpc.StatusCode.NOT_FOUND, "NAMESPACE_NOT_FOUND")
    updated = (await stub.UpdateNamespace(add, timeout=5, metadata=auth(acme))).namespace
    assert updated.require_signatures and [k.key_id for k in updated.keys] == [signing.key_id(public)]
    assert updated.keys[0].public_key == public
    # A remove of an unknown key changes nothing, not even the flag sent with it.
    await refused(stub.UpdateNamespace(pb.UpdateNamespaceRequest(
        name="com.acme", remove_key_ids=["ed25519:0000000000000000"], require_signatures=False),
        timeout=5, metadata=auth(acme)), grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")
    current = (await stub.GetNamespace(pb.GetNamespaceRequest(name="com.acme"), timeout=5)).namespace
    assert current.require_signatures and len(current.keys) == 1
    # Unset require_signatures leaves it; the admin may change any namespace.
    removed = (await stub.UpdateNamespace(pb.UpdateNamespaceRequest(
        name="com.acme", remove_key_ids=[signing.key_id(public)]), timeout=5, metadata=auth(ADMIN))).namespace
    assert removed.require_signatures and not removed.keys


# Signatures.

@pytest.fixture
async def signed_namespace(trusted: Client) -> tuple[Client, str, Ed25519PrivateKey]:
    """com.acme, owned by acme, requiring signatures by one trusted key; returns (client, token, key)."""
    token = await create_publisher(trusted.stub, "acme")
    key = signing.generate()
    await create_namespace(trusted.stub, "com.acme", "acme", require_signatures=True,
                           keys=(signing.raw_public_key(key),))
    return trusted, token, key


async def test_a_namespace_requiring_signatures_refuses_anything_but_a_valid_one(
        signed_namespace: tuple[Client, str, Ed25519PrivateKey]) -> None:
    client, token, key = signed_namespace
    stub = client.stub
    man = manifest("com.acme.echo", description="echoes")
    data = module("signed")
    meta = await refused(publish(stub, man, token=token, data=data), grpc.StatusCode.PERMISSION_DENIED,
                         "SIGNATURE_REQUIRED")
    assert meta["namespace"] == "com.acme"
    # Signed by a key the namespace does not trust.
    stranger = sign(signing.generate(), man, data)
    meta = await refused(publish(stub, man, token=token, data=data, signature=stranger),
                         grpc.StatusCode.PERMISSION_DENIED, "SIGNER_NOT_TRUSTED")
    assert meta["key_id"] == stranger.key_id
    # The trusted key's signature over another manifest (tampered after signing: a capability added).
    tampered = skill_pb2.Manifest()
    tampered.CopyFrom(man)
    tampered.capabilities.append("env:SECRET")
    for bad in (sign(key, tampered, data),                       # over another manifest
                sign(key, man, module("other bytes")),            # over other module bytes
                sign(key, manifest("com.acme.echo", "2.0.0", "echoes"), data),  # over another version
                pb.Signature(key_id=signing.key_id(signing.raw_public_key(key)), signature=b"\1" * 64)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish(stub, man, token=token, data=data, signature=bad)
        check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "SIGNATURE_INVALID")
        assert "metadata.signature" in violations(caught.value)
    good = sign(key, man, data)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(stub, man, token=token, data=data,
                      signature=pb.Signature(key_id="rsa:1", signature=good.signature))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "SIGNATURE_INVALID")
    assert "metadata.signature.key_id" in violations(caught.value)
    # Nothing was stored by any refused publish.
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetSkill(pb.GetSkillRequest(name="com.acme.echo"), timeout=5)
    # A valid signature: stored, shown, mentioned in the verdict.
    response = await publish(stub, man, token=token, data=data, signature=good)
    assert response.created
    version = (await stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0.0"),
                                          timeout=5)).skill_version
    assert version.signature == good and version.publisher == "acme"
    assert f"signature by {good.key_id} verified" in version.history[-1].reason
    # The stored signature verifies over what GetSkillVersion returns (what the executor re-checks).
    subject = signing.Subject(version.name, version.version, version.digest, version.bundle_digest,
                              signing.manifest_bytes(version.manifest))
    assert signing.verify(signing.raw_public_key(key), version.signature.signature, subject)


async def test_a_signature_is_checked_even_where_none_is_required(trusted: Client) -> None:
    stub = trusted.stub
    token = await create_publisher(stub, "acme")
    key = signing.generate()
    await create_namespace(stub, "com.acme", "acme", keys=(signing.raw_public_key(key),))
    man, data = manifest("com.acme.echo"), module("x")
    other = manifest("com.acme.echo", description="something else")
    await refused(publish(stub, man, token=token, data=data, signature=sign(key, other, data)),
                  grpc.StatusCode.INVALID_ARGUMENT, "SIGNATURE_INVALID")
    # Under no namespace no key is trusted, so a signature there cannot be checked and is refused.
    free = manifest("org.free.tool")
    meta = await refused(publish(stub, free, data=data, signature=sign(key, free, data)),
                         grpc.StatusCode.PERMISSION_DENIED, "SIGNER_NOT_TRUSTED")
    assert "namespace" not in meta  # under no namespace: no `namespace: ` with nothing after it
    assert (await publish(stub, man, token=token, data=data)).created
    signed = await publish(stub, manifest("com.acme.echo", "1.1.0"), token=token, data=data,
                           signature=sign(key, manifest("com.acme.echo", "1.1.0"), data))
    assert signed.skill_version.signature.key_id == signing.key_id(signing.raw_public_key(key))



async def test_problems_say_when_a_signature_is_no_longer_trusted(
        signed_namespace: tuple[Client, str, Ed25519PrivateKey]) -> None:
    """`clawhub namespace remove-key` revokes what the key signed: the versions say they cannot run (what
    `clawhub status` shows), and adding the key back clears it."""
    client, token, key = signed_namespace
    stub = client.stub
    man, data = manifest("com.acme.echo"), module("revoked")
    await publish(stub, man, token=token, data=data, signature=sign(key, man, data))
    get = pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0.0")
    assert list((await stub.GetSkillVersion(get, timeout=5)).skill_version.problems) == []
    key_id = signing.key_id(signing.raw_public_key(key))
    await stub.UpdateNamespace(pb.UpdateNamespaceRequest(name="com.acme", remove_key_ids=[key_id]), timeout=5,
                               metadata=auth(token))
    problems = list((await stub.GetSkillVersion(get, timeout=5)).skill_version.problems)
    assert len(problems) == 1 and key_id in problems[0] and "no longer trusts" in problems[0]
    listed = (await stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.echo"), timeout=5))
    assert list(listed.skill_versions[0].problems) == problems
    await stub.UpdateNamespace(pb.UpdateNamespaceRequest(name="com.acme", add_public_keys=[
        signing.raw_public_key(key)]), timeout=5, metadata=auth(token))
    assert list((await stub.GetSkillVersion(get, timeout=5)).skill_version.problems) == []


async def test_problems_say_when_a_namespace_starts_requiring_signatures(trusted: Client) -> None:
    stub = trusted.stub
    token = await create_publisher(stub, "acme")
    await create_namespace(stub, "com.acme", "acme")
    await publish(stub, manifest("com.acme.echo"), token=token)
    await stub.UpdateNamespace(pb.UpdateNamespaceRequest(name="com.acme", require_signatures=True), timeout=5,
                               metadata=auth(token))
    version = (await stub.GetSkillVersion(pb.GetSkillVersionRequest(name="com.acme.echo", version="1.0.0"),
                                          timeout=5)).skill_version
    assert [p for p in version.problems if "requires signatures" in p]


def test_trust_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWHUB_REGISTRY_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CLAWHUB_REGISTRY_REQUIRE_NAMESPACE", raising=False)
    defaults = Settings.from_env()
    assert defaults.admin_token == "" and defaults.require_namespace is False
    monkeypatch.setenv("CLAWHUB_REGISTRY_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("CLAWHUB_REGISTRY_REQUIRE_NAMESPACE", "true")
    settings = Settings.from_env()
    assert settings.admin_token == ADMIN and settings.require_namespace is True
    assert ADMIN not in repr(settings)  # settings may be logged; the secret must not be
    monkeypatch.setenv("CLAWHUB_REGISTRY_REQUIRE_NAMESPACE", "sometimes")
    with pytest.raises(SettingsError, match="CLAWHUB_REGISTRY_REQUIRE_NAMESPACE"):
        Settings.from_env()
