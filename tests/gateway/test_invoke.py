"""InvokeSkill through a real gateway → dispatcher → executor: what counts as JSON output, and calls with no
input."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as pb

from services.runtime.errors import bad_request
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
