"""Structured gRPC errors: every non-OK status carries a google.rpc.Status with an ErrorInfo.

All reasons live in `Reason` below (documented in docs/errors.md). A servicer raises `ServiceError`; the
`ErrorInterceptor` installed by the bootstrap turns it into a status with details, passes statuses from
downstream services through unchanged, and turns anything unexpected into INTERNAL (logged, never leaked).

The interceptor also decodes requests itself, so bytes that are not the method's message (corrupt wire
format, invalid UTF-8 in a string, nesting past protobuf's depth limit) get INVALID_ARGUMENT /
MALFORMED_REQUEST and one rate-limited log line, instead of gRPC's UNKNOWN and a traceback per request; and it
checks every decoded request's enum values and string sizes (services/runtime/fieldcheck.py). On the
public port (`public=True`, the gateway) every outgoing status has internal addresses removed. Streaming
handlers write with backpressure, and a caller that goes away mid-stream ends the stream quietly.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc._cython import cygrpc

log = logging.getLogger("clawhub.errors")

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# gRPC refuses trailing metadata over 16 KiB, and the status travels there: keep every part of it small so
# an error about a huge input still reaches the caller (instead of RESOURCE_EXHAUSTED with no details).
MAX_MESSAGE_CHARS = 2048
MAX_DETAIL_CHARS = 512
MAX_VIOLATIONS = 20
# How deep protobuf (upb) decodes nested messages; deeper is a DecodeError. A google.protobuf.Value takes two
# levels per nested list and three per nested struct, inside the levels of the request around it.
PROTOBUF_MAX_DEPTH = 100


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` shortened to `limit` characters, saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


# Control characters as they would be escaped in a string literal; the rest as \xNN or \uNNNN.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` on one line: newlines, tabs and other control characters escaped (`\\n`, `\\x1b`), so that a
    log record or a message quoting someone else's text stays one line and cannot forge another."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m[0]) or m[0].encode("unicode_escape").decode("ascii"), text)


def show_bytes(data: bytes, limit: int = 200) -> str:
    """Bytes as a person reads them: decoded as UTF-8 (an invalid sequence shows as U+FFFD), double-quoted,
    with quotes, backslashes and control characters escaped (`"hello\\n"`); cut after `limit` bytes,
    saying how many more there were. Never a Python bytes repr (`b'...'`), never empty (`""`)."""
    text = data[:limit].decode("utf-8", errors="replace")
    shown = '"' + one_line(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return shown + (f"… ({len(data) - limit} more bytes)" if len(data) > limit else "")


def describe_error(exc: BaseException) -> str:
    """One line saying what failed, for logs and progress messages: `CODE REASON: details` for a failed gRPC
    call (never the multi-line repr of an AioRpcError) or a ServiceError, `Type: text` for anything else."""
    if isinstance(exc, ServiceError):
        return f"{exc.code.name} {exc.reason}: {one_line(exc.message)}"
    code = getattr(exc, "code", None)
    if isinstance(exc, grpc.RpcError) and callable(code):
        status = code()
        info = error_info(exc)
        reason = f" {info.reason}" if info is not None else ""
        details = exc.details() if callable(getattr(exc, "details", None)) else ""
        name = status.name if isinstance(status, grpc.StatusCode) else str(status)
        return f"{name}{reason}: {one_line(details or 'no details')}"
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# How alike two names must be (difflib's ratio over the whole name) to be suggested for each other.
SUGGEST_CUTOFF = 0.8
MAX_SUGGESTIONS = 3


def close_names(name: str, candidates: Iterable[str], limit: int = MAX_SUGGESTIONS) -> list[str]:
    """The names among `candidates` most like `name` (a typo of one of them, say), best first; at most `limit`.

    Skill names share long prefixes (`com.example.`), so the whole name must be very alike (SUGGEST_CUTOFF)
    and so must its last label: `com.example.foo` is not suggested for `com.example.bar`. Names whose length
    is too different to pass are skipped before difflib looks at them."""
    longest = len(name) / SUGGEST_CUTOFF
    shortest = len(name) * SUGGEST_CUTOFF / (2 - SUGGEST_CUTOFF)
    pool = [c for c in candidates if c != name and shortest <= len(c) <= longest]
    last = name.rpartition(".")[2]
    return [match for match in difflib.get_close_matches(name, pool, n=limit * 4, cutoff=SUGGEST_CUTOFF)
            if difflib.SequenceMatcher(None, last, match.rpartition(".")[2]).ratio() >= 0.5][:limit]


def did_you_mean(suggestions: Sequence[str]) -> str:
    """` (did you mean a?)` / ` (did you mean a, b or c?)`; empty without suggestions."""
    if not suggestions:
        return ""
    listed = suggestions[0] if len(suggestions) == 1 else f"{', '.join(suggestions[:-1])} or {suggestions[-1]}"
    return f" (did you mean {listed}?)"


# ErrorInfo metadata key of the close names an unknown name's NOT_FOUND suggests (comma-separated).
DID_YOU_MEAN = "did_you_mean"


class Reason(StrEnum):
    """Every ErrorInfo reason clawhub returns. Stable: clients may branch on them."""

    # Requests that are malformed.
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INVALID_NAME = "INVALID_NAME"
    INVALID_VERSION = "INVALID_VERSION"
    INVALID_DIGEST = "INVALID_DIGEST"
    INVALID_MANIFEST = "INVALID_MANIFEST"
    INVALID_INPUT = "INVALID_INPUT"
    INPUT_SCHEMA_VIOLATION = "INPUT_SCHEMA_VIOLATION"
    INPUT_SCHEMA_INVALID = "INPUT_SCHEMA_INVALID"
    FIELD_TOO_LONG = "FIELD_TOO_LONG"
    INVALID_ENUM_VALUE = "INVALID_ENUM_VALUE"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    ENV_NOT_SET = "ENV_NOT_SET"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    # Uploads.
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    SIZE_MISMATCH = "SIZE_MISMATCH"
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"
    VERIFICATION_FAILED = "VERIFICATION_FAILED"
    VERSION_EXISTS = "VERSION_EXISTS"
    PUBLISH_IN_PROGRESS = "PUBLISH_IN_PROGRESS"
    TOO_MANY_UPLOADS = "TOO_MANY_UPLOADS"
    DESCRIPTOR_BUDGET_EXHAUSTED = "DESCRIPTOR_BUDGET_EXHAUSTED"
    UPLOAD_TIMEOUT = "UPLOAD_TIMEOUT"
    TOO_MANY_DOWNLOADS = "TOO_MANY_DOWNLOADS"
    # Lookups.
    SKILL_NOT_FOUND = "SKILL_NOT_FOUND"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
    BLOB_NOT_FOUND = "BLOB_NOT_FOUND"
    BLOB_CORRUPT = "BLOB_CORRUPT"
    BLOB_CHANGED = "BLOB_CHANGED"
    TAG_NOT_FOUND = "TAG_NOT_FOUND"
    DEPLOYMENT_NOT_FOUND = "DEPLOYMENT_NOT_FOUND"
    # Release state.
    VERSION_NOT_READY = "VERSION_NOT_READY"
    DEPLOYMENT_IN_PROGRESS = "DEPLOYMENT_IN_PROGRESS"
    NO_PREVIOUS_VERSION = "NO_PREVIOUS_VERSION"
    SKILL_NOT_DEPLOYED = "SKILL_NOT_DEPLOYED"
    ILLEGAL_TRANSITION = "ILLEGAL_TRANSITION"
    SMOKE_TEST_FAILED = "SMOKE_TEST_FAILED"
    DEPENDENCY_CONFLICT = "DEPENDENCY_CONFLICT"
    DEPLOYMENT_CIRCUIT_OPEN = "DEPLOYMENT_CIRCUIT_OPEN"
    DEPENDENCY_LINK_FAILED = "DEPENDENCY_LINK_FAILED"
    NOT_DEPLOYABLE = "NOT_DEPLOYABLE"
    # Running a skill.
    MODULE_INVALID = "MODULE_INVALID"
    SKILL_TRAPPED = "SKILL_TRAPPED"
    SKILL_EXIT_NONZERO = "SKILL_EXIT_NONZERO"
    SKILL_TIMEOUT = "SKILL_TIMEOUT"
    MEMORY_LIMIT_EXCEEDED = "MEMORY_LIMIT_EXCEEDED"
    OUTPUT_LIMIT_EXCEEDED = "OUTPUT_LIMIT_EXCEEDED"
    STDERR_LIMIT_EXCEEDED = "STDERR_LIMIT_EXCEEDED"
    INPUT_TOO_LARGE = "INPUT_TOO_LARGE"
    EXECUTOR_OVERLOADED = "EXECUTOR_OVERLOADED"
    FUEL_EXHAUSTED = "FUEL_EXHAUSTED"
    # A skill's key-value store (`kv` capability; services/executor/kvstore.py, docs/skills/host-api.md).
    KV_INVALID_ARGUMENT = "KV_INVALID_ARGUMENT"
    KV_KEY_TOO_LARGE = "KV_KEY_TOO_LARGE"
    KV_VALUE_TOO_LARGE = "KV_VALUE_TOO_LARGE"
    KV_TOO_MANY_KEYS = "KV_TOO_MANY_KEYS"
    KV_STORE_FULL = "KV_STORE_FULL"
    KV_UNAVAILABLE = "KV_UNAVAILABLE"
    # A skill's outbound HTTP (`http:HOST` capabilities; services/executor/outbound.py, docs/skills/http.md).
    HTTP_HOST_NOT_ALLOWED = "HTTP_HOST_NOT_ALLOWED"
    HTTP_SCHEME_NOT_ALLOWED = "HTTP_SCHEME_NOT_ALLOWED"
    HTTP_PRIVATE_ADDRESS = "HTTP_PRIVATE_ADDRESS"
    HTTP_REDIRECT_NOT_ALLOWED = "HTTP_REDIRECT_NOT_ALLOWED"
    HTTP_INVALID_REQUEST = "HTTP_INVALID_REQUEST"
    HTTP_DNS_FAILED = "HTTP_DNS_FAILED"
    HTTP_CONNECTION_FAILED = "HTTP_CONNECTION_FAILED"
    HTTP_TLS_FAILED = "HTTP_TLS_FAILED"
    HTTP_TIMEOUT = "HTTP_TIMEOUT"
    HTTP_REQUEST_TOO_LARGE = "HTTP_REQUEST_TOO_LARGE"
    HTTP_RESPONSE_TOO_LARGE = "HTTP_RESPONSE_TOO_LARGE"
    HTTP_TOO_MANY_REQUESTS = "HTTP_TOO_MANY_REQUESTS"
    HTTP_TOO_MANY_REDIRECTS = "HTTP_TOO_MANY_REDIRECTS"
    # Trust: publishers, namespaces, signatures (registry) and provenance re-checks (executor).
    INVALID_TOKEN = "INVALID_TOKEN"
    # Users: credentials and roles (services/runtime/auth.py).
    CREDENTIALS_REQUIRED = "CREDENTIALS_REQUIRED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    API_KEY_NOT_FOUND = "API_KEY_NOT_FOUND"
    ADMIN_REQUIRED = "ADMIN_REQUIRED"
    ADMIN_TOKEN_NOT_CONFIGURED = "ADMIN_TOKEN_NOT_CONFIGURED"
    PUBLISHER_EXISTS = "PUBLISHER_EXISTS"
    PUBLISHER_NOT_FOUND = "PUBLISHER_NOT_FOUND"
    NAMESPACE_NOT_OWNED = "NAMESPACE_NOT_OWNED"
    NAMESPACE_REQUIRED = "NAMESPACE_REQUIRED"
    NAMESPACE_EXISTS = "NAMESPACE_EXISTS"
    NAMESPACE_OVERLAP = "NAMESPACE_OVERLAP"
    NAMESPACE_NOT_FOUND = "NAMESPACE_NOT_FOUND"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    SIGNATURE_REQUIRED = "SIGNATURE_REQUIRED"
    SIGNER_NOT_TRUSTED = "SIGNER_NOT_TRUSTED"
    PROVENANCE_MISMATCH = "PROVENANCE_MISMATCH"
    # Platform.
    PLATFORM_CREDENTIALS_REQUIRED = "PLATFORM_CREDENTIALS_REQUIRED"
    SERVICE_NOT_ALLOWED = "SERVICE_NOT_ALLOWED"
    METHOD_NOT_EXPOSED = "METHOD_NOT_EXPOSED"
    NO_EXECUTOR_AVAILABLE = "NO_EXECUTOR_AVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    # A deployer standby asked to do what only the leading replica does (services/deployer/leader.py).
    NOT_LEADER = "NOT_LEADER"
    INTERNAL = "INTERNAL"


@dataclass
class ServiceError(Exception):
    """An error a servicer raises; the interceptor sends it as a structured status."""

    code: grpc.StatusCode
    reason: Reason
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    # (field, description) pairs for a google.rpc.BadRequest.
    field_violations: Iterable[tuple[str, str]] = ()
    retry_after_seconds: float | None = None
    domain: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self, default_domain: str) -> status_pb2.Status:
        details = [
            error_details_pb2.ErrorInfo(
                reason=str(self.reason),
                domain=self.domain or default_domain,
                # An empty value says nothing and reads as a bug (`latest_version: `): left out.
                metadata={clip(k, 128): clip(str(v))
                          for k, v in [(k, v) for k, v in self.metadata.items() if str(v) != ""][:MAX_VIOLATIONS]},
            )
        ]
        violations = list(self.field_violations)[:MAX_VIOLATIONS]
        if violations:
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=clip(f, 128), description=clip(d))
                for f, d in violations
            ]))
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=self.code.value[0], message=clip(self.message, MAX_MESSAGE_CHARS),
                                 details=packed)


def invalid(reason: Reason, field_name: str, problem: str) -> ServiceError:
    """INVALID_ARGUMENT about one field, with a BadRequest naming it."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, problem,
                        metadata={"field": field_name}, field_violations=[(field_name, problem)])


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError, domain: str) -> None:
    status = error.to_status(domain)
    await context.abort(error.code, status.message,
                        trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),))


_RELAYED_TRAILERS = frozenset({STATUS_DETAILS_KEY, "retry-after"})


async def abort_passthrough(context: grpc.aio.ServicerContext[Any, Any], err: grpc.aio.AioRpcError) -> None:
    """Re-raise a downstream status unchanged: code, message, structured details and a `retry-after` entry (a
    rate limit's refusal, relayed); no other trailer of the downstream service passes."""
    trailing = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if k in _RELAYED_TRAILERS)
    await context.abort(err.code(), err.details() or "", trailing_metadata=trailing)


def upstream_error(err: grpc.aio.AioRpcError, upstream: str, address: str = "") -> Exception:
    """What to raise for a failed call to another service.

    A status that carries structured details comes from a clawhub service and passes through unchanged;
    a bare transport failure (peer down, our own deadline) gets an ErrorInfo naming the upstream. Its address
    goes to the log only (rate-limited): callers must not learn the platform's internal addresses, and gRPC's
    own text ("ipv4:10.0.0.7:50052: Connection refused") has them removed.
    """
    if status_of(err) is not None:
        passthrough: Exception = err
        return passthrough
    code = err.code()
    reason = {grpc.StatusCode.UNAVAILABLE: Reason.UPSTREAM_UNAVAILABLE,
              grpc.StatusCode.DEADLINE_EXCEEDED: Reason.DEADLINE_EXCEEDED,
              # gRPC's own refusal of a message over a size limit, on either side of the call.
              grpc.StatusCode.RESOURCE_EXHAUSTED: Reason.MESSAGE_TOO_LARGE}.get(code, Reason.INTERNAL)
    details = err.details() or code.name
    level = logging.INFO if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED) else logging.WARNING
    _upstream_log.log(level, "call to %s%s failed: %s: %s", upstream, f" at {address}" if address else "",
                      code.name, one_line(details))
    # The address is known here even when it is a host name ("DNS resolution failed for registry.internal:50052").
    return ServiceError(code, reason, f"{upstream}: {redact_addresses(details, (address,) if address else ())}",
                        metadata={"upstream": upstream})


# What is an internal address in text, without knowing the platform's host names: an IP literal with a port
# (`10.0.0.7:50052`, `[::1]:50052`, gRPC's URL-encoded `%5B::1%5D:50052`), `localhost:PORT`, and any host:port
# that gRPC marks as a target (`dns:///registry:50052`), with gRPC's `ipv4:` / `ipv6:` prefixes. Not every
# `word:digits`: a file position (`main.c:42`, `src/main.rs:10:5`), `Error:404`, a time or a digest is not an
# address. Host names are redacted where they are known: the addresses a service is configured with, and the
# values of the address metadata keys below.
_PORT = r":\d{1,5}(?!\w)"
_ADDRESS = re.compile(
    r"(?:\b(?:ipv4|ipv6):)?"
    r"(?:\[[0-9A-Fa-f:.]+(?:%[\w.~-]+)?\]|%5B[0-9A-Fa-f:.]+(?:%25[\w.~-]+)?%5D"
    r"|(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}|\blocalhost)" + _PORT
    + r"|\bdns:(?://[^/\s]*/)?[\w.-]+" + _PORT,
    re.IGNORECASE)
HIDDEN_ADDRESS = "[internal address]"
# ErrorInfo metadata keys whose values are internal addresses: dropped from public statuses, and their values
# (comma-separated) removed from the rest of the status.
_ADDRESS_KEYS = frozenset({"address", "executor", "executors"})
# ErrorInfo metadata that is the skill's own text (the end of its stderr, its trap message): passed on verbatim.
# It is what the skill's author debugs with, and it holds nothing of the platform's configuration.
_SKILL_TEXT_KEYS = frozenset({"stderr_tail", "trap"})
# Reasons whose status message quotes the skill's own text (SKILL_TRAPPED quotes the trap); the executor writes
# the rest of those messages, without addresses. Their message is passed on verbatim.
_SKILL_REASONS = frozenset({Reason.SKILL_TRAPPED, Reason.SKILL_EXIT_NONZERO, Reason.SKILL_TIMEOUT,
                            Reason.MEMORY_LIMIT_EXCEEDED, Reason.STDERR_LIMIT_EXCEEDED})


@functools.lru_cache(maxsize=64)
def _known_pattern(known: frozenset[str]) -> re.Pattern[str] | None:
    """The exact addresses in `known`, not inside a longer word or number; longest first."""
    alternatives = sorted((a for a in known if a), key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile(r"(?<![\w.-])(?:" + "|".join(map(re.escape, alternatives)) + r")(?!\w)")


def redact_addresses(text: str, known: Iterable[str] = ()) -> str:
    """`text` with every internal address (see `_ADDRESS`) and every address in `known` replaced by
    HIDDEN_ADDRESS."""
    if ":" not in text and "%5B" not in text:
        return text
    text = _ADDRESS.sub(HIDDEN_ADDRESS, text)
    pattern = _known_pattern(frozenset(known))
    return pattern.sub(HIDDEN_ADDRESS, text) if pattern is not None else text


def redact_status(status: status_pb2.Status, known: Iterable[str] = ()) -> status_pb2.Status:
    """A public copy of `status`: no internal address in its message, ErrorInfo metadata or BadRequest.

    `known`: host:port strings to remove besides those `redact_addresses` recognises by their form (the
    caller's configured upstreams). The skill's own text (`_SKILL_TEXT_KEYS`, the message of `_SKILL_REASONS`)
    is left as the skill wrote it."""
    infos: dict[int, error_details_pb2.ErrorInfo] = {}
    for index, detail in enumerate(status.details):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            infos[index] = error_details_pb2.ErrorInfo()
            detail.Unpack(infos[index])
    addresses = set(known)
    for info in infos.values():
        for key in _ADDRESS_KEYS & set(info.metadata):
            addresses.update(a.strip() for a in info.metadata[key].split(","))
    skill_message = any(info.reason in _SKILL_REASONS for info in infos.values())
    public = status_pb2.Status(
        code=status.code, message=status.message if skill_message else redact_addresses(status.message, addresses))
    for index, detail in enumerate(status.details):
        if index in infos:
            info = infos[index]
            for key in list(info.metadata):
                if key in _ADDRESS_KEYS:
                    del info.metadata[key]
                elif key not in _SKILL_TEXT_KEYS:
                    info.metadata[key] = redact_addresses(info.metadata[key], addresses)
            public.details.add().Pack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            for violation in request.field_violations:
                violation.description = redact_addresses(violation.description, addresses)
            public.details.add().Pack(request)
        else:
            public.details.append(detail)
    return public


class RateLimitedLog:
    """At most `burst` lines per `window` seconds; the first line after a quiet spell says how many were
    dropped. A flood of bad requests must cost the log a few lines, not one per request."""

    def __init__(self, logger: logging.Logger, *, burst: int = 5, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._burst = burst
        self._window = window
        self._clock = clock
        self._started = -window
        self._count = 0
        self._dropped = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._started >= self._window:
            if self._dropped:
                self._logger.log(level, "(%d similar lines dropped in the last %.0fs)", self._dropped,
                                 now - self._started)
            self._started, self._count, self._dropped = now, 0, 0
        if self._count < self._burst:
            self._count += 1
            self._logger.log(level, msg, *args)
        else:
            self._dropped += 1

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)


# Failures of calls to other services, with their addresses. Module-level like the logger it wraps: it holds
# no state a test or a caller depends on.
_upstream_log = RateLimitedLog(logging.getLogger("clawhub.upstream"))


def status_of(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status carried by an RPC error, if any (client side)."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of an RPC error, if any (client side)."""
    status = status_of(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def bad_request(err: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    status = status_of(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            return request
    return None


class MalformedRequest(ServiceError):
    """Request bytes that do not decode as the method's message."""


# upb's reasons for a failed decode, in words a caller can act on.
_DECODE_PROBLEMS = (
    ("UTF-8", "invalid_utf8", "a string field is not valid UTF-8 (send binary data in a bytes field)"),
    ("MaxDepth", "too_deep", f"messages are nested deeper than the {PROTOBUF_MAX_DEPTH} levels protobuf decodes "
                             "(a google.protobuf.Value takes 2 levels per nested list and 3 per nested struct)"),
    ("corrupt", "corrupt_wire_format", "the bytes are not a valid protobuf encoding (corrupt wire format)"),
)


def malformed_request(type_name: str, exc: BaseException) -> MalformedRequest:
    """INVALID_ARGUMENT / MALFORMED_REQUEST for request bytes that `type_name` cannot be decoded from."""
    text = str(exc)
    # Another implementation's wording (or a RecursionError): say what it said, without the traceback.
    problem, words = "undecodable", clip(f"{type(exc).__name__}: {text}", 200)
    for marker, known, described in _DECODE_PROBLEMS:
        if marker in text:
            problem, words = known, described
            break
    metadata = {"message_type": type_name, "problem": problem}
    if problem == "too_deep":
        metadata["max_depth"] = str(PROTOBUF_MAX_DEPTH)
    return MalformedRequest(grpc.StatusCode.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST,
                            f"the request cannot be decoded as {type_name}: {words}", metadata=metadata)


Decode = Callable[[bytes], Any]


def _decoder(deserialize: Decode) -> Decode:
    """`deserialize`, raising MalformedRequest (naming the message type) for bytes it cannot decode, then the
    generic field checks (unknown enum values, unset required enums, oversize strings:
    services/runtime/fieldcheck.py)."""
    from services.runtime import fieldcheck  # it builds on this module

    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else getattr(deserialize, "__qualname__", "the request")
    check = fieldcheck.checker(descriptor)

    def decode(raw: bytes) -> Any:
        try:
            request = deserialize(raw)
        except (message.DecodeError, RecursionError, ValueError, TypeError) as exc:
            raise malformed_request(type_name, exc) from None
        if check is not None:
            check(request)
        return request

    return decode


async def _decoded(requests: AsyncIterator[bytes], decode: Decode) -> AsyncIterator[Any]:
    async for raw in requests:
        yield decode(raw)


class HandlerWrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor that runs its code around each method's handler (where the decoded request is at hand,
    which gRPC's `intercept_service` alone never sees): `_wrap` builds the wrapped handler once per method and
    it is reused for as long as the server hands out the same handler."""

    # What `intercept_service` returns depends only on the method and the handler it wraps (no per-call work,
    # no context variable set): `fuse` may run it once per method for a chain of such interceptors.
    per_method = True

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = await self._build(handler, handler_call_details)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    async def _build(self, handler: grpc.RpcMethodHandler,
                     handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError


def _said_unimplemented(context: Any) -> bool:
    """Whether the handler set UNIMPLEMENTED before raising NotImplementedError (what a generated servicer's
    default method does); any other NotImplementedError is a bug, answered INTERNAL and logged."""
    try:
        return bool(context.code() == grpc.StatusCode.UNIMPLEMENTED)
    except Exception:  # noqa: BLE001 - a context without code(): not the generated default
        return False


class FusedInterceptors(HandlerWrappingInterceptor):
    """Consecutive `per_method` interceptors as one: gRPC runs a coroutine (and a continuation) per interceptor
    per call; this runs the chain once per method and then hands out its handler, so the chain costs a call one
    dict lookup. The handlers it hands out are the ones the chain would (each member's own wrapping, in order)."""

    def __init__(self, members: Sequence[grpc.aio.ServerInterceptor]) -> None:
        super().__init__()
        self._members = tuple(members)

    async def _build(self, handler: grpc.RpcMethodHandler,
                     handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        members = self._members

        async def run(index: int, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            if index == len(members):
                return handler
            return await members[index].intercept_service(functools.partial(run, index + 1), details)

        return await run(0, handler_call_details)


def fuse(interceptors: Sequence[grpc.aio.ServerInterceptor]) -> list[grpc.aio.ServerInterceptor]:
    """`interceptors` with each run of two or more consecutive `per_method` ones replaced by FusedInterceptors."""
    out: list[grpc.aio.ServerInterceptor] = []
    run: list[grpc.aio.ServerInterceptor] = []
    for interceptor in (*interceptors, None):
        if interceptor is not None and getattr(interceptor, "per_method", False):
            run.append(interceptor)
            continue
        out.extend([FusedInterceptors(run)] if len(run) > 1 else run)
        run = []
        if interceptor is not None:
            out.append(interceptor)
    return out


class ErrorInterceptor(HandlerWrappingInterceptor):
    """Decodes requests and turns exceptions raised by servicers into structured statuses.

    It takes over each handler's request_deserializer (gRPC then hands the handler raw bytes) and decodes
    inside the wrapper, so a decode failure is a status of ours rather than gRPC's UNKNOWN + traceback. This
    costs nothing extra per call: gRPC would call the same deserializer from its own code. Wrapped handlers
    are cached per method, so a call pays one dict lookup here.

    `public` (the gateway): statuses that leave have internal addresses removed (`redact_status`, also removing
    the exact `internal_addresses` the service is configured with), both the service's own and those passed
    through from the services behind it.

    A response stream (an async generator handler) is written here with `context.write`, one message at a
    time: each write waits for the transport, so a caller that stops reading stops the handler (and whatever
    it relays) once HTTP/2's flow-control windows are full. A caller that goes away (cancels, disconnects,
    its deadline passes) ends the handler: its generator is closed (a relay's `finally` cancels its upstream
    call) and the RPC ends as cancelled, with at most one rate-limited log line, never a traceback.
    """

    def __init__(self, domain: str, *, public: bool = False, internal_addresses: Iterable[str] = (),
                 observe: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler] | None = None) -> None:
        self._domain = domain
        # Wraps each method's wrapped handler once more, outside the error handling (RPC metrics:
        # services/runtime/metrics.py), so it sees the status the caller gets without another interceptor.
        self._observe = observe
        self._public = public
        self._internal_addresses = frozenset(internal_addresses)
        super().__init__()
        self._malformed_log = RateLimitedLog(log)
        self._gone_log = RateLimitedLog(log)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        wrapped = self._wrap_errors(handler, method)
        return wrapped if self._observe is None else self._observe(wrapped, method)

    def _wrap_errors(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        decode = _decoder(handler.request_deserializer) if handler.request_deserializer else None
        raw = handler._replace(request_deserializer=None)
        if handler.unary_unary:
            return raw._replace(unary_unary=self._wrap_unary(handler.unary_unary, method, decode))
        if handler.stream_unary:
            return raw._replace(stream_unary=self._wrap_client_stream(handler.stream_unary, method, decode))
        if handler.unary_stream:
            return raw._replace(unary_stream=self._wrap_stream(handler.unary_stream, method, decode, False))
        if handler.stream_stream:
            return raw._replace(stream_stream=self._wrap_stream(handler.stream_stream, method, decode, True))
        return handler

    async def _abort(self, context: Any, code: grpc.StatusCode, status: status_pb2.Status) -> None:
        if self._public:
            status = redact_status(status, self._internal_addresses)
        await context.abort(code, status.message,
                            trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),))

    async def _handle(self, exc: Exception, context: Any, method: str) -> None:
        """Send the status `exc` stands for (this always raises: gRPC's AbortError once the status is sent)."""
        if isinstance(exc, _CALL_OVER):
            self._caller_gone(method)
        try:
            await self._send_status(exc, context, method)
        except _CALL_OVER:
            self._caller_gone(method)

    def _caller_gone(self, method: str) -> NoReturn:
        """A write (or the status itself) failed because the call is over: the caller cancelled, went away or ran
        out of time, and gRPC has not told the handler yet. gRPC would log the failure with a traceback, one per
        call; a CancelledError is what gRPC ends a cancelled handler with, quietly."""
        self._gone_log.log(logging.INFO, "the caller of %s went away; stopped answering it", method)
        raise asyncio.CancelledError from None

    async def _send_status(self, exc: Exception, context: Any, method: str) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, MalformedRequest):
            self._malformed_log.warning("malformed request to %s from %s: %s", method, context.peer(), exc.message)
        if isinstance(exc, ServiceError):
            await self._abort(context, exc.code, exc.to_status(self._domain))
        if isinstance(exc, grpc.aio.AioRpcError):
            translated = upstream_error(exc, "a service this one calls")
            if isinstance(translated, ServiceError):
                # A bare transport failure of a call this service made: still a structured error.
                await self._abort(context, translated.code, translated.to_status(self._domain))
            status = status_of(exc)
            if status is not None and self._public:
                await self._abort(context, exc.code(), status)
            await abort_passthrough(context, exc)
        if isinstance(exc, NotImplementedError) and _said_unimplemented(context):
            # A servicer without this method (the generated base class's default): UNIMPLEMENTED, as gRPC says
            # for a method it does not know, so that a client can fall back (services/runtime/mux.py).
            await abort_with(context, ServiceError(grpc.StatusCode.UNIMPLEMENTED, Reason.METHOD_NOT_EXPOSED,
                                                   f"{method} is not implemented by this server",
                                                   metadata={"method": method}), self._domain)
        log.exception("unexpected error in %s", method, exc_info=exc)
        await abort_with(context, ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL,
                                               f"internal error in {method}; see the service log"),
                         self._domain)

    def _wrap_unary(self, fn: Callable[..., Awaitable[Any]], method: str,
                    decode: Decode | None) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: Any) -> Any:
            try:
                return await fn(request if decode is None else decode(request), context)
            except Exception as exc:  # noqa: BLE001 - translated into a status
                await self._handle(exc, context, method)

        return wrapper

    def _wrap_client_stream(self, fn: Callable[..., Awaitable[Any]], method: str,
                            decode: Decode | None) -> Callable[..., Awaitable[Any]]:
        async def wrapper(requests: Any, context: Any) -> Any:
            try:
                return await fn(requests if decode is None else _decoded(requests, decode), context)
            except Exception as exc:  # noqa: BLE001 - translated into a status
                # (Not for a method that is not implemented: a caller streaming calls over it would hold the
                # answer back for the whole drain, when it only needs to learn to call something else.)
                if method not in NO_DRAIN and not isinstance(exc, (grpc.aio.AbortError, NotImplementedError,
                                                                   *_CALL_OVER)):
                    await _drain(requests)
                await self._handle(exc, context, method)

        return wrapper

    def _wrap_stream(self, fn: Callable[..., Any], method: str, decode: Decode | None,
                     client_streaming: bool) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(fn):
            # A handler that writes with context.write (grpc_health's Watch) is a plain coroutine.
            if client_streaming:
                return self._wrap_client_stream(fn, method, decode)
            return self._wrap_unary(fn, method, decode)

        async def wrapper(request: Any, context: Any) -> None:
            try:
                if decode is not None:
                    request = _decoded(request, decode) if client_streaming else decode(request)
                responses = fn(request, context)
                try:
                    async for item in responses:
                        await self._write(context, item)
                finally:
                    await responses.aclose()
            except Exception as exc:  # noqa: BLE001 - translated into a status
                await self._handle(exc, context, method)

        return wrapper

    @staticmethod
    async def _write(context: Any, item: Any) -> None:
        """Send one response message, as gRPC would for an async generator handler. A write to a caller that
        is gone fails with gRPC's ExecuteBatchError, which `_handle` turns into a quiet cancellation."""
        if context.done():  # the handler aborted the call and went on yielding
            raise asyncio.CancelledError
        await context.write(item)


# What a write raises when the call is already over in gRPC's core (the caller cancelled or disconnected).
_CALL_OVER: tuple[type[BaseException], ...] = (cygrpc.ExecuteBatchError,)

# Client-streaming methods whose refusal is sent at once, without reading what the client still sends first: their
# clients send nothing until the stream is served (services/runtime/mux.py registers its stream methods here).
NO_DRAIN: set[str] = set()
# Bounds on reading what a client still sends after its stream was refused.
DRAIN_BYTES = 8 * 1024 * 1024
DRAIN_SECONDS = 2.0


async def _drain(requests: Any) -> None:
    """Read (and drop) what the client is still sending, within bounds, before the error status goes out.

    A server that finishes a client-streaming call while the client is still writing races the client's
    writes: the client then sometimes sees INTERNAL ("Internal error from Core") instead of the real status.
    """
    async def consume() -> None:
        received = 0
        async for request in requests:
            # Raw bytes: the interceptor decodes, gRPC does not.
            received += len(request) if isinstance(request, bytes) else request.ByteSize()
            if received > DRAIN_BYTES:
                return

    try:
        await asyncio.wait_for(consume(), DRAIN_SECONDS)
    except Exception:  # noqa: BLE001 - best effort: the status is what matters
        return
