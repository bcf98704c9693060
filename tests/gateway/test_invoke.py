"""InvokeSkill through a real gateway → dispatcher → executor: what counts as JSON output, and calls with no
input."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.runtime.errors import bad_request, error_info
from tests.conftest import Starter
from tests.gateway.support import ECHO_SKILL, ROOT, Chain, start_chain


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path)
    yield chain
    await chain.channel.close()


@pytest.mark.parametrize("printed", [b"NaN", b"-Infinity", b"Infinity", b"1e999", b"[1, -1e400]",
                                     b'{"n": NaN}', b"1" + b"0" * 400])
async def test_output_python_reads_as_json_but_json_is_not_comes_back_raw(chain: Chain, printed: bytes) -> None:
    """Python's json module reads these (NaN, infinities, numbers beyond a double); JSON has no such values, and
    a client would get a Value no JSON printer can write. The echo skill prints its input unchanged."""
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=printed), timeout=10)
    assert not response.HasField("output")
    assert response.raw_output == printed


async def test_finite_json_output_is_still_json(chain: Chain) -> None:
    response = await chain.stub.InvokeSkill(
        pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b'{"big": 1e308, "small": -2.5e-300, "n": 3}'), timeout=10)
    assert response.HasField("output")
    fields = response.output.struct_value.fields
    assert fields["big"].number_value == 1e308 and fields["n"].number_value == 3


async def test_no_input_runs_the_skill_with_empty_stdin(chain: Chain) -> None:
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL), timeout=10)
    assert response.raw_output == b"" and not response.HasField("output")
    assert response.version == "1.0.0"


def test_the_contract_says_what_no_input_does() -> None:
    """The proto once listed "no input" among InvokeSkill's INVALID_ARGUMENT cases while the gateway ran the
    skill with empty stdin; the comment now says what the gateway does."""
    proto = (ROOT / "protos" / "clawhub" / "gateway" / "v1" / "gateway_service.proto").read_text()
    rpc_comment = proto[:proto.index("rpc InvokeSkill")].rsplit("{", 1)[1]
    refused = re.search(r"INVALID_ARGUMENT \(([^)]*)\)", rpc_comment)
    assert refused is not None and "no input" not in refused.group(1)
    assert re.search(r"neither `input` nor `raw_input` runs the skill\s+// with empty stdin", rpc_comment)


async def test_request_id_is_an_id_not_a_payload(chain: Chain) -> None:
    """Every hop logs request_id: a megabyte of it would be a megabyte per log line on each."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, request_id="r" * 1_000_000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = bad_request(caught.value)
    assert request is not None and request.field_violations[0].field == "request_id"
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, request_id="r" * 128), timeout=10)
    assert response.version == "1.0.0"


async def test_an_unknown_skill_name_suggests_close_names(chain: Chain) -> None:
    # A typo of the deployed skill: the dispatcher (routed names) and the registry (published names) suggest it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name="com.example.echo-memroy"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info is not None and info.reason == "SKILL_NOT_FOUND"
    assert dict(info.metadata) == {"skill": "com.example.echo-memroy", "did_you_mean": ECHO_SKILL}
    assert caught.value.details() == (
        f"no skill named 'com.example.echo-memroy' is published (did you mean {ECHO_SKILL}?)")
    # Nothing close: no suggestion and no empty `did_you_mean`.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name="org.unrelated.thing"), timeout=10)
    info = error_info(caught.value)
    assert info is not None and dict(info.metadata) == {"skill": "org.unrelated.thing"}
    assert "did you mean" not in (caught.value.details() or "")


async def test_a_published_skill_without_a_ready_version_shows_no_empty_value(chain: Chain) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.registry.port}") as channel:
        registry = registry_grpc.RegistryServiceStub(channel)
        garbage = b"not a module"
        manifest = skill_pb2.Manifest(name="com.example.broken", version="1.0.0", abi=skill_pb2.ABI_WASI_COMMAND_V1)

        async def stream() -> AsyncIterator[registry_pb.PublishSkillRequest]:
            yield registry_pb.PublishSkillRequest(metadata=registry_pb.PublishSkillMetadata(
                manifest=manifest, sha256=hashlib.sha256(garbage).hexdigest(), size_bytes=len(garbage)))
            yield registry_pb.PublishSkillRequest(chunk=garbage)

        with pytest.raises(grpc.aio.AioRpcError):  # fails verification: published, but never Ready
            await registry.PublishSkill(stream(), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name="com.example.broken"), timeout=10)
    info = error_info(caught.value)
    assert info is not None and info.reason == "SKILL_NOT_DEPLOYED"
    # No `latest_version: ` with nothing after it, in the metadata or the message.
    assert dict(info.metadata) == {"skill": "com.example.broken"}
    assert caught.value.details() == ("skill 'com.example.broken' is published but not deployed; it has no Ready "
                                      "version to deploy yet (publish one that passes verification)")
