"""The gRPC face of the registry: validates requests, runs publishes, maps records to messages and failures
to structured errors (domain `registry.clawhub`)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import grpc
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import access_pb2_grpc as access_grpc
from clawhub.registry.v1 import registry_internal_pb2 as internal_pb
from clawhub.registry.v1 import registry_internal_pb2_grpc as internal_grpc
from clawhub.registry.v1 import registry_service_pb2 as pb
from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc

from services.registry.access import AccessRpcs
from services.registry.blobs import BlobBackend, BlobChanged, BlobCorrupt, BlobNotFound
from services.registry.integrity import (
    BUNDLE,
    MODULE,
    FoundProblem,
    Integrity,
    ScrubProgress,
    blob_corrupt_error,
)
from services.registry.limits import (
    DownloadGate,
    DownloadLimits,
    UploadGate,
    UploadLimits,
    UploadTimeout,
    caller_key,
    is_out_of_descriptors,
    out_of_descriptors,
)
from services.registry.ranges import range_problem
from services.registry.resolver import Catalog, Release, Requirement, ResolutionError, Resolved, Resolver
from services.registry.store import MetadataStore, NewVersion, SkillRecord, State, VersionNotFound, VersionRecord
from services.registry.trust import Caller, NamespaceRpcs, Trust
from services.registry.verify import ABIS as SUPPORTED_ABIS
from services.registry.verify import MAX_LINKED_BYTES, Verifier
from services.runtime import bundle as bundles
from services.runtime.cachettl import ttl_problem
from services.runtime.errors import (
    DID_YOU_MEAN,
    RateLimitedLog,
    Reason,
    ServiceError,
    abort_with,
    close_names,
    did_you_mean,
    invalid,
)
from services.runtime.inputschema import schema_problem
from services.runtime.linking import MAX_MODULES, ROOT, Copy, provider_for
from services.runtime.names import SHA256_HEX_RE, digest_problem, skill_name_problem, version_problem
from services.runtime.wasm import capability_problem

log = logging.getLogger("clawhub.registry")

DOMAIN = "registry.clawhub"

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_STATE_PB: dict[State, release_pb2.ReleaseState.ValueType] = {
    State.PENDING: release_pb2.RELEASE_STATE_PENDING,
    State.VERIFYING: release_pb2.RELEASE_STATE_VERIFYING,
    State.READY: release_pb2.RELEASE_STATE_READY,
    State.FAILED: release_pb2.RELEASE_STATE_FAILED,
}

# Page tokens are opaque to clients; the prefix lets a token for one listing be told from another's.
_SKILLS_TOKEN = "skills/"
_VERSIONS_TOKEN = "versions/"

# Tag names: lowercase, starting with a letter, so a tag can never be mistaken for a SemVer version.
TAG_RE = re.compile(r"[a-z][a-z0-9-]{0,63}", re.ASCII)  # fullmatch: `$` would accept a final "\n"
LATEST = "latest"
MAX_YANK_REASON = 1024
MAX_FILTER_LENGTH = 256
MAX_REQUIREMENTS = 1000
# A download that met a repair or a quarantine mid-way can start again at once.
BLOB_CHANGED_RETRY_SECONDS = 0.1
# An unknown skill name is compared with at most this many published names (close ones are suggested), read
# again at most every SUGGESTION_NAMES_SECONDS (and after a publish adds a name).
SUGGESTION_NAMES = 100_000
SUGGESTION_NAMES_SECONDS = 10.0


class _KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextmanager
    def _ref(self, key: tuple[str, str]) -> Iterator[asyncio.Lock]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            yield lock
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def run(self, key: tuple[str, str], fn: Callable[[], Awaitable[T]]) -> T:
        with self._ref(key) as lock:
            async with lock:
                return await fn()


def _problems_error(problems: list[tuple[Reason, str, str]]) -> ServiceError:
    """INVALID_ARGUMENT naming every bad field; the ErrorInfo reason is the first problem's."""
    reason, field_name, _ = problems[0]
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, "; ".join(p for _, _, p in problems),
                        metadata={"field": field_name}, field_violations=[(f, p) for _, f, p in problems])


def _page_size(requested: int) -> int:
    if requested < 0:
        raise invalid(Reason.INVALID_ARGUMENT, "page_size", f"page_size must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode("ascii")


def _decode_token(token: str, prefix: str) -> str:
    """The position a page token carries; INVALID_PAGE_TOKEN when it is not one this registry issued."""
    bad = invalid(Reason.INVALID_PAGE_TOKEN, "page_token",
                  "page_token is not a token from a previous response of this call; start again without it")
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, binascii.Error, UnicodeError):
        raise bad from None
    if _encode_token(text) != token or not text.startswith(prefix):
        raise bad
    return text[len(prefix):]


def version_to_pb(record: VersionRecord, problems: Sequence[str] = ()) -> pb.SkillVersion:
    """The message of a stored version; `problems` is what integrity.version_problems says about it."""
    message = pb.SkillVersion(
        name=record.name,
        version=record.version,
        digest=record.digest,
        size_bytes=record.size_bytes,
        manifest=skill_pb2.Manifest.FromString(record.manifest),
        state=_STATE_PB[record.state],
        verification_errors=list(record.verification_errors),
        bundle_digest=record.bundle_digest,
        yanked=record.yanked,
        yank_reason=record.yank_reason,
        publisher=record.publisher,
        problems=list(problems),
    )
    if record.signature_key_id:
        message.signature.key_id = record.signature_key_id
        message.signature.signature = record.signature
    message.create_time.FromNanoseconds(record.create_time_ns)
    for step in record.history:
        transition = message.history.add(
            from_state=_STATE_PB[step.from_state] if step.from_state else release_pb2.RELEASE_STATE_UNSPECIFIED,
            to_state=_STATE_PB[step.to_state],
            reason=step.reason,
        )
        transition.time.FromNanoseconds(step.time_ns)
    return message


def skill_to_pb(record: SkillRecord) -> pb.Skill:
    description = skill_pb2.Manifest.FromString(record.latest_manifest).description if record.latest_manifest else ""
    tags = dict(record.tags)
    if record.latest_version:
        tags[LATEST] = record.latest_version
    message = pb.Skill(name=record.name, latest_version=record.latest_version, description=description, tags=tags)
    message.create_time.FromNanoseconds(record.create_time_ns)
    message.update_time.FromNanoseconds(record.update_time_ns)
    return message


MAX_ARGS = 256
MAX_ARG_LENGTH = 4096


def _manifest_problems(manifest: skill_pb2.Manifest) -> list[tuple[Reason, str, str]]:
    """What makes the manifest's `args`, `files`, capabilities, dependencies or `input_schema` unusable, before
    any byte is uploaded."""
    problems: list[tuple[Reason, str, str]] = []
    if len(manifest.args) > MAX_ARGS:
        problems.append((Reason.INVALID_MANIFEST, "metadata.manifest.args",
                         f"{len(manifest.args)} arguments, more than the limit of {MAX_ARGS}"))
    for i, arg in enumerate(manifest.args):
        if "\0" in arg or len(arg) > MAX_ARG_LENGTH:
            problems.append((Reason.INVALID_MANIFEST, f"metadata.manifest.args[{i}]",
                             f"an argument may not contain NUL and is at most {MAX_ARG_LENGTH} characters"))
    if manifest.HasField("limits") and manifest.limits.HasField("timeout"):
        timeout = manifest.limits.timeout
        if timeout.seconds < 0 or timeout.nanos < 0:
            problems.append((Reason.INVALID_MANIFEST, "metadata.manifest.limits.timeout",
                             "a timeout must not be negative (leave it unset for the platform default)"))
    for i, dependency in enumerate(manifest.dependencies):
        where = f"metadata.manifest.dependencies[{i}]"
        if problem := skill_name_problem(dependency.package):
            problems.append((Reason.INVALID_NAME, f"{where}.package", problem))
        elif dependency.package == manifest.name:
            problems.append((Reason.INVALID_MANIFEST, f"{where}.package",
                             f"{manifest.name} cannot depend on itself"))
        if problem := range_problem(dependency.version_range):
            problems.append((Reason.INVALID_MANIFEST, f"{where}.version_range", problem))
    for i, capability in enumerate(manifest.capabilities):
        if problem := capability_problem(capability):
            problems.append((Reason.INVALID_MANIFEST, f"metadata.manifest.capabilities[{i}]", problem))
    if problem := schema_problem(manifest.input_schema):
        problems.append((Reason.INVALID_MANIFEST, "metadata.manifest.input_schema", problem))
    if manifest.HasField("cache_ttl") and (problem := ttl_problem(manifest.cache_ttl)):
        problems.append((Reason.INVALID_MANIFEST, "metadata.manifest.cache_ttl", problem))
    seen: set[str] = set()
    for i, declared in enumerate(manifest.files):
        where = f"metadata.manifest.files[{i}]"
        if problem := bundles.path_problem(declared.path):
            problems.append((Reason.INVALID_MANIFEST, f"{where}.path", problem))
        elif declared.path in seen:
            problems.append((Reason.INVALID_MANIFEST, f"{where}.path", f"{declared.path!r} is listed twice"))
        seen.add(declared.path)
        if problem := digest_problem(declared.digest):
            problems.append((Reason.INVALID_DIGEST, f"{where}.digest", problem))
    return problems


MAX_REPORTED_PROBLEMS = 20


def _at_most(problems: list[str], limit: int = MAX_REPORTED_PROBLEMS) -> list[str]:
    """The first `limit` problems and a count of the rest: an error's details travel in trailing metadata,
    which has a size limit, and a bundle of a million stray files should not produce a million lines."""
    if len(problems) <= limit:
        return problems
    return [*problems[:limit], f"… and {len(problems) - limit} more problem(s)"]


def _version_exists(name: str, version: str, record: VersionRecord, digest: str, bundle_digest: str,
                    ) -> ServiceError:
    if record.digest != digest:
        what = f"digest {record.digest}, not {digest}"
    else:
        what = f"file bundle {record.bundle_digest or '(none)'}, not {bundle_digest or '(none)'}"
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS, Reason.VERSION_EXISTS,
        f"{name}@{version} already exists with {what}; versions are immutable, publish a new version",
        metadata={"name": name, "version": version, "existing_digest": record.digest, "digest": digest,
                  "existing_bundle_digest": record.bundle_digest, "bundle_digest": bundle_digest})




def _check_name(name: str, field_name: str = "name") -> None:
    problem = skill_name_problem(name)
    if problem:
        raise invalid(Reason.INVALID_NAME, field_name, problem)


def _check_version(version: str, field_name: str = "version") -> None:
    problem = version_problem(version)
    if problem:
        raise invalid(Reason.INVALID_VERSION, field_name, problem)


def _check_tag(tag: str, field_name: str = "tag") -> None:
    if not TAG_RE.fullmatch(tag):
        raise invalid(Reason.INVALID_ARGUMENT, field_name,
                      f"{tag[:80]!r} is not a tag name: a lowercase letter, then up to 63 lowercase letters, "
                      "digits or hyphens")
    if tag == LATEST:
        raise invalid(Reason.INVALID_ARGUMENT, field_name,
                      "`latest` is reserved: it always follows the highest Ready non-yanked release")




def _filter_key(prefix: str, query: str) -> str:
    """What binds a ListSkills page token to its filter, without putting the filter in the token."""
    return hashlib.sha256(f"{prefix}\0{query}".encode()).hexdigest()[:16]


def _requirement_problems(dependencies: list[skill_pb2.Dependency], field_name: str,
                          ) -> list[tuple[Reason, str, str]]:
    problems: list[tuple[Reason, str, str]] = []
    for i, dependency in enumerate(dependencies):
        if problem := skill_name_problem(dependency.package):
            problems.append((Reason.INVALID_NAME, f"{field_name}[{i}].package", problem))
        if problem := range_problem(dependency.version_range):
            problems.append((Reason.INVALID_ARGUMENT, f"{field_name}[{i}].version_range", problem))
    return problems


def _requirements(dependencies: list[skill_pb2.Dependency]) -> tuple[Requirement, ...]:
    return tuple(Requirement(d.package, d.version_range, d.is_shared) for d in dependencies)


class RegistryServicer(NamespaceRpcs, AccessRpcs, pb_grpc.RegistryServiceServicer,
                       internal_grpc.RegistryInternalServiceServicer, access_grpc.AccessServiceServicer):
    """clawhub.registry.v1.RegistryService (the publisher and namespace RPCs are in trust.NamespaceRpcs)."""

    def __init__(self, store: MetadataStore, blobs: BlobBackend, verifier: Verifier, *,
                 max_upload_bytes: int, trust: Trust | None = None, uploads: UploadGate | None = None,
                 downloads: DownloadGate | None = None) -> None:
        self._store = store
        self._integrity = Integrity(store, blobs)
        self._uploads = uploads or UploadGate(UploadLimits())
        self._downloads = downloads or DownloadGate(DownloadLimits())
        # A flood of stalled streams costs the log a few lines, not one per stream.
        self._drops_log = RateLimitedLog(log)
        # Without a Trust: no admin token, names under no namespace open (what tests of other parts need).
        self._trust = trust or Trust(store, admin_token="", require_namespace=False)
        self._blobs = blobs
        self._verifier = verifier
        self._max_upload = max_upload_bytes
        # Publishes of one name@version take turns, so a retry waits for the first attempt's verdict instead
        # of racing it; different versions run in parallel.
        self._publishing = _KeyedLocks()
        # The resolver's catalogue, rebuilt after any change to the set of READY versions or yank flags:
        # (generation it was built at, catalogue). Manifests are parsed once per build, not per request.
        self._generation = 0
        self._catalog: tuple[int, Catalog] | None = None
        # (when read, names) of published skills, for suggestions on an unknown name; see `_close_names`.
        self._names: tuple[float, list[str]] | None = None

    async def _close_names(self, name: str) -> list[str]:
        """Published names close to the unknown `name` (a typo of one of them, say), best first."""
        loop = asyncio.get_running_loop()
        if self._names is None or loop.time() - self._names[0] > SUGGESTION_NAMES_SECONDS:
            self._names = (loop.time(), await self._store.skill_names(limit=SUGGESTION_NAMES))
        names = self._names[1]
        # difflib is Python: a large catalogue is compared off the event loop.
        return close_names(name, names) if len(names) < 1000 else await asyncio.to_thread(close_names, name, names)

    async def _skill_not_found(self, name: str) -> ServiceError:
        suggestions = await self._close_names(name)
        return ServiceError(grpc.StatusCode.NOT_FOUND, Reason.SKILL_NOT_FOUND,
                            f"no skill named {name!r}{did_you_mean(suggestions)}",
                            metadata={"name": name, DID_YOU_MEAN: ",".join(suggestions)})

    async def _version_not_found(self, name: str, version: str) -> ServiceError:
        """VERSION_NOT_FOUND; when no skill has that name at all, the message says so and suggests close names."""
        metadata = {"name": name, "version": version}
        if await self._store.get_skill(name) is not None:
            return ServiceError(grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND,
                                f"no version {version} of skill {name!r}", metadata=metadata)
        suggestions = await self._close_names(name)
        return ServiceError(grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND,
                            f"no skill named {name!r}{did_you_mean(suggestions)}, so no version {version} of it",
                            metadata={**metadata, DID_YOU_MEAN: ",".join(suggestions)})

    async def _version_pb(self, record: VersionRecord) -> pb.SkillVersion:
        return version_to_pb(record, (await self._integrity.problems([record]))[0])

    # Publishing.

    def _check_metadata(self, meta: pb.PublishSkillMetadata) -> None:
        problems: list[tuple[Reason, str, str]] = []
        if not meta.HasField("manifest"):
            problems.append((Reason.INVALID_MANIFEST, "metadata.manifest", "a manifest is required"))
        manifest = meta.manifest
        if problem := skill_name_problem(manifest.name):
            problems.append((Reason.INVALID_NAME, "metadata.manifest.name", problem))
        if problem := version_problem(manifest.version):
            problems.append((Reason.INVALID_VERSION, "metadata.manifest.version", problem))
        if not SHA256_HEX_RE.fullmatch(meta.sha256):
            hint = " without the `sha256:` prefix" if meta.sha256.startswith("sha256:") else ""
            problems.append((Reason.INVALID_DIGEST, "metadata.sha256",
                             f"{meta.sha256[:80]!r} is not a sha256: send 64 lowercase hex digits{hint}"))
        if self._verifier.abi_of(manifest) is None:
            abi = (skill_pb2.Abi.Name(manifest.abi) if manifest.abi in skill_pb2.Abi.values()
                   else str(manifest.abi))
            problems.append((Reason.INVALID_MANIFEST, "metadata.manifest.abi",
                             f"ABI {abi} is not supported; declare one of "
                             + ", ".join(skill_pb2.Abi.Name(a) for a in sorted(SUPPORTED_ABIS))))
        if meta.size_bytes > self._max_upload:
            problems.append((Reason.UPLOAD_TOO_LARGE, "metadata.size_bytes",
                             f"the module is {meta.size_bytes} bytes, more than the registry's limit of "
                             f"{self._max_upload} bytes"))
        if meta.bundle_sha256 and not SHA256_HEX_RE.fullmatch(meta.bundle_sha256):
            hint = " without the `sha256:` prefix" if meta.bundle_sha256.startswith("sha256:") else ""
            problems.append((Reason.INVALID_DIGEST, "metadata.bundle_sha256",
                             f"{meta.bundle_sha256[:80]!r} is not a sha256: send 64 lowercase hex digits{hint}"))
        if meta.bundle_size_bytes and not meta.bundle_sha256:
            problems.append((Reason.INVALID_ARGUMENT, "metadata.bundle_sha256",
                             "bundle_size_bytes is set but bundle_sha256 is not: a bundle needs its sha256"))
        if meta.size_bytes <= self._max_upload and meta.size_bytes + meta.bundle_size_bytes > self._max_upload:
            problems.append((Reason.UPLOAD_TOO_LARGE, "metadata.bundle_size_bytes",
                             f"the module and the file bundle are {meta.size_bytes + meta.bundle_size_bytes} "
                             f"bytes together, more than the registry's limit of {self._max_upload} bytes"))
        problems += _manifest_problems(manifest)
        if problems:
            raise _problems_error(problems)

    async def PublishSkill(self, request_iterator: AsyncIterator[pb.PublishSkillRequest],
                           context: grpc.aio.ServicerContext) -> pb.PublishSkillResponse:
        # Who calls decides which upload slots the stream counts against; an unknown token is refused here,
        # before the stream holds anything (random tokens must not buy fresh per-caller slots).
        caller = await self._trust.caller(context)
        who = caller_key(context, caller)
        with self._uploads.admit(who):
            paced = self._paced(request_iterator)
            try:
                return await self._publish(paced, context, caller)
            except OSError as exc:
                if is_out_of_descriptors(exc):
                    log.warning("a publish failed for want of file descriptors: %s", exc)
                    raise out_of_descriptors() from None
                raise
            except UploadTimeout as exc:
                self._drops_log.log(logging.INFO, "dropped a publish stream of %s: %s", who, exc.message)
                if context is None:
                    raise
                # Straight to the status: the interceptor would first wait for a stalled client to send more.
                await abort_with(context, exc, DOMAIN)
                raise  # not reached: abort raises
            finally:
                await paced.aclose()

    async def _paced(self, requests: AsyncIterator[pb.PublishSkillRequest],
                     ) -> AsyncGenerator[pb.PublishSkillRequest, None]:
        """The stream's messages, each within the idle timeout and all within the upload's time cap."""
        limits = self._uploads.limits
        loop = asyncio.get_running_loop()
        end = loop.time() + limits.max_duration_seconds
        iterator = aiter(requests)
        while True:
            remaining = end - loop.time()
            # Which bound this wait runs into: the idle timeout, or the cap on the whole upload.
            capped = remaining < limits.idle_timeout_seconds
            try:
                async with asyncio.timeout(max(min(remaining, limits.idle_timeout_seconds), 0.0)):
                    request = await anext(iterator, None)
            except TimeoutError:
                raise UploadTimeout(limits, total=capped) from None
            if request is None:
                return
            yield request

    async def _publish(self, requests: AsyncIterator[pb.PublishSkillRequest], context: grpc.aio.ServicerContext,
                       caller: Caller) -> pb.PublishSkillResponse:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("content") != "metadata":
            raise invalid(Reason.INVALID_ARGUMENT, "metadata",
                          "the first message of a publish stream must carry the metadata (manifest, sha256); "
                          "the module bytes follow as chunks, then the file bundle as bundle_chunks")
        meta = first.metadata
        self._check_metadata(meta)
        # Ownership and signature, before any byte is stored (the signature covers the declared digests).
        grant = await self._trust.authorize_publish(context, meta, caller)
        name, version = meta.manifest.name, meta.manifest.version
        expected = "sha256:" + meta.sha256
        started_ns = time.time_ns()
        limit = min(self._max_upload, meta.size_bytes) if meta.size_bytes else self._max_upload

        async with contextlib.AsyncExitStack() as stack:
            # Neither holds a file until its bytes outgrow a buffer; the module's is closed (finished) before
            # the bundle's opens, so a publish holds at most one descriptor at a time.
            upload = await stack.enter_async_context(self._blobs.upload(meta.sha256))
            bundle = (await stack.enter_async_context(self._blobs.upload(meta.bundle_sha256))
                      if meta.bundle_sha256 else None)
            in_bundle = False
            async for request in requests:
                kind = request.WhichOneof("content")
                if kind == "chunk":
                    if in_bundle:
                        raise invalid(Reason.INVALID_ARGUMENT, "chunk",
                                      "a module chunk came after a bundle_chunk: send every module chunk first, "
                                      "then the bundle")
                    if upload.size + len(request.chunk) > limit:
                        what = ("the declared size_bytes" if meta.size_bytes and limit == meta.size_bytes
                                else "the registry's upload limit")
                        raise self._too_large(name, version, "upload", what, limit, "chunk")
                    await upload.write(request.chunk)
                elif kind == "bundle_chunk":
                    if bundle is None:
                        raise invalid(Reason.INVALID_ARGUMENT, "bundle_chunk",
                                      "a bundle_chunk arrived but the metadata declares no bundle: set "
                                      "bundle_sha256 (and bundle_size_bytes) in the metadata")
                    if not in_bundle:
                        in_bundle = True
                        await upload.finish()
                    # One limit covers module and bundle together.
                    room = self._max_upload - upload.size
                    bundle_limit = min(room, meta.bundle_size_bytes) if meta.bundle_size_bytes else room
                    if bundle.size + len(request.bundle_chunk) > bundle_limit:
                        what = ("the declared bundle_size_bytes"
                                if meta.bundle_size_bytes and bundle_limit == meta.bundle_size_bytes
                                else "what the registry's upload limit leaves after the module")
                        raise self._too_large(name, version, "file bundle", what, bundle_limit, "bundle_chunk")
                    await bundle.write(request.bundle_chunk)
                else:
                    raise invalid(Reason.INVALID_ARGUMENT, "metadata",
                                  "metadata may only be sent once, as the first message of the stream")
            actual = await upload.finish()
            self._check_received("module", name, version, expected, actual, upload.size, meta.size_bytes,
                                 "metadata.sha256", "metadata.size_bytes")
            bundle_digest = ""
            if bundle is not None:
                bundle_digest = await bundle.finish()
                self._check_received("bundle", name, version, "sha256:" + meta.bundle_sha256, bundle_digest,
                                     bundle.size, meta.bundle_size_bytes, "metadata.bundle_sha256",
                                     "metadata.bundle_size_bytes")
            with_bundle = (f" and a {bundle.size}-byte file bundle matching {bundle_digest}"
                           if bundle is not None else "")

            async def settle() -> pb.PublishSkillResponse:
                record, created = await self._store.begin_version(NewVersion(
                    name=name, version=version, digest=actual, size_bytes=upload.size,
                    manifest=meta.manifest.SerializeToString(deterministic=True),
                    upload_started_ns=started_ns, upload_completed_ns=time.time_ns(),
                    pending_reason="upload started",
                    verifying_reason=f"upload complete: {upload.size} bytes matching {actual}{with_bundle}",
                    bundle_digest=bundle_digest,
                    signature_key_id=grant.key_id, signature=grant.signature, publisher=grant.publisher,
                ))
                if created and self._names is not None and name not in self._names[1]:
                    self._names = None  # a new name: suggestions read the names again
                if not created:
                    if (record.digest, record.bundle_digest) != (actual, bundle_digest):
                        raise _version_exists(name, version, record, actual, bundle_digest)
                    if skill_pb2.Manifest.FromString(record.manifest) != meta.manifest:
                        # Same bytes, another manifest (say, one more capability): not the same version.
                        raise ServiceError(
                            grpc.StatusCode.ALREADY_EXISTS, Reason.VERSION_EXISTS,
                            f"{name}@{version} already exists with the same module but another manifest; "
                            "versions are immutable, publish a new version",
                            metadata={"name": name, "version": version, "existing_digest": record.digest,
                                      "digest": actual})
                    if record.state in (State.PENDING, State.VERIFYING):
                        # Another registry replica on the shared database publishes it now (this one's own
                        # publishes of it are serialized above): its verification may still fail.
                        since = (time.time_ns() - record.history[-1].time_ns) / 1e9 if record.history else 0.0
                        raise ServiceError(
                            grpc.StatusCode.UNAVAILABLE, Reason.PUBLISH_IN_PROGRESS,
                            f"{name}@{version} is being published by another registry replica ({record.state} "
                            f"for {since:.0f}s); retry to learn its outcome",
                            metadata={"name": name, "version": version, "state": str(record.state)},
                            retry_after_seconds=1.0)
                    # The same bytes again: they hash to the version's digests, which passed verification when
                    # it was published, so they repair a stored blob that went missing or corrupt.
                    repaired = False
                    if record.state is State.READY:
                        what = f"{name}@{version}"
                        if bundle is not None:
                            repaired |= await self._integrity.restore(bundle, bundle_digest, what)
                        repaired |= await self._integrity.restore(upload, actual, what)
                    return pb.PublishSkillResponse(skill_version=await self._version_pb(record), created=False,
                                                   repaired=repaired)
                settled = False
                try:
                    data = await upload.read_all()
                    module_problems = _at_most(await self._verifier.verify(data, meta.manifest)
                                               or await self._link_problems(data, meta.manifest))
                    bundle_problems = _at_most(await self._verifier.verify_bundle(
                        bundle.path if bundle is not None else None, meta.manifest))
                    problems = module_problems + bundle_problems
                    if problems:
                        await self._store.transition(name, version, State.FAILED,
                                                     "verification failed: " + "; ".join(problems),
                                                     errors=problems)
                        settled = True
                        metadata = {"name": name, "version": version, "digest": actual}
                        if bundle_digest:
                            metadata["bundle_digest"] = bundle_digest
                        raise ServiceError(
                            grpc.StatusCode.INVALID_ARGUMENT, Reason.VERIFICATION_FAILED,
                            f"{name}@{version} failed verification: " + "; ".join(problems),
                            metadata=metadata,
                            field_violations=[("module", p) for p in module_problems]
                            + [("bundle", p) for p in bundle_problems])
                    # The blobs go into place only now: anything served by digest has passed verification.
                    # The bundle first: a module blob in place means its bundle is too (see settle_unfinished).
                    # Placing verified bytes also repairs a blob another version shares that was quarantined.
                    if bundle is not None:
                        await bundle.commit(bundle_digest)
                    await upload.commit(actual)
                    for placed in (bundle_digest, actual):
                        if placed:
                            await self._store.mark_repaired(placed)
                    abi = self._verifier.abi_of(meta.manifest)
                    files = (f"; bundle holds exactly the manifest's {len(meta.manifest.files)} file(s)"
                             if bundle is not None else "")
                    # Before and after: a resolver catalogue built while the transition commits must not be
                    # kept as current (it may predate the new READY version).
                    self._generation += 1
                    try:
                        record = await self._store.transition(
                            name, version, State.READY,
                            f"verification passed: compiles with wasmtime and implements "
                            f"{abi.name if abi else '?'} with capabilities "
                            f"[{', '.join(meta.manifest.capabilities)}]{files}; {grant.summary()}")
                    finally:
                        self._generation += 1
                    settled = True
                except BaseException:
                    if not settled:
                        await self._abandon(name, version)
                    raise
                log.info("published %s@%s (%s, %d bytes%s)", name, version, actual, upload.size,
                         f"; bundle {bundle_digest}, {bundle.size} bytes" if bundle is not None else "")
                return pb.PublishSkillResponse(skill_version=version_to_pb(record), created=True)

            return await self._publishing.run((name, version), settle)

    @staticmethod
    def _too_large(name: str, version: str, what: str, bound: str, limit: int, field_name: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, Reason.UPLOAD_TOO_LARGE,
            f"the {what} of {name}@{version} exceeds {bound} of {limit} bytes",
            metadata={"limit_bytes": str(limit), "name": name, "version": version},
            field_violations=[(field_name, f"more than {limit} bytes")])

    @staticmethod
    def _check_received(blob: str, name: str, version: str, expected: str, actual: str, size: int,
                        declared_size: int, sha_field: str, size_field: str) -> None:
        """CHECKSUM_MISMATCH or SIZE_MISMATCH for the module or the bundle, naming which in `blob`."""
        what = "" if blob == "module" else f" of the file {blob}"
        if actual != expected:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, Reason.CHECKSUM_MISMATCH,
                f"checksum mismatch{what} for {name}@{version}: expected {expected}, got {actual} over {size} bytes",
                metadata={"blob": blob, "expected": expected, "actual": actual, "size_bytes": str(size)},
                field_violations=[(sha_field, f"the uploaded bytes have digest {actual}")])
        if declared_size and size != declared_size:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, Reason.SIZE_MISMATCH,
                f"size mismatch{what} for {name}@{version}: declared {declared_size} bytes, received {size}",
                metadata={"blob": blob, "expected": str(declared_size), "actual": str(size)},
                field_violations=[(size_field, f"{size} bytes were uploaded")])

    async def _abandon(self, name: str, version: str) -> None:
        """Record FAILED for a publish that stopped mid-verification (client gone, deadline, shutdown), so
        the version does not stay VERIFYING and can be published again. A restart settles it otherwise."""
        why = "the publish was interrupted before verification finished; publish this version again"
        try:
            await asyncio.shield(self._store.transition(name, version, State.FAILED, why, errors=[why]))
        except Exception:  # noqa: BLE001 - the original error matters more; settle_unfinished is the backstop
            log.warning("could not record the interrupted publish of %s@%s", name, version, exc_info=True)

    # Reading.

    async def GetSkill(self, request: pb.GetSkillRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetSkillResponse:
        _check_name(request.name)
        record = await self._store.get_skill(request.name)
        if record is None:
            raise await self._skill_not_found(request.name)
        return pb.GetSkillResponse(skill=skill_to_pb(record))

    async def ListSkills(self, request: pb.ListSkillsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListSkillsResponse:
        size = _page_size(request.page_size)
        for field_name, text in (("prefix", request.prefix), ("query", request.query)):
            if len(text) > MAX_FILTER_LENGTH:
                raise invalid(Reason.INVALID_ARGUMENT, field_name, f"{field_name} is at most {MAX_FILTER_LENGTH} "
                              "characters")
        # A filtered listing's token carries a key of its filter (an unfiltered one keeps the old format), so
        # a token replayed with another filter is refused instead of silently skipping or repeating skills.
        filtered = bool(request.prefix or request.query)
        token_prefix = _SKILLS_TOKEN + (_filter_key(request.prefix, request.query) + "/" if filtered else "")
        after = None
        if request.page_token:
            after = _decode_token(request.page_token, _SKILLS_TOKEN)
            if not (_SKILLS_TOKEN + after).startswith(token_prefix) or (not filtered and "/" in after):
                raise invalid(Reason.INVALID_PAGE_TOKEN, "page_token",
                              "page_token belongs to a listing with another prefix or query; start again "
                              "without it")
            after = after.rpartition("/")[2]
        if filtered:
            page = await self._store.search_skills(after=after, limit=size, prefix=request.prefix,
                                                   query=request.query)
        else:
            page = await self._store.list_skills(after=after, limit=size)
        token = _encode_token(token_prefix + page.items[-1].name) if page.more and page.items else ""
        return pb.ListSkillsResponse(skills=[skill_to_pb(s) for s in page.items], next_page_token=token)

    async def GetSkillVersion(self, request: pb.GetSkillVersionRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetSkillVersionResponse:
        _check_name(request.name)
        version = request.version
        if version_problem(version) and TAG_RE.fullmatch(version):
            skill = await self._store.get_skill(request.name)
            if skill is None:
                raise await self._skill_not_found(request.name)
            tagged = skill.latest_version if version == LATEST else skill.tags.get(version, "")
            if not tagged:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND,
                                   f"skill {request.name!r} has no tag {version!r}"
                                   + (" (no Ready, non-yanked version)" if version == LATEST else ""),
                                   metadata={"name": request.name, "tag": version})
            version = tagged
        else:
            _check_version(version)
        record = await self._store.get_version(request.name, version)
        if record is None:
            raise await self._version_not_found(request.name, version)
        return pb.GetSkillVersionResponse(skill_version=await self._version_pb(record))

    async def ListSkillVersions(self, request: pb.ListSkillVersionsRequest,
                                context: grpc.aio.ServicerContext) -> pb.ListSkillVersionsResponse:
        _check_name(request.name)
        size = _page_size(request.page_size)
        after = None
        if request.page_token:
            position = _decode_token(request.page_token, _VERSIONS_TOKEN)
            token_name, _, after = position.partition("@")
            if token_name != request.name or version_problem(after):
                raise invalid(Reason.INVALID_PAGE_TOKEN, "page_token",
                              "page_token belongs to another listing; start again without it")
        page = await self._store.list_versions(request.name, after=after, limit=size)
        if page is None:
            raise await self._skill_not_found(request.name)
        token = ""
        if page.more and page.items:
            token = _encode_token(f"{_VERSIONS_TOKEN}{request.name}@{page.items[-1].version}")
        problems = await self._integrity.problems(page.items)
        return pb.ListSkillVersionsResponse(
            skill_versions=[version_to_pb(v, p) for v, p in zip(page.items, problems, strict=True)],
            next_page_token=token)

    # Catalogue.

    async def YankSkillVersion(self, request: pb.YankSkillVersionRequest,
                               context: grpc.aio.ServicerContext) -> pb.YankSkillVersionResponse:
        _check_name(request.name)
        _check_version(request.version)
        if len(request.reason) > MAX_YANK_REASON:
            raise invalid(Reason.INVALID_ARGUMENT, "reason", f"a yank reason is at most {MAX_YANK_REASON} characters")
        await self._trust.authorize_change(context, request.name, "yank" if request.yanked else "un-yank",
                                          "skills.yank")
        self._generation += 1
        try:
            record = await self._store.set_yanked(request.name, request.version, request.yanked, request.reason)
        except VersionNotFound:
            raise await self._version_not_found(request.name, request.version) from None
        finally:
            self._generation += 1
        log.info("%s %s@%s%s", "yanked" if request.yanked else "un-yanked", request.name, request.version,
                 f" ({request.reason})" if request.yanked and request.reason else "")
        return pb.YankSkillVersionResponse(skill_version=await self._version_pb(record))

    async def SetSkillTag(self, request: pb.SetSkillTagRequest,
                          context: grpc.aio.ServicerContext) -> pb.SetSkillTagResponse:
        _check_name(request.name)
        _check_tag(request.tag)
        _check_version(request.version)
        await self._trust.authorize_change(context, request.name, "tag", "skills.tag")
        record = await self._store.get_version(request.name, request.version)
        if record is None:
            raise await self._version_not_found(request.name, request.version)
        if record.state is not State.READY:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_NOT_READY,
                               f"{request.name}@{request.version} is {record.state}, not READY: only a verified "
                               "version can be tagged",
                               metadata={"name": request.name, "version": request.version,
                                         "state": record.state.value})
        skill = await self._store.set_tag(request.name, request.tag, request.version)
        return pb.SetSkillTagResponse(skill=skill_to_pb(skill))

    async def DeleteSkillTag(self, request: pb.DeleteSkillTagRequest,
                             context: grpc.aio.ServicerContext) -> pb.DeleteSkillTagResponse:
        _check_name(request.name)
        _check_tag(request.tag)
        await self._trust.authorize_change(context, request.name, "untag", "skills.tag")
        skill = await self._store.delete_tag(request.name, request.tag)
        if skill is None:
            if await self._store.get_skill(request.name) is None:
                raise await self._skill_not_found(request.name)
            raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.TAG_NOT_FOUND,
                               f"skill {request.name!r} has no tag {request.tag!r}",
                               metadata={"name": request.name, "tag": request.tag})
        return pb.DeleteSkillTagResponse(skill=skill_to_pb(skill))

    async def _link_problems(self, data: bytes, manifest: skill_pb2.Manifest) -> list[str]:
        """Problems linking a module that imports functions from dependency packages with the versions its
        dependencies resolve to now (the deployer pins a resolution again at deploy time). Empty for a
        module that imports only WASI."""
        if not await self._verifier.dependency_packages(data):
            return []
        try:
            resolved = await asyncio.to_thread(Resolver(await self._resolver_catalog()).resolve,
                                               _requirements(list(manifest.dependencies)))
        except ResolutionError as exc:
            return [f"the module imports from its dependencies, but they do not resolve: {exc}"]
        copies = [Copy(r.package, r.version, r.digest, r.shared, r.required_by) for r in resolved]
        # Only the copies the imports reach are read and compiled, and only up to the graph bounds.
        modules: dict[str, bytes] = {}
        pending = [(package, ROOT) for package in await self._verifier.dependency_packages(data)]
        seen: set[tuple[str, str, bool]] = set()
        total = 0
        while pending:
            package, dependent = pending.pop()
            copy = provider_for(package, dependent, copies)
            if copy is None or (copy.package, copy.version, copy.shared) in seen:
                continue  # a missing provider is reported by verify_links
            seen.add((copy.package, copy.version, copy.shared))
            if len(seen) > MAX_MODULES:
                return [f"the dependency graph the module imports from has more than {MAX_MODULES} modules"]
            if copy.digest not in modules:
                try:
                    modules[copy.digest] = await self._read_blob(copy.digest)
                except BlobNotFound:
                    return [f"the module of dependency {copy.package}@{copy.version} ({copy.digest}) is missing "
                            "from the registry's blob store; publish it again to restore it"]
                except BlobCorrupt as exc:
                    record = await self._integrity.quarantine(exc, "publish")
                    return [f"the module of dependency {copy.package}@{copy.version} "
                            f"({blob_corrupt_error(copy.digest, record).message})"]
                total += len(modules[copy.digest])
                if total > MAX_LINKED_BYTES:
                    return [f"the dependency modules the module imports from total more than "
                            f"{MAX_LINKED_BYTES} bytes"]
            pending += [(p, copy.label) for p in await self._verifier.dependency_packages(modules[copy.digest])]
        return await self._verifier.verify_links(data, manifest, copies, modules)

    async def _read_blob(self, digest: str) -> bytes:
        """A whole stored blob, checked; read again if a repair or a quarantine replaced it meanwhile (the next
        read finds the repaired bytes, or the blob gone: BlobNotFound)."""
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                return await (await self._blobs.read(digest)).read_all()
            except BlobChanged:
                if attempt == attempts:
                    raise
        raise AssertionError("not reached")

    async def _resolver_catalog(self) -> Catalog:
        generation = self._generation
        if self._catalog is not None and self._catalog[0] == generation:
            return self._catalog[1]
        entries = await self._store.catalog()

        def build() -> Catalog:
            catalog: dict[str, list[Release]] = {}
            for entry in entries:
                manifest = skill_pb2.Manifest.FromString(entry.manifest)
                catalog.setdefault(entry.name, []).append(Release(
                    entry.version, _requirements(list(manifest.dependencies)), entry.digest, entry.yanked))
            return catalog

        catalog = await asyncio.to_thread(build)
        # Tagged with the generation read before the query: a change meanwhile makes the next call rebuild.
        self._catalog = (generation, catalog)
        return catalog

    async def ResolveDependencies(self, request: pb.ResolveDependenciesRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ResolveDependenciesResponse:
        by_version = bool(request.name or request.version)
        if by_version == bool(request.requirements):
            raise invalid(Reason.INVALID_ARGUMENT, "requirements",
                          "send either requirements or name and version of a published skill, not both")
        if len(request.requirements) > MAX_REQUIREMENTS:
            raise invalid(Reason.INVALID_ARGUMENT, "requirements",
                          f"at most {MAX_REQUIREMENTS} requirements per request")
        if problems := _requirement_problems(list(request.requirements), "requirements"):
            raise _problems_error(problems)
        roots = _requirements(list(request.requirements))
        if by_version:
            _check_name(request.name)
            _check_version(request.version)
            record = await self._store.get_version(request.name, request.version)
            if record is None:
                raise await self._version_not_found(request.name, request.version)
            if record.state is not State.READY:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_NOT_READY,
                                   f"{request.name}@{request.version} is {record.state}, not READY",
                                   metadata={"name": request.name, "version": request.version,
                                             "state": record.state.value})
            # Resolve the version itself, pinned: its own dependencies come from the catalogue, a cycle back
            # to it is caught, and a yanked version still resolves (it is pinned exactly).
            roots = (Requirement(request.name, "=" + request.version, True),)
        catalog = await self._resolver_catalog()
        try:
            resolved = await asyncio.to_thread(Resolver(catalog).resolve, roots)
        except ResolutionError as exc:
            metadata = {"package": exc.package}
            if exc.cycle:
                metadata["cycle"] = " -> ".join(exc.cycle)
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPENDENCY_CONFLICT, str(exc),
                               metadata=metadata) from None
        if by_version:
            resolved = [r for r in resolved if (r.package, r.version) != (request.name, request.version)]
        return pb.ResolveDependenciesResponse(dependencies=[_resolved_to_pb(r) for r in resolved])

    async def DownloadBlob(self, request: internal_pb.DownloadBlobRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[internal_pb.DownloadBlobResponse]:
        if problem := digest_problem(request.digest):
            raise invalid(Reason.INVALID_DIGEST, "digest", problem)
        # Counted against the same caller as its uploads; an unknown token is refused before it takes a slot.
        with self._downloads.admit(caller_key(context, await self._trust.caller(context))):
            try:
                reader = await self._blobs.read(request.digest)
                # Checked on the way; the last chunk waits for the verdict. No descriptor is held between
                # chunks, so a client that stops reading holds only its slot (see BlobReader.chunks).
                async for chunk in reader.chunks():
                    yield internal_pb.DownloadBlobResponse(chunk=chunk)
            except OSError as exc:
                if is_out_of_descriptors(exc):
                    log.warning("a download failed for want of file descriptors: %s", exc)
                    raise out_of_descriptors() from None
                raise
            except BlobNotFound:
                if record := await self._integrity.quarantine_record(request.digest):
                    raise blob_corrupt_error(request.digest, record) from None
                raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.BLOB_NOT_FOUND,
                                   f"no blob with digest {request.digest}", metadata={"digest": request.digest}
                                   ) from None
            except BlobChanged:
                raise ServiceError(grpc.StatusCode.ABORTED, Reason.BLOB_CHANGED,
                                   f"blob {request.digest} was repaired or quarantined while it was being sent; "
                                   "download it again", metadata={"digest": request.digest},
                                   retry_after_seconds=BLOB_CHANGED_RETRY_SECONDS) from None
            except BlobCorrupt as exc:
                record = await self._integrity.quarantine(exc, "download")
                raise blob_corrupt_error(request.digest, record or await self._integrity.quarantine_record(
                    request.digest)) from None

    async def VerifyBlobs(self, request: pb.VerifyBlobsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.VerifyBlobsResponse]:
        await self._trust.require_admin(context)
        log.info("a blob scrub was asked for (VerifyBlobs)")
        async for progress in self._integrity.scrub():
            yield _progress_to_pb(progress)
            if progress.done:
                log.info("scrub (VerifyBlobs): %d blob(s), %d bytes hashed; %d quarantined now; %d problem(s)",
                         progress.blobs_checked, progress.bytes_checked, progress.blobs_quarantined,
                         progress.problem_count)


_ROLES_PB = {MODULE: pb.BLOB_ROLE_MODULE, BUNDLE: pb.BLOB_ROLE_BUNDLE, "": pb.BLOB_ROLE_UNUSED}
_CONDITIONS_PB = {"corrupt": pb.BLOB_CONDITION_CORRUPT, "quarantined": pb.BLOB_CONDITION_QUARANTINED,
                  "missing": pb.BLOB_CONDITION_MISSING}


def _problem_to_pb(problem: FoundProblem) -> pb.BlobProblem:
    return pb.BlobProblem(name=problem.name, version=problem.version, role=_ROLES_PB[problem.role],
                          digest=problem.digest, condition=_CONDITIONS_PB[problem.condition],
                          description=problem.description)


def _progress_to_pb(progress: ScrubProgress) -> pb.VerifyBlobsResponse:
    return pb.VerifyBlobsResponse(blobs_checked=progress.blobs_checked, blobs_total=progress.blobs_total,
                                  bytes_checked=progress.bytes_checked, blobs_quarantined=progress.blobs_quarantined,
                                  problems=[_problem_to_pb(p) for p in progress.problems], done=progress.done)


def _resolved_to_pb(resolved: Resolved) -> skill_pb2.ResolvedDependency:
    return skill_pb2.ResolvedDependency(package=resolved.package, version=resolved.version,
                                        digest=resolved.digest, is_shared=resolved.shared,
                                        required_by=list(resolved.required_by))


async def settle_unfinished(store: MetadataStore, blobs: BlobBackend, verifier: Verifier, *,
                            older_than_seconds: float = 0.0, pending_older_than_seconds: float | None = None,
                            ) -> None:
    """Finish the publishes a previous run left in flight, so no version stays PENDING or VERIFYING. Where
    replicas share the store, only those unchanged for `older_than_seconds` (PENDING ones: for
    `pending_older_than_seconds`, as long as an upload may last): a younger one may be another replica's publish
    in flight."""
    now = time.time_ns()
    before_ns = now - int(older_than_seconds * 1e9)
    pending_before_ns = now - int((older_than_seconds if pending_older_than_seconds is None
                                   else pending_older_than_seconds) * 1e9)
    for record in await store.unsettled_versions():
        limit = pending_before_ns if record.state is State.PENDING else before_ns
        if record.history and record.history[-1].time_ns > limit:
            log.info("%s@%s has been %s for %.0fs, perhaps on another replica: left alone", record.name,
                     record.version, record.state, (time.time_ns() - record.history[-1].time_ns) / 1e9)
            continue
        manifest = skill_pb2.Manifest.FromString(record.manifest)
        bundle_ok = not record.bundle_digest or await blobs.exists(record.bundle_digest)
        if record.state is State.VERIFYING and bundle_ok and await blobs.exists(record.digest):
            # The registry stopped between placing the blobs and recording READY: verify again.
            try:
                # No BlobChanged here: nothing else runs yet, so nothing replaces the file meanwhile.
                data = await (await blobs.read(record.digest)).read_all()
            except BlobCorrupt as exc:
                await Integrity(store, blobs).quarantine(exc, "restart")
                why = ("the module stored before the registry stopped failed its digest check; publish this "
                       "version again")
                await store.transition(record.name, record.version, State.FAILED, why, errors=[why])
                log.warning("%s@%s left %s by a previous run: now FAILED", record.name, record.version, record.state)
                continue
            problems = await verifier.verify(data, manifest)
            if record.bundle_digest:
                async with blobs.local_file(record.bundle_digest) as bundle_path:
                    problems += await verifier.verify_bundle(bundle_path, manifest)
            else:
                problems += await verifier.verify_bundle(None, manifest)
            if not problems and await verifier.dependency_packages(data):
                # Its links were checked against the catalogue of that moment, which a restart does not keep:
                # rather than pass it unchecked, ask for the publish again.
                problems = ["the registry stopped before the module's dependency links were recorded as checked; "
                            "publish this version again"]
            if not problems:
                await store.transition(record.name, record.version, State.READY,
                                       "verification passed (re-run after a restart)")
                continue
            reason = "verification failed (re-run after a restart): " + "; ".join(problems)
        else:
            problems = ["the registry stopped before verification finished; publish this version again"]
            reason = problems[0]
        await store.transition(record.name, record.version, State.FAILED, reason, errors=problems)
        log.warning("%s@%s left %s by a previous run: now FAILED", record.name, record.version, record.state)
