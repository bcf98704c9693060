"""The grpc.aio server interceptor that applies rate limits to every call of a service.

Install it after the ErrorInterceptor (`create_server(..., interceptors=[...])`): it then sees decoded requests,
which per-skill buckets need. Each call is identified by a hook, `Identify(method, context, request)` →
`CallKey(principal, role, method_class, skill)` (None: not limited); its bucket is taken before the handler runs.
gRPC's interceptors see only the method and metadata before the request is decoded, so the check runs in a
wrapper around the handler (like ErrorInterceptor's). A client-streaming call is checked when it opens, with
no request (`request` None). A response stream is counted once, when it opens.

A refusal is RESOURCE_EXHAUSTED with an ErrorInfo (reason RATE_LIMITED; metadata `class`, `limit`, `key`, and
`skill` on per-skill buckets), a RetryInfo, a QuotaFailure naming the bucket, and a `retry-after` trailer
(whole seconds, rounded up). With the Redis backend down and failing closed: UNAVAILABLE, UPSTREAM_UNAVAILABLE.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from services.runtime import metrics, tracing
from services.runtime.auth import current_principal
from services.runtime.channels import PEER_METADATA, peer_host
from services.runtime.errors import (
    NO_DRAIN,
    STATUS_DETAILS_KEY,
    HandlerWrappingInterceptor,
    Reason,
    ServiceError,
    _drain,
    one_line,
)
from services.runtime.identity import calling_service
from services.runtime.ratelimit.buckets import Backend, Decision, LocalBackend, RateLimitCounters
from services.runtime.ratelimit.policy import MAX_KEY_CHARS, Limit, RateLimitSettings
from services.runtime.ratelimit.redis_backend import RedisBackend

RETRY_AFTER_METADATA = "retry-after"


@dataclass(frozen=True, slots=True)
class CallKey:
    """Whose bucket a call takes from. `principal` names the caller without revealing a secret (`key:<key id>`,
    `service:dispatcher`, `peer:ipv4:10.0.0.7`); `skill` is set for per-skill buckets (invoke)."""

    principal: str
    role: str
    method_class: str
    skill: str = ""


Identify = Callable[[str, grpc.aio.ServicerContext[Any, Any], Any], "CallKey | None"]


_REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
               "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")

# Every RPC of every clawhub service → its method class. tests/runtime/test_ratelimit.py checks it against the
# service descriptors, so a new RPC without a class fails the tests.
METHOD_CLASSES: Mapping[str, str] = {
    "/clawhub.gateway.v1.GatewayService/InvokeSkill": "invoke",
    "/clawhub.gateway.v1.GatewayService/TailSkillLogs": "stream",
    "/clawhub.gateway.v1.GatewayService/GetSkillStats": "read",
    "/clawhub.dispatcher.v1.DispatcherService/Dispatch": "invoke",
    "/clawhub.dispatcher.v1.DispatcherService/GetRouteTable": "read",
    "/clawhub.dispatcher.v1.DispatcherService/TailSkillLogs": "stream",
    "/clawhub.dispatcher.v1.DispatcherService/GetSkillStats": "read",
    "/clawhub.dispatcher.v1.DataPlaneService/WatchDataPlane": "stream",
    "/clawhub.dispatcher.v1.DataPlaneService/AcknowledgeDataPlane": "write",
    "/clawhub.dispatcher.v1.DataPlaneService/ReportCalls": "write",
    "/clawhub.executor.v1.ExecutorService/Execute": "invoke",
    # One stream per caller, each of its calls limited as an Execute (services/runtime/mux.py).
    "/clawhub.executor.v1.ExecutorService/ExecuteStream": "stream",
    "/clawhub.executor.v1.ExecutorService/LoadSkill": "write",
    "/clawhub.executor.v1.ExecutorService/UnloadSkill": "write",
    "/clawhub.executor.v1.ExecutorService/TailSkillLogs": "stream",
    "/clawhub.executor.v1.ExecutorService/GetLoad": "read",
    "/clawhub.registry.v1.RegistryService/PublishSkill": "write",
    "/clawhub.registry.v1.RegistryService/GetSkill": "read",
    "/clawhub.registry.v1.RegistryService/ListSkills": "read",
    "/clawhub.registry.v1.RegistryService/GetSkillVersion": "read",
    "/clawhub.registry.v1.RegistryService/ListSkillVersions": "read",
    "/clawhub.registry.v1.RegistryInternalService/DownloadBlob": "stream",
    "/clawhub.registry.v1.RegistryService/YankSkillVersion": "write",
    "/clawhub.registry.v1.RegistryService/SetSkillTag": "write",
    "/clawhub.registry.v1.RegistryService/DeleteSkillTag": "write",
    "/clawhub.registry.v1.RegistryService/ResolveDependencies": "read",
    "/clawhub.registry.v1.RegistryService/CreatePublisher": "write",
    "/clawhub.registry.v1.RegistryService/CreateNamespace": "write",
    "/clawhub.registry.v1.RegistryService/GetNamespace": "read",
    "/clawhub.registry.v1.RegistryService/ListNamespaces": "read",
    "/clawhub.registry.v1.RegistryService/UpdateNamespace": "write",
    "/clawhub.registry.v1.RegistryService/VerifyBlobs": "stream",
    "/clawhub.deployer.v1.DeployerService/CreateDeployment": "write",
    "/clawhub.deployer.v1.DeployerService/GetDeployment": "read",
    "/clawhub.deployer.v1.DeployerService/ListDeployments": "read",
    "/clawhub.deployer.v1.DeployerService/Rollback": "write",
    "/clawhub.deployer.v1.DeployerService/WatchDeployment": "stream",
    "/clawhub.deployer.v1.DeployerService/ListAuditEvents": "read",
    "/clawhub.registry.v1.RegistryInternalService/Authenticate": "read",
    "/clawhub.registry.v1.AccessService/CreateApiKey": "write",
    "/clawhub.registry.v1.AccessService/ListApiKeys": "read",
    "/clawhub.registry.v1.AccessService/RevokeApiKey": "write",
    "/clawhub.registry.v1.AccessService/ListAuditEvents": "read",
    "/clawhub.deployer.v1.DeployerInternalService/WatchRoutes": "stream",
    "/clawhub.deployer.v1.DeployerInternalService/AcknowledgeRoutes": "write",
    "/clawhub.deployer.v1.DeployerInternalService/ReportStats": "write",
    "/clawhub.deployer.v1.DeployerInternalService/RegisterExecutor": "write",
    "/clawhub.deployer.v1.DeployerInternalService/DeregisterExecutor": "write",
    **{method: "read" for method in _REFLECTION},
}
# A method missing from the table (a service of a test, a new RPC) is limited as `write`, the strictest class.
DEFAULT_CLASS = "write"
# Health checks are never limited: a refused probe would take a healthy service out of its balancer.
EXEMPT_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
# Where a request names the skill, for per-skill buckets: the first non-empty field wins.
SKILL_FIELDS: Mapping[str, tuple[str, ...]] = {
    "/clawhub.gateway.v1.GatewayService/InvokeSkill": ("name",),
    "/clawhub.dispatcher.v1.DispatcherService/Dispatch": ("skill",),
    "/clawhub.executor.v1.ExecutorService/Execute": ("skill", "digest"),
}


def _metadata_value(context: grpc.aio.ServicerContext[Any, Any], name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class PeerIdentity:
    """The default hook, until callers authenticate: every caller is `role` (anonymous), keyed by its address
    without the port (`peer:ipv4:10.0.0.7`; one bucket per host, not per connection).

    `trust_forwarded_peer` (ports behind the gateway only, never the public one): the address the gateway relays
    in `x-clawhub-peer` is the caller instead of the connection's. A client can set that metadata itself, so on
    a port it can reach directly it would choose a fresh bucket per call."""

    def __init__(self, *, classes: Mapping[str, str] = METHOD_CLASSES, default_class: str = DEFAULT_CLASS,
                 skill_fields: Mapping[str, tuple[str, ...]] = SKILL_FIELDS, role: str = "anonymous",
                 trust_forwarded_peer: bool = False) -> None:
        self._classes = classes
        self._default_class = default_class
        self._skill_fields = skill_fields
        self._role = role
        self._trust_forwarded_peer = trust_forwarded_peer

    def __call__(self, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> CallKey | None:
        if method in EXEMPT_METHODS:
            return None
        peer = _metadata_value(context, PEER_METADATA) if self._trust_forwarded_peer else None
        if not peer:
            peer = peer_host(str(context.peer() or ""))
        return CallKey(f"peer:{peer.strip()}", self._role, self._classes.get(method, self._default_class),
                       skill_of(request, self._skill_fields.get(method, ())))


def skill_of(request: Any, fields: tuple[str, ...]) -> str:
    """The first non-empty string among `fields` of `request` (a message; raw bytes have none)."""
    for name in fields:
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return value
    return ""


def bucket_key(call: CallKey) -> str:
    """The bucket of a call: class, principal and skill, each bounded; the principal's length is part of the
    key, so no principal can spell another's principal-and-skill."""
    principal = call.principal[:MAX_KEY_CHARS]
    key = f"{call.method_class}:{len(principal)}:{principal}"
    return f"{key}:{call.skill[:MAX_KEY_CHARS]}" if call.skill else key


class RateLimiter:
    """A policy and the backend its buckets live in."""

    def __init__(self, settings: RateLimitSettings, backend: Backend,
                 counters: RateLimitCounters | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.counters = counters if counters is not None else RateLimitCounters()

    @classmethod
    def from_settings(cls, settings: RateLimitSettings) -> RateLimiter:
        counters = RateLimitCounters()
        local = LocalBackend(settings.max_keys)
        backend: Backend = local
        if settings.backend == "redis":
            backend = RedisBackend.from_url(settings.redis_url, timeout=settings.redis_timeout,
                                            prefix=settings.redis_prefix, fail_open=settings.redis_down == "open",
                                            fallback=local, retry_seconds=settings.redis_retry, counters=counters)
        return cls(settings, backend, counters)

    async def check(self, call: CallKey) -> tuple[Decision, Limit] | None:
        """Take a token for `call`: the decision and the limit it was taken against; None when not limited."""
        limit = self.settings.limit_for(call.principal, call.role, call.method_class)
        if limit is None:
            return None
        decision = await self.backend.take(bucket_key(call), limit.rate, limit.burst)
        if decision.allowed:
            self.counters.allowed += 1
        elif decision.unavailable:
            self.counters.unavailable += 1
            metrics.rate_limit_refused(call.method_class, unavailable=True)
        else:
            self.counters.refused += 1
            metrics.rate_limit_refused(call.method_class)
        return decision, limit

    async def close(self) -> None:
        await self.backend.close()


def refusal(call: CallKey, limit: Limit, decision: Decision, domain: str) -> tuple[grpc.StatusCode, str,
                                                                                   tuple[tuple[str, str | bytes], ...]]:
    """The status of a refused call: code, message and trailing metadata (details and `retry-after`)."""
    seconds = max(decision.retry_after_seconds, 0.001)
    if decision.unavailable:
        error = ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE,
                             "rate limits cannot be checked now (their store, Redis, is unreachable); retry later",
                             metadata={"upstream": "rate limit store"}, retry_after_seconds=seconds)
        status = error.to_status(domain)
    else:
        principal = one_line(call.principal[:MAX_KEY_CHARS])
        skill = one_line(call.skill[:MAX_KEY_CHARS])
        subject = f"{call.method_class}:{principal}" + (f":{skill}" if skill else "")
        error = ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED,
            f"rate limit exceeded: {call.method_class} calls" + (f" to {skill}" if skill else "") + f" by {principal}"
            f" are limited to {limit.rate:g} per second in bursts of {limit.burst:g}; retry in {seconds:.3g}s",
            metadata={"class": call.method_class, "limit": str(limit), "key": principal, "skill": skill},
            retry_after_seconds=seconds)
        status = error.to_status(domain)
        quota = error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=subject, description=f"at most {limit.rate:g} {call.method_class} calls per second, "
                                         f"bursts of {limit.burst:g}")])
        packed = any_pb2.Any()
        packed.Pack(quota)
        status.details.append(packed)
    return error.code, status.message, ((STATUS_DETAILS_KEY, status.SerializeToString()),
                                        (RETRY_AFTER_METADATA, str(math.ceil(seconds))))


class RateLimitInterceptor(HandlerWrappingInterceptor):
    """Applies `limiter` to every call; see the module docstring. Wrapped handlers are cached per method."""

    def __init__(self, limiter: RateLimiter, *, domain: str, identify: Identify | None = None) -> None:
        super().__init__()
        self.limiter = limiter
        self._domain = domain
        self._identify: Identify = identify if identify is not None else PeerIdentity()
        # Rate-limit attributes on the call's span only when tracing is on (chosen once: nothing is added otherwise).
        if tracing.enabled():
            self._admit = self._traced_admit  # type: ignore[method-assign]

    @property
    def counters(self) -> RateLimitCounters:
        return self.limiter.counters

    async def close(self) -> None:
        await self.limiter.close()

    async def _admit(self, method: str, context: Any, request: Any, requests: Any = None) -> None:
        """Take the call's token, or end the call with the refusal (after reading what a client stream still
        sends, so the client sees the status rather than a reset)."""
        call = self._identify(method, context, request)
        if call is None:
            return
        checked = await self.limiter.check(call)
        if checked is None or checked[0].allowed:
            return
        code, message, trailing = refusal(call, checked[1], checked[0], self._domain)
        if requests is not None and method not in NO_DRAIN:
            await _drain(requests)
        await context.abort(code, message, trailing_metadata=trailing)

    async def _traced_admit(self, method: str, context: Any, request: Any, requests: Any = None) -> None:
        if not tracing.recording():
            return await RateLimitInterceptor._admit(self, method, context, request, requests)
        try:
            await RateLimitInterceptor._admit(self, method, context, request, requests)
        except grpc.aio.AbortError:
            tracing.annotate({"clawhub.ratelimit.refused": True})
            raise
        tracing.annotate({"clawhub.ratelimit.refused": False})

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_call(handler.unary_unary, method, False))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_call(handler.stream_unary, method, True))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method, False))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method, True))
        return handler

    def _wrap_call(self, fn: Callable[..., Awaitable[Any]], method: str,
                   client_streaming: bool) -> Callable[..., Awaitable[Any]]:
        admit = self._admit
        if client_streaming:
            async def stream_wrapper(requests: Any, context: Any) -> Any:
                await admit(method, context, None, requests)
                return await fn(requests, context)

            return stream_wrapper

        async def wrapper(request: Any, context: Any) -> Any:
            await admit(method, context, request)
            return await fn(request, context)

        return wrapper

    def _wrap_stream(self, fn: Callable[..., Any], method: str, client_streaming: bool) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(fn):
            # A handler that writes with context.write is a plain coroutine.
            return self._wrap_call(fn, method, client_streaming)
        admit = self._admit

        async def wrapper(request: Any, context: Any) -> Any:
            if client_streaming:
                await admit(method, context, None, request)
            else:
                await admit(method, context, request)
            responses = fn(request, context)
            try:
                async for item in responses:
                    yield item
            finally:
                await responses.aclose()

        return wrapper


def rate_limit_interceptor(settings: RateLimitSettings, *, domain: str,
                           identify: Identify | None = None) -> RateLimitInterceptor | None:
    """The interceptor `settings` call for (None when CLAWHUB_RATE_LIMITS=off). Close it when the server stops
    (`await interceptor.close()`: a Redis client's connections)."""
    if not settings.enabled:
        return None
    return RateLimitInterceptor(RateLimiter.from_settings(settings), domain=domain, identify=identify)


# Whose bucket a platform call takes from, most privileged role first: a principal with several roles is
# limited as the most privileged one.
_ROLE_ORDER = ("admin", "operator", "publisher", "invoker", "viewer")


class PrincipalIdentity(PeerIdentity):
    """The hook the services install: a call is keyed by who made it, as authentication established.

    A user principal (UserAuthInterceptor ran first and set it: services/runtime/auth.py) is keyed by its key id,
    publisher or JWT subject and limited by its most privileged role; a platform service calling an internal
    port (services/runtime/identity.py) is `service:<name>` with role `service`; anyone else falls back to the
    peer (PeerIdentity: role anonymous)."""

    def __call__(self, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> CallKey | None:
        if method in EXEMPT_METHODS:
            return None
        principal = current_principal()
        method_class = self._classes.get(method, self._default_class)
        skill = skill_of(request, self._skill_fields.get(method, ()))
        if principal is not None and not principal.anonymous:
            role = next((r for r in _ROLE_ORDER if r in principal.roles), "anonymous")
            return CallKey(principal_key(principal.kind, principal.subject or principal.name), role, method_class,
                           skill)
        service = calling_service()
        if service:
            return CallKey(f"service:{service}", "service", method_class, skill)
        return super().__call__(method, context, request)


def principal_key(kind: str, subject: str) -> str:
    """The bucket name of a user principal, as `CLAWHUB_RATE_OVERRIDES` names it: `key:chk_<id>` for an API
    key, `publisher:NAME`, `jwt:SUB`, `admin` for the admin token."""
    if kind == "key":
        return f"key:chk_{subject}"
    if kind == "admin":
        return "admin"
    return f"{kind}:{subject}"
