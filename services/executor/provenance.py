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

Every request must name its `skill` and `version` (INVALID_ARGUMENT otherwise): the executor runs only
published versions the platform deployed, never a bare digest, and the smoke examples LoadSkill runs pass the
same check (a cache hit). What a call may do comes from the deployment too: its capabilities must be declared by
the manifest, its env keys by those capabilities, and its limits are capped at the executor's own maximums
(servicer.py `_limits`): no caller can widen them.

What verified does not stay verified forever: a key removed from a namespace revokes what it signed. A
background re-check (`Provenance.run_rechecks`, every `recheck_seconds`) judges every entry a call used within
`active_seconds` again against its namespace as the registry has it now (one question per skill: the version's
own record is immutable once Ready). An entry that no longer verifies is kept as *revoked* — its calls are
refused with the reason at once, it is logged, and `on_change` reports the digest not runnable once no name it
runs as may run it (the executor turns its per-digest health NOT_SERVING) — and one that verifies again is
restored. So a revocation reaches running calls within about `recheck_seconds`. An entry idle for longer than
`active_seconds` is asked about before its next call. A registry that cannot be reached, or does not answer
within `refresh_timeout`, changes nothing: skills keep running on what was verified, so invoking does not
depend on the registry being up (only a first-ever check of a version needs it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.executor.singleflight import SingleFlight
from services.runtime import signing
from services.runtime.errors import Reason, ServiceError, describe_error, invalid
from services.runtime.names import skill_name_problem, version_problem

log = logging.getLogger("clawhub.executor.provenance")

# Verified (skill, version, digest, bundle digest) entries kept; each is a few hundred bytes.
DEFAULT_CACHE_ENTRIES = 4096
# Seconds between re-checks of the entries in use: the bound on how long a revoked signing key still runs.
DEFAULT_RECHECK_SECONDS = 5.0
# Registry questions of one re-check round in flight at once.
RECHECK_CONCURRENCY = 8
# Entries a call used within this many seconds are re-checked every round; one idle for longer is asked about
# before its next call runs.
ACTIVE_SECONDS = 600.0
# How long a re-check waits for the registry before it keeps what was verified.
REFRESH_TIMEOUT = 2.0

Key = tuple[str, str, str, str]
# Told when an entry's digest stops (False, with the reason) or starts again (True) being runnable.
OnChange = Callable[[str, bool, str], Awaitable[None]]


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
                                        f"{describe_error(err)}") from None
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
                                        f"{describe_error(err)}") from None
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


@dataclass
class _Entry:
    """What the last check of one entry found: Verified, or the error that now refuses it (revoked)."""

    found: Verified | ServiceError
    # The registry's record of the version (immutable once Ready: digest, manifest, signature), kept so a
    # re-check asks only for the namespace, whose keys are what revocation changes.
    published: registry_pb.SkillVersion
    # When the registry last answered about it, and when a call last used it (time.monotonic()).
    checked: float
    used: float


class Provenance:
    """Checks digests against the registry's record of them, caching what verified and re-checking it."""

    def __init__(self, source: ProvenanceSource, *, cache_entries: int = DEFAULT_CACHE_ENTRIES,
                 recheck_seconds: float = DEFAULT_RECHECK_SECONDS, on_change: OnChange | None = None,
                 active_seconds: float = ACTIVE_SECONDS, refresh_timeout: float = REFRESH_TIMEOUT) -> None:
        self._source = source
        # Entry → what it was last found to be.
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._cache_entries = cache_entries
        self.recheck_seconds = recheck_seconds
        self.active_seconds = active_seconds
        self.refresh_timeout = refresh_timeout
        self.on_change = on_change
        # Concurrent first calls for one entry (a restarted executor taking traffic) ask the registry once.
        self._flight: SingleFlight[Key, tuple[Verified, registry_pb.SkillVersion]] = SingleFlight()
        self._namespaces: SingleFlight[str, registry_pb.Namespace | None] = SingleFlight()

    async def close(self) -> None:
        await self._flight.close()
        await self._namespaces.close()

    async def run_rechecks(self) -> None:
        """Re-check the entries in use every `recheck_seconds`, until cancelled."""
        while True:
            await asyncio.sleep(self.recheck_seconds)
            started = time.monotonic()
            try:
                await self.recheck()
            except Exception:  # noqa: BLE001 - one bad round must not end the re-checks
                log.exception("re-checking the provenance of running skills failed")
            log.debug("provenance re-check of %d entries took %.1f ms", len(self._entries),
                      (time.monotonic() - started) * 1e3)

    async def recheck(self) -> None:
        """One round: every entry a call used within `active_seconds` is judged again against its namespace as
        the registry has it now (one question per skill), and revoked or restored accordingly."""
        now = time.monotonic()
        active = [(k, e) for k, e in self._entries.items() if now - e.used <= self.active_seconds]
        limit = asyncio.Semaphore(RECHECK_CONCURRENCY)
        asked: dict[str, asyncio.Future[registry_pb.Namespace | None]] = {}

        async def namespace_of(skill: str) -> registry_pb.Namespace | None:
            if skill not in asked:
                asked[skill] = asyncio.ensure_future(self._namespace(skill))
            return await asked[skill]

        async def one(key: Key, entry: _Entry) -> None:
            async with limit:
                await self._refresh(key, entry, namespace_of)

        await asyncio.gather(*(one(k, e) for k, e in active))

    async def _namespace(self, skill: str) -> registry_pb.Namespace | None:
        """The namespace governing `skill` now; raises ProvenanceUnavailable (also when the registry takes longer
        than `refresh_timeout`: a hung registry must not hold calls)."""
        try:
            return await asyncio.wait_for(self._namespaces.do(skill, lambda: self._source.namespace(skill)),
                                          self.refresh_timeout)
        except TimeoutError:
            raise ProvenanceUnavailable(f"the registry did not answer within {self.refresh_timeout:g}s") from None

    async def _refresh(self, key: Key, entry: _Entry,
                       namespace_of: Callable[[str], Awaitable[registry_pb.Namespace | None]] | None = None) -> None:
        skill, version, digest, bundle = key
        try:
            namespace = await (namespace_of or self._namespace)(skill)
        except ProvenanceUnavailable as exc:
            # Cannot tell now: keep serving on what was verified; the next round asks again.
            log.debug("cannot re-check %s@%s now: %s", skill, version, exc)
            entry.checked = time.monotonic()
            return
        try:
            found: Verified | ServiceError = self._judge(entry.published, namespace, digest,
                                                         None if bundle == "*" else bundle)
        except ServiceError as exc:
            found = exc
        await self._settle(key, entry, found)

    def _runnable(self, digest: str) -> bool:
        return any(isinstance(e.found, Verified) for k, e in self._entries.items() if k[2] == digest)

    async def _settle(self, key: Key, entry: _Entry, found: Verified | ServiceError) -> None:
        was_runnable, digest_was_runnable = isinstance(entry.found, Verified), self._runnable(key[2])
        entry.found, entry.checked = found, time.monotonic()
        skill, version, digest, _ = key
        if isinstance(found, ServiceError) and was_runnable:
            log.warning("%s@%s (%s) is no longer runnable: %s", skill, version, digest[:19], found.message)
        elif isinstance(found, Verified) and not was_runnable:
            log.info("%s@%s (%s) verifies again and is runnable", skill, version, digest[:19])
        # Health is per digest, and the same module may be published under several names: it turns
        # NOT_SERVING only when no name it runs as may run it any more.
        runnable = self._runnable(digest)
        if runnable != digest_was_runnable and self.on_change is not None:
            await self.on_change(digest, runnable, "" if runnable or isinstance(found, Verified) else found.message)

    async def check(self, skill: str, version: str, digest: str, bundle_digest: str, capabilities: Sequence[str],
                    dependencies: Sequence[skill_pb2.ResolvedDependency] = ()) -> None:
        """Refuse (ServiceError) unless `digest` (and `bundle_digest`) is what the registry lists as the Ready
        `skill@version`, its capabilities cover `capabilities`, its signature verifies where one is present or
        required, and every dependency passes the same check. A request that names no skill is refused: the
        executor runs only what the platform deployed, never a bare digest."""
        if not skill:
            raise invalid(Reason.INVALID_ARGUMENT, "skill",
                          "name the skill and version to run (the executor runs only published, deployed versions, "
                          "never a bare digest)")
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
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is None:
            # Refusals are not cached here (a fixed registry answer is picked up by the next call); only a
            # re-check keeps one, for a version that verified before and was revoked since.
            verified, published = await self._flight.do(
                key, lambda: self._verify(skill, version, digest, bundle_digest))
            entry = _Entry(verified, published, checked=now, used=now)
            self._entries[key] = entry
            while len(self._entries) > self._cache_entries:
                self._entries.popitem(last=False)
        else:
            if now - entry.used > self.active_seconds and now - entry.checked > self.recheck_seconds:
                # Idle for longer than the rounds cover: ask before running it again, within refresh_timeout
                # (an unreachable or hung registry keeps what was verified).
                await self._refresh(key, entry)
            entry.used = now
        self._entries.move_to_end(key)
        declared = entry.found
        if isinstance(declared, ServiceError):
            raise dataclasses.replace(declared)  # a fresh exception: re-raising one object grows its traceback
        if extra := sorted(set(capabilities) - declared.capabilities):
            raise _mismatch(f"capabilities {', '.join(extra)} are not declared by the manifest {skill}@{version} was "
                            "published (and signed) with",
                            {"skill": skill, "version": version, "digest": digest, "undeclared": ", ".join(extra)})
        return declared

    async def _verify(self, skill: str, version: str, digest: str, bundle_digest: str | None,
                      ) -> tuple[Verified, registry_pb.SkillVersion]:
        """Ask the registry and check everything but the requested capabilities; the verdict and the record."""
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
        return self._judge(published, namespace, digest, bundle_digest), published

    @staticmethod
    def _judge(published: registry_pb.SkillVersion, namespace: registry_pb.Namespace | None, digest: str,
               bundle_digest: str | None) -> Verified:
        """The verdict on running `digest` as the registry's record `published`, under `namespace`."""
        skill, version = published.name, published.version
        meta = {"skill": skill, "version": version, "digest": digest}
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
    """A Provenance without a registry to ask: it refuses every request."""
    return Provenance(_NoRegistry())
