"""The gateway's result cache (docs/cache.md) through a real chain: a cached skill's second identical call is
answered by the gateway (HIT_L1) without reaching the executor; another input, env, version or config is a
miss; failures are not stored; entries expire; `no_cache` bypasses; a route splitting traffic is not cached;
two gateways share L2 in Redis. Then the cache's parts on their own: L1's byte bound and LRU order, single
flight, jitter, and `[cache] ttl` in manifests (CLI and registry)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.protobuf import duration_pb2

from services.cli import manifest
from services.gateway.cache import L1, ResultCache
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.runtime.errors import error_info
from tests.conftest import Starter
from tests.deployer.fakes import eventually
from tests.gateway.support import ECHO, ECHO_SKILL, Chain, start_chain

HIT_L1, HIT_L2 = pb.CACHE_STATUS_HIT_L1, pb.CACHE_STATUS_HIT_L2
MISS, BYPASS = pb.CACHE_STATUS_MISS, pb.CACHE_STATUS_BYPASS


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path)
    yield chain
    await chain.channel.close()


def ttl(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(int(seconds * 1000))
    return duration


async def published(chain: Chain) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.registry.port}") as ch:
        return (await registry_grpc.RegistryServiceStub(ch).GetSkillVersion(
            registry_pb.GetSkillVersionRequest(name=ECHO_SKILL, version="1.0.0"), timeout=5)).skill_version


def target(version: Any, *, seconds: float | None = 60, env_digest: str = "hmac-sha256:one", weight: int = 100,
           role: int = routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED, **fields: Any) -> routing_pb2.RouteTarget:
    made = routing_pb2.RouteTarget(version=version.version, digest=version.digest, weight=weight,
                                   limits=version.manifest.limits, env_digest=env_digest, role=role, **fields)
    if seconds is not None:
        made.cache_ttl.CopyFrom(ttl(seconds))
    return made


async def route(chain: Chain, generation: int, *targets: routing_pb2.RouteTarget) -> None:
    """Serve a new table and wait until the gateway routes with it (its table is at most 1 s old)."""
    assert chain.routes is not None
    chain.routes.set_table(routing_pb2.RouteTable(generation=generation, routes=[
        routing_pb2.Route(skill=ECHO_SKILL, targets=list(targets))]))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.dispatcher.port}") as ch:
        stub = dispatcher_grpc.DispatcherServiceStub(ch)

        async def routed() -> bool:
            table = (await stub.GetRouteTable(dispatcher_pb.GetRouteTableRequest(), timeout=5)).route_table
            return bool(table.generation == generation)

        await eventually(routed)
    await asyncio.sleep(1.1)  # the gateway's table is then read again (ROUTES_MAX_AGE_SECONDS)


async def runs(chain: Chain) -> int:
    """How many calls of the skill ran on an executor, as the dispatcher's rolling stats count them: the gateway
    routes calls itself and reports them every 0.1 s (CLAWHUB_GATEWAY_STATS_INTERVAL), so after 3 intervals."""
    await asyncio.sleep(0.3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.dispatcher.port}") as ch:
        stats = await dispatcher_grpc.DispatcherServiceStub(ch).GetSkillStats(
            dispatcher_pb.GetSkillStatsRequest(skill=ECHO_SKILL), timeout=5)
    return sum(int(s.calls) for s in stats.skills if s.skill == ECHO_SKILL)


async def invoke(stub: gateway_grpc.GatewayServiceStub, data: bytes, **fields: Any) -> pb.InvokeSkillResponse:
    return await stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=data, **fields), timeout=10)


async def test_a_second_identical_call_is_answered_by_the_gateway(chain: Chain) -> None:
    v1 = await published(chain)
    # The chain's own route declares no TTL: not cached, and the response says nothing of a cache.
    assert (await invoke(chain.stub, b"warm")).cache_status == pb.CACHE_STATUS_UNSPECIFIED
    await route(chain, 2, target(v1))
    before = await runs(chain)
    first = await invoke(chain.stub, b'{"n": 1}')
    assert first.cache_status == MISS and first.output.struct_value.fields["n"].number_value == 1
    second = await invoke(chain.stub, b'{"n": 1}')
    assert second.cache_status == HIT_L1 and second.output == first.output and second.version == "1.0.0"
    assert second.usage == first.usage  # the usage of the call that produced the result
    assert await runs(chain) == before + 1
    # Another input is another key.
    assert (await invoke(chain.stub, b'{"n": 2}')).cache_status == MISS
    assert (await invoke(chain.stub, b'{"n": 2}')).cache_status == HIT_L1
    assert await runs(chain) == before + 2
    # no_cache runs the skill and does not touch the entry.
    bypassed = await invoke(chain.stub, b'{"n": 1}', no_cache=True)
    assert bypassed.cache_status == BYPASS and bypassed.output == first.output
    assert await runs(chain) == before + 3
    assert (await invoke(chain.stub, b'{"n": 1}')).cache_status == HIT_L1


async def test_cache_lookups_are_counted_by_status(chain: Chain) -> None:
    from services.runtime import metrics

    def counted(status: str) -> float:
        return metrics.REGISTRY.get_sample_value("clawhub_gateway_cache_lookups_total", {"status": status}) or 0.0

    before = {s: counted(s) for s in ("miss", "hit_l1", "bypass")}
    v1 = await published(chain)
    await invoke(chain.stub, b"uncounted")  # a skill route without a TTL: not counted
    await route(chain, 2, target(v1))
    for data, no_cache in ((b"c", False), (b"c", False), (b"c", False), (b"c", True)):
        await invoke(chain.stub, data, no_cache=no_cache)
    assert {s: counted(s) - before[s] for s in before} == {"miss": 1, "hit_l1": 2, "bypass": 1}


async def test_new_env_args_or_config_is_a_new_key_and_a_split_route_is_not_cached(chain: Chain) -> None:
    v1 = await published(chain)
    await route(chain, 2, target(v1))
    assert (await invoke(chain.stub, b"same")).cache_status == MISS
    assert (await invoke(chain.stub, b"same")).cache_status == HIT_L1
    # New env values (a new env digest): a miss.
    await route(chain, 3, target(v1, env_digest="hmac-sha256:two"))
    assert (await invoke(chain.stub, b"same")).cache_status == MISS
    # New limits: a miss.
    changed = target(v1, env_digest="hmac-sha256:two")
    changed.limits.fuel = 10_000_000
    await route(chain, 4, changed)
    assert (await invoke(chain.stub, b"same")).cache_status == MISS
    assert (await invoke(chain.stub, b"same")).cache_status == HIT_L1
    # A release under analysis (roles), a target with no TTL, or one without an env digest: bypassed.
    await route(chain, 5, target(v1, role=routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE),
                target(v1, weight=0, role=routing_pb2.ROUTE_TARGET_ROLE_STABLE, env_digest="hmac-sha256:x"))
    assert (await invoke(chain.stub, b"same")).cache_status == BYPASS
    await route(chain, 6, target(v1, seconds=None))
    assert (await invoke(chain.stub, b"same")).cache_status == pb.CACHE_STATUS_UNSPECIFIED
    await route(chain, 7, target(v1, env_digest=""))
    assert (await invoke(chain.stub, b"same")).cache_status == BYPASS


async def test_failures_are_not_cached_and_entries_expire(chain: Chain) -> None:
    v1 = await published(chain)
    small = target(v1, seconds=0.2)
    small.limits.max_output_bytes = 16  # an echo of more fails (OUTPUT_TOO_LARGE)
    await route(chain, 2, small)
    before = await runs(chain)
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await invoke(chain.stub, b"x" * 64)
        info = error_info(caught.value)
        assert info is not None and info.reason != "", caught.value.details()
    assert await runs(chain) == before + 2  # both ran: the failure was not stored
    assert (await invoke(chain.stub, b"short")).cache_status == MISS
    assert (await invoke(chain.stub, b"short")).cache_status == HIT_L1
    await asyncio.sleep(0.4)  # past the TTL (0.2 s, jittered by at most 10%)
    assert (await invoke(chain.stub, b"short")).cache_status == MISS


async def test_two_gateways_share_l2_in_redis(start_service: Starter, tmp_path: Path, redis_url: str,
                                              redis_prefix: str) -> None:
    chain = await start_chain(start_service, tmp_path, cache_redis_url=redis_url, cache_redis_prefix=redis_prefix)
    other = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address=f"127.0.0.1:{chain.dispatcher.port}",
        registry_address=f"127.0.0.1:{chain.registry.port}", deployer_address=f"127.0.0.1:{chain.deployer.port}",
        grace_seconds=0.5, cache_redis_url=redis_url, cache_redis_prefix=redis_prefix)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as ch:
            second = gateway_grpc.GatewayServiceStub(ch)
            await route(chain, 2, target(await published(chain)))
            before = await runs(chain)
            first = await invoke(chain.stub, b'{"shared": true}')
            assert first.cache_status == MISS
            shared = await invoke(second, b'{"shared": true}')
            assert shared.cache_status == HIT_L2 and shared.output == first.output
            assert (await invoke(second, b'{"shared": true}')).cache_status == HIT_L1
            assert await runs(chain) == before + 1
            # What is in Redis is under the prefix, with an expiry.
            import redis.asyncio as aioredis
            client = aioredis.Redis.from_url(redis_url)
            try:
                keys = [k async for k in client.scan_iter(match=f"{redis_prefix}v:*")]
                assert len(keys) == 1 and 0 < await client.pttl(keys[0]) <= 66_000
            finally:
                await client.aclose()
    finally:
        await chain.channel.close()


async def test_redis_down_degrades_to_l1(start_service: Starter, tmp_path: Path) -> None:
    chain = await start_chain(start_service, tmp_path, cache_redis_url="redis://127.0.0.1:1/0")
    try:
        await route(chain, 2, target(await published(chain)))
        assert (await invoke(chain.stub, b"down")).cache_status == MISS
        assert (await invoke(chain.stub, b"down")).cache_status == HIT_L1
    finally:
        await chain.channel.close()


# The parts on their own.


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_l1_is_bounded_by_bytes_least_recently_used_first_and_expires() -> None:
    clock = Clock()
    l1 = L1(1000, clock)
    for name in "abcd":
        l1.put(name, name.encode() * 200, ttl=10)
    assert len(l1) == 4 and l1.bytes == 804
    assert l1.get("a") is not None  # a is now the most recently used
    l1.put("e", b"e" * 200, ttl=10)
    assert l1.get("b") is None and l1.get("a") is not None and l1.bytes <= 1000
    l1.put("huge", b"h" * 600, ttl=10)  # more than a quarter of the cache: not kept
    assert l1.get("huge") is None
    clock.now = 10.0
    assert l1.get("a") is None and l1.get("e") is None


async def test_concurrent_misses_run_once_and_errors_are_shared_not_stored() -> None:
    cache = ResultCache(1 << 20, rng=random.Random(1))
    plan = cache.plan("com.example.x", (target(_Version(), seconds=60),), b"in", no_cache=False)
    assert plan is not None
    calls = 0
    gate = asyncio.Event()

    async def run() -> dispatcher_pb.DispatchResponse:
        nonlocal calls
        calls += 1
        await gate.wait()
        return dispatcher_pb.DispatchResponse(output=b"out", version="1.0.0")

    waiting = [asyncio.ensure_future(cache.fetch(plan, run)) for _ in range(10)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*waiting)
    assert calls == 1 and {r.output for r, _ in results} == {b"out"}
    assert {s for _, s in results} == {MISS}
    assert (await cache.fetch(plan, run))[1] == HIT_L1 and calls == 1

    other = cache.plan("com.example.x", (target(_Version(), seconds=60),), b"fails", no_cache=False)
    assert other is not None

    async def fail() -> dispatcher_pb.DispatchResponse:
        nonlocal calls
        calls += 1
        raise RuntimeError("skill failed")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            await cache.fetch(other, fail)
    assert calls == 3
    # A result of another version than the key names (the route changed meanwhile) is not stored.
    stale = cache.plan("com.example.x", (target(_Version(), seconds=60),), b"moved", no_cache=False)
    assert stale is not None

    async def moved() -> dispatcher_pb.DispatchResponse:
        return dispatcher_pb.DispatchResponse(output=b"new", version="2.0.0")

    assert (await cache.fetch(stale, moved))[1] == MISS
    assert (await cache.fetch(stale, moved))[1] == MISS


def test_ttls_are_jittered_within_ten_percent() -> None:
    cache = ResultCache(1 << 20, rng=random.Random(7))
    ttls = {cache._jittered(60.0) for _ in range(200)}
    assert len(ttls) > 100 and min(ttls) >= 54.0 and max(ttls) <= 66.0


class _Version:
    """Enough of a SkillVersion for target()."""

    version = "1.0.0"
    digest = "sha256:" + hashlib.sha256(b"m").hexdigest()
    manifest = type("M", (), {"limits": routing_pb2.RouteTarget().limits})()


# Manifests.


def cached_skill(tmp_path: Path, ttl_text: str) -> Path:
    """The echo-memory example with `[cache] ttl = ttl_text`."""
    directory = tmp_path / f"echo-{hashlib.sha256(ttl_text.encode()).hexdigest()[:8]}"
    shutil.copytree(ECHO, directory)
    toml = (directory / "skill.toml").read_text()
    (directory / "skill.toml").write_text(toml.replace("[limits]", f'[cache]\nttl = "{ttl_text}"\n\n[limits]', 1))
    return directory


@pytest.mark.parametrize(("text", "seconds"), [("60s", 60), ("5m", 300), ("1.5h", 5400), ("1s", 1), ("24h", 86400)])
def test_manifest_cache_ttl_is_parsed(tmp_path: Path, text: str, seconds: int) -> None:
    package = manifest.load(cached_skill(tmp_path, text))
    assert package.manifest.cache_ttl.ToMilliseconds() == seconds * 1000


@pytest.mark.parametrize(("text", "problem"), [("500ms", "out of range"), ("25h", "out of range"),
                                               ("0s", "out of range"), ("soon", "not a duration"),
                                               ("60", "not a duration")])
def test_manifest_cache_ttl_out_of_range_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(manifest.ManifestError, match=problem):
        manifest.load(cached_skill(tmp_path, text))


async def test_registry_refuses_a_cache_ttl_out_of_range(start_service: Starter, tmp_path: Path) -> None:
    from services.registry.server import build_server as build_registry
    from services.registry.settings import Settings as RegistrySettings

    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", shutdown_grace_seconds=0.5)))
    package = manifest.load(cached_skill(tmp_path, "60s"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as ch:
        stub = registry_grpc.RegistryServiceStub(ch)
        for bad in (ttl(0.5), ttl(86_401), duration_pb2.Duration(seconds=-5)):
            package.manifest.cache_ttl.CopyFrom(bad)

            async def stream() -> AsyncIterator[registry_pb.PublishSkillRequest]:
                yield registry_pb.PublishSkillRequest(metadata=registry_pb.PublishSkillMetadata(
                    manifest=package.manifest, sha256=hashlib.sha256(package.module).hexdigest(),
                    size_bytes=len(package.module)))
                yield registry_pb.PublishSkillRequest(chunk=package.module)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.PublishSkill(stream(), timeout=10)
            info = error_info(caught.value)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info is not None and info.reason == "INVALID_MANIFEST", caught.value.details()
            assert "cache TTL" in (caught.value.details() or "")


async def test_a_miss_on_one_gateway_holds_back_the_same_miss_on_another(redis_url: str, redis_prefix: str) -> None:
    """The Redis lock: while one gateway runs a call, another gateway's identical miss waits for its result."""
    first, second = (ResultCache(1 << 20, redis_url, redis_prefix) for _ in range(2))
    try:
        plan = first.plan("com.example.x", (target(_Version(), seconds=60),), b"in", no_cache=False)
        assert plan is not None
        calls = 0
        gate = asyncio.Event()

        async def run() -> dispatcher_pb.DispatchResponse:
            nonlocal calls
            calls += 1
            await gate.wait()
            return dispatcher_pb.DispatchResponse(output=b"out", version="1.0.0")

        leading = asyncio.ensure_future(first.fetch(plan, run))
        await eventually(lambda: _true(calls == 1))
        following = asyncio.ensure_future(second.fetch(plan, run))
        await asyncio.sleep(0.1)
        assert not following.done()
        gate.set()
        assert (await leading)[1] == MISS
        result, status = await following
        assert status == HIT_L2 and result.output == b"out" and calls == 1
    finally:
        await first.close()
        await second.close()


async def _true(value: bool) -> bool:
    return value


async def test_an_l1_entry_presents_its_result_once_and_counts_what_it_keeps() -> None:
    cache = ResultCache(1 << 20, rng=random.Random(1))
    routed = (target(_Version(), seconds=60),)
    plan = cache.plan("com.example.x", routed, b"in", no_cache=False)
    assert plan is not None and cache.plan("com.example.x", routed, b"in", no_cache=False) == plan
    presented: list[tuple[bytes, int]] = []

    def present(result: dispatcher_pb.DispatchResponse, status: int) -> dispatcher_pb.DispatchResponse:
        presented.append((result.output, status))
        return dispatcher_pb.DispatchResponse(output=result.output.upper(), version=result.version)

    async def run() -> dispatcher_pb.DispatchResponse:
        return dispatcher_pb.DispatchResponse(output=b"out", version="1.0.0")

    missed = await cache.fetch(plan, run, present=present)
    stored = cache.l1.bytes
    first = await cache.fetch(plan, run, present=present)
    second = await cache.fetch(plan, run, present=present)
    # The miss and the first hit are presented; later hits get the first hit's object, parsing nothing.
    assert presented == [(b"out", MISS), (b"out", HIT_L1)] and missed.output == first.output == b"OUT"
    assert second is first and cache.stats["hit_l1"] == 2
    assert cache.l1.bytes == stored + first.ByteSize()
    cache.l1.put(plan.key, b"newer", ttl=60)  # replaced: its size and presentation go with the old entry
    assert cache.l1.bytes == len(b"newer") + len(plan.key) and cache.l1.lookup(plan.key).shown is None
