"""The executor re-verifies what it is asked to run (issue 4, trust): the registry must list the digest as
skill@version, and a signature must verify against the namespace's keys, before any byte runs."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb
from clawhub.executor.v1 import executor_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.executor.provenance import Provenance, ProvenanceUnavailable
from services.executor.server import build_server
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime import signing
from services.runtime.errors import ServiceError, error_info
from services.runtime.wasm import sha256_digest
from tests.conftest import Starter
from tests.executor.conftest import TEST_SETTINGS, MemorySource
from tests.executor.fixtures import ECHO, NO_OUTPUT
from tests.executor.test_dependencies import LIB, SHOUT  # a library, and a skill calling its `upper`

SKILL = "com.acme.echo"
DOMAIN = "executor.clawhub"


class FakeRegistry:
    """A ProvenanceSource answering from dicts; counts questions, can be made unreachable."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], registry_pb.SkillVersion] = {}
        self.namespaces: dict[str, registry_pb.Namespace] = {}
        self.asked = 0
        self.namespaces_asked = 0
        self.unavailable = False
        self.hang = False
        self.delay = 0.0

    async def version(self, skill: str, version: str) -> registry_pb.SkillVersion | None:
        self.asked += 1
        await asyncio.sleep(self.delay)
        if self.unavailable:
            raise ProvenanceUnavailable("the test registry is down")
        return self.versions.get((skill, version))

    async def namespace(self, skill: str) -> registry_pb.Namespace | None:
        self.namespaces_asked += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.unavailable:
            raise ProvenanceUnavailable("the test registry is down")
        matches = [n for prefix, n in self.namespaces.items() if skill == prefix or skill.startswith(prefix + ".")]
        return max(matches, key=lambda n: len(n.name)) if matches else None

    def publish(self, data: bytes, *, version: str = "1.0.0", key: Ed25519PrivateKey | None = None,
                capabilities: tuple[str, ...] = (), skill: str = SKILL) -> registry_pb.SkillVersion:
        manifest = skill_pb2.Manifest(name=skill, version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1,
                                      capabilities=list(capabilities))
        published = registry_pb.SkillVersion(name=skill, version=version, digest=sha256_digest(data),
                                             manifest=manifest, state=release_pb2.RELEASE_STATE_READY)
        if key is not None:
            subject = signing.Subject(skill, version, published.digest, "", signing.manifest_bytes(manifest))
            published.signature.key_id = signing.key_id(signing.raw_public_key(key))
            published.signature.signature = signing.sign(key, subject)
        self.versions[(skill, version)] = published
        return published

    def claim(self, prefix: str, *keys: Ed25519PrivateKey, require_signatures: bool = True) -> registry_pb.Namespace:
        namespace = registry_pb.Namespace(name=prefix, owner="acme", require_signatures=require_signatures)
        for key in keys:
            raw = signing.raw_public_key(key)
            namespace.keys.add(key_id=signing.key_id(raw), public_key=raw)
        self.namespaces[prefix] = namespace
        return namespace


class Setup:
    def __init__(self, stub: pb_grpc.ExecutorServiceStub, source: MemorySource, registry: FakeRegistry) -> None:
        self.stub = stub
        self.source = source
        self.registry = registry


@pytest.fixture
async def setup(start_service: Starter, tmp_path: Path) -> AsyncIterator[Setup]:
    source, registry = MemorySource(), FakeRegistry()
    host = await start_service(build_server(replace(TEST_SETTINGS, data_dir=tmp_path / "executor"),
                                            module_source=source, provenance_source=registry))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        yield Setup(pb_grpc.ExecutorServiceStub(channel), source, registry)


def execute(digest: str, *, skill: str = SKILL, version: str = "1.0.0", **fields: Any) -> pb.ExecuteRequest:
    fields.setdefault("input", b"hi")
    return pb.ExecuteRequest(digest=digest, skill=skill, version=version, **fields)


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    info = error_info(caught.value)
    assert info is not None and info.reason == reason and info.domain == DOMAIN, (info, caught.value.details())
    return dict(info.metadata)


async def test_a_signed_version_is_verified_once_then_runs(setup: Setup) -> None:
    key = signing.generate()
    setup.registry.claim("com.acme", key)
    digest = setup.source.add(ECHO)
    setup.registry.publish(ECHO, key=key)
    loaded = await setup.stub.LoadSkill(pb.LoadSkillRequest(digest=digest, skill=SKILL, version="1.0.0"), timeout=10)
    assert loaded.digest == digest
    for _ in range(3):
        assert (await setup.stub.Execute(execute(digest), timeout=10)).output == b"ok:hi"
    # Verified (skill, version, digest) triples are cached: one registry question for all four calls.
    assert setup.registry.asked == 1


async def test_concurrent_first_calls_ask_the_registry_once(setup: Setup) -> None:
    digest = setup.source.add(ECHO)
    setup.registry.publish(ECHO)
    setup.registry.delay = 0.05  # every call arrives while the first question is still out
    outputs = await asyncio.gather(*(setup.stub.Execute(execute(digest), timeout=10) for _ in range(8)))
    assert [o.output for o in outputs] == [b"ok:hi"] * 8
    assert setup.registry.asked == 1


async def test_a_digest_the_registry_does_not_list_as_that_version_never_runs(setup: Setup) -> None:
    digest = setup.source.add(ECHO)
    published = setup.registry.publish(NO_OUTPUT)
    meta = await refused(setup.stub.Execute(execute(digest), timeout=10), grpc.StatusCode.FAILED_PRECONDITION,
                         "PROVENANCE_MISMATCH")
    assert meta["registry_digest"] == published.digest and meta["digest"] == digest
    await refused(setup.stub.LoadSkill(pb.LoadSkillRequest(digest=digest, skill=SKILL, version="1.0.0"), timeout=10),
                  grpc.StatusCode.FAILED_PRECONDITION, "PROVENANCE_MISMATCH")
    # Unknown version, a version not READY, another bundle, capabilities the manifest does not declare.
    await refused(setup.stub.Execute(execute(digest, version="9.9.9"), timeout=10),
                  grpc.StatusCode.FAILED_PRECONDITION, "PROVENANCE_MISMATCH")
    setup.registry.publish(ECHO, version="2.0.0").state = release_pb2.RELEASE_STATE_FAILED
    await refused(setup.stub.Execute(execute(digest, version="2.0.0"), timeout=10),
                  grpc.StatusCode.FAILED_PRECONDITION, "PROVENANCE_MISMATCH")
    setup.registry.publish(ECHO, version="3.0.0", capabilities=("env:HOME",))
    await refused(setup.stub.Execute(execute(digest, version="3.0.0", bundle_digest=sha256_digest(b"tar")),
                                     timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "PROVENANCE_MISMATCH")
    meta = await refused(setup.stub.Execute(execute(digest, version="3.0.0", capabilities=["env:HOME", "env:SECRET"]),
                                            timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "PROVENANCE_MISMATCH")
    assert meta["undeclared"] == "env:SECRET"
    await refused(setup.stub.Execute(execute(digest, version="3.0.0", dependencies=[
        skill_pb2.ResolvedDependency(package="com.acme.lib", version="1.0.0", digest=digest)]), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION, "PROVENANCE_MISMATCH")
    await refused(setup.stub.Execute(execute(digest, version="latest"), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION")
    await refused(setup.stub.Execute(execute(digest, skill=""), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    # None of the refused digests was even fetched, let alone run.
    assert setup.source.fetches == {}
    assert (await setup.stub.Execute(execute(digest, version="3.0.0", capabilities=["env:HOME"]),
                                     timeout=10)).output == b"ok:hi"


async def test_a_signature_that_does_not_verify_is_refused(setup: Setup) -> None:
    key, other = signing.generate(), signing.generate()
    namespace = setup.registry.claim("com.acme", key)
    digest = setup.source.add(ECHO)
    # Stored data tampered with after the registry verified it: a capability added to the manifest.
    setup.registry.publish(ECHO, key=key).manifest.capabilities.append("env:SECRET")
    meta = await refused(setup.stub.Execute(execute(digest), timeout=10), grpc.StatusCode.PERMISSION_DENIED,
                         "SIGNATURE_INVALID")
    assert meta["key_id"] == signing.key_id(signing.raw_public_key(key)) and meta["namespace"] == "com.acme"
    # Unsigned where signatures are required.
    setup.registry.publish(ECHO)
    await refused(setup.stub.Execute(execute(digest), timeout=10), grpc.StatusCode.PERMISSION_DENIED,
                  "SIGNATURE_REQUIRED")
    # Signed by a key the namespace does not (or no longer) trust.
    setup.registry.publish(ECHO, key=other)
    await refused(setup.stub.LoadSkill(pb.LoadSkillRequest(digest=digest, skill=SKILL, version="1.0.0"), timeout=10),
                  grpc.StatusCode.PERMISSION_DENIED, "SIGNER_NOT_TRUSTED")
    # Signed, under no namespace: nothing vouches for the key.
    setup.registry.publish(ECHO, key=key, skill="org.free.echo")
    await refused(setup.stub.Execute(execute(digest, skill="org.free.echo"), timeout=10),
                  grpc.StatusCode.PERMISSION_DENIED, "SIGNER_NOT_TRUSTED")
    assert setup.source.fetches == {}
    # Trusting the other key fixes it (refusals were not cached).
    raw = signing.raw_public_key(other)
    namespace.keys.add(key_id=signing.key_id(raw), public_key=raw)
    assert (await setup.stub.Execute(execute(digest), timeout=10)).output == b"ok:hi"


async def test_an_unreachable_registry_is_unavailable_and_not_cached(setup: Setup) -> None:
    digest = setup.source.add(ECHO)
    setup.registry.publish(ECHO)
    setup.registry.unavailable = True
    await refused(setup.stub.Execute(execute(digest), timeout=10), grpc.StatusCode.UNAVAILABLE,
                  "UPSTREAM_UNAVAILABLE")
    setup.registry.unavailable = False
    assert (await setup.stub.Execute(execute(digest), timeout=10)).output == b"ok:hi"


async def test_a_bare_digest_is_never_run(setup: Setup) -> None:
    """The executor runs only what the platform assigned: a request naming no skill@version is refused, even
    for a digest it has loaded and verified, before any byte runs."""
    digest = setup.source.add(ECHO)
    setup.registry.publish(ECHO)
    assert (await setup.stub.Execute(execute(digest), timeout=10)).output == b"ok:hi"
    for request in (pb.ExecuteRequest(digest=digest, input=b"x"),
                    pb.ExecuteRequest(digest=sha256_digest(b"anything"), input=b"x")):
        meta = await refused(setup.stub.Execute(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                             "INVALID_ARGUMENT")
        assert meta["field"] == "skill"
    await refused(setup.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_limits_are_capped_at_the_executors_own(setup: Setup) -> None:
    """A caller cannot widen what the executor allows: limits above its maximums are capped."""
    digest = setup.source.add(ECHO)
    setup.registry.publish(ECHO)
    huge = skill_pb2.Limits(memory_bytes=2**40, max_output_bytes=2**40, max_stderr_bytes=2**40,
                            max_input_bytes=2**40)
    huge.timeout.FromSeconds(10**6)
    big_input = b"x" * (TEST_SETTINGS.max_input + 1)
    await refused(setup.stub.Execute(execute(digest, limits=huge, input=big_input), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE")


# Against the real registry: tampering with its stored data is caught by the executor.

ADMIN = "admin-token-for-tests-0123456789"


async def test_tampering_with_the_registrys_stored_manifest_is_caught_on_load(start_service: Starter,
                                                                               tmp_path: Path) -> None:
    registry_host = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", admin_token=ADMIN, shutdown_grace_seconds=0.5)))
    address = f"127.0.0.1:{registry_host.port}"
    executor_host = await start_service(build_server(replace(TEST_SETTINGS, data_dir=tmp_path / "executor",
                                                             registry_address=address)))
    admin = (("authorization", f"Bearer {ADMIN}"),)
    key = signing.generate()
    async with grpc.aio.insecure_channel(address) as registry_channel, \
            grpc.aio.insecure_channel(f"127.0.0.1:{executor_host.port}") as executor_channel:
        registry = registry_grpc.RegistryServiceStub(registry_channel)
        executor = pb_grpc.ExecutorServiceStub(executor_channel)
        token = (await registry.CreatePublisher(registry_pb.CreatePublisherRequest(name="acme"), timeout=5,
                                                metadata=admin)).token
        await registry.CreateNamespace(registry_pb.CreateNamespaceRequest(
            name="com.acme", owner="acme", require_signatures=True, public_keys=[signing.raw_public_key(key)]),
            timeout=5, metadata=admin)
        digest = sha256_digest(ECHO)
        for version in ("1.0.0", "1.0.1"):
            manifest = skill_pb2.Manifest(name=SKILL, version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1)
            subject = signing.Subject(SKILL, version, digest, "", signing.manifest_bytes(manifest))
            meta = registry_pb.PublishSkillMetadata(manifest=manifest, sha256=digest.removeprefix("sha256:"),
                                                    size_bytes=len(ECHO), signature=registry_pb.Signature(
                                                        key_id=signing.key_id(signing.raw_public_key(key)),
                                                        signature=signing.sign(key, subject)))

            async def stream(meta: registry_pb.PublishSkillMetadata = meta) -> AsyncIterator[Any]:
                yield registry_pb.PublishSkillRequest(metadata=meta)
                yield registry_pb.PublishSkillRequest(chunk=ECHO)

            await registry.PublishSkill(stream(), timeout=10, metadata=(("authorization", f"Bearer {token}"),))
        # Someone with access to the registry's disk widens 1.0.1's grants behind its back.
        tampered = skill_pb2.Manifest(name=SKILL, version="1.0.1", abi=skill_pb2.ABI_WASI_COMMAND_V1,
                                      capabilities=["env:AWS_SECRET_ACCESS_KEY"])
        with sqlite3.connect(tmp_path / "registry" / "registry.sqlite3") as db:
            db.execute("UPDATE versions SET manifest = ? WHERE name = ? AND version = ?",
                       (tampered.SerializeToString(deterministic=True), SKILL, "1.0.1"))
        load = pb.LoadSkillRequest(digest=digest, skill=SKILL, version="1.0.1", capabilities=tampered.capabilities)
        await refused(executor.LoadSkill(load, timeout=10), grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_INVALID")
        # The untouched version loads and runs.
        await executor.LoadSkill(pb.LoadSkillRequest(digest=digest, skill=SKILL, version="1.0.0"), timeout=10)
        assert (await executor.Execute(execute(digest), timeout=10)).output == b"ok:hi"


async def test_a_signed_namespace_runs_only_signed_dependencies(setup: Setup) -> None:
    key = signing.generate()
    setup.registry.claim("com.acme", key)
    lib = setup.source.add(LIB)
    digest = setup.source.add(SHOUT)
    setup.registry.publish(SHOUT, key=key)
    dependency = skill_pb2.ResolvedDependency(package="org.text", version="1.0.0", digest=lib,
                                              required_by=["(root)"])
    # Anyone may publish org.text (no namespace): unsigned, it cannot run inside a signed skill.
    setup.registry.publish(LIB, skill="org.text")
    meta = await refused(setup.stub.Execute(execute(digest, dependencies=[dependency]), timeout=10),
                         grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_REQUIRED")
    assert meta["dependency"] == "org.text@1.0.0"
    # Signed by a key its own namespace trusts, it runs.
    other = signing.generate()
    setup.registry.claim("org.text", other, require_signatures=False)
    setup.registry.publish(LIB, skill="org.text", version="1.0.1", key=other)
    dependency.version = "1.0.1"
    response = await setup.stub.Execute(execute(digest, dependencies=[dependency]), timeout=10)
    assert response.output == b"HI"


# Revocation while running: a key removed from the namespace stops what it signed within the re-check bound.

RECHECK = 0.1


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(RECHECK / 2)


async def _digest_health(channel: grpc.aio.Channel, digest: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=digest),
                                                               timeout=5)
    status: int = response.status
    return status


async def _refuses(stub: pb_grpc.ExecutorServiceStub, digest: str, reason: str) -> bool:
    try:
        await stub.Execute(execute(digest), timeout=5)
    except grpc.aio.AioRpcError as err:
        info = error_info(err)
        return info is not None and info.reason == reason
    return False


async def test_a_removed_key_stops_what_it_signed_on_a_running_executor(
        start_service: Starter, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source, registry = MemorySource(), FakeRegistry()
    host = await start_service(build_server(
        replace(TEST_SETTINGS, data_dir=tmp_path / "executor", trust_recheck_seconds=RECHECK),
        module_source=source, provenance_source=registry))
    key = signing.generate()
    namespace = registry.claim("com.acme", key)
    digest = source.add(ECHO)
    registry.publish(ECHO, key=key)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = pb_grpc.ExecutorServiceStub(channel)
        await stub.LoadSkill(pb.LoadSkillRequest(digest=digest, skill=SKILL, version="1.0.0"), timeout=10)
        assert (await stub.Execute(execute(digest), timeout=5)).output == b"ok:hi"
        assert await _digest_health(channel, digest) == health_pb2.HealthCheckResponse.SERVING
        # A registry that cannot be reached revokes nothing: running skills keep running.
        registry.unavailable = True
        await asyncio.sleep(RECHECK * 4)
        assert (await stub.Execute(execute(digest), timeout=5)).output == b"ok:hi"
        registry.unavailable = False

        removed = namespace.keys.pop()
        await _until(lambda: _refuses(stub, digest, "SIGNER_NOT_TRUSTED"))
        assert await _digest_health(channel, digest) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert any("no longer runnable" in r.getMessage() and "no longer trusts" in r.getMessage()
                   for r in caplog.records)
        # Trusting the key again restores it, health included.
        namespace.keys.append(removed)

        async def runs() -> bool:
            return not await _refuses(stub, digest, "SIGNER_NOT_TRUSTED")

        await _until(runs)
        assert await _digest_health(channel, digest) == health_pb2.HealthCheckResponse.SERVING


async def test_rechecks_ask_once_per_skill_about_entries_in_use(setup: Setup) -> None:
    """A round asks only for the namespaces (the version record is immutable), once per skill, and only about
    entries used within `active_seconds`; an entry idle for longer is asked about before its next call, and a
    registry that cannot answer then does not stop it."""
    registry = setup.registry
    provenance = Provenance(registry, recheck_seconds=3600, active_seconds=3600)
    for version in ("1.0.0", "1.0.1"):
        registry.publish(ECHO, version=version)
        await provenance.check(SKILL, version, sha256_digest(ECHO), "", ())
    assert (registry.asked, registry.namespaces_asked) == (2, 2)
    await provenance.recheck()
    assert (registry.asked, registry.namespaces_asked) == (2, 3)  # two entries, one skill: one question
    provenance.active_seconds = 0.0  # now nothing counts as in use
    await provenance.recheck()
    assert registry.namespaces_asked == 3
    provenance.recheck_seconds = 0.0
    await provenance.check(SKILL, "1.0.0", sha256_digest(ECHO), "", ())  # idle: asked first
    assert registry.namespaces_asked == 4
    registry.unavailable = True
    await provenance.check(SKILL, "1.0.0", sha256_digest(ECHO), "", ())  # idle, registry down: still runs


async def test_a_hung_registry_never_holds_a_call_longer_than_the_refresh_timeout(setup: Setup) -> None:
    """A registry that accepts the question and never answers (SIGSTOPped) costs a call at most refresh_timeout,
    once; afterwards calls run on what was verified without waiting."""
    registry = setup.registry
    provenance = Provenance(registry, recheck_seconds=0.0, active_seconds=0.0, refresh_timeout=0.2)
    registry.publish(ECHO)
    await provenance.check(SKILL, "1.0.0", sha256_digest(ECHO), "", ())
    registry.hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    await provenance.check(SKILL, "1.0.0", sha256_digest(ECHO), "", ())
    assert loop.time() - started < 1.0
    provenance.recheck_seconds = 3600  # checked just now (the attempt counts): no more waiting
    started = loop.time()
    for _ in range(20):
        await provenance.check(SKILL, "1.0.0", sha256_digest(ECHO), "", ())
    assert loop.time() - started < 0.2
    await asyncio.wait_for(provenance.recheck(), 1.0)  # a round does not hang either


async def test_revoking_one_name_of_a_module_keeps_the_digest_serving_for_another(setup: Setup) -> None:
    """Health is per digest: the same module published under a revoked name and an unsigned one stays SERVING
    for the one that may still run it."""
    changes: list[tuple[str, bool]] = []

    async def on_change(digest: str, runnable: bool, why: str) -> None:
        changes.append((digest, runnable))

    registry = setup.registry
    key = signing.generate()
    namespace = registry.claim("com.acme", key, require_signatures=False)
    registry.publish(ECHO, key=key)
    registry.publish(ECHO, skill="org.free.echo")
    provenance = Provenance(registry, on_change=on_change)
    digest = sha256_digest(ECHO)
    await provenance.check(SKILL, "1.0.0", digest, "", ())
    await provenance.check("org.free.echo", "1.0.0", digest, "", ())
    namespace.keys.pop()
    await provenance.recheck()
    with pytest.raises(ServiceError, match="no longer trusts"):
        await provenance.check(SKILL, "1.0.0", digest, "", ())
    await provenance.check("org.free.echo", "1.0.0", digest, "", ())
    assert changes == []  # the digest still runs as org.free.echo
    registry.claim("org.free")  # now its namespace requires signatures, which that version lacks
    await provenance.recheck()
    assert changes == [(digest, False)]


async def test_namespace_remove_key_revokes_on_a_running_executor_against_the_real_registry(
        start_service: Starter, tmp_path: Path) -> None:
    registry_host = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", admin_token=ADMIN, shutdown_grace_seconds=0.5)))
    address = f"127.0.0.1:{registry_host.port}"
    executor_host = await start_service(build_server(replace(
        TEST_SETTINGS, data_dir=tmp_path / "executor", registry_address=address, trust_recheck_seconds=RECHECK)))
    admin = (("authorization", f"Bearer {ADMIN}"),)
    key = signing.generate()
    async with grpc.aio.insecure_channel(address) as registry_channel, \
            grpc.aio.insecure_channel(f"127.0.0.1:{executor_host.port}") as executor_channel:
        registry = registry_grpc.RegistryServiceStub(registry_channel)
        executor = pb_grpc.ExecutorServiceStub(executor_channel)
        token = (await registry.CreatePublisher(registry_pb.CreatePublisherRequest(name="acme"), timeout=5,
                                                metadata=admin)).token
        await registry.CreateNamespace(registry_pb.CreateNamespaceRequest(
            name="com.acme", owner="acme", public_keys=[signing.raw_public_key(key)]), timeout=5, metadata=admin)
        digest = sha256_digest(ECHO)
        manifest = skill_pb2.Manifest(name=SKILL, version="1.0.0", abi=skill_pb2.ABI_WASI_COMMAND_V1)
        key_id = signing.key_id(signing.raw_public_key(key))
        meta = registry_pb.PublishSkillMetadata(
            manifest=manifest, sha256=digest.removeprefix("sha256:"), size_bytes=len(ECHO),
            signature=registry_pb.Signature(key_id=key_id, signature=signing.sign(
                key, signing.Subject(SKILL, "1.0.0", digest, "", signing.manifest_bytes(manifest)))))

        async def stream() -> AsyncIterator[Any]:
            yield registry_pb.PublishSkillRequest(metadata=meta)
            yield registry_pb.PublishSkillRequest(chunk=ECHO)

        owner = (("authorization", f"Bearer {token}"),)
        await registry.PublishSkill(stream(), timeout=10, metadata=owner)
        await executor.LoadSkill(pb.LoadSkillRequest(digest=digest, skill=SKILL, version="1.0.0"), timeout=10)
        assert (await executor.Execute(execute(digest), timeout=5)).output == b"ok:hi"
        await registry.UpdateNamespace(registry_pb.UpdateNamespaceRequest(name="com.acme", remove_key_ids=[key_id]),
                                       timeout=5, metadata=owner)
        # Within the re-check bound (and not only after a restart) the executor refuses it.
        await _until(lambda: _refuses(executor, digest, "SIGNER_NOT_TRUSTED"), timeout=RECHECK * 20)
