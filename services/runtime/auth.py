"""Who is calling, and may they: users' credentials (API keys, publisher tokens, JWTs) and the roles they grant.

Credentials travel as `authorization: Bearer <credential>` metadata:

- **API keys** `chk_<12-hex id>_<secret>` (created with `clawhub keys create`; the registry keeps the sha256 and
  the id; logs name a key `chk_<id>`), **publisher tokens** (`clawhub_…`, role publisher) and the registry's
  **admin token** (role admin) are resolved by the registry. Every other service asks the registry's internal
  `Authenticate` with the sha256 of the credential and caches the answer, found or not, for at most
  `CACHE_SECONDS` (1 s): a revoked key is refused by every gateway within a second of the revocation, whatever
  it cached (a cache bound, not a pushed revocation: nothing to lose when a gateway misses a message).
- **JWTs** are verified here, against the configured keys: an HS256 secret file and/or a JWKS file of EdDSA
  public keys (`CLAWHUB_JWT_HS256_SECRET_FILE`, `CLAWHUB_JWT_JWKS_FILE`; `CLAWHUB_JWT_ISSUER`, `_AUDIENCE`
  optional). `sub` names the principal (`jwt:<sub>`), `role` (a string) or `roles` (a list) its roles, `scope`
  (space-separated) or `scopes` (a list) the names it may act on; `exp` is required, `exp` and `nbf` are enforced
  with `JWT_LEEWAY_SECONDS` of leeway.

No credentials: the anonymous principal, with the roles of `CLAWHUB_ANONYMOUS_ROLES` (default none). A call
whose principal lacks the permission its method needs (services/runtime/policy.py) is refused:
UNAUTHENTICATED / CREDENTIALS_REQUIRED for the anonymous principal, PERMISSION_DENIED / PERMISSION_DENIED
naming the permission (and the scope) for anyone else. Bad credentials are UNAUTHENTICATED / INVALID_TOKEN.

`UserAuthInterceptor` checks every public method at the gateway and, again, at the service that owns it (the
registry, the deployer), and records each mutating call in the owning service's audit log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import stat
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message

from services.runtime.channels import PEER_METADATA
from services.runtime.errors import Reason, ServiceError, error_info, one_line
from services.runtime.policy import PERMISSIONS, ROLES, Rule
from services.runtime.settings import SettingsError, env_list, env_str

log = logging.getLogger("clawhub.auth")

AUTH_VARIABLE = "CLAWHUB_USER_AUTH"
ANONYMOUS_VARIABLE = "CLAWHUB_ANONYMOUS_ROLES"
HS256_VARIABLE = "CLAWHUB_JWT_HS256_SECRET_FILE"
JWKS_VARIABLE = "CLAWHUB_JWT_JWKS_FILE"
ISSUER_VARIABLE = "CLAWHUB_JWT_ISSUER"
AUDIENCE_VARIABLE = "CLAWHUB_JWT_AUDIENCE"

KEY_PREFIX = "chk_"
KEY_ID_CHARS = 12
# How long an answer of the registry about a credential is reused: revocation takes effect within it.
CACHE_SECONDS = 1.0
# A credential still in use when this share of its cache time has passed is looked up again in the background, so
# that the callers of a busy key never wait for the registry (answers used stay at most CACHE_SECONDS old).
REFRESH_AFTER = 0.5
CACHE_ENTRIES = 10_000
# While the registry cannot be reached, a key it confirmed this recently keeps working (invoking must not need
# the registry: a restart of the registry stops no caller). A revocation needs the registry, so none is lost.
STALE_SECONDS = 600.0
JWT_LEEWAY_SECONDS = 5.0
JWT_ALGORITHMS = ("HS256", "EdDSA")
MAX_TOKEN_CHARS = 8192
REQUEST_ID_METADATA = "x-request-id"

_PRINCIPAL: ContextVar[Principal | None] = ContextVar("clawhub_principal", default=None)


def current_principal() -> Principal | None:
    """The user principal of the call being handled, once UserAuthInterceptor checked it (None otherwise: auth
    off, a call from a platform service, outside a call). For rate limits keyed by principal."""
    return _PRINCIPAL.get()


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """(id, whole key): `chk_<12 hex>_<43 url-safe characters>` (256 random bits)."""
    key_id = secrets.token_hex(KEY_ID_CHARS // 2)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(token: str) -> str | None:
    """The id of a token shaped as an API key, else None."""
    if token.startswith(KEY_PREFIX) and len(token) > len(KEY_PREFIX) + KEY_ID_CHARS + 1 \
            and token[len(KEY_PREFIX) + KEY_ID_CHARS] == "_":
        return token[len(KEY_PREFIX):len(KEY_PREFIX) + KEY_ID_CHARS]
    return None


def normalize_scope(scope: str) -> str:
    """`com.acme.` and `com.acme` are the same scope: stored without the trailing dot."""
    return scope.strip().rstrip(".")


def in_scope(name: str, scopes: Iterable[str]) -> bool:
    """Whether `name` is under one of `scopes` (name prefixes on dot boundaries, as namespaces)."""
    return any(name == s or name.startswith(s + ".") for s in scopes)


@dataclass(frozen=True)
class Principal:
    """Who calls: a key, a publisher token, the admin token, a JWT subject, or nobody."""

    name: str
    kind: str
    roles: frozenset[str] = frozenset()
    scopes: tuple[str, ...] | None = None
    """The names it may act on; None: every name."""
    subject: str = ""
    """A key's id, a publisher's name, a JWT's `sub`."""
    expires: float = float("inf")
    """Unix time after which it is no longer valid (a JWT's `exp`)."""

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"

    @property
    def permissions(self) -> frozenset[str]:
        return permissions_of(self.roles)

    def allows(self, permission: str, name: str = "") -> bool:
        return permission in self.permissions and (self.scopes is None or not name or in_scope(name, self.scopes))


def permissions_of(roles: Iterable[str]) -> frozenset[str]:
    granted: set[str] = set()
    for role in roles:
        granted |= ROLES.get(role, frozenset())
    return frozenset(granted)


ANONYMOUS = Principal("anonymous", "anonymous")
ADMIN = Principal("admin", "admin", frozenset({"admin"}))


def publisher_principal(publisher: str) -> Principal:
    """An existing publisher's token: role publisher; the registry limits it to the namespaces it owns (and
    the names under no namespace, where the registry leaves them open), as before keys existed."""
    return Principal(f"publisher:{publisher}", "publisher", frozenset({"publisher"}), None, publisher)


def key_principal(key_id: str, name: str, role: str, scopes: Iterable[str]) -> Principal:
    listed = tuple(scopes)
    return Principal(f"{KEY_PREFIX}{key_id} ({name})", "key", frozenset({role}), listed or None, key_id)


# --- Settings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthSettings:
    """User authentication and authorization of a service's public methods.

    `enabled`: `CLAWHUB_USER_AUTH` (on|off), on in from_env; off in the dataclass default so that tests which
    build servers directly keep working (then credentials are still resolved where a service needs to know who
    calls, as the registry's namespace checks do, but no permission is checked)."""

    enabled: bool = False
    anonymous_roles: frozenset[str] = frozenset()
    hs256_secret: bytes = field(default=b"", repr=False)
    jwks: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """kid → pyjwt PyJWK (EdDSA public keys)."""
    issuer: str = ""
    audience: str = ""

    @classmethod
    def from_env(cls) -> AuthSettings:
        mode = env_str(AUTH_VARIABLE, "on").lower()
        if mode not in ("on", "off"):
            raise SettingsError(f"{AUTH_VARIABLE}={mode!r} must be on or off")
        roles = frozenset(r.strip().lower() for r in env_list(ANONYMOUS_VARIABLE, "") if r.strip())
        unknown = sorted(roles - set(ROLES))
        if unknown:
            raise SettingsError(f"{ANONYMOUS_VARIABLE}: unknown role(s) {', '.join(unknown)} (roles: "
                                f"{', '.join(ROLES)})")
        secret_file = env_str(HS256_VARIABLE, "")
        jwks_file = env_str(JWKS_VARIABLE, "")
        return cls(enabled=mode == "on", anonymous_roles=roles,
                   hs256_secret=read_hs256_secret(Path(secret_file).expanduser()) if secret_file else b"",
                   jwks=read_jwks(Path(jwks_file).expanduser()) if jwks_file else {},
                   issuer=env_str(ISSUER_VARIABLE, ""), audience=env_str(AUDIENCE_VARIABLE, ""))

    @property
    def jwt_configured(self) -> bool:
        return bool(self.hs256_secret or self.jwks)


def read_hs256_secret(path: Path) -> bytes:
    try:
        info = path.stat()
        data = path.read_bytes().strip()
    except OSError as exc:
        raise SettingsError(f"{HS256_VARIABLE}={str(path)!r}: cannot read it ({exc.strerror})") from None
    if info.st_mode & 0o077:
        raise SettingsError(f"{HS256_VARIABLE}={str(path)!r} is readable by other users (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); run chmod 600 {path}")
    if len(data) < 32:
        raise SettingsError(f"{HS256_VARIABLE}={str(path)!r}: an HS256 secret must be at least 32 bytes")
    return data


def read_jwks(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"{JWKS_VARIABLE}={str(path)!r}: cannot read it ({exc.strerror})") from None
    try:
        keys = jwt.PyJWKSet.from_json(text).keys
    except (jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError) as exc:
        raise SettingsError(f"{JWKS_VARIABLE}={str(path)!r} is not a JWKS of usable keys: {exc}") from None
    found: dict[str, Any] = {}
    for key in keys:
        if key.key_type != "OKP":
            raise SettingsError(f"{JWKS_VARIABLE}={str(path)!r}: only EdDSA (OKP Ed25519) keys are accepted, "
                                f"not {key.key_type}")
        found[key.key_id or ""] = key
    return found


# --- Authentication ------------------------------------------------------------------------------------------

Resolver = Callable[[str], Awaitable["Principal | None"]]
"""sha256 hex of a bearer token → its principal, None when no one holds it."""


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A lookup's error, retrieved even when no caller waited for it (a refresh ahead): its callers saw it."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("a credential lookup failed: %s", task.exception())


def invalid_token(problem: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, Reason.INVALID_TOKEN,
                        f"the bearer credential is not valid: {problem}", metadata={"problem": problem})


def bearer(metadata: Any) -> str | None:
    """The bearer token of a call's metadata, None without one; INVALID_TOKEN when the header is not one
    `Bearer <token>`."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        return None
    value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
    scheme, _, token = value.strip().partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, Reason.INVALID_TOKEN,
                           "the authorization metadata must be one `Bearer <token>` value")
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid_token(f"longer than {MAX_TOKEN_CHARS} characters")
    return token.strip()


def _looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


class Authenticator:
    """Turns a call's credentials into a Principal: opaque tokens through `resolve` (cached for at most
    `cache_seconds`), JWTs verified locally."""

    def __init__(self, settings: AuthSettings, resolve: Resolver | None, *, cache_seconds: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._resolve = resolve
        self._cache_seconds = cache_seconds
        self._clock = clock
        # digest -> (until, principal or None, when a hit refreshes it: math.inf for JWTs and unknown tokens).
        self._cache: OrderedDict[str, tuple[float, Principal | None, float]] = OrderedDict()
        # The registry lookups under way, by digest: concurrent callers of one credential share one.
        self._lookups: dict[str, asyncio.Task[Principal | None]] = {}
        # The last principal the registry confirmed for each credential, for an outage (STALE_SECONDS).
        self._confirmed: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self.anonymous = Principal("anonymous", "anonymous", settings.anonymous_roles)

    async def principal(self, metadata: Any) -> Principal:
        token = bearer(metadata)
        if token is None:
            return self.anonymous
        digest = token_sha256(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            found = cached[1]
            if now >= cached[2] and digest not in self._lookups:
                self._lookup(digest, now)  # in the background: this caller goes on with the cached answer
        elif _looks_like_jwt(token):
            found = self.verify_jwt(token)
            # A verified JWT is reused until it expires, never longer than the cache bound.
            ttl = min(self._cache_seconds, found.expires - time.time()) if found else 0.0
            if ttl > 0:
                self._remember(digest, now + ttl, found, math.inf)
        else:
            lookup = self._lookups.get(digest)
            # One lookup per credential at a time, whoever started it (shielded: a caller that goes away does
            # not cancel it for the others).
            found = await asyncio.shield(lookup if lookup is not None else self._lookup(digest, now))
        if found is None:
            raise invalid_token("no key, publisher or admin token is this one (a revoked or mistyped key?)"
                                + (f"; key chk_{key_id_of(token)}" if key_id_of(token) else ""))
        if found.expires <= time.time():
            raise invalid_token("it has expired")
        return found

    def _lookup(self, digest: str, now: float) -> asyncio.Task[Principal | None]:
        """Start looking `digest` up (remembered when answered, for callers to come)."""
        async def lookup() -> Principal | None:
            try:
                found = await self._lookup_or_confirmed(digest, now)
            finally:
                self._lookups.pop(digest, None)
            if self._cache_seconds > 0:
                # Unknown tokens are not refreshed ahead: a caller spraying made-up keys makes no lookups but
                # its own.
                refresh = now + self._cache_seconds * REFRESH_AFTER if found is not None else math.inf
                self._remember(digest, now + self._cache_seconds, found, refresh)
            return found

        task = asyncio.ensure_future(lookup())
        task.add_done_callback(_retrieved)
        self._lookups[digest] = task
        return task

    async def _lookup_or_confirmed(self, digest: str, now: float) -> Principal | None:
        if self._resolve is None:
            return None
        try:
            found = await self._resolve(digest)
        except ServiceError as exc:
            confirmed = self._confirmed.get(digest)
            if exc.code != grpc.StatusCode.UNAVAILABLE or confirmed is None or confirmed[0] < now - STALE_SECONDS:
                raise
            log.warning("the registry cannot be reached: %s is taken as last confirmed %.0f s ago",
                        confirmed[1].name, now - confirmed[0])
            return confirmed[1]
        if found is not None and self._cache_seconds > 0:
            self._confirmed[digest] = (now, found)
            self._confirmed.move_to_end(digest)
            while len(self._confirmed) > CACHE_ENTRIES:
                self._confirmed.popitem(last=False)
        else:
            self._confirmed.pop(digest, None)
        return found

    def _remember(self, digest: str, until: float, found: Principal | None, refresh: float) -> None:
        self._cache[digest] = (until, found, refresh)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def verify_jwt(self, token: str) -> Principal:
        settings = self.settings
        if not settings.jwt_configured:
            raise invalid_token("a JWT, and this platform accepts none (no CLAWHUB_JWT_HS256_SECRET_FILE or "
                                "CLAWHUB_JWT_JWKS_FILE is configured)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise invalid_token(f"a malformed JWT ({exc})") from None
        algorithm = header.get("alg")
        if algorithm == "HS256" and settings.hs256_secret:
            key: Any = settings.hs256_secret
        elif algorithm == "EdDSA" and settings.jwks:
            kid = header.get("kid", "")
            key = settings.jwks.get(kid) or (next(iter(settings.jwks.values())) if len(settings.jwks) == 1
                                             and not kid else None)
            if key is None:
                raise invalid_token(f"a JWT signed with key {one_line(str(kid))[:64]!r}, which is not in the JWKS")
        else:
            raise invalid_token(f"a JWT signed with {one_line(str(algorithm))[:32]}, which is not accepted here "
                                f"(accepted: {', '.join(a for a in JWT_ALGORITHMS if self._accepts(a))})")
        try:
            claims = jwt.decode(token, key, algorithms=[str(algorithm)], leeway=JWT_LEEWAY_SECONDS,
                                audience=settings.audience or None, issuer=settings.issuer or None,
                                options={"require": ["exp", "sub"], "verify_aud": bool(settings.audience)})
        except jwt.ExpiredSignatureError:
            raise invalid_token("the JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise invalid_token("the JWT is not valid yet (nbf)") from None
        except jwt.PyJWTError as exc:
            raise invalid_token(f"the JWT does not verify ({one_line(str(exc))[:200]})") from None
        return jwt_principal(claims)

    def _accepts(self, algorithm: str) -> bool:
        return bool(self.settings.hs256_secret) if algorithm == "HS256" else bool(self.settings.jwks)


def jwt_principal(claims: Mapping[str, Any]) -> Principal:
    sub = str(claims.get("sub", ""))
    raw_roles = claims.get("roles", claims.get("role", []))
    roles = [raw_roles] if isinstance(raw_roles, str) else list(raw_roles) if isinstance(raw_roles, list) else []
    raw_scopes = claims.get("scopes", claims.get("scope"))
    if isinstance(raw_scopes, str):
        scopes: tuple[str, ...] | None = tuple(normalize_scope(s) for s in raw_scopes.split() if s.strip())
    elif isinstance(raw_scopes, list):
        scopes = tuple(normalize_scope(str(s)) for s in raw_scopes if str(s).strip())
    else:
        scopes = None
    return Principal(f"jwt:{one_line(sub)[:200]}", "jwt",
                     frozenset(str(r).lower() for r in roles if str(r).lower() in ROLES),
                     scopes or None, sub, float(claims["exp"]))


# --- Authorization -------------------------------------------------------------------------------------------


def authorize(principal: Principal, permission: str, name: str = "", *, method: str = "") -> None:
    """Raise unless `principal` holds `permission` (for `name`, when the call names one)."""
    if principal.allows(permission, name):
        return
    what = f" on {name}" if name else ""
    metadata = {"permission": permission, "principal": principal.name, "method": method}
    if principal.anonymous:
        raise ServiceError(
            grpc.StatusCode.UNAUTHENTICATED, Reason.CREDENTIALS_REQUIRED,
            f"this call needs credentials (permission {permission}{what}): send an API key or a JWT as "
            "`authorization: Bearer <credential>` (the clawhub CLI sends the key `clawhub up` created; "
            "`clawhub keys token` prints it for other clients)",
            metadata=metadata)
    if permission in principal.permissions:
        scopes = ", ".join(principal.scopes or ())
        raise ServiceError(
            grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED,
            f"{principal.name} may not act on {name}: it holds {permission} only for {scopes}",
            metadata={**metadata, "skill": name, "scope": name, "granted_scopes": scopes})
    roles = ", ".join(sorted(principal.roles)) or "no role"
    needed = ", ".join(r for r, granted in ROLES.items() if permission in granted)
    raise ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED,
        f"{principal.name} ({roles}) lacks the permission {permission}{what} (granted to: {needed})",
        metadata={**metadata, "skill": name, "scope": name, "roles": roles})


# --- The interceptor -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecord:
    time_ns: int
    principal: str
    method: str
    target: str
    request_id: str
    outcome: str


AuditSink = Callable[[AuditRecord], Awaitable[None]]


def field_value(request: Message | None, path: str) -> str:
    """The string at a dotted field path of `request` ("" when unset or not a string)."""
    value: Any = request
    for part in path.split("."):
        if value is None or not isinstance(value, Message):
            return ""
        try:
            value = getattr(value, part)
        except AttributeError:
            return ""
    return value if isinstance(value, str) else ""


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, ServiceError):
        return f"{exc.code.name} {exc.reason}"
    if isinstance(exc, grpc.aio.AioRpcError):
        info = error_info(exc)
        return f"{exc.code().name}{' ' + info.reason if info else ''}"
    if isinstance(exc, grpc.aio.AbortError):
        return "ABORTED_BY_HANDLER"
    return f"{type(exc).__name__}"


class UserAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the caller's permission for every method in `rules` (full method name → Rule), before the
    handler runs; records mutating calls with `audit` (the owning services).

    `descriptors` (full method name → MethodDescriptor) lets it read the name a call is about from a request
    it receives as bytes (the gateway relays bytes); the first message of a client stream is read for it.

    `platform_exempt`: at an owning service, the calls a platform service makes on its own behalf (the deployer
    reading a version, an executor a namespace, the gateway an input schema) carry no user credentials and are
    not checked here: they are the calls without the `x-clawhub-peer` entry the gateway sets on every call it
    relays for a client. With internal auth on (the default), only platform services reach these ports at all,
    each only for the methods the policy table allows it (services/runtime/identity.py); every relayed call is
    checked again here. With internal auth off, anyone who reaches the port directly is taken for the platform:
    that mode is only for networks where nothing else can reach the services' ports (docs/security.md).
    """

    # Its intercept_service depends only on the method and handler (the checks run in the wrapped handler):
    # services/runtime/errors.py `fuse`.
    per_method = True

    def __init__(self, authenticator: Authenticator, rules: Mapping[str, Rule], *,
                 descriptors: Mapping[str, MethodDescriptor] | None = None, audit: AuditSink | None = None,
                 platform_exempt: bool = False, enforce: bool = True) -> None:
        self._auth = authenticator
        self._rules = rules
        self._audit = audit
        self._platform_exempt = platform_exempt
        self._enforce = enforce
        self._classes: dict[str, type[Message]] = {}
        for method, descriptor in (descriptors or {}).items():
            self._classes[method] = message_factory.GetMessageClass(descriptor.input_type)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        # Authentication attributes on the call's span only when tracing is on (chosen once: nothing is added
        # otherwise). Imported here: the CLI imports this module and has no use for OpenTelemetry.
        from services.runtime import tracing

        if tracing.enabled():
            self._check = self._traced_check  # type: ignore[method-assign]

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        rule = self._rules.get(method)
        if handler is None or rule is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method, rule)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _platform_call(self, context: Any) -> bool:
        """A call a platform service makes on its own behalf: without the `x-clawhub-peer` entry the gateway sets
        on every call it relays for a client (and that it replaces when a client sends one)."""
        if not self._platform_exempt:
            return False
        return not any(k == PEER_METADATA for k, _ in context.invocation_metadata() or ())

    def _decode(self, method: str, request: Any) -> Message | None:
        if isinstance(request, Message) or request is None:
            return request
        cls = self._classes.get(method)
        if cls is None:
            return None
        try:
            return cls.FromString(request)
        except (DecodeError, RecursionError, ValueError, TypeError):
            return None  # the owning service says what is wrong with it

    async def _check(self, method: str, rule: Rule, request: Any, context: Any,
                     first: Callable[[], Awaitable[Any]] | None = None) -> tuple[Principal | None, str]:
        """(principal, the name the call is about); raises when refused. Where nothing is enforced (auth off,
        a platform service's own call) the principal is still found, for the audit log, when it can be.

        A client stream passes `first` instead of `request`: its first message is read only when the check needs
        the name (a principal limited to scopes), so an unknown or missing credential is refused before the
        stream is read at all."""
        enforce = self._enforce and not self._platform_call(context)
        try:
            principal = await self._auth.principal(context.invocation_metadata())
        except ServiceError:
            if enforce:
                raise
            return None, ""
        _PRINCIPAL.set(principal)
        name = ""
        if rule.name_field and (principal.scopes is not None or (self._audit is not None and first is None)):
            if first is not None:
                if enforce and principal.scopes is not None:
                    request = await first()
                else:
                    request = None
            name = field_value(self._decode(method, request), rule.name_field)
        if enforce:
            authorize(principal, rule.permission, name, method=method)
        return principal, name

    async def _traced_check(self, method: str, rule: Rule, request: Any, context: Any,
                            first: Callable[[], Awaitable[Any]] | None = None) -> tuple[Principal | None, str]:
        from services.runtime import tracing

        if not tracing.recording():  # most calls (the default sampler records one in twenty)
            return await UserAuthInterceptor._check(self, method, rule, request, context, first)
        try:
            principal, name = await UserAuthInterceptor._check(self, method, rule, request, context, first)
        except ServiceError as exc:
            tracing.annotate({"clawhub.auth.permission": rule.permission, "clawhub.auth.refused": str(exc.reason)})
            raise
        tracing.annotate({"clawhub.auth.permission": rule.permission,
                          "clawhub.auth.principal": principal.name if principal else "anonymous",
                          "clawhub.auth.kind": principal.kind if principal else "", "clawhub.auth.name": name})
        return principal, name

    async def _record(self, principal: Principal | None, method: str, rule: Rule, request: Any, context: Any,
                      name: str, exc: BaseException | None) -> None:
        if self._audit is None or not rule.mutating:
            return
        decoded = self._decode(method, request)
        request_id = field_value(decoded, "request_id") or next(
            (str(v) for k, v in context.invocation_metadata() or () if k == REQUEST_ID_METADATA), "") \
            or uuid.uuid4().hex
        target = name or field_value(decoded, rule.name_field) if rule.name_field else ""
        for extra in rule.target_fields:
            value = field_value(decoded, extra)
            if value:
                target = f"{target}@{value}" if extra == "version" or extra.endswith(".version") else \
                    (f"{target} {value}" if target else value)
        try:
            await self._audit(AuditRecord(time.time_ns(), principal.name if principal else "anonymous", method,
                                          target[:300], request_id[:128], _outcome(exc)))
        except Exception:  # noqa: BLE001 - the call's outcome stands; the log says the record is missing
            log.exception("could not record the audit event of %s", method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str, rule: Rule) -> grpc.RpcMethodHandler:
        if handler.unary_unary:
            fn = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                principal: Principal | None = None
                name = ""
                try:
                    principal, name = await self._check(method, rule, request, context)
                    result = await fn(request, context)
                except BaseException as exc:
                    await self._record(principal or _PRINCIPAL.get(), method, rule, request, context, name, exc)
                    raise
                await self._record(principal, method, rule, request, context, name, None)
                return result

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream:
            stream_fn = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await self._check(method, rule, request, context)
                async for item in stream_fn(request, context):
                    yield item

            return handler._replace(unary_stream=unary_stream)
        if handler.stream_unary:
            client_fn = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
                stream = _Peeked(requests)
                principal: Principal | None = None
                name = ""
                try:
                    principal, name = await self._check(method, rule, None, context, stream.first)
                    result = await client_fn(stream, context)
                except BaseException as exc:
                    await self._record(principal or _PRINCIPAL.get(), method, rule, stream.seen, context, name, exc)
                    raise
                await self._record(principal, method, rule, stream.seen, context, name, None)
                return result

            return handler._replace(stream_unary=stream_unary)
        both_fn = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            stream = _Peeked(requests)
            await self._check(method, rule, None, context, stream.first)
            async for item in both_fn(stream, context):
                yield item

        return handler._replace(stream_stream=stream_stream)


# A client stream's first message (what the call is about) must arrive within this when a check needs it.
FIRST_MESSAGE_SECONDS = 30.0


class _Peeked:
    """A client stream whose first message can be read ahead (`first`) and is remembered (`seen`) as it passes."""

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._iterator = aiter(requests)
        self._ahead: list[Any] = []
        self.seen: Any = None

    async def first(self) -> Any:
        if self.seen is None and not self._ahead:
            try:
                async with asyncio.timeout(FIRST_MESSAGE_SECONDS):
                    item = await anext(self._iterator, None)
            except TimeoutError:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED,
                                   f"the stream sent no message for {FIRST_MESSAGE_SECONDS:.0f} s") from None
            if item is not None:
                self._ahead.append(item)
                self.seen = item
        return self.seen

    def __aiter__(self) -> _Peeked:
        return self

    async def __anext__(self) -> Any:
        if self._ahead:
            return self._ahead.pop()
        item = await anext(self._iterator)
        if self.seen is None:
            self.seen = item
        return item


def method_descriptors(*services: Any) -> dict[str, MethodDescriptor]:
    """Full method name → MethodDescriptor, for every method of the given ServiceDescriptors."""
    return {f"/{s.full_name}/{m.name}": m for s in services for m in s.methods}


def check_permissions_known() -> None:
    """Every role grants only known permissions (a typo would silently grant nothing)."""
    for role, granted in ROLES.items():
        unknown = granted - PERMISSIONS
        if unknown:
            raise ValueError(f"role {role} grants unknown permissions {sorted(unknown)}")


# --- The registry as a resolver ------------------------------------------------------------------------------


class RegistryResolver:
    """Resolves opaque credentials with the registry's internal Authenticate (over a channel carrying the
    service's platform token)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 5.0) -> None:
        from clawhub.registry.v1 import registry_internal_pb2_grpc as internal_grpc

        self._stub = internal_grpc.RegistryInternalServiceStub(channel)
        self._timeout = timeout

    async def __call__(self, digest: str) -> Principal | None:
        from clawhub.registry.v1 import access_pb2
        from clawhub.registry.v1 import registry_internal_pb2 as internal_pb

        try:
            found = await self._stub.Authenticate(internal_pb.AuthenticateRequest(token_sha256=digest),
                                                  timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                info = error_info(err)
                if info is not None and info.reason == Reason.INVALID_TOKEN:
                    return None
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE,
                               "credentials cannot be checked right now: the registry, which knows the keys, does "
                               f"not answer ({err.code().name}); try again", metadata={"upstream": "registry"},
                               retry_after_seconds=1.0) from None
        roles = frozenset(access_pb2.Role.Name(r).removeprefix("ROLE_").lower() for r in found.roles
                          if r != access_pb2.ROLE_UNSPECIFIED)
        return Principal(found.principal, found.kind, roles, tuple(found.scopes) if found.scoped else None,
                         found.subject)


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def write_private_json(path: Path, data: object) -> None:
    """`path` written whole with mode 0600 (its directory created 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    import os

    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
