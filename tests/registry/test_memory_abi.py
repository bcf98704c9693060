"""Publishing memory-v1 skills: the registry checks the module against the ABI the manifest declares."""

from __future__ import annotations

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2

from tests.registry.support import MODULE, Client, check_error, publish, still_serving, violations, wasm

S = release_pb2.ReleaseState
_ALLOC = '(func (export "clawhub_alloc") (param i32) (result i32) (i32.const 1024))'
_RUN = '(func (export "clawhub_run") (param i32 i32) (result i64) (i64.const 0))'
ECHO = wasm(f'(module (memory (export "memory") 1) {_ALLOC} {_RUN})')


async def test_a_memory_v1_module_publishes(registry: Client) -> None:
    response = await publish(registry.stub, ECHO, abi=skill_pb2.ABI_MEMORY_V1)
    assert response.created and response.skill_version.state == S.RELEASE_STATE_READY
    assert response.skill_version.manifest.abi == skill_pb2.ABI_MEMORY_V1


@pytest.mark.parametrize(("data", "abi", "problem"), [
    (wasm(f'(module (memory (export "memory") 1) {_ALLOC})'), skill_pb2.ABI_MEMORY_V1,
     "the module does not export `clawhub_run`"),
    (MODULE, skill_pb2.ABI_MEMORY_V1, 'it is a WASI command, so declare abi = "wasi-command-v1"'),
    (ECHO, skill_pb2.ABI_WASI_COMMAND_V1,
     'implements the memory-v1 ABI, not wasi-command-v1: declare abi = "memory-v1"'),
    (wasm(f'(module (memory (export "memory") 1) {_RUN})'), skill_pb2.ABI_MEMORY_V1,
     "the module does not export `clawhub_alloc`"),
], ids=["no-clawhub-run", "wasi-command-declared-memory", "memory-declared-wasi-command", "no-alloc"])
async def test_abi_mismatches_fail_verification(registry: Client, data: bytes, abi: skill_pb2.Abi.ValueType,
                                                problem: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, data, abi=abi)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert problem in (caught.value.details() or "")
    assert "module" in violations(caught.value)
    await still_serving(registry.stub)
    # The same version with a module that matches the declared ABI goes through.
    good = ECHO if abi == skill_pb2.ABI_MEMORY_V1 else MODULE
    assert (await publish(registry.stub, good, abi=abi)).created
