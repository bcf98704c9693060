"""Run-time dependencies through the executor's gRPC API: a skill calling a function of its dependency
package, linked per call with the pinned resolution; link failures are FAILED_PRECONDITION
DEPENDENCY_LINK_FAILED; limits cover dependency code too."""

from __future__ import annotations

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.runtime.errors import error_info
from tests.conftest import wat
from tests.executor.conftest import Executor, limits
from tests.executor.fixtures import ECHO, command

# Library: `shout(ptr, len)` is not possible across memories, so the library works on scalars: `upper(c)`
# maps one ASCII byte to upper case. `spin` never returns (limits must cover dependency code).
LIB = wat("""(module
  (func (export "upper") (param i32) (result i32)
    (if (result i32) (i32.and (i32.ge_u (local.get 0) (i32.const 97)) (i32.le_u (local.get 0) (i32.const 122)))
      (then (i32.sub (local.get 0) (i32.const 32))) (else (local.get 0))))
  (func (export "spin") (loop $l (br $l))))""")

# Reads stdin, upper-cases each byte through the dependency, writes it back.
SHOUT = command(imports='(import "org.text" "upper" (func $upper (param i32) (result i32)))', body="""
  (i32.store (i32.const 0) (i32.const 1024))
  (i32.store (i32.const 4) (i32.const 4096))
  (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
  (local.set $n (i32.load (i32.const 8)))
  (block $done (loop $next
    (br_if $done (i32.eqz (local.get $n)))
    (local.set $n (i32.sub (local.get $n) (i32.const 1)))
    (i32.store8 (i32.add (i32.const 1024) (local.get $n))
      (call $upper (i32.load8_u (i32.add (i32.const 1024) (local.get $n)))))
    (br $next)))
  (i32.store (i32.const 4) (i32.load (i32.const 8)))
  (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
""")

SPINS = command(imports='(import "org.text" "spin" (func $spin))', body="(call $spin)")


def dep(digest: str, *, package: str = "org.text", version: str = "1.0.0") -> skill_pb2.ResolvedDependency:
    return skill_pb2.ResolvedDependency(package=package, version=version, digest=digest, is_shared=False,
                                        required_by=["(root)"])


async def test_a_skill_calls_its_dependency(executor: Executor) -> None:
    lib = executor.source.add(LIB)
    digest = executor.source.add(SHOUT)
    response = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"hello, deps!",
                                                             dependencies=[dep(lib)]), timeout=10)
    assert response.output == b"HELLO, DEPS!"
    # Linked once, then served from the cache: the dependency is fetched only once.
    again = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"abc", dependencies=[dep(lib)]),
                                        timeout=10)
    assert again.output == b"ABC"
    assert executor.source.fetches[lib] == 1


async def test_load_skill_links_and_smoke_tests_with_dependencies(executor: Executor) -> None:
    lib = executor.source.add(LIB)
    digest = executor.source.add(SHOUT)
    await executor.stub.LoadSkill(pb.LoadSkillRequest(
        digest=digest, dependencies=[dep(lib)],
        examples=[skill_pb2.SmokeExample(input=b"ok", expected_output=b"OK")]), timeout=10)


async def link_failure(executor: Executor, request: pb.ExecuteRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor.stub.Execute(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    info = error_info(err.value)
    assert info is not None and info.reason == "DEPENDENCY_LINK_FAILED"
    # The executor still serves a good call afterwards.
    echo = executor.source.add(ECHO)
    assert (await executor.stub.Execute(pb.ExecuteRequest(digest=echo, input=b"x"), timeout=10)).output == b"ok:x"
    return err.value.details() or ""


async def test_a_call_without_the_resolution_is_refused(executor: Executor) -> None:
    digest = executor.source.add(SHOUT)
    details = await link_failure(executor, pb.ExecuteRequest(digest=digest, input=b"x"))
    assert "imports from org.text, but the call carries no dependency resolution" in details


async def test_a_dependency_without_the_function_is_refused(executor: Executor) -> None:
    other = executor.source.add(wat('(module (func (export "lower") (param i32) (result i32) (local.get 0)))'))
    digest = executor.source.add(SHOUT)
    details = await link_failure(executor, pb.ExecuteRequest(digest=digest, input=b"x", dependencies=[dep(other)]))
    assert "imports `org.text.upper`, which org.text@1.0.0 does not export" in details


async def test_a_dependency_that_is_not_wasm_is_refused(executor: Executor) -> None:
    garbage = executor.source.add(b"\0asm\x01\0\0\0garbage")
    digest = executor.source.add(SHOUT)
    details = await link_failure(executor, pb.ExecuteRequest(digest=digest, input=b"x",
                                                             dependencies=[dep(garbage)]))
    assert "does not compile" in details


async def test_a_dependency_missing_from_the_registry_is_not_found(executor: Executor) -> None:
    digest = executor.source.add(SHOUT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"x",
                                                      dependencies=[dep("sha256:" + "0" * 64)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_wall_clock_limit_covers_dependency_code(executor: Executor) -> None:
    lib = executor.source.add(LIB)
    digest = executor.source.add(SPINS)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor.stub.Execute(pb.ExecuteRequest(digest=digest, dependencies=[dep(lib)],
                                                      limits=limits(timeout_ms=200)), timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = error_info(err.value)
    assert info is not None and info.reason == "SKILL_TIMEOUT"
