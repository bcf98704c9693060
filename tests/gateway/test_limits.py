"""Message size limits: an oversized message is refused by gRPC before it is buffered (the gateway's memory
does not grow by it), and messages just under each limit still work end to end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.gateway.settings import Settings as GatewaySettings
from services.runtime.channels import ENVELOPE_BYTES, MAX_CHUNK_BYTES
from services.runtime.errors import Reason, error_info
from tests.conftest import Starter
from tests.gateway.support import ECHO_SKILL, Chain, start_chain
from tests.registry.support import metadata, module

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
MAX_INPUT = GatewaySettings().max_input_bytes


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def gateway_process() -> AsyncIterator[tuple[str, int]]:
    """`python -m services.gateway` on a free port (nothing behind it: the refusal happens before any call)."""
    env = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off",
           "CLAWHUB_GATEWAY_HOST": "127.0.0.1", "CLAWHUB_GATEWAY_PORT": "0",
           "CLAWHUB_SHUTDOWN_GRACE": "0.2", "CLAWHUB_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("clawhub gateway listening on "), line
        yield line.rsplit(" ", 1)[1].strip(), process.pid
    finally:
        process.terminate()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
async def test_oversized_requests_are_refused_before_they_are_buffered(gateway_process: tuple[str, int]) -> None:
    address, pid = gateway_process
    size = 32 * MiB
    request = pb.InvokeSkillRequest(name="com.example.big", raw_input=b"x" * size).SerializeToString()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/clawhub.gateway.v1.GatewayService/InvokeSkill")
        with pytest.raises(grpc.aio.AioRpcError):  # warm up: nothing is deployed behind this gateway
            await call(pb.InvokeSkillRequest(name="com.example.big").SerializeToString(), timeout=5)
        before = peak_rss_mib(pid)
        started = time.monotonic()

        async def send() -> grpc.StatusCode:
            try:
                await call(request, timeout=30)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(send() for _ in range(4)))
        elapsed = time.monotonic() - started
    grown = peak_rss_mib(pid) - before
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
    # 128 MiB were sent; the gateway's peak memory grew by far less than even one of the requests.
    assert grown < size / MiB / 2, f"peak RSS grew by {grown:.0f} MiB"
    assert elapsed < 10, elapsed


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path)
    yield chain
    await chain.channel.close()


async def test_inputs_at_the_limits(chain: Chain) -> None:
    # Just under the limit: the input crosses gateway, dispatcher and executor, and comes back.
    data = bytes(range(256)) * (MAX_INPUT // 256)
    assert len(data) == MAX_INPUT
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=data), timeout=30)
    assert response.raw_output == data
    # One byte over the input limit: the gateway's own check, with details.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=data + b"x"), timeout=30)
    info = error_info(caught.value)
    assert info is not None and info.reason == Reason.INPUT_TOO_LARGE
    # Over the message limit: gRPC refuses it before the gateway reads it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chain.stub.InvokeSkill(pb.InvokeSkillRequest(
            name=ECHO_SKILL, raw_input=data + b"x" * (ENVELOPE_BYTES + 1)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_json_output_too_large_as_a_value_comes_back_raw(chain: Chain) -> None:
    """`[0,0,…]` is 2 bytes per element as JSON text and 11 as a protobuf Value: under the output limit as
    text, over the response limit as a Value. It comes back as raw_output rather than failing."""
    text = b"[" + b"0," * 399_999 + b"0]"
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=text), timeout=30)
    assert not response.HasField("output")
    assert response.raw_output == text
    # Small JSON is still JSON.
    response = await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, raw_input=b"[0,1]"), timeout=30)
    assert response.HasField("output") and len(response.output.list_value.values) == 2


async def test_publish_chunks_are_bounded(chain: Chain) -> None:
    data = module("y" * (2 * MiB), pages=40)

    async def publish(stub: registry_grpc.RegistryServiceStub, name: str,
                      chunk: int) -> registry_pb.PublishSkillResponse:
        async def stream() -> AsyncIterator[registry_pb.PublishSkillRequest]:
            yield metadata(data, name=name)
            for offset in range(0, len(data), chunk):
                yield registry_pb.PublishSkillRequest(chunk=data[offset:offset + chunk])

        response: registry_pb.PublishSkillResponse = await stub.PublishSkill(stream(), timeout=30)
        return response

    direct = grpc.aio.insecure_channel(f"127.0.0.1:{chain.registry.port}")
    try:
        for channel, name in ((direct, "com.acme.direct"), (chain.channel, "com.acme.relayed")):
            stub = registry_grpc.RegistryServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await publish(stub, name, 2 * MAX_CHUNK_BYTES)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
            if channel is chain.channel:
                info = error_info(caught.value)
                assert info is not None and info.reason == Reason.MESSAGE_TOO_LARGE
                assert "127.0.0.1" not in (caught.value.details() or "")
            # Chunks of the documented maximum go through.
            assert (await publish(stub, name, MAX_CHUNK_BYTES)).created
    finally:
        await direct.close()


async def test_publishes_cut_off_midway_leave_the_registry_working(chain: Chain) -> None:
    """gRPC refusing an oversized chunk cancels the registry's handler wherever it is, as a caller cancelling
    its call does. A handler cancelled while opening a database transaction used to leave the connection
    inside it: every later call failed INTERNAL until a restart."""
    data = module("ok")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.registry.port}") as channel:
        stub = registry_grpc.RegistryServiceStub(channel)
        for i in range(150):
            async def stalled(i: int = i) -> AsyncIterator[registry_pb.PublishSkillRequest]:
                yield metadata(data, name=f"com.acme.cut{i}")
                await asyncio.Event().wait()

            call = stub.PublishSkill(stalled(), timeout=10)
            await asyncio.sleep(0.0003 * (i % 20))  # cut off at different points of the handler
            call.cancel()

        async def whole() -> AsyncIterator[registry_pb.PublishSkillRequest]:
            yield metadata(data, name="com.acme.whole")
            yield registry_pb.PublishSkillRequest(chunk=data)

        assert (await stub.PublishSkill(whole(), timeout=10)).created
        found = await stub.GetSkill(registry_pb.GetSkillRequest(name="com.acme.whole"), timeout=5)
        assert found.skill.name == "com.acme.whole"
