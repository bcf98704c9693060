"""Fixtures for registry tests: a real registry on 127.0.0.1:0 over a temporary data directory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from services.registry.server import build_server
from services.registry.settings import Settings
from tests.conftest import Starter
from tests.registry.support import Client, RegistryStub

Opener = Callable[..., Awaitable[Client]]


@pytest.fixture
async def open_registry(start_service: Starter, tmp_path: Any) -> AsyncIterator[Opener]:
    """Start a registry (settings overridable by keyword) over tmp_path/registry and connect to it."""
    channels: list[grpc.aio.Channel] = []

    async def open_(**overrides: Any) -> Client:
        settings = Settings(**{"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "registry",
                               "shutdown_grace_seconds": 0.5, **overrides})
        host = await start_service(build_server(settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        channels.append(channel)
        return Client(host=host, stub=RegistryStub(channel), settings=settings)

    yield open_
    for channel in channels:
        await channel.close()


@pytest.fixture
async def registry(open_registry: Opener) -> Client:
    return await open_registry()
