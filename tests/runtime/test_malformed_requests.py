"""Bytes that are not the method's message: a clear INVALID_ARGUMENT / MALFORMED_REQUEST on every service and
through the gateway's relay, one log line (not a traceback) per request, few lines for a flood, and no
internal address in what the caller sees.

The attack: a generic `channel.unary_unary(path)` (no serializer) sends raw bytes of the attacker's choosing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from google.protobuf import struct_pb2

from services.deployer.server import build_server as build_deployer
from services.deployer.settings import Settings as DeployerSettings
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.runtime.errors import PROTOBUF_MAX_DEPTH, RateLimitedLog, Reason, error_info, malformed_request
from services.runtime.server import ServiceHost
from tests.conftest import Starter
from tests.gateway.support import Chain, assert_no_address, start_chain

CORRUPT = b"\xff\xff\xff\xff\xff\xff"
# Field 1 is a string in every request below; these bytes are not UTF-8.
BAD_UTF8 = b"\x0a\x02\xff\xfe"


def deep_invoke_request(levels: int) -> bytes:
    """An InvokeSkillRequest whose `input` nests `levels` lists (protobuf decodes 100 message levels)."""
    value = struct_pb2.Value()
    inner = value
    for _ in range(levels):
        inner = inner.list_value.values.add()
    inner.number_value = 1
    # Field 1 (name) and field 2 (input), encoded by hand: the generated serializer would refuse nothing, but
    # this keeps the request exactly what a hostile client sends.
    body = value.SerializeToString()
    return b"\x0a\x0ecom.example.xy" + b"\x12" + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[tuple[Chain, ServiceHost]]:
    """The invocation chain, plus a real deployer the gateway relays DeployerService to."""
    chain = await start_chain(start_service, tmp_path)
    deployer = await start_service(build_deployer(DeployerSettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "deployer", registry_address=f"127.0.0.1:{chain.registry.port}",
        executor_addresses=(f"127.0.0.1:{chain.executor.port}",), grace=0.2)))
    # The gateway under test relays to the real deployer (the chain's deployer only feeds routes).
    chain.gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address=f"127.0.0.1:{chain.dispatcher.port}",
        registry_address=f"127.0.0.1:{chain.registry.port}", deployer_address=f"127.0.0.1:{deployer.port}",
        grace_seconds=0.5)))
    yield chain, deployer
    await chain.channel.close()


async def send_raw(address: str, path: str, payload: bytes, *, stream: str = "") -> grpc.aio.AioRpcError:
    """Send `payload` as the request bytes of `path`; return the error it must end with."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            if stream == "client":
                async def messages() -> AsyncIterator[bytes]:
                    yield payload
                    yield payload

                await channel.stream_unary(path)(messages(), timeout=10)
            elif stream == "bidi":
                async def one() -> AsyncIterator[bytes]:
                    yield payload

                async for _ in channel.stream_stream(path)(one(), timeout=10):
                    pass
            else:
                await channel.unary_unary(path)(payload, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err
    raise AssertionError(f"{path} accepted bytes that are not its request message")


def assert_malformed(err: grpc.aio.AioRpcError, message_type: str, domain: str, addresses: list[str]) -> dict[str, str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    info = error_info(err)
    assert info is not None and info.reason == Reason.MALFORMED_REQUEST, err.details()
    assert info.domain == domain
    assert info.metadata["message_type"] == message_type
    assert message_type in (err.details() or "")
    assert_no_address(err, addresses)
    return dict(info.metadata)


def assert_one_log_line(caplog: pytest.LogCaptureFixture, path: str) -> None:
    """Exactly one line about the request, no traceback, nothing from gRPC's own logger."""
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert path in lines[0].getMessage() and "\n" not in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.name.startswith("grpc")], \
        [(r.name, r.getMessage()) for r in caplog.records]
    caplog.clear()


async def test_through_the_gateway(chain: tuple[Chain, ServiceHost], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c, deployer = chain
    internal = [*c.internal_addresses(), f"127.0.0.1:{deployer.port}"]
    invoke = "/clawhub.gateway.v1.GatewayService/InvokeSkill"
    for payload, problem in ((CORRUPT, "corrupt_wire_format"), (BAD_UTF8, "invalid_utf8")):
        err = await send_raw(c.address, invoke, payload)
        meta = assert_malformed(err, "clawhub.gateway.v1.InvokeSkillRequest", "gateway.clawhub", internal)
        assert meta["problem"] == problem
        assert_one_log_line(caplog, invoke)

    # A JSON input nested past protobuf's depth limit: the message says what the limit is.
    err = await send_raw(c.address, invoke, deep_invoke_request(60))
    meta = assert_malformed(err, "clawhub.gateway.v1.InvokeSkillRequest", "gateway.clawhub", internal)
    assert meta["problem"] == "too_deep" and meta["max_depth"] == str(PROTOBUF_MAX_DEPTH)
    assert f"{PROTOBUF_MAX_DEPTH} levels" in (err.details() or "")
    assert_one_log_line(caplog, invoke)
    # 49 levels (98 Value/ListValue messages inside the request) still decode: the limit is protobuf's, exactly.
    err = await send_raw(c.address, invoke, deep_invoke_request(49))
    assert error_info(err) is not None and error_info(err).reason != Reason.MALFORMED_REQUEST  # type: ignore[union-attr]
    caplog.clear()

    # Relayed methods: the registry and the deployer decode and refuse; the gateway passes their status on.
    for path, message_type, domain, kind in (
            ("/clawhub.registry.v1.RegistryService/GetSkill", "clawhub.registry.v1.GetSkillRequest",
             "registry.clawhub", ""),
            ("/clawhub.registry.v1.RegistryService/PublishSkill", "clawhub.registry.v1.PublishSkillRequest",
             "registry.clawhub", "client"),
            ("/clawhub.deployer.v1.DeployerService/GetDeployment", "clawhub.deployer.v1.GetDeploymentRequest",
             "deployer.clawhub", "")):
        err = await send_raw(c.address, path, CORRUPT, stream=kind)
        assert_malformed(err, message_type, domain, internal)
        assert_one_log_line(caplog, path)


async def test_directly_on_every_service(chain: tuple[Chain, ServiceHost], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c, deployer = chain
    internal = [*c.internal_addresses(), f"127.0.0.1:{deployer.port}"]
    cases = [
        (c.registry, "/clawhub.registry.v1.RegistryService/GetSkill", "clawhub.registry.v1.GetSkillRequest", ""),
        (c.registry, "/clawhub.registry.v1.RegistryService/PublishSkill", "clawhub.registry.v1.PublishSkillRequest",
         "client"),
        (deployer, "/clawhub.deployer.v1.DeployerService/GetDeployment", "clawhub.deployer.v1.GetDeploymentRequest",
         ""),
        (c.dispatcher, "/clawhub.dispatcher.v1.DispatcherService/Dispatch", "clawhub.dispatcher.v1.DispatchRequest",
         ""),
        (c.executor, "/clawhub.executor.v1.ExecutorService/Execute", "clawhub.executor.v1.ExecuteRequest", ""),
        (c.gateway, "/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", ""),
        (c.gateway, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
         "grpc.reflection.v1alpha.ServerReflectionRequest", "bidi"),
    ]
    for host, path, message_type, kind in cases:
        domain = f"{host.name}.clawhub"
        for payload in (CORRUPT, BAD_UTF8):
            err = await send_raw(f"127.0.0.1:{host.port}", path, payload, stream=kind)
            assert_malformed(err, message_type, domain, internal)
            assert_one_log_line(caplog, path)
    # The services still serve.
    err = await send_raw(c.address, "/clawhub.gateway.v1.GatewayService/InvokeSkill", CORRUPT)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_flood_of_garbage_costs_the_log_a_few_lines(chain: tuple[Chain, ServiceHost],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c, _ = chain
    path = "/clawhub.gateway.v1.GatewayService/InvokeSkill"
    async with grpc.aio.insecure_channel(c.address) as channel:
        call = channel.unary_unary(path)
        for i in range(200):
            try:
                await call(CORRUPT + bytes([i]), timeout=10)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert 1 <= len(lines) <= 5, len(lines)
    assert not [r for r in caplog.records if r.exc_info]


def test_rate_limited_log_reports_what_it_dropped(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=2, window=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for i in range(7):
            limited.warning("line %d", i)
        now[0] = 11.0
        limited.warning("later")
    assert [r.getMessage() for r in caplog.records] == [
        "line 0", "line 1", "(5 similar lines dropped in the last 11s)", "later"]


def test_decode_problems_are_named() -> None:
    for raw, problem in ((CORRUPT, "corrupt_wire_format"), (BAD_UTF8, "invalid_utf8"),
                         (deep_invoke_request(60), "too_deep")):
        try:
            pb.InvokeSkillRequest.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - the decode error under test
            error = malformed_request("clawhub.gateway.v1.InvokeSkillRequest", exc)
        else:
            raise AssertionError(f"{raw!r} decoded")
        assert error.metadata["problem"] == problem
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
