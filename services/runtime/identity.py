"""The platform's own identity: which service is calling (per-suite service tokens).

Each platform service has its own random token (`chs_<service>_<43 characters>`, 256 bits) in a file only it
reads (`CLAWHUB_SERVICE_TOKEN_FILE`, mode 0600), and every service knows the identities file
(`CLAWHUB_PLATFORM_IDENTITIES_FILE`: a JSON object from the SHA-256 of each token, hex, to its service name).
`clawhub up` creates both on first start in `<data-dir>/secrets/` (services/cli/up.py).

- Outgoing calls carry the token as `x-clawhub-service` metadata (services/runtime/channels.py).
- The internal servers (dispatcher, executor, deployer, registry) check it in `PlatformAuthInterceptor`: a
  missing or unknown token is UNAUTHENTICATED / PLATFORM_CREDENTIALS_REQUIRED, a known service calling a method
  the policy table (services/runtime/policy.py) does not allow it is PERMISSION_DENIED / SERVICE_NOT_ALLOWED.
  Health checks and reflection stay open (probes and grpcurl describe need no token).
- A servicer learns its caller from `calling_service()`.

A token proves which service sent a call, not what it carries: TLS (services/runtime/tls.py) or a service mesh
keeps it from being read on the wire (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.runtime.channels import SERVICE_METADATA, Outgoing
from services.runtime.errors import Reason, ServiceError
from services.runtime.settings import SettingsError, env_str
from services.runtime.tls import TlsSettings

PLATFORM_SERVICES = ("gateway", "dispatcher", "executor", "deployer", "registry")
TOKEN_PREFIX = "chs_"
IDENTITIES_FILE = "identities.json"
TOKEN_FILE_VARIABLE = "CLAWHUB_SERVICE_TOKEN_FILE"
IDENTITIES_VARIABLE = "CLAWHUB_PLATFORM_IDENTITIES_FILE"
AUTH_VARIABLE = "CLAWHUB_INTERNAL_AUTH"
# Services every caller may reach without a token: load balancers' and `clawhub health`'s probes, and
# `grpcurl list/describe`. Neither reveals anything the proto files do not.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})

_CALLER: ContextVar[str | None] = ContextVar("clawhub_calling_service", default=None)


def calling_service() -> str | None:
    """The platform service that made the call being handled (None when internal auth is off, or outside a
    call)."""
    return _CALLER.get()


def new_token(service: str) -> str:
    return f"{TOKEN_PREFIX}{service}_{secrets.token_urlsafe(32)}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class PlatformIdentity:
    """This service's own token and the tokens (as digests) of every platform service."""

    service: str
    token: str = field(repr=False)
    identities: Mapping[str, str] = field(repr=False, default_factory=dict)
    """sha256(token) hex → service name."""

    def caller_of(self, token: str) -> str | None:
        return self.identities.get(token_digest(token))


def read_token_file(path: Path, variable: str = TOKEN_FILE_VARIABLE) -> str:
    """The secret in `path`: the file must exist, be readable by its owner alone (0600 or stricter) and hold
    one non-empty line. Anything else is a SettingsError of one line naming `variable`."""
    try:
        info = path.stat()
    except OSError as exc:
        raise SettingsError(f"{variable}={str(path)!r}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise SettingsError(f"{variable}={str(path)!r} is not a file")
    if info.st_mode & 0o077:
        raise SettingsError(f"{variable}={str(path)!r} is readable by other users (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); run chmod 600 {path}")
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{variable}={str(path)!r}: cannot read it ({exc})") from None
    if not text or "\n" in text:
        raise SettingsError(f"{variable}={str(path)!r} must hold the secret on one line")
    return text


def read_identities(path: Path) -> dict[str, str]:
    """The identities file: a JSON object of sha256 hex digests → platform service names. It holds no secret
    (digests of 256-bit tokens), but whoever can write it can add a service: refused if others may write it."""
    try:
        info = path.stat()
        raw = path.read_text()
    except OSError as exc:
        raise SettingsError(f"{IDENTITIES_VARIABLE}={str(path)!r}: cannot read it ({exc.strerror})") from None
    if info.st_mode & 0o022:
        raise SettingsError(f"{IDENTITIES_VARIABLE}={str(path)!r} is writable by other users (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); run chmod 600 {path}")
    try:
        data = json.loads(raw)
    except ValueError:
        raise SettingsError(f"{IDENTITIES_VARIABLE}={str(path)!r} is not JSON") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and len(k) == 64 and isinstance(v, str) and v in PLATFORM_SERVICES
            for k, v in data.items()):
        raise SettingsError(f"{IDENTITIES_VARIABLE}={str(path)!r} must map sha256 hex digests of tokens to "
                            f"service names ({', '.join(PLATFORM_SERVICES)})")
    return {k.lower(): v for k, v in data.items()}


def load_identity(service: str, token_file: Path, identities_file: Path | None) -> PlatformIdentity:
    token = read_token_file(token_file)
    identities = read_identities(identities_file) if identities_file is not None else {}
    if identities_file is not None and identities.get(token_digest(token)) != service:
        raise SettingsError(f"the token in {TOKEN_FILE_VARIABLE}={str(token_file)!r} is not the {service}'s in "
                            f"{IDENTITIES_VARIABLE}={str(identities_file)!r}")
    return PlatformIdentity(service=service, token=token, identities=identities)


def identity_from_env(service: str, *, checks_callers: bool = True) -> PlatformIdentity | None:
    """The service's identity from `CLAWHUB_SERVICE_TOKEN_FILE` and `CLAWHUB_PLATFORM_IDENTITIES_FILE`; None
    when `CLAWHUB_INTERNAL_AUTH=off`. Neither set (and auth not off) refuses to start, with one line.

    `checks_callers`: the service checks the tokens of its callers, so it needs the identities file (the
    gateway, whose port is public, only sends its own token)."""
    mode = env_str(AUTH_VARIABLE, "on").lower()
    if mode not in ("on", "off"):
        raise SettingsError(f"{AUTH_VARIABLE}={mode!r} must be on or off")
    if mode == "off":
        return None
    token_file = env_str(TOKEN_FILE_VARIABLE, "")
    identities_file = env_str(IDENTITIES_VARIABLE, "")
    if not token_file and not identities_file:
        raise SettingsError(f"internal calls need {TOKEN_FILE_VARIABLE} and {IDENTITIES_VARIABLE} (clawhub up "
                            f"creates both), or {AUTH_VARIABLE}=off (only where nothing else can reach the "
                            "services' ports; see docs/security.md)")
    if not token_file:
        raise SettingsError(f"{IDENTITIES_VARIABLE} is set but {TOKEN_FILE_VARIABLE} is not: set both")
    if checks_callers and not identities_file:
        raise SettingsError(f"{TOKEN_FILE_VARIABLE} is set but {IDENTITIES_VARIABLE} is not: set both")
    return load_identity(service, Path(token_file).expanduser(),
                         Path(identities_file).expanduser() if identities_file else None)


def write_credentials(directory: Path, services: tuple[str, ...] = PLATFORM_SERVICES) -> None:
    """Create `directory` (0700) with `<service>.token` (0600) for each service and `identities.json`; tokens
    already there are kept (a restart of the suite reuses them), missing ones are added."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    identities: dict[str, str] = {}
    for service in services:
        path = directory / f"{service}.token"
        if not path.exists():
            _write_private(path, new_token(service) + "\n")
        os.chmod(path, 0o600)
        identities[token_digest(read_token_file(path))] = service
    _write_private(directory / IDENTITIES_FILE, json.dumps(identities, indent=2, sort_keys=True) + "\n")


def _write_private(path: Path, text: str) -> None:
    """Write `path` whole with mode 0600 (never readable by others, not even for an instant)."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class PlatformAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits a call to an internal service only from a platform service the policy table allows for its method.

    Installed by `create_server` right inside the ErrorInterceptor (which turns the refusals into statuses) and
    before every other interceptor (a rate limiter keyed by calling service reads `calling_service()`). A
    refused call's request is never decoded. A token is hashed once: known tokens are remembered (at most one
    per identity), so an admitted call costs a dict lookup."""

    def __init__(self, identity: PlatformIdentity, allowed: Mapping[str, frozenset[str]], *,
                 open_services: frozenset[str] = OPEN_SERVICES) -> None:
        self._identity = identity
        self._allowed = allowed
        self._open = open_services
        self._known: dict[str, str] = {}
        self._refusals: dict[tuple[str, str, str], grpc.RpcMethodHandler] = {}

    def _caller(self, metadata: Any) -> str | None:
        for key, value in metadata or ():
            if key == SERVICE_METADATA:
                token = value.decode(errors="replace") if isinstance(value, bytes) else value
                caller = self._known.get(token)
                if caller is None:
                    caller = self._identity.caller_of(token)
                    if caller is not None and len(self._known) < 64:
                        self._known[token] = caller
                return caller
        return None

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        if method.split("/", 2)[1] in self._open:
            _CALLER.set(None)
            return await continuation(handler_call_details)
        caller = self._caller(handler_call_details.invocation_metadata)
        if caller is not None and caller in self._allowed.get(method, ()):
            # Set in the task that runs the handler (gRPC runs interceptors and handler in one task per call).
            _CALLER.set(caller)
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as for anyone: the method list is public (reflection)
        return self._refusal(handler, method, caller)

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str, caller: str | None) -> grpc.RpcMethodHandler:
        key = (method, caller or "", _kind(handler))
        cached = self._refusals.get(key)
        if cached is not None:
            return cached
        error = refusal(method, caller, self._allowed.get(method, frozenset()))

        async def refuse(request: Any, context: Any) -> Any:
            raise ServiceError(error.code, error.reason, error.message, metadata=dict(error.metadata))

        # No deserializer: the ErrorInterceptor hands the refusal raw bytes, never decoded.
        refused = handler._replace(request_deserializer=None, **{_kind(handler): refuse})
        self._refusals[key] = refused
        return refused


def refusal(method: str, caller: str | None, allowed: frozenset[str]) -> ServiceError:
    """The error for a call to `method` by `caller` (None: no or an unknown token)."""
    if caller is None:
        return ServiceError(
            grpc.StatusCode.UNAUTHENTICATED, Reason.PLATFORM_CREDENTIALS_REQUIRED,
            f"{method} is internal to the platform: only clawhub's own services may call it, with their "
            f"{SERVICE_METADATA} token (use the gateway's public port)",
            metadata={"method": method, "metadata_key": SERVICE_METADATA})
    who = ", ".join(sorted(allowed)) or "no platform service"
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, Reason.SERVICE_NOT_ALLOWED,
        f"the {caller} may not call {method} (permission {method.lstrip('/')} is granted to {who})",
        metadata={"permission": method.lstrip("/"), "service": caller, "allowed": who})


def _kind(handler: grpc.RpcMethodHandler) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return kind
    raise ValueError("a handler of no kind")


def outgoing_security(identity: PlatformIdentity | None, tls: TlsSettings) -> Outgoing:
    """What a service's channels carry: its token (when internal auth is on) and its client TLS."""
    return Outgoing(token=identity.token if identity is not None else None, tls=tls.client)


def main(argv: list[str] | None = None) -> int:
    """`python -m services.runtime.identity DIR`: create (or complete) DIR with every service's token and the
    identities file, as `clawhub up` does in `<data-dir>/secrets` (for compose and other deployments)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.runtime.identity DIR", file=sys.stderr)
        return 2
    write_credentials(Path(args[0]))
    print(f"service tokens and {IDENTITIES_FILE} are in {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
