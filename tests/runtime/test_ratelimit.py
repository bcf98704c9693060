"""Token-bucket rate limits: the refill arithmetic, bounded memory, the settings, and the interceptor on a real
grpc.aio server (with the ErrorInterceptor in front, as create_server builds it) called by a real client."""

from __future__ import annotations

import asyncio
import importlib
import math
import pkgutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import clawhub
import grpc
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from services.runtime.errors import error_info, status_of
from services.runtime.ratelimit import (
    CLASSES,
    METHOD_CLASSES,
    RETRY_AFTER_METADATA,
    CallKey,
    Decision,
    Identify,
    Limit,
    LocalBackend,
    PeerIdentity,
    RateLimiter,
    RateLimitInterceptor,
    RateLimitSettings,
    bucket_key,
    parse_limit,
    rate_limit_interceptor,
)
from services.runtime.ratelimit.buckets import Backend
from services.runtime.server import ServiceHost, create_server
from services.runtime.settings import SettingsError

INVOKE = "/clawhub.gateway.v1.GatewayService/InvokeSkill"
WATCH = "/clawhub.deployer.v1.DeployerService/WatchDeployment"
PUBLISH = "/clawhub.registry.v1.RegistryService/PublishSkill"
DOMAIN = "limited.clawhub"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- refill arithmetic ---------------------------------------------------------------------------------------


async def test_a_bucket_admits_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    backend = LocalBackend(clock=clock)
    assert [(await backend.take("k", 2, 5)).allowed for _ in range(6)] == [True] * 5 + [False]
    refused = await backend.take("k", 2, 5)
    assert refused == Decision(False, 0.5, 0.0)
    clock.now += 0.25
    assert (await backend.take("k", 2, 5)).retry_after_seconds == pytest.approx(0.25)
    clock.now += 0.25  # exactly the advertised delay: the token is there
    admitted = await backend.take("k", 2, 5)
    assert admitted.allowed and admitted.remaining == pytest.approx(0.0)
    clock.now += 3600  # a long idle spell fills the bucket to its burst, not beyond
    assert (await backend.take("k", 2, 5)).remaining == pytest.approx(4.0)
    clock.now -= 10  # a clock that goes backwards adds nothing
    assert (await backend.take("k", 2, 5)).remaining == pytest.approx(3.0)


async def test_a_call_may_cost_several_tokens_but_never_more_than_the_burst() -> None:
    clock = Clock()
    backend = LocalBackend(clock=clock)
    assert (await backend.take("k", 1, 5, cost=3)).remaining == 2
    refused = await backend.take("k", 1, 5, cost=3)
    assert not refused.allowed and refused.retry_after_seconds == pytest.approx(1.0)
    with pytest.raises(ValueError, match="never pass"):
        await backend.take("k", 1, 5, cost=6)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.1, 1000), burst=st.integers(1, 100),
       gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200))
def test_no_sequence_of_calls_gets_more_than_the_burst_plus_the_refill(rate: float, burst: int,
                                                                        gaps: list[float]) -> None:
    clock = Clock()
    backend = LocalBackend(clock=clock)
    start = clock.now
    admitted = 0
    for gap in gaps:
        clock.now += gap
        decision = backend.take_now("k", rate, burst)
        admitted += decision.allowed
        assert 0 <= decision.remaining <= burst
        if not decision.allowed:
            # The advertised delay is exact: after it the call passes.
            clock.now += decision.retry_after_seconds
            assert backend.take_now("k", rate, burst).allowed
            admitted += 1
    assert admitted <= burst + rate * (clock.now - start) + 1e-6


def test_local_buckets_are_bounded_and_keep_the_busy_ones() -> None:
    backend = LocalBackend(max_keys=1000)
    for _ in range(3):
        backend.take_now("busy", 0.001, 3)
    assert not backend.take_now("busy", 0.001, 3).allowed
    for i in range(50_000):  # a flood of distinct callers
        backend.take_now(f"caller-{i}", 1, 1)
        if i % 100 == 0:
            backend.take_now("busy", 0.001, 3)
    assert len(backend) == 1000
    assert "busy" in backend and not backend.take_now("busy", 0.001, 3).allowed


# --- settings ------------------------------------------------------------------------------------------------


def test_default_limits_are_far_above_normal_use() -> None:
    defaults = RateLimitSettings.from_env({})
    assert defaults == RateLimitSettings()
    assert defaults.enabled and defaults.backend == "local" and defaults.redis_down == "open"
    for role in ("anonymous", "viewer", "invoker", "publisher", "operator", "admin"):
        for cls in CLASSES:
            limit = defaults.limit_for("peer:ipv4:127.0.0.1", role, cls)
            assert limit is not None and limit.rate >= 200 and limit.burst >= 1000
    service = defaults.limit_for("service:dispatcher", "service", "invoke")
    assert service is not None and service.rate >= 10 * 2000


def test_limits_per_class_role_and_key() -> None:
    s = RateLimitSettings.from_env({
        "CLAWHUB_RATE_INVOKE": "10/20",
        "CLAWHUB_RATE_READ_ADMIN": "off",
        "CLAWHUB_RATE_WRITE_ANONYMOUS": "0.5/2",
        "CLAWHUB_RATE_OVERRIDES": " key:ck_7f3a@invoke=50/100, alice@example.com@*=off ,peer:ipv6:[::1]@write=1/1",
        "CLAWHUB_RATE_BACKEND": "redis",
        "CLAWHUB_RATE_REDIS_URL": "redis://:secret@redis.internal:6379/2",
        "CLAWHUB_RATE_REDIS_DOWN": "CLOSED",
        "CLAWHUB_RATE_REDIS_TIMEOUT": "0.1",
        "CLAWHUB_RATE_MAX_KEYS": "5000",
    })
    assert s.limit_for("peer:x", "invoker", "invoke") == Limit(10, 20)
    assert s.limit_for("peer:x", "admin", "read") is None
    assert s.limit_for("peer:x", "admin", "invoke") == Limit(10, 20)
    assert s.limit_for("peer:x", "anonymous", "write") == Limit(0.5, 2)
    # CLAWHUB_RATE_<CLASS> is not the platform's own services' limit.
    assert s.limit_for("service:gateway", "service", "invoke") == Limit(20000, 40000)
    assert s.limit_for("key:ck_7f3a", "invoker", "invoke") == Limit(50, 100)
    assert s.limit_for("key:ck_7f3a", "invoker", "read") == Limit(2000, 4000)
    assert s.limit_for("alice@example.com", "publisher", "write") is None
    assert s.limit_for("peer:ipv6:[::1]", "anonymous", "write") == Limit(1, 1)
    assert (s.backend, s.redis_down, s.redis_timeout, s.max_keys) == ("redis", "closed", 0.1, 5000)
    assert str(Limit(0.5, 2)) == "0.5/2" and str(Limit(10, 20)) == "10/20"
    assert parse_limit("unlimited") is None


@pytest.mark.parametrize(("env", "message"), [
    ({"CLAWHUB_RATE_INVOKE": "fast"}, "CLAWHUB_RATE_INVOKE: 'fast' is not RATE/BURST"),
    ({"CLAWHUB_RATE_INVOKE": "0/10"}, "CLAWHUB_RATE_INVOKE: rate 0.0 must be a positive number"),
    ({"CLAWHUB_RATE_READ": "inf/10"}, "CLAWHUB_RATE_READ: rate inf must be a positive number"),
    ({"CLAWHUB_RATE_WRITE_ADMIN": "10/0.5"}, "CLAWHUB_RATE_WRITE_ADMIN: burst 0.5 must be at least 1"),
    ({"CLAWHUB_RATE_INVOKES": "1/1"}, "CLAWHUB_RATE_INVOKES is not a rate-limit setting (did you mean "
                                      "CLAWHUB_RATE_INVOKE?)"),
    ({"CLAWHUB_RATE_LIMITS": "maybe"}, "CLAWHUB_RATE_LIMITS='maybe' must be on or off"),
    ({"CLAWHUB_RATE_BACKEND": "memcached"}, "CLAWHUB_RATE_BACKEND='memcached' must be one of local, redis"),
    ({"CLAWHUB_RATE_BACKEND": "redis"}, "CLAWHUB_RATE_BACKEND=redis needs CLAWHUB_RATE_REDIS_URL"),
    ({"CLAWHUB_RATE_BACKEND": "redis", "CLAWHUB_RATE_REDIS_URL": "http://user:hunter2@cache:6379"},
     "CLAWHUB_RATE_REDIS_URL must start with redis://"),
    ({"CLAWHUB_RATE_REDIS_DOWN": "maybe"}, "CLAWHUB_RATE_REDIS_DOWN='maybe' must be one of open, closed"),
    ({"CLAWHUB_RATE_MAX_KEYS": "0"}, "CLAWHUB_RATE_MAX_KEYS=0 must be at least 1"),
    ({"CLAWHUB_RATE_MAX_KEYS": "lots"}, "CLAWHUB_RATE_MAX_KEYS='lots' is not an integer"),
    ({"CLAWHUB_RATE_REDIS_RETRY": "nan"}, "CLAWHUB_RATE_REDIS_RETRY='nan' must be a finite number"),
    ({"CLAWHUB_RATE_OVERRIDES": "key:ck_1=5/10"},
     "CLAWHUB_RATE_OVERRIDES: 'key:ck_1=5/10' is not KEY@CLASS=RATE/BURST"),
    ({"CLAWHUB_RATE_OVERRIDES": "key:ck_1@deploy=5/10"}, "class 'deploy' must be one of invoke, read, write, stream"),
    ({"CLAWHUB_RATE_OVERRIDES": "key:ck_1@invoke=5"}, "'5' is not RATE/BURST"),
])
def test_bad_settings_are_one_line_errors_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        RateLimitSettings.from_env(env)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert "hunter2" not in text


def test_limits_can_be_turned_off() -> None:
    assert rate_limit_interceptor(RateLimitSettings.from_env({"CLAWHUB_RATE_LIMITS": "off"}), domain=DOMAIN) is None


def test_every_rpc_of_every_service_has_a_method_class() -> None:
    """From the descriptors: a new RPC without a class fails here (it would be limited as `write`)."""
    methods = set()
    for module in pkgutil.walk_packages(clawhub.__path__, "clawhub."):
        if module.name.endswith("_pb2"):
            for service in importlib.import_module(module.name).DESCRIPTOR.services_by_name.values():
                methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert methods, "no service descriptors found"
    ours = {m for m in METHOD_CLASSES if m.startswith("/clawhub.")}
    assert sorted(methods - ours) == [] and sorted(ours - methods) == []
    assert set(METHOD_CLASSES.values()) <= set(CLASSES)


def test_bucket_keys_cannot_collide_across_principals() -> None:
    assert bucket_key(CallKey("peer:a:b", "anonymous", "invoke")) != bucket_key(CallKey("peer:a", "anonymous",
                                                                                         "invoke", "b"))
    long = bucket_key(CallKey("k" * 10_000, "anonymous", "invoke", "s" * 10_000))
    assert len(long) < 600


# --- the interceptor on a real server ------------------------------------------------------------------------


def invoke(channel: grpc.aio.Channel, name: str, metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.UnaryUnaryCall[
        gateway_pb.InvokeSkillRequest, gateway_pb.InvokeSkillResponse]:
    call = channel.unary_unary(INVOKE, request_serializer=gateway_pb.InvokeSkillRequest.SerializeToString,
                               response_deserializer=gateway_pb.InvokeSkillResponse.FromString)
    return call(gateway_pb.InvokeSkillRequest(name=name), metadata=tuple(metadata), timeout=10)


@dataclass
class Limited:
    host: ServiceHost
    interceptor: RateLimitInterceptor
    channel: grpc.aio.Channel

    def invoke(self, name: str, metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.UnaryUnaryCall[
            gateway_pb.InvokeSkillRequest, gateway_pb.InvokeSkillResponse]:
        return invoke(self.channel, name, metadata)


def register_test_services(server: grpc.aio.Server) -> None:
    """Stand-ins at real method paths: an invoke (decoded request), a response stream, a client stream."""
    async def invoke(request: gateway_pb.InvokeSkillRequest, context: object) -> gateway_pb.InvokeSkillResponse:
        return gateway_pb.InvokeSkillResponse(version=f"ran {request.name}")

    async def watch(request: bytes, context: object) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i])

    async def publish(requests: AsyncIterator[bytes], context: object) -> bytes:
        return b"%d" % len([r async for r in requests])

    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("clawhub.gateway.v1.GatewayService", {
            "InvokeSkill": grpc.unary_unary_rpc_method_handler(
                invoke, request_deserializer=gateway_pb.InvokeSkillRequest.FromString,
                response_serializer=gateway_pb.InvokeSkillResponse.SerializeToString)}),
        grpc.method_handlers_generic_handler("clawhub.deployer.v1.DeployerService", {
            "WatchDeployment": grpc.unary_stream_rpc_method_handler(watch)}),
        grpc.method_handlers_generic_handler("clawhub.registry.v1.RegistryService", {
            "PublishSkill": grpc.stream_unary_rpc_method_handler(publish)}),
    ))


async def start_limited(limiter: RateLimiter, identify: Identify | None = None) -> Limited:
    interceptor = RateLimitInterceptor(limiter, domain=DOMAIN, identify=identify)
    host = create_server("limited", (), host="127.0.0.1", port=0, interceptors=[interceptor],
                         register=register_test_services)
    await host.start()
    return Limited(host, interceptor, grpc.aio.insecure_channel(f"127.0.0.1:{host.port}"))


def limiter(limits: Mapping[str, Limit | None], backend: Backend | None = None) -> RateLimiter:
    settings = RateLimitSettings(class_limits=dict(limits))
    return RateLimiter(settings, backend if backend is not None else LocalBackend())


@pytest.fixture
async def limited() -> AsyncIterator[Limited]:
    server = await start_limited(limiter({"invoke": Limit(2, 3), "stream": Limit(2, 2), "write": Limit(2, 2),
                                          "read": Limit(0.01, 1)}))
    yield server
    await server.channel.close()
    await server.host.stop(0)
    await server.interceptor.close()


def refusal_details(err: grpc.aio.AioRpcError) -> tuple[dict[str, str], float, list[tuple[str, str]], str]:
    """ErrorInfo metadata, RetryInfo delay, QuotaFailure (subject, description) and the retry-after trailer."""
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(err)
    assert info is not None and info.reason == "RATE_LIMITED" and info.domain == DOMAIN
    status = status_of(err)
    assert status is not None
    delay, quota = -1.0, []
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota = [(v.subject, v.description) for v in failure.violations]
    trailers = dict(err.trailing_metadata() or ())
    retry_after = trailers.get(RETRY_AFTER_METADATA)
    assert isinstance(retry_after, str)
    return dict(info.metadata), delay, quota, retry_after


async def test_a_burst_over_the_bucket_is_refused_with_details_and_admitted_after_the_refill(
        limited: Limited) -> None:
    for _ in range(3):
        assert (await limited.invoke("com.example.a")).version == "ran com.example.a"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited.invoke("com.example.a")
    err = caught.value
    metadata, delay, quota, retry_after = refusal_details(err)
    assert metadata == {"class": "invoke", "limit": "2/3", "key": "peer:ipv4:127.0.0.1", "skill": "com.example.a"}
    assert 0.3 < delay <= 0.5
    assert quota == [("invoke:peer:ipv4:127.0.0.1:com.example.a", "at most 2 invoke calls per second, bursts of 3")]
    assert retry_after == str(math.ceil(delay)) == "1"
    assert "rate limit exceeded" in (err.details() or "") and "com.example.a" in (err.details() or "")
    # Buckets are per skill: another skill of the same caller still has its burst.
    assert (await limited.invoke("com.example.b")).version == "ran com.example.b"
    await asyncio.sleep(delay)
    assert (await limited.invoke("com.example.a")).version == "ran com.example.a"
    counters = limited.interceptor.counters
    assert (counters.allowed, counters.refused) == (5, 1)


async def test_a_refusal_relayed_by_another_service_keeps_its_details_and_retry_after(limited: Limited) -> None:
    """A service that relays a call (the gateway to the registry or deployer) passes a downstream refusal on
    whole: code, message, details and the retry-after trailer, and no other trailer."""
    async def relay(request: gateway_pb.InvokeSkillRequest, context: object) -> gateway_pb.InvokeSkillResponse:
        response: gateway_pb.InvokeSkillResponse = await limited.invoke(request.name)
        return response

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("clawhub.gateway.v1.GatewayService", {
            "InvokeSkill": grpc.unary_unary_rpc_method_handler(
                relay, request_deserializer=gateway_pb.InvokeSkillRequest.FromString,
                response_serializer=gateway_pb.InvokeSkillResponse.SerializeToString)}),))

    front = create_server("front", (), host="127.0.0.1", port=0, register=register)
    await front.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            for _ in range(3):
                await invoke(channel, "com.example.a")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await invoke(channel, "com.example.a")
        metadata, delay, quota, retry_after = refusal_details(caught.value)
        assert metadata["class"] == "invoke" and 0 < delay <= 0.5 and quota and retry_after == "1"
    finally:
        await front.stop(0)


async def test_a_relayed_peer_is_the_caller_only_where_it_is_trusted(limited: Limited) -> None:
    """Not trusted by default: a client naming another peer still takes from its own bucket."""
    for i in range(3):
        await limited.invoke("com.example.a", [("x-clawhub-peer", f"ipv4:10.0.0.{i}")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited.invoke("com.example.a", [("x-clawhub-peer", "ipv4:10.0.0.99")])
    assert refusal_details(caught.value)[0]["key"] == "peer:ipv4:127.0.0.1"

    behind = await start_limited(limiter({"invoke": Limit(0.01, 1)}), PeerIdentity(trust_forwarded_peer=True))
    try:
        for i in range(3):
            await behind.invoke("com.example.a", [("x-clawhub-peer", f"ipv4:10.0.0.{i}")])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await behind.invoke("com.example.a", [("x-clawhub-peer", "ipv4:10.0.0.1")])
        assert refusal_details(caught.value)[0]["key"] == "peer:ipv4:10.0.0.1"
    finally:
        await behind.channel.close()
        await behind.host.stop(0)


async def test_streams_are_counted_when_they_open(limited: Limited) -> None:
    watch = limited.channel.unary_stream(WATCH)
    for _ in range(2):
        assert [r async for r in watch(b"", timeout=10)] == [b"\x00", b"\x01", b"\x02"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in watch(b"", timeout=10)]
    metadata, _, quota, _ = refusal_details(caught.value)
    assert metadata == {"class": "stream", "limit": "2/2", "key": "peer:ipv4:127.0.0.1"}
    assert quota[0][0] == "stream:peer:ipv4:127.0.0.1"


async def test_a_refused_client_stream_gets_the_status_not_a_reset(limited: Limited) -> None:
    publish = limited.channel.stream_unary(PUBLISH)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 65536

    for _ in range(2):
        assert await publish(chunks(), timeout=10) == b"20"
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish(chunks(), timeout=10)
        assert refusal_details(caught.value)[0]["class"] == "write"


async def test_health_checks_are_never_limited(limited: Limited) -> None:
    check = health_pb2_grpc.HealthStub(limited.channel).Check
    for _ in range(20):
        response = await check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_default_limits_refuse_nothing_a_person_does() -> None:
    server = await start_limited(RateLimiter(RateLimitSettings(), LocalBackend()))
    try:
        results = await asyncio.gather(*(server.invoke("com.example.a") for _ in range(500)))
        assert len(results) == 500 and server.interceptor.counters.refused == 0
    finally:
        await server.channel.close()
        await server.host.stop(0)


async def test_a_hook_decides_who_the_caller_is_and_what_is_not_limited() -> None:
    seen: list[tuple[str, object]] = []

    def identify(method: str, context: grpc.aio.ServicerContext[object, object], request: object) -> CallKey | None:
        seen.append((method, request))
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("x-test-exempt"):
            return None
        return CallKey(f"key:{metadata.get('x-test-key', 'none')}", "invoker", "invoke")

    server = await start_limited(limiter({"invoke": Limit(0.01, 1)}), identify)
    try:
        await server.invoke("com.example.a", [("x-test-key", "ck_1")])
        await server.invoke("com.example.a", [("x-test-key", "ck_2")])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.invoke("com.example.b", [("x-test-key", "ck_1")])
        assert refusal_details(caught.value)[0]["key"] == "key:ck_1"
        for _ in range(3):
            await server.invoke("com.example.a", [("x-test-key", "ck_1"), ("x-test-exempt", "1")])
        # The hook sees the decoded request.
        assert seen[0] == (INVOKE, gateway_pb.InvokeSkillRequest(name="com.example.a"))
    finally:
        await server.channel.close()
        await server.host.stop(0)
