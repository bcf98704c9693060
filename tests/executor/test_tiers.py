"""Fuel (deterministic CPU budgets) and the warm tier (precompiled artifacts on disk)."""

from __future__ import annotations

import struct

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.executor.artifacts import ArtifactCache, engine_fingerprint
from services.executor.modules import ModuleLoader
from services.executor.sandbox import RunLimits, Sandbox, Verdict
from services.runtime.errors import error_info
from tests.executor import fixtures as f
from tests.executor.conftest import Executor, MemorySource


def count(n: int) -> bytes:
    return struct.pack("<I", n)


def fuel(units: int) -> skill_pb2.Limits:
    return skill_pb2.Limits(fuel=units)


async def test_fuel_is_metered_and_deterministic(executor: Executor) -> None:
    digest = executor.source.add(f.COUNTDOWN)
    used = set()
    for _ in range(3):
        response = await executor.stub.Execute(
            pb.ExecuteRequest(digest=digest, input=count(10_000), limits=fuel(10_000_000)), timeout=5)
        assert response.output == b"done"
        used.add(response.usage.fuel_consumed)
    assert len(used) == 1
    once = used.pop()
    assert 10_000 < once < 1_000_000
    # Twice the work, about twice the fuel.
    response = await executor.stub.Execute(
        pb.ExecuteRequest(digest=digest, input=count(20_000), limits=fuel(10_000_000)), timeout=5)
    assert 1.8 * once < response.usage.fuel_consumed < 2.2 * once
    # Unmetered calls report no fuel.
    response = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=count(10)), timeout=5)
    assert (response.output, response.usage.fuel_consumed) == (b"done", 0)


async def test_fuel_exhausted_has_its_own_reason(executor: Executor) -> None:
    digest = executor.source.add(f.INFINITE_LOOP)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.Execute(pb.ExecuteRequest(digest=digest, limits=fuel(1_000_000)), timeout=5)
    info = error_info(caught.value)
    assert (caught.value.code(), info.reason, info.metadata["fuel"]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "FUEL_EXHAUSTED", "1000000")
    # The same module unmetered is stopped by the clock instead; the executor keeps serving.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.Execute(pb.ExecuteRequest(
            digest=digest, limits=skill_pb2.Limits(timeout=dict(nanos=100_000_000))), timeout=5)
    assert error_info(caught.value).reason == "SKILL_TIMEOUT"
    echo = executor.source.add(f.ECHO)
    assert (await executor.stub.Execute(pb.ExecuteRequest(digest=echo, input=b"x", limits=fuel(10**6)),
                                        timeout=5)).output == b"ok:x"


def test_sandbox_refuses_a_module_from_the_wrong_engine() -> None:
    sandbox = Sandbox()
    try:
        plain = sandbox.compile("d", f.ECHO)
        metered = sandbox.compile("d", f.ECHO, metered=True)
        limits = RunLimits(memory_bytes=1 << 20, timeout_seconds=1, max_output_bytes=100, max_stderr_bytes=100)
        with pytest.raises(ValueError):
            sandbox.run(plain, b"", RunLimits(**{**limits.__dict__, "fuel": 1000}))
        with pytest.raises(ValueError):
            sandbox.run(metered, b"", limits)
        result = sandbox.run(metered, b"hi", RunLimits(**{**limits.__dict__, "fuel": 10**6}))
        assert (result.verdict, result.output) == (Verdict.OK, b"ok:hi") and result.fuel_consumed > 0
    finally:
        sandbox.close()


async def test_restarted_executor_loads_from_disk_without_fetching(make_executor, tmp_path) -> None:
    source = MemorySource()
    data_dir = tmp_path / "shared"
    first = await make_executor(source=source, data_dir=data_dir)
    digest = source.add(f.ECHO)
    assert (await first.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"1"), timeout=5)).output == b"ok:1"
    metered = await first.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"m", limits=fuel(10**6)), timeout=5)
    assert source.fetches[digest] == 2  # one compile per engine
    await first.host.stop(grace=0.1)

    second = await make_executor(source=source, data_dir=data_dir)
    assert (await second.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"2"), timeout=5)).output == b"ok:2"
    again = await second.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"m", limits=fuel(10**6)), timeout=5)
    assert again.usage.fuel_consumed == metered.usage.fuel_consumed
    loaded = await second.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    assert loaded.already_loaded
    assert source.fetches[digest] == 2  # nothing fetched again


async def test_corrupt_or_foreign_artifacts_are_replaced(tmp_path) -> None:
    source = MemorySource()
    digest = source.add(f.ECHO)
    sandbox = Sandbox()
    try:
        loader = ModuleLoader(source, sandbox, 1 << 20, artifacts_dir=tmp_path)
        await loader.get(digest)
        path = loader.artifact_path(digest)
        assert path is not None and path.is_file()
        assert loader.tiers["cold"] == 1
        good = path.read_bytes()

        def reload() -> ModuleLoader:
            fresh = ModuleLoader(source, sandbox, 1 << 20, artifacts_dir=tmp_path)
            return fresh

        fresh = reload()
        await fresh.get(digest)
        assert (fresh.tiers["warm"], fresh.tiers["cold"]) == (1, 0)

        corruptions = [
            good[:len(good) // 2],  # truncated
            good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],  # one bit flipped
            b"",  # empty
            b"garbage" * 20,
        ]
        for bad in corruptions:
            path.write_bytes(bad)
            fresh = reload()
            compiled, _ = await fresh.get(digest)
            assert (fresh.tiers["warm"], fresh.tiers["cold"]) == (0, 1)
            result = sandbox.run(compiled, b"x", RunLimits(1 << 20, 1.0, 100, 100))
            assert result.output == b"ok:x"
            assert path.read_bytes() != bad  # rewritten from a good compile

        # An artifact with a valid checksum that wasmtime refuses (say, another engine's) is dropped too.
        other = Sandbox()
        try:
            foreign = ArtifactCache(tmp_path, "other").path(digest)
            ArtifactCache(tmp_path, "other").store(digest, other.compile(digest, f.ECHO, metered=True).module, 1)
            path.write_bytes(foreign.read_bytes())
        finally:
            other.close()
        fresh = reload()
        await fresh.get(digest)
        assert fresh.tiers["cold"] == 1
    finally:
        sandbox.close()


def test_artifact_key_covers_engine_settings_and_version() -> None:
    sandbox = Sandbox()
    try:
        plain, metered = sandbox.engine_settings(False), sandbox.engine_settings(True)
        assert engine_fingerprint(plain) != engine_fingerprint(metered)
        assert engine_fingerprint(plain) == engine_fingerprint(plain)
    finally:
        sandbox.close()


async def test_an_unusable_artifact_dir_only_costs_the_warm_tier(tmp_path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the artifact directory should be")
    source = MemorySource()
    digest = source.add(f.ECHO)
    sandbox = Sandbox()
    try:
        loader = ModuleLoader(source, sandbox, 1 << 20, artifacts_dir=tmp_path / "not-a-dir" / "artifacts")
        compiled, _ = await loader.get(digest)
        assert sandbox.run(compiled, b"x", RunLimits(1 << 20, 1.0, 100, 100)).output == b"ok:x"
        again = ModuleLoader(source, sandbox, 1 << 20, artifacts_dir=tmp_path / "not-a-dir" / "artifacts")
        await again.get(digest)
        assert (again.tiers["warm"], again.tiers["cold"], source.fetches[digest]) == (0, 1, 2)
    finally:
        sandbox.close()
