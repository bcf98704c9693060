"""One service per port: a second server on a port another holds fails with a message naming the port and
the variable that moves it, instead of silently sharing it through SO_REUSEPORT (gRPC's default)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.server import PortInUse, ServiceHost, create_server, host_port

ROOT = Path(__file__).resolve().parents[2]


def nothing(server: grpc.aio.Server) -> None:
    """Registers no service of its own (health and reflection come with every server)."""


@pytest.fixture
async def grpc_holder() -> AsyncIterator[int]:
    """A port held the way a clawhub of before this fix held it: gRPC's defaults, SO_REUSEPORT on."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(0)


def build(port: int, **kwargs: object) -> ServiceHost:
    return create_server("dispatcher", [], host="127.0.0.1", port=port, register=nothing, **kwargs)  # type: ignore[arg-type]


async def test_a_taken_port_is_refused_with_the_variable_that_moves_it(grpc_holder: int) -> None:
    with pytest.raises(PortInUse) as caught:
        build(grpc_holder)
    message = str(caught.value)
    assert f"127.0.0.1:{grpc_holder}" in message and "CLAWHUB_DISPATCHER_PORT" in message
    assert "\n" not in message


async def test_a_second_clawhub_server_on_the_same_port_is_refused() -> None:
    first = build(0)
    await first.start()
    try:
        with pytest.raises(PortInUse):
            build(first.port, port_variable="CLAWHUB_SOMETHING_PORT")
    finally:
        await first.stop(0)
    # Once the first is gone, the port is free again at once (SO_REUSEADDR still applies).
    again = build(first.port)
    await again.start()
    await again.stop(0)


async def test_port_sharing_only_when_asked() -> None:
    first = build(0, share_port=True)
    await first.start()
    try:
        second = build(first.port, share_port=True)
        assert second.port == first.port
        await second.start()
        await second.stop(0)
    finally:
        await first.stop(0)


async def test_a_service_on_a_taken_port_exits_with_one_line(grpc_holder: int) -> None:
    """What `clawhub up` shows: the service's exit status and its stderr."""
    env = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off",
           "CLAWHUB_DISPATCHER_HOST": "127.0.0.1", "CLAWHUB_DISPATCHER_PORT": str(grpc_holder),
           "CLAWHUB_DEPLOYER_ADDRESS": "127.0.0.1:9", "CLAWHUB_EXECUTOR_ADDRESSES": "127.0.0.1:9"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.dispatcher", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError("the dispatcher started on a port another server holds") from None
    lines = stderr.decode().splitlines()
    assert process.returncode == 1, (process.returncode, lines)
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{grpc_holder} is already in use" in lines[0] and "CLAWHUB_DISPATCHER_PORT" in lines[0]
    assert b"listening" not in stdout


def test_startup_errors_are_one_line_in_run() -> None:
    """`run` turns a StartupError from build() into one stderr line and exit status 1."""
    code = ("from services.runtime.server import run, StartupError\n"
            "async def build():\n"
            "    raise StartupError('registry: the data directory is held by pid 42')\n"
            "run(build, host='127.0.0.1')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["clawhub: registry: the data directory is held by pid 42"]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_an_ipv6_literal_host_binds_and_prints_a_usable_address(host: str) -> None:
    """`CLAWHUB_GATEWAY_HOST=::1` (no brackets) listens, and its `listening` line is an address a client can use
    (`clawhub up` hands it on as is)."""
    env = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off", "CLAWHUB_GATEWAY_HOST": host, "CLAWHUB_GATEWAY_PORT": "0",
           "CLAWHUB_REGISTRY_ADDRESS": "127.0.0.1:9", "CLAWHUB_DEPLOYER_ADDRESS": "127.0.0.1:9",
           "CLAWHUB_DISPATCHER_ADDRESS": "127.0.0.1:9"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.gateway", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        match = re.fullmatch(r"clawhub gateway listening on (\[::1\]:\d+)", line)
        assert match, (line, await _rest(process))
        async with grpc.aio.insecure_channel(match[1]) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def _rest(process: asyncio.subprocess.Process) -> str:
    """What a service that did not start wrote to stderr."""
    assert process.stderr is not None
    try:
        return (await asyncio.wait_for(process.stderr.read(), 10)).decode()
    except TimeoutError:
        return "(still running)"


def test_host_port_brackets_ipv6_literals() -> None:
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("[::1]", 50051) == "[::1]:50051"
    assert host_port("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert host_port("gateway.internal", 50051) == "gateway.internal:50051"
