"""Shared fixtures: real servers on 127.0.0.1:0, wasm modules built from WAT."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import wasmtime

from services.runtime.server import ServiceHost

Starter = Callable[[Awaitable[ServiceHost]], Awaitable[ServiceHost]]


@pytest.fixture
async def start_service() -> AsyncIterator[Starter]:
    """Start ServiceHosts built by a service's build_server; every one is stopped after the test."""
    started: list[ServiceHost] = []

    async def start(building: Awaitable[ServiceHost]) -> ServiceHost:
        host = await building
        await host.start()
        started.append(host)
        return host

    yield start
    for host in reversed(started):
        await host.stop(grace=0.5)


def wat(text: str) -> bytes:
    """Compile WebAssembly text to a binary module."""
    return bytes(wasmtime.wat2wasm(text))
