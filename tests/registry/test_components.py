"""Publishing component-v1 skills through the real registry: the component's world is verified at publish.

Needs the `ABI_COMPONENT_V1` enum value in protos/ (a manifest cannot declare the ABI without it): skipped,
saying so, until then. The checks themselves are also tested without the enum, against the verifier, in
tests/executor/test_components.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.runtime.components import NOT_A_COMPONENT
from tests.executor.test_components import ECHO, bare
from tests.registry.support import MODULE, Client, check_error, chunks, metadata, still_serving, violations

pytestmark = [
    pytest.mark.skipif(not hasattr(skill_pb2, "ABI_COMPONENT_V1"),
                       reason="protos/ has no ABI_COMPONENT_V1 yet: a manifest cannot declare component-v1"),
    pytest.mark.timeout(600),  # verifying the Python example compiles it: 7-30 s on a busy 2-core machine
]
HELLO = Path(__file__).resolve().parents[2] / "examples" / "skills" / "hello-python" / "hello.wasm"


def component_abi() -> Any:
    return getattr(skill_pb2, "ABI_COMPONENT_V1", 0)


async def publish(stub: Any, data: bytes, abi: Any, name: str = "com.example.hello-python",
                  timeout: float = 300) -> pb.PublishSkillResponse:
    async def stream() -> AsyncIterator[pb.PublishSkillRequest]:
        yield metadata(data, name=name, abi=abi)
        for chunk in chunks(data, 1024 * 1024):
            yield chunk

    response: pb.PublishSkillResponse = await stub.PublishSkill(stream(), timeout=timeout)
    return response


async def test_the_python_example_publishes(registry: Client) -> None:
    response = await publish(registry.stub, HELLO.read_bytes(), component_abi())
    assert response.created and response.skill_version.state == release_pb2.RELEASE_STATE_READY
    assert response.skill_version.manifest.abi == component_abi()


@pytest.mark.parametrize(("data", "abi", "problem"), [
    (MODULE, "component", NOT_A_COMPONENT),
    (ECHO, skill_pb2.ABI_WASI_COMMAND_V1, 'the file is a WebAssembly component, not a core module: declare abi = '
                                          '"component-v1"'),
    (bare(""), "component", "the component does not export `run`"),
    (bare('(import "wasi:http/outgoing-handler@0.2.0" (instance))'), "component",
     "imports `wasi:http/outgoing-handler@0.2.0`, which a skill may not use"),
], ids=["core-module-as-component", "component-as-wasi-command", "no-run", "wasi-http"])
async def test_components_outside_the_world_are_refused(registry: Client, data: bytes, abi: Any,
                                                        problem: str) -> None:
    declared = component_abi() if abi == "component" else abi
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(registry.stub, data, declared, name="com.acme.widget", timeout=60)
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert problem in (caught.value.details() or "")
    assert "module" in violations(caught.value)
    await still_serving(registry.stub)
    assert (await publish(registry.stub, ECHO, component_abi(), name="com.acme.widget", timeout=60)).created
