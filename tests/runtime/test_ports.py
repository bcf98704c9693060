"""One service per port: a second server on a port another holds fails with a message naming the port and
the variable that moves it, instead of silently sharing it through SO_REUSEPORT (gRPC's default)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.runtime.server import PortInUse, ServiceHost, create_server

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
    env = {**os.environ, "CLAWHUB_DISPATCHER_HOST": "127.0.0.1", "CLAWHUB_DISPATCHER_PORT": str(grpc_holder),
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
