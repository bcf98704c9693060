"""Publish-time verification of run-time dependencies: a module importing functions from a package must
declare it, and the version its dependencies resolve to must export those functions with those types."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from tests.registry.support import Client, check_error, chunks, publish_raw, still_serving, wasm

LIB = wasm('(module (func (export "add1") (param i32) (result i32) (i32.add (local.get 0) (i32.const 1))))')
LIB_V2 = wasm('(module (func (export "add1") (param i64) (result i64) (i64.add (local.get 0) (i64.const 1))))')
USER = wasm("""(module (import "org.math" "add1" (func (param i32) (result i32)))
  (memory (export "memory") 1) (func (export "_start")))""")


def request(data: bytes, name: str, version: str, *, abi: Any = skill_pb2.ABI_WASI_COMMAND_V1,
            deps: tuple[tuple[str, str], ...] = ()) -> list[pb.PublishSkillRequest]:
    manifest = skill_pb2.Manifest(name=name, version=version, abi=abi, dependencies=[
        skill_pb2.Dependency(package=p, version_range=r) for p, r in deps])
    return [pb.PublishSkillRequest(metadata=pb.PublishSkillMetadata(
        manifest=manifest, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))), *chunks(data, 65536)]


async def test_a_library_is_published_and_a_skill_linking_it_passes(registry: Client) -> None:
    lib = await publish_raw(registry.stub, request(LIB, "org.math", "1.0.0", abi=skill_pb2.ABI_LIBRARY_V1))
    assert lib.skill_version.state == release_pb2.RELEASE_STATE_READY
    user = await publish_raw(registry.stub, request(USER, "org.user", "1.0.0", deps=(("org.math", "^1.0.0"),)))
    assert user.created


async def test_an_import_from_an_undeclared_package_fails_verification(registry: Client) -> None:
    await publish_raw(registry.stub, request(LIB, "org.math", "1.0.0", abi=skill_pb2.ABI_LIBRARY_V1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await publish_raw(registry.stub, request(USER, "org.user", "1.0.0"))
    check_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert "imports `org.math.add1`, which no declared capability provides" in (err.value.details() or "")
    await still_serving(registry.stub)


async def test_an_export_of_another_type_fails_verification(registry: Client) -> None:
    await publish_raw(registry.stub, request(LIB_V2, "org.math", "2.0.0", abi=skill_pb2.ABI_LIBRARY_V1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await publish_raw(registry.stub, request(USER, "org.user", "1.0.0", deps=(("org.math", "^2.0.0"),)))
    check_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert ("org.user@1.0.0 imports `org.math.add1` as func (i32) -> (i32), but org.math@2.0.0 exports it as "
            "func (i64) -> (i64)") in (err.value.details() or "")
    # The same skill against the compatible major line passes.
    await publish_raw(registry.stub, request(LIB, "org.math", "1.0.0", abi=skill_pb2.ABI_LIBRARY_V1))
    await publish_raw(registry.stub, request(USER, "org.user", "1.0.1", deps=(("org.math", "^1.0.0"),)))


async def test_unresolvable_dependencies_of_an_importing_module_fail_verification(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await publish_raw(registry.stub, request(USER, "org.user", "1.0.0", deps=(("org.math", "^1.0.0"),)))
    check_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert "they do not resolve" in (err.value.details() or "")
    await still_serving(registry.stub)


async def test_a_library_must_export_a_function(registry: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await publish_raw(registry.stub, request(wasm("(module)"), "org.empty", "1.0.0",
                                                 abi=skill_pb2.ABI_LIBRARY_V1))
    check_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert "a library must export at least one function" in (err.value.details() or "")


async def test_a_library_may_not_import_wasi(registry: Client) -> None:
    leaky = wasm('(module (import "wasi_snapshot_preview1" "environ_get" (func (param i32 i32) (result i32)))'
                 ' (func (export "add1") (param i32) (result i32) (local.get 0)))')
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await publish_raw(registry.stub, request(leaky, "org.leaky", "1.0.0", abi=skill_pb2.ABI_LIBRARY_V1))
    check_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert "a library may not import `wasi_snapshot_preview1.environ_get`" in (err.value.details() or "")
