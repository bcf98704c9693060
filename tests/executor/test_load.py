"""LoadSkill / UnloadSkill, per-digest health, single-flight loads, the hot cache, overload shedding."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.executor.modules import ModuleLoader
from services.executor.sandbox import Sandbox
from services.runtime.errors import error_info, status_of
from services.runtime.wasm import sha256_digest
from tests.executor import fixtures as f
from tests.executor.conftest import Executor, MemorySource, limits

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(ex: Executor, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(ex.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


async def test_load_then_execute_and_per_digest_health(executor: Executor) -> None:
    digest = executor.source.add(f.ECHO)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_of(executor, digest)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # never loaded: unknown to health

    first = await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    assert (first.digest, first.already_loaded) == (digest, False)
    assert await health_of(executor, digest) == SERVING
    assert await health_of(executor, "clawhub.executor.v1.ExecutorService") == SERVING
    second = await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    assert second.already_loaded is True

    response = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"hi"), timeout=5)
    assert response.output == b"ok:hi"
    assert executor.source.fetches[digest] == 1

    unloaded = await executor.stub.UnloadSkill(pb.UnloadSkillRequest(digest=digest), timeout=5)
    assert unloaded.was_loaded is True
    assert await health_of(executor, digest) == NOT_SERVING
    again = await executor.stub.UnloadSkill(pb.UnloadSkillRequest(digest=digest), timeout=5)
    assert again.was_loaded is False

    # Unloaded is not forbidden: the next call loads it again, from its precompiled artifact (warm).
    response = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"back"), timeout=5)
    assert response.output == b"ok:back"
    assert executor.source.fetches[digest] == 1


async def test_load_errors(executor: Executor) -> None:
    bad = executor.source.add(f.GARBAGE)
    cases = [
        ("sha256:nope", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DIGEST"),
        ("sha256:" + "1" * 64, grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND"),
        (bad, grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID"),
    ]
    for digest, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
        assert (caught.value.code(), error_info(caught.value).reason) == (code, reason)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.UnloadSkill(pb.UnloadSkillRequest(digest="bad"), timeout=5)
    assert error_info(caught.value).reason == "INVALID_DIGEST"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_of(executor, bad)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # a refused module is never SERVING


async def test_concurrent_loads_fetch_once(executor: Executor) -> None:
    executor.source.delay = 0.2
    digest = executor.source.add(f.ECHO)
    calls = [executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=str(i).encode()), timeout=5)
             for i in range(8)]
    calls += [executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5) for _ in range(4)]
    results = await asyncio.gather(*calls)
    assert [r.output for r in results[:8]] == [b"ok:" + str(i).encode() for i in range(8)]
    assert executor.source.fetches[digest] == 1


async def test_overload_is_shed_with_retry_info(make_executor) -> None:
    ex = await make_executor(threads=1, queue=1)
    digest = ex.source.add(f.INFINITE_LOOP)
    await ex.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    request = pb.ExecuteRequest(digest=digest, limits=limits(timeout_ms=300))
    outcomes = await asyncio.gather(*(ex.stub.Execute(request, timeout=5) for _ in range(6)),
                                    return_exceptions=True)
    assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)
    reasons = sorted(error_info(o).reason for o in outcomes)
    # One running plus one waiting were admitted (and timed out); the other four found the waiting bound
    # (queue=1) reached and were shed at once (tests/executor/test_scheduling.py covers waiting and deadlines).
    assert reasons == ["EXECUTOR_OVERLOADED"] * 4 + ["SKILL_TIMEOUT"] * 2
    shed = [o for o in outcomes if error_info(o).reason == "EXECUTOR_OVERLOADED"]
    assert {o.code() for o in shed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any(d.type_url.endswith("google.rpc.RetryInfo") for d in status_of(shed[0]).details)
    # Capacity comes back once the calls finish.
    echo = ex.source.add(f.ECHO)
    assert (await ex.stub.Execute(pb.ExecuteRequest(digest=echo, input=b"1"), timeout=5)).output == b"ok:1"


async def test_parallel_calls_use_several_threads(make_executor) -> None:
    # Four 300 ms loops on four threads finish in about 300 ms, not 1.2 s: wasm runs outside the GIL.
    ex = await make_executor(threads=4, queue=0)
    digest = ex.source.add(f.INFINITE_LOOP)
    await ex.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    request = pb.ExecuteRequest(digest=digest, limits=limits(timeout_ms=300))
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcomes = await asyncio.gather(*(ex.stub.Execute(request, timeout=5) for _ in range(4)),
                                    return_exceptions=True)
    elapsed = loop.time() - started
    assert [error_info(o).reason for o in outcomes] == ["SKILL_TIMEOUT"] * 4
    assert elapsed < 0.9


async def test_hot_cache_is_lru_bounded_by_module_bytes() -> None:
    source = MemorySource()
    modules = [f.ECHO, f.TRAP, f.EXIT_3]
    a, b, c = (source.add(m) for m in modules)
    sandbox = Sandbox()
    try:
        loader = ModuleLoader(source, sandbox, capacity_bytes=len(f.ECHO) + len(f.EXIT_3))
        assert (await loader.get(a))[1] is False
        assert (await loader.get(b))[1] is False
        assert (await loader.get(a))[1] is True  # a is now the most recently used
        await loader.get(c)  # over capacity: evicts b, the least recently used
        assert (loader.is_hot(a), loader.is_hot(b), loader.is_hot(c)) == (True, False, True)
        assert loader.hot_bytes == len(f.ECHO) + len(f.EXIT_3)
        assert (await loader.get(b))[1] is False
        assert source.fetches == {a: 1, b: 2, c: 1}

        # A module bigger than the whole cache still loads and stays until the next one.
        tiny = ModuleLoader(source, sandbox, capacity_bytes=10)
        await tiny.get(a)
        assert tiny.is_hot(a)
        await tiny.get(b)
        assert (tiny.is_hot(a), tiny.is_hot(b)) == (False, True)
        assert tiny.drop(b) is True
        assert tiny.hot_bytes == 0
    finally:
        sandbox.close()


async def test_compiled_module_digest_matches(executor: Executor) -> None:
    digest = executor.source.add(f.ECHO)
    assert digest == sha256_digest(f.ECHO)
    response = await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    assert response.digest == digest


async def test_shutdown_lets_running_calls_end_within_their_timeout(make_executor) -> None:
    ex = await make_executor()
    digest = ex.source.add(f.INFINITE_LOOP)
    await ex.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    call = asyncio.ensure_future(
        ex.stub.Execute(pb.ExecuteRequest(digest=digest, limits=limits(timeout_ms=400)), timeout=5))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await ex.host.stop(grace=0.1)
    # stop() returns once the running wasm call hit its wall-clock limit, not later and not hanging.
    assert loop.time() - started < 2.0
    with pytest.raises(grpc.aio.AioRpcError):
        await call


async def test_smoke_examples_gate_serving(executor: Executor) -> None:
    good = executor.source.add(f.ECHO)
    passing = [skill_pb2.SmokeExample(input=b"hi", expected_output=b"ok:hi"),
               skill_pb2.SmokeExample(input=b"", expected_output=b"ok:")]
    await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=good, examples=passing), timeout=5)
    assert await health_of(executor, good) == SERVING

    # A module whose output does not match its example: refused, and never SERVING.
    wrong_digest = executor.source.add(f.NO_OUTPUT)
    wrong = [skill_pb2.SmokeExample(input=b"hi", expected_output=b"HI")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=wrong_digest, examples=wrong), timeout=5)
    info = error_info(caught.value)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info is not None and info.reason == "SMOKE_TEST_FAILED"
    # Text in quotes, never a Python bytes repr (b'HI'), never an empty value.
    assert (info.metadata["example"], info.metadata["expected"], info.metadata["actual"]) == ("0", '"HI"', '""')
    assert caught.value.details() == 'smoke example 0 printed "" instead of "HI"'

    # Output that is not plain text: decoded (an invalid byte shows as U+FFFD), control characters escaped.
    echo = executor.source.add(f.ECHO)
    odd = [skill_pb2.SmokeExample(input="été\n\x1b".encode() + b"\xff", expected_output=b"x")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=echo, examples=odd), timeout=5)
    info = error_info(caught.value)
    assert info is not None and info.metadata["actual"] == '"ok:été\\n\\x1b\ufffd"'
    assert "b'" not in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError):
        await health_of(executor, wrong_digest)  # never reported SERVING

    trapping = executor.source.add(f.TRAP)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.LoadSkill(pb.LoadSkillRequest(
            digest=trapping, examples=[skill_pb2.SmokeExample(input=b"x", expected_output=b"x")]), timeout=5)
    info = error_info(caught.value)
    assert info is not None and (info.reason, info.metadata["cause"]) == ("SMOKE_TEST_FAILED", "SKILL_TRAPPED")
    # The executor keeps serving.
    assert (await executor.stub.Execute(pb.ExecuteRequest(digest=good, input=b"z"), timeout=5)).output == b"ok:z"
