"""Re-verification of a digest's provenance before it runs: the executor trusts no caller's word for it.

A LoadSkill or Execute request that names the `skill` and `version` a digest was published as is checked
with the registry once per (skill, version, digest, bundle digest): the registry must list exactly that
module and bundle as the Ready version, the capabilities asked for must be among those its manifest
declares, and the signature is verified here, with `services/runtime/signing.py`, against the keys of the
namespace that governs the name, whenever the version is signed or its namespace requires signatures. The
dependencies a request links the module with are checked the same way, and must be signed when the skill's
namespace requires signatures (else a publisher of an in-range dependency version could change what runs
inside a signed skill). Failures refuse the call before any
byte of the module runs, and are not cached (a fixed registry answer is picked up by the next call).

Requests without `skill` skip the check: they come from inside the executor (smoke examples, after their
LoadSkill was checked) or from older callers; the route's own requests always name the skill.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.executor.singleflight import SingleFlight
from services.runtime import signing
from services.runtime.errors import Reason, ServiceError, invalid
from services.runtime.names import skill_name_problem, version_problem

# Verified (skill, version, digest, bundle digest) entries kept; each is a few hundred bytes.
DEFAULT_CACHE_ENTRIES = 4096


class ProvenanceUnavailable(Exception):
    """The registry could not be asked; trying again later may work."""


class ProvenanceSource(Protocol):
    """What the registry says about a published version and its namespace."""

    async def version(self, skill: str, version: str) -> registry_pb.SkillVersion | None:
        """The version, or None when the registry has no such version. Raises ProvenanceUnavailable."""
        ...

    async def namespace(self, skill: str) -> registry_pb.Namespace | None:
        """The namespace that governs `skill`, or None. Raises ProvenanceUnavailable."""
        ...


class RegistryProvenanceSource:
    """Asks `RegistryService.GetSkillVersion` and `GetNamespace`, each with a deadline."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = registry_grpc.RegistryServiceStub(channel)
        self._timeout = timeout

    async def version(self, skill: str, version: str) -> registry_pb.SkillVersion | None:
        try:
            response = await self._stub.GetSkillVersion(
                registry_pb.GetSkillVersionRequest(name=skill, version=version), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise ProvenanceUnavailable(f"asking the registry for {skill}@{version} failed: "
                                        f"{err.code().name}: {err.details()}") from None
        result: registry_pb.SkillVersion = response.skill_version
        return result

    async def namespace(self, skill: str) -> registry_pb.Namespace | None:
        try:
            response = await self._stub.GetNamespace(registry_pb.GetNamespaceRequest(skill=skill),
                                                     timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise ProvenanceUnavailable(f"asking the registry for the namespace of {skill} failed: "
                                        f"{err.code().name}: {err.details()}") from None
        result: registry_pb.Namespace = response.namespace
        return result


@dataclass(frozen=True)
class Verified:
    """What the check of one published version found."""

    # The capabilities its manifest declares.
    capabilities: frozenset[str]
    # Whether it carries a signature that verified against its namespace's keys.
    signed: bool
    # Whether its namespace requires signatures.
    requires_signatures: bool


class Provenance:
    """Checks digests against the registry's record of them, caching what verified."""

    def __init__(self, source: ProvenanceSource, *, cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self._source = source
        # Verified entry → what it was found to be (the manifest of a version is immutable).
        self._verified: OrderedDict[tuple[str, str, str, str], Verified] = OrderedDict()
        self._cache_entries = cache_entries
        # Concurrent first calls for one entry (a restarted executor taking traffic) ask the registry once.
        self._flight: SingleFlight[tuple[str, str, str, str], Verified] = SingleFlight()

    async def close(self) -> None:
        await self._flight.close()

    async def check(self, skill: str, version: str, digest: str, bundle_digest: str, capabilities: Sequence[str],
                    dependencies: Sequence[skill_pb2.ResolvedDependency] = ()) -> None:
        """Refuse (ServiceError) unless `digest` (and `bundle_digest`) is what the registry lists as the Ready
        `skill@version`, its capabilities cover `capabilities`, its signature verifies where one is present or
        required, and every dependency passes the same check. No-op when `skill` is empty."""
        if not skill:
            if version:
                raise invalid(Reason.INVALID_ARGUMENT, "skill", "version is set but skill is not: send both")
            return
        if problem := skill_name_problem(skill):
            raise invalid(Reason.INVALID_NAME, "skill", problem)
        if problem := version_problem(version):
            raise invalid(Reason.INVALID_VERSION, "version", f"{problem} (an exact version, not a tag)")
        root = await self._check_one(skill, version, digest, bundle_digest, capabilities)
        for i, dependency in enumerate(dependencies):
            if skill_name_problem(dependency.package) or version_problem(dependency.version):
                raise invalid(Reason.INVALID_ARGUMENT, f"dependencies[{i}]",
                              f"{dependency.package[:80]}@{dependency.version[:80]} is not a package and exact version")
            # A dependency is linked, not run on its own: its bundle and capabilities are not granted.
            linked = await self._check_one(dependency.package, dependency.version, dependency.digest, None, ())
            # Code linked into a skill whose namespace requires signatures must be signed too (by keys its own
            # namespace trusts): otherwise anyone publishing an in-range version could swap it in.
            if root.requires_signatures and not linked.signed:
                raise ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED, Reason.SIGNATURE_REQUIRED,
                    f"the namespace of {skill} requires signatures, and {skill}@{version} links its dependency "
                    f"{dependency.package}@{dependency.version}, which is not signed: refusing to run unsigned "
                    "code inside it", metadata={"skill": skill, "version": version,
                                                "dependency": f"{dependency.package}@{dependency.version}"})

    async def _check_one(self, skill: str, version: str, digest: str, bundle_digest: str | None,
                         capabilities: Sequence[str]) -> Verified:
        key = (skill, version, digest, bundle_digest if bundle_digest is not None else "*")
        declared = self._verified.get(key)
        if declared is None:
            declared = await self._flight.do(key, lambda: self._verify(skill, version, digest, bundle_digest))
            self._verified[key] = declared
            while len(self._verified) > self._cache_entries:
                self._verified.popitem(last=False)
        self._verified.move_to_end(key)
        if extra := sorted(set(capabilities) - declared.capabilities):
            raise _mismatch(f"capabilities {', '.join(extra)} are not declared by the manifest {skill}@{version} was "
                            "published (and signed) with",
                            {"skill": skill, "version": version, "digest": digest, "undeclared": ", ".join(extra)})
        return declared

    async def _verify(self, skill: str, version: str, digest: str, bundle_digest: str | None) -> Verified:
        """Ask the registry and check everything but the requested capabilities."""
        meta = {"skill": skill, "version": version, "digest": digest}
        namespace: registry_pb.Namespace | None = None
        try:
            published = await self._source.version(skill, version)
            if published is not None and published.digest == digest:
                namespace = await self._source.namespace(skill)
        except ProvenanceUnavailable as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE,
                               f"cannot verify {skill}@{version} before running it: {exc}",
                               metadata={**meta, "upstream": "registry"}) from None
        if published is None:
            raise _mismatch(f"the registry has no version {version} of {skill}, so {digest} cannot run as it",
                            {**meta, "registry_digest": ""})
        if published.digest != digest:
            raise _mismatch(f"the registry lists {skill}@{version} as {published.digest}, not {digest}: refusing "
                            "to run bytes that were not published under that name",
                            {**meta, "registry_digest": published.digest})
        if published.state != release_pb2.RELEASE_STATE_READY:
            raise _mismatch(f"{skill}@{version} is {release_pb2.ReleaseState.Name(published.state)} in the registry, "
                            "not READY: it did not pass verification", {**meta, "registry_digest": published.digest})
        if bundle_digest is not None and published.bundle_digest != bundle_digest:
            raise _mismatch(f"{skill}@{version} was published with file bundle {published.bundle_digest or '(none)'}, "
                            f"not {bundle_digest or '(none)'}",
                            {**meta, "registry_digest": published.digest,
                             "registry_bundle_digest": published.bundle_digest})
        signed = _check_signature(published, namespace)
        return Verified(frozenset(published.manifest.capabilities), signed,
                        namespace is not None and namespace.require_signatures)


def _mismatch(message: str, metadata: dict[str, str]) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, Reason.PROVENANCE_MISMATCH, message,
                        metadata=metadata)


def _check_signature(published: registry_pb.SkillVersion, namespace: registry_pb.Namespace | None) -> bool:
    """The executor's own verification of the stored signature, against the namespace's current keys: a key
    removed from the namespace no longer vouches for what it signed (revocation)."""
    skill, version = published.name, published.version
    meta = {"skill": skill, "version": version, "digest": published.digest,
            "namespace": namespace.name if namespace else ""}
    signature = published.signature
    if not published.HasField("signature") or not signature.key_id:
        if namespace is not None and namespace.require_signatures:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.SIGNATURE_REQUIRED,
                               f"namespace {namespace.name} requires signatures, and the registry holds none for "
                               f"{skill}@{version}", metadata=meta)
        return False
    key = next((k for k in namespace.keys if k.key_id == signature.key_id), None) if namespace else None
    if key is None:
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.SIGNER_NOT_TRUSTED,
                           f"{skill}@{version} is signed by {signature.key_id}, which "
                           + (f"namespace {namespace.name} no longer trusts" if namespace
                              else "no namespace trusts (the name is in none)"),
                           metadata={**meta, "key_id": signature.key_id})
    subject = signing.Subject(name=skill, version=version, digest=published.digest,
                              bundle_digest=published.bundle_digest,
                              manifest=signing.manifest_bytes(published.manifest))
    if not signing.verify(key.public_key, signature.signature, subject):
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.SIGNATURE_INVALID,
                           f"the signature of {skill}@{version} by {signature.key_id} does not verify over its name, "
                           "version, digests and manifest as the registry holds them: refusing to run it",
                           metadata={**meta, "key_id": signature.key_id})
    return True


class _NoRegistry:
    """The source of an executor built without a registry: every check is refused as unavailable."""

    async def version(self, skill: str, version: str) -> registry_pb.SkillVersion | None:
        raise ProvenanceUnavailable("this executor has no registry to check provenance with")

    async def namespace(self, skill: str) -> registry_pb.Namespace | None:
        raise ProvenanceUnavailable("this executor has no registry to check provenance with")


def unchecked() -> Provenance:
    """A Provenance that refuses every request naming a skill (requests without one still run)."""
    return Provenance(_NoRegistry())
