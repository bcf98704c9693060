"""Who may publish what: publishers and their bearer tokens, namespaces, and signature checks at publish.

A publisher authenticates with `authorization: Bearer <token>` metadata; the registry stores only the
token's sha256 (tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force). The
operator's admin token (`CLAWHUB_REGISTRY_ADMIN_TOKEN`) creates publishers and namespaces. A namespace is a
name prefix on dot boundaries; the longest claimed prefix of a skill name governs it. Names under no
namespace stay open unless the registry requires namespaces. See docs/registry.md, "Namespaces and
signatures".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

import grpc
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.registry.store import (
    AlreadyExists,
    MetadataStore,
    NamespaceOverlap,
    NamespaceRecord,
    NotFound,
    PublisherRecord,
)
from services.runtime import signing
from services.runtime.auth import ADMIN as ADMIN_PRINCIPAL
from services.runtime.auth import (
    ANONYMOUS,
    Authenticator,
    AuthSettings,
    Principal,
    bearer,
    key_principal,
    publisher_principal,
)
from services.runtime.errors import Reason, ServiceError, invalid
from services.runtime.names import key_id_problem, skill_name_problem

log = logging.getLogger("clawhub.registry")

Context = Any  # grpc.aio.ServicerContext; grpc ships no type information

PUBLISHER_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,62}", re.ASCII)  # fullmatch: `$` would accept a final "\n"
TOKEN_PREFIX = "clawhub_"
# What a version's `publisher` says when the admin token published it: not a valid publisher name.
ADMIN_PUBLISHER = "(admin)"
MAX_KEYS_PER_REQUEST = 64
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_NAMESPACES_TOKEN = "namespaces/"
# Neutral: the registry does not know which client (or CLI command) called; the clawhub CLI adds the flag and
# variable of the command being run.
HOW_TO_PUBLISH = "send the owner's token as the bearer token (`authorization: Bearer <token>` metadata)"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A bearer token: 256 random bits, with a prefix that secret scanners can recognize."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    """Who is calling: nobody (no token), the admin (the admin token, or a key or JWT with the admin role), a
    publisher (its token), or another principal (an API key or a JWT; services/runtime/auth.py)."""

    publisher: str = ""
    admin: bool = False
    principal: Principal = ANONYMOUS

    def describe(self) -> str:
        if self.admin and self.principal.kind in ("admin", "anonymous"):
            return "the admin token"
        if self.principal.kind in ("key", "jwt"):
            return self.principal.name
        return f"publisher {self.publisher}'s token" if self.publisher else "no token"

    def may(self, permission: str, skill: str) -> bool:
        """Whether a key or JWT grants `permission` on `skill` by its role and scopes (publisher tokens are
        governed by namespace ownership instead)."""
        return self.principal.kind in ("key", "jwt") and self.principal.allows(permission, skill)


@dataclass(frozen=True)
class PublishGrant:
    """What the trust checks decided for one publish: who published, under which namespace, signed how."""

    publisher: str
    namespace: str
    key_id: str = ""
    signature: bytes = b""

    def summary(self) -> str:
        """For the READY transition's reason, so the verdict says how the version's provenance was checked."""
        where = f"namespace {self.namespace}" if self.namespace else "no namespace"
        who = f"published by {self.publisher}" if self.publisher else "published without a token"
        if self.key_id:
            return f"signature by {self.key_id} verified (a key {where} trusts); {who}"
        return f"unsigned ({where} does not require signatures); {who}"


def _bearer(context: Context) -> str | None:
    """The bearer token of the call, None without one; INVALID_TOKEN when the header is not `Bearer <token>`."""
    # No context: called in-process (tests drive the servicer directly), which carries no credentials.
    return bearer(context.invocation_metadata() if context is not None else None)


def namespace_problem(name: str) -> str | None:
    problem = skill_name_problem(name)
    if problem:
        return problem.replace("skill name", "namespace").replace("com.acme.image-process", "com.acme")
    return None


def _check_namespace_name(name: str, field_name: str = "name") -> None:
    if problem := namespace_problem(name):
        raise invalid(Reason.INVALID_NAME, field_name, problem)


def _public_keys(keys: list[bytes], field_name: str) -> list[tuple[str, bytes]]:
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise invalid(Reason.INVALID_ARGUMENT, field_name, f"at most {MAX_KEYS_PER_REQUEST} keys per request")
    parsed = []
    for i, key in enumerate(keys):
        if problem := signing.public_key_problem(key):
            raise invalid(Reason.INVALID_ARGUMENT, f"{field_name}[{i}]", problem)
        parsed.append((signing.key_id(key), bytes(key)))
    return parsed


def namespace_to_pb(record: NamespaceRecord) -> pb.Namespace:
    message = pb.Namespace(name=record.name, owner=record.owner, require_signatures=record.require_signatures)
    for key in record.keys:
        added = message.keys.add(key_id=key.key_id, public_key=key.public_key)
        added.create_time.FromNanoseconds(key.create_time_ns)
    message.create_time.FromNanoseconds(record.create_time_ns)
    message.update_time.FromNanoseconds(record.update_time_ns)
    return message


def _publisher_to_pb(record: PublisherRecord) -> pb.Publisher:
    message = pb.Publisher(name=record.name)
    message.create_time.FromNanoseconds(record.create_time_ns)
    return message


def _namespace_not_found(what: str, metadata: dict[str, str]) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, Reason.NAMESPACE_NOT_FOUND, what, metadata=metadata)


class Trust:
    """Authentication and namespace policy, shared by the publish path and the namespace RPCs."""

    def __init__(self, store: MetadataStore, *, admin_token: str, require_namespace: bool,
                 auth: AuthSettings | None = None) -> None:
        self._store = store
        # Only the hash is kept in memory too, and compared in constant time.
        self._admin_sha256 = token_sha256(admin_token) if admin_token else ""
        self._require_namespace = require_namespace
        # The registry is where keys live: its answers are never cached (a revocation holds at once here).
        self.authenticator = Authenticator(auth or AuthSettings(), self.resolve, cache_seconds=0.0)

    async def resolve(self, digest: str) -> Principal | None:
        """The principal of the bearer token whose sha256 is `digest`: the admin token, an API key (not
        revoked), a publisher's token; None for anything else."""
        if self._admin_sha256 and hmac.compare_digest(digest, self._admin_sha256):
            return ADMIN_PRINCIPAL
        key = await self._store.api_key_by_sha256(digest)
        if key is not None:
            return key_principal(key.id, key.name, key.role, key.scopes) if key.revoke_time_ns is None else None
        publisher = await self._store.publisher_by_token(digest)
        return publisher_principal(publisher) if publisher is not None else None

    async def caller(self, context: Context) -> Caller:
        """Who calls. A token that is presented but unknown is refused even where none is needed: a typo
        should not silently turn into an anonymous publish."""
        # No context: called in-process (tests drive the servicer directly), which carries no credentials.
        metadata = context.invocation_metadata() if context is not None else None
        principal = await self.authenticator.principal(metadata)
        if principal.anonymous:
            return Caller()
        return Caller(publisher=principal.subject if principal.kind == "publisher" else "",
                      admin="admin" in principal.roles, principal=principal)

    async def require_admin(self, context: Context) -> None:
        token = _bearer(context)
        try:
            caller = await self.caller(context) if token is not None else Caller()
        except ServiceError:
            caller = Caller()  # an unknown token: "another token", as below
        if caller.admin:
            return
        if not self._admin_sha256:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED, Reason.ADMIN_TOKEN_NOT_CONFIGURED,
                "this registry has no admin token, so admin calls are refused: its operator starts it with "
                "CLAWHUB_REGISTRY_ADMIN_TOKEN set to a long random secret, and admin calls send that secret as "
                "the bearer token (`authorization: Bearer <token>` metadata); or send a key with the admin role "
                "(the one `clawhub up` created)")
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.ADMIN_REQUIRED,
                           "this call needs the registry's admin token (or a key with the admin role) as the bearer "
                           "token (`authorization: Bearer <token>` metadata), and the call carries "
                           + ("no token" if token is None else "another token" if caller.principal.anonymous
                              else caller.describe()))

    def _check_owner(self, caller: Caller, skill: str, namespace: NamespaceRecord | None, action: str,
                     permission: str = "skills.publish") -> None:
        if caller.admin or caller.may(permission, skill):
            # A key or JWT whose role grants the change on this name (its scopes cover it): an admin gave it.
            return
        if namespace is None:
            if self._require_namespace:
                raise ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED, Reason.NAMESPACE_REQUIRED,
                    f"{skill} is in no namespace, and this registry requires one "
                    "(CLAWHUB_REGISTRY_REQUIRE_NAMESPACE): ask the operator to create a namespace for it",
                    metadata={"skill": skill})
            return
        if caller.publisher != namespace.owner:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED, Reason.NAMESPACE_NOT_OWNED,
                f"cannot {action} {skill}: it is in namespace {namespace.name}, owned by publisher "
                f"{namespace.owner}, and the call carries {caller.describe()}; {HOW_TO_PUBLISH}",
                metadata={"skill": skill, "namespace": namespace.name, "owner": namespace.owner})

    async def authorize_change(self, context: Context, skill: str, action: str, permission: str) -> None:
        """Yank and tag changes: the governing namespace's owner, a key or JWT granted `permission` on the
        name, or the admin."""
        caller = await self.caller(context)
        self._check_owner(caller, skill, await self._store.governing_namespace(skill), action, permission)

    async def authorize_publish(self, context: Context, meta: pb.PublishSkillMetadata,
                                caller: Caller | None = None) -> PublishGrant:
        """Ownership of the name, then the signature: over the *declared* digests, which the upload must then
        match, so a refused publish is refused before any byte is stored. `caller`: who `caller(context)`
        said calls, when the caller already asked."""
        name, version = meta.manifest.name, meta.manifest.version
        if caller is None:
            caller = await self.caller(context)
        namespace = await self._store.governing_namespace(name)
        self._check_owner(caller, name, namespace, "publish")
        publisher = (caller.principal.name if caller.principal.kind in ("key", "jwt")
                     else ADMIN_PUBLISHER if caller.admin else caller.publisher)
        ns_name = namespace.name if namespace else ""
        signature = meta.signature
        if not meta.HasField("signature") or (not signature.key_id and not signature.signature):
            if namespace is not None and namespace.require_signatures:
                raise ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED, Reason.SIGNATURE_REQUIRED,
                    f"namespace {namespace.name} requires signatures: sign {name}@{version} with a key it trusts "
                    f"(`clawhub publish --sign KEYFILE`; trusted: {_key_list(namespace)})",
                    metadata={"skill": name, "version": version, "namespace": namespace.name})
            return PublishGrant(publisher, ns_name)
        if problem := key_id_problem(signature.key_id):
            raise invalid(Reason.SIGNATURE_INVALID, "metadata.signature.key_id", problem)
        if len(signature.signature) != signing.SIGNATURE_BYTES:
            raise invalid(Reason.SIGNATURE_INVALID, "metadata.signature.signature",
                          f"an Ed25519 signature is {signing.SIGNATURE_BYTES} bytes, not {len(signature.signature)}")
        key = namespace.key(signature.key_id) if namespace else None
        if namespace is None or key is None:
            where = (f"namespace {namespace.name} does not trust it (trusted: {_key_list(namespace)}; add it with "
                     "`clawhub namespace add-key`)" if namespace
                     else f"{name} is in no namespace, so no key is trusted to sign it")
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.SIGNER_NOT_TRUSTED,
                               f"{name}@{version} is signed by {signature.key_id}, but {where}",
                               metadata={"skill": name, "version": version, "key_id": signature.key_id,
                                         "namespace": ns_name})
        subject = signing.Subject(name=name, version=version, digest="sha256:" + meta.sha256,
                                  bundle_digest="sha256:" + meta.bundle_sha256 if meta.bundle_sha256 else "",
                                  manifest=signing.manifest_bytes(meta.manifest))
        if not signing.verify(key.public_key, signature.signature, subject):
            problem = (f"the signature by {signature.key_id} does not verify over {name}@{version} with module "
                       f"sha256:{meta.sha256}, its bundle and this manifest: the package or the manifest changed "
                       "after signing, or it was signed for something else")
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.SIGNATURE_INVALID, problem,
                               metadata={"skill": name, "version": version, "key_id": signature.key_id,
                                         "field": "metadata.signature"},
                               field_violations=[("metadata.signature", problem)])
        return PublishGrant(publisher, ns_name, signature.key_id, bytes(signature.signature))


def _key_list(namespace: NamespaceRecord) -> str:
    return ", ".join(k.key_id for k in namespace.keys) or "none yet"


def _page_size(requested: int) -> int:
    if requested < 0:
        raise invalid(Reason.INVALID_ARGUMENT, "page_size", f"page_size must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _after(token: str) -> str | None:
    if not token:
        return None
    bad = invalid(Reason.INVALID_PAGE_TOKEN, "page_token",
                  "page_token is not a token from a previous ListNamespaces response; start again without it")
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, binascii.Error, UnicodeError):
        raise bad from None
    if not text.startswith(_NAMESPACES_TOKEN) or namespace_problem(text[len(_NAMESPACES_TOKEN):]):
        raise bad
    return text[len(_NAMESPACES_TOKEN):]


class NamespaceRpcs:
    """The publisher and namespace RPCs of RegistryService (mixed into the servicer)."""

    _store: MetadataStore
    _trust: Trust

    async def CreatePublisher(self, request: pb.CreatePublisherRequest,
                              context: Context) -> pb.CreatePublisherResponse:
        await self._trust.require_admin(context)
        if not PUBLISHER_NAME_RE.fullmatch(request.name):
            raise invalid(Reason.INVALID_NAME, "name",
                          f"{request.name[:80]!r} is not a publisher name: a lowercase letter, then up to 62 "
                          "lowercase letters, digits or hyphens")
        token = new_token()
        try:
            record = await self._store.create_publisher(request.name, token_sha256(token))
        except AlreadyExists:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, Reason.PUBLISHER_EXISTS,
                               f"a publisher named {request.name!r} exists", metadata={"publisher": request.name}
                               ) from None
        log.info("created publisher %s", request.name)
        return pb.CreatePublisherResponse(publisher=_publisher_to_pb(record), token=token)

    async def CreateNamespace(self, request: pb.CreateNamespaceRequest,
                              context: Context) -> pb.CreateNamespaceResponse:
        await self._trust.require_admin(context)
        _check_namespace_name(request.name)
        if not PUBLISHER_NAME_RE.fullmatch(request.owner):
            raise invalid(Reason.INVALID_NAME, "owner", f"{request.owner[:80]!r} is not a publisher name")
        keys = _public_keys(list(request.public_keys), "public_keys")
        try:
            record = await self._store.create_namespace(request.name, request.owner, request.require_signatures,
                                                        keys)
        except NotFound:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.PUBLISHER_NOT_FOUND,
                               f"no publisher named {request.owner!r}; create it first (`clawhub publisher create`)",
                               metadata={"publisher": request.owner}) from None
        except AlreadyExists:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, Reason.NAMESPACE_EXISTS,
                               f"namespace {request.name} is already claimed", metadata={"namespace": request.name}
                               ) from None
        except NamespaceOverlap as exc:
            relation = "inside" if request.name.startswith(exc.other + ".") else "around"
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, Reason.NAMESPACE_OVERLAP,
                f"{request.name} would be {relation} namespace {exc.other}, which publisher {exc.owner} owns: a "
                "publisher can only nest namespaces inside its own",
                metadata={"namespace": request.name, "conflicts_with": exc.other, "owner": exc.owner}) from None
        log.info("created namespace %s for %s (require_signatures=%s, %d key(s))", record.name, record.owner,
                 record.require_signatures, len(record.keys))
        return pb.CreateNamespaceResponse(namespace=namespace_to_pb(record))

    async def GetNamespace(self, request: pb.GetNamespaceRequest, context: Context) -> pb.GetNamespaceResponse:
        if bool(request.name) == bool(request.skill):
            raise invalid(Reason.INVALID_ARGUMENT, "name", "send either name (a prefix) or skill, not both")
        if request.skill:
            if problem := skill_name_problem(request.skill):
                raise invalid(Reason.INVALID_NAME, "skill", problem)
            record = await self._store.governing_namespace(request.skill)
            if record is None:
                raise _namespace_not_found(f"no namespace governs {request.skill}", {"skill": request.skill})
        else:
            _check_namespace_name(request.name)
            record = await self._store.get_namespace(request.name)
            if record is None:
                raise _namespace_not_found(f"no namespace {request.name!r}", {"namespace": request.name})
        return pb.GetNamespaceResponse(namespace=namespace_to_pb(record))

    async def ListNamespaces(self, request: pb.ListNamespacesRequest,
                             context: Context) -> pb.ListNamespacesResponse:
        size = _page_size(request.page_size)
        page = await self._store.list_namespaces(after=_after(request.page_token), limit=size)
        token = ""
        if page.more and page.items:
            token = base64.urlsafe_b64encode((_NAMESPACES_TOKEN + page.items[-1].name).encode()).decode("ascii")
        return pb.ListNamespacesResponse(namespaces=[namespace_to_pb(n) for n in page.items], next_page_token=token)

    async def UpdateNamespace(self, request: pb.UpdateNamespaceRequest,
                              context: Context) -> pb.UpdateNamespaceResponse:
        _check_namespace_name(request.name)
        caller = await self._trust.caller(context)
        current = await self._store.get_namespace(request.name)
        if current is None:
            raise _namespace_not_found(f"no namespace {request.name!r}", {"namespace": request.name})
        if not caller.admin and caller.publisher != current.owner and not caller.may("namespaces.update",
                                                                                       current.name):
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED, Reason.NAMESPACE_NOT_OWNED,
                f"namespace {current.name} is owned by publisher {current.owner}, and the call carries "
                f"{caller.describe()}: only its owner or the admin can change it",
                metadata={"namespace": current.name, "owner": current.owner})
        keys = _public_keys(list(request.add_public_keys), "add_public_keys")
        for i, key_id in enumerate(request.remove_key_ids):
            if problem := key_id_problem(key_id):
                raise invalid(Reason.INVALID_ARGUMENT, f"remove_key_ids[{i}]", problem)
        flag = request.require_signatures if request.HasField("require_signatures") else None
        try:
            record = await self._store.update_namespace(request.name, add_keys=keys,
                                                        remove_key_ids=list(request.remove_key_ids),
                                                        require_signatures=flag)
        except NotFound as exc:
            # The namespace was checked above, so this is a key id it does not have.
            raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.KEY_NOT_FOUND, f"{exc}; nothing was changed",
                               metadata={"namespace": request.name}) from None
        log.info("updated namespace %s (by %s): +%d key(s), -%d key(s), require_signatures=%s", record.name,
                 caller.describe(), len(keys), len(request.remove_key_ids), record.require_signatures)
        return pb.UpdateNamespaceResponse(namespace=namespace_to_pb(record))
