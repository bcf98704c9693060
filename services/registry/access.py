"""AccessService (API keys, the registry's audit log) and the internal Authenticate, mixed into the servicer.

Keys are `chk_<12 hex id>_<secret>` (services/runtime/auth.py): the registry stores the sha256 of the whole key
and its id, and shows the key once, in CreateApiKey's response. Permissions are checked by the
UserAuthInterceptor before these run (the policy table: keys.* and audit.read are the admin's).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from typing import Any

import grpc
from clawhub.common.v1 import audit_pb2
from clawhub.registry.v1 import access_pb2 as pb
from clawhub.registry.v1 import registry_internal_pb2 as internal_pb

from services.registry.store import ApiKeyRecord, AuditEventRecord, MetadataStore
from services.runtime.auth import (
    AuditRecord,
    Principal,
    current_principal,
    key_id_of,
    new_api_key,
    normalize_scope,
    token_sha256,
)
from services.runtime.errors import Reason, ServiceError, invalid
from services.runtime.names import skill_name_problem
from services.runtime.policy import ROLES
from services.runtime.settings import SettingsError

log = logging.getLogger("clawhub.registry")

Context = Any
KEY_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,62}", re.ASCII)
KEY_ID_RE = re.compile(r"(?:chk_)?([0-9a-f]{12})", re.ASCII)
MAX_SCOPES = 64
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def role_name(role: int) -> str:
    return pb.Role.Name(role).removeprefix("ROLE_").lower()  # type: ignore[arg-type]


def role_value(name: str) -> int:
    return int(pb.Role.Value("ROLE_" + name.upper()))


def key_to_pb(record: ApiKeyRecord) -> pb.ApiKey:
    message = pb.ApiKey(id=record.id, name=record.name, role=role_value(record.role),  # type: ignore[arg-type]
                        scopes=list(record.scopes), created_by=record.created_by)
    message.create_time.FromNanoseconds(record.create_time_ns)
    if record.revoke_time_ns is not None:
        message.revoke_time.FromNanoseconds(record.revoke_time_ns)
    return message


def audit_to_pb(record: AuditEventRecord, service: str) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(sequence=record.seq, principal=record.principal, method=record.method,
                                 target=record.target, request_id=record.request_id, outcome=record.outcome,
                                 service=service)
    event.time.FromNanoseconds(record.time_ns)
    return event


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid(Reason.INVALID_ARGUMENT, "page_size", f"page_size must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(prefix: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{prefix}{value}".encode()).decode("ascii")


def decode_token(token: str, prefix: str, pattern: re.Pattern[str]) -> str | None:
    if not token:
        return None
    bad = invalid(Reason.INVALID_PAGE_TOKEN, "page_token",
                  "page_token is not a token from a previous response of this listing; start again without it")
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, binascii.Error, UnicodeError):
        raise bad from None
    if not text.startswith(prefix) or not pattern.fullmatch(text[len(prefix):]):
        raise bad
    return text[len(prefix):]


def who(principal: Principal | None) -> str:
    return principal.name if principal is not None else "(in-process)"


async def adopt_bootstrap_key(store: MetadataStore, key: str) -> None:
    """Store `key` (from CLAWHUB_REGISTRY_BOOTSTRAP_KEY_FILE) as API key `admin`, role admin, unless it is known
    (revoked or not: a revoked bootstrap key is not brought back by a restart)."""
    key_id = key_id_of(key)
    if key_id is None:
        raise SettingsError("CLAWHUB_REGISTRY_BOOTSTRAP_KEY_FILE must hold an API key (chk_<id>_<secret>)")
    digest = token_sha256(key)
    known = await store.api_key_by_sha256(digest)
    if known is not None:
        if known.revoke_time_ns is not None:
            log.warning("the bootstrap admin key chk_%s is revoked; it stays revoked", key_id)
        return
    await store.create_api_key(ApiKeyRecord(key_id, "admin", "admin", (), "bootstrap", time.time_ns()), digest)
    log.info("adopted the bootstrap admin key chk_%s", key_id)


class AccessRpcs:
    """The AccessService RPCs and RegistryInternalService.Authenticate."""

    _store: MetadataStore
    _trust: Any  # services.registry.trust.Trust

    async def _principal(self, context: Context) -> Principal | None:
        # Checked already by the interceptor when user auth is on; else resolved here, for created_by.
        return current_principal() or (await self._trust.caller(context)).principal

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Context) -> pb.CreateApiKeyResponse:
        if not KEY_NAME_RE.fullmatch(request.name):
            raise invalid(Reason.INVALID_NAME, "name",
                          f"{request.name[:80]!r} is not a key name: a lowercase letter, then up to 62 lowercase "
                          "letters, digits or hyphens")
        if request.role == pb.ROLE_UNSPECIFIED or request.role not in pb.Role.values():
            raise invalid(Reason.INVALID_ARGUMENT, "role",
                          f"role is required, one of {', '.join(ROLES)} (got {request.role})")
        if len(request.scopes) > MAX_SCOPES:
            raise invalid(Reason.INVALID_ARGUMENT, "scopes", f"at most {MAX_SCOPES} scopes")
        scopes = []
        for i, scope in enumerate(request.scopes):
            normalized = normalize_scope(scope)
            if problem := skill_name_problem(normalized):
                raise invalid(Reason.INVALID_ARGUMENT, f"scopes[{i}]",
                              f"{scope[:80]!r} is not a scope (a name prefix on dot boundaries, such as com.acme.): "
                              + problem.replace("skill name", "scope"))
            scopes.append(normalized)
        key_id, key = new_api_key()
        record = ApiKeyRecord(key_id, request.name, role_name(request.role), tuple(dict.fromkeys(scopes)),
                              who(await self._principal(context)), time.time_ns())
        await self._store.create_api_key(record, token_sha256(key))
        log.info("created API key chk_%s (%s, role %s, scopes %s) for %s", key_id, record.name, record.role,
                 ",".join(record.scopes) or "all", record.created_by)
        return pb.CreateApiKeyResponse(api_key=key_to_pb(record), secret=key)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        size = page_size(request.page_size)
        page = await self._store.list_api_keys(before=decode_token(request.page_token, "keys/", KEY_ID_RE),
                                               limit=size)
        token = encode_token("keys/", page.items[-1].id) if page.more and page.items else ""
        return pb.ListApiKeysResponse(api_keys=[key_to_pb(k) for k in page.items], next_page_token=token)

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.RevokeApiKeyResponse:
        match = KEY_ID_RE.fullmatch(request.id)
        if match is None:
            raise invalid(Reason.INVALID_ARGUMENT, "id",
                          f"{request.id[:80]!r} is not a key id (12 hex characters, as `clawhub keys list` shows)")
        record = await self._store.revoke_api_key(match[1])
        if record is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.API_KEY_NOT_FOUND, f"no API key chk_{match[1]}",
                               metadata={"id": match[1]})
        log.info("revoked API key chk_%s (%s) by %s", record.id, record.name, who(await self._principal(context)))
        return pb.RevokeApiKeyResponse(api_key=key_to_pb(record))

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest,
                              context: Context) -> pb.ListAuditEventsResponse:
        size = page_size(request.page_size)
        before = decode_token(request.page_token, "audit/", re.compile(r"[0-9]{1,18}"))
        page = await self._store.list_audit(before=int(before) if before else None, limit=size)
        token = encode_token("audit/", str(page.items[-1].seq)) if page.more and page.items else ""
        return pb.ListAuditEventsResponse(events=[audit_to_pb(e, "registry") for e in page.items],
                                          next_page_token=token)

    async def Authenticate(self, request: internal_pb.AuthenticateRequest,
                           context: Context) -> internal_pb.AuthenticateResponse:
        if not _HEX64.fullmatch(request.token_sha256):
            raise invalid(Reason.INVALID_ARGUMENT, "token_sha256", "token_sha256 must be 64 lowercase hex characters")
        principal = await self._trust.resolve(request.token_sha256)
        if principal is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, Reason.INVALID_TOKEN,
                               "no API key (valid), publisher token or admin token has this hash",
                               metadata={"problem": "unknown"})
        return internal_pb.AuthenticateResponse(
            principal=principal.name, roles=[role_value(r) for r in sorted(principal.roles)],  # type: ignore[misc]
            scoped=principal.scopes is not None, scopes=list(principal.scopes or ()), kind=principal.kind,
            subject=principal.subject)

    async def record_audit(self, event: AuditRecord) -> None:
        await self._store.append_audit(event.time_ns, event.principal, event.method, event.target,
                                       event.request_id, event.outcome)
