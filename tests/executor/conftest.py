"""Executor fixtures: a real executor on 127.0.0.1:0 fed by an in-memory module source.

The in-memory source stands in for the registry (a test double of `ModuleSource`); the end-to-end tests
cover the executor against the real registry.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb
from clawhub.executor.v1 import executor_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from google.protobuf import duration_pb2

from services.executor.server import build_server
from services.executor.settings import Settings
from services.executor.source import BlobNotFound, SourceUnavailable
from services.runtime.server import ServiceHost
from services.runtime.wasm import sha256_digest
from tests.conftest import Starter

TEST_SETTINGS = Settings(host="127.0.0.1", port=0, threads=4, queue=8, default_timeout=2.0,
                         grace_seconds=0.5)


class MemorySource:
    """Module bytes by digest, from a dict; counts fetches, can be slowed down or made to fail."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fetches: dict[str, int] = {}
        self.delay = 0.0
        self.unavailable = False

    def add(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    async def fetch(self, digest: str) -> bytes:
        self.fetches[digest] = self.fetches.get(digest, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.unavailable:
            raise SourceUnavailable("the test registry is down")
        try:
            return self.blobs[digest]
        except KeyError:
            raise BlobNotFound(f"no blob {digest}") from None


ASSIGNED_SKILL = "test.assigned"


class AsAssigned:
    """The registry's record of what the platform deployed, for tests about running modules rather than about
    provenance (tests/executor/test_provenance.py covers that with its own registry): the executor runs only
    requests naming a published skill@version, so `NameTheSkill` below names one for requests that name none
    and publishes it here, as a deploy would have (the module, bundle, capabilities and dependencies the request
    asks for)."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], registry_pb.SkillVersion] = {}

    async def version(self, skill: str, version: str) -> registry_pb.SkillVersion | None:
        return self.versions.get((skill, version))

    async def namespace(self, skill: str) -> registry_pb.Namespace | None:
        return None

    def publish(self, skill: str, version: str, digest: str, bundle_digest: str = "",
                capabilities: tuple[str, ...] = ()) -> None:
        manifest = skill_pb2.Manifest(name=skill, version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1,
                                      capabilities=list(capabilities))
        self.versions[(skill, version)] = registry_pb.SkillVersion(
            name=skill, version=version, digest=digest, bundle_digest=bundle_digest, manifest=manifest,
            state=release_pb2.RELEASE_STATE_READY)

    def assign(self, request: Any) -> Any:
        if request.skill or not request.digest.startswith("sha256:"):
            return request
        capabilities = tuple(sorted(set(request.capabilities)))
        key = hashlib.sha256(repr((request.digest, request.bundle_digest, capabilities)).encode()).hexdigest()[:16]
        version = f"1.0.0-t{key}"
        self.publish(ASSIGNED_SKILL, version, request.digest, request.bundle_digest, capabilities)
        for dependency in request.dependencies:
            self.publish(dependency.package, dependency.version, dependency.digest)
        named = type(request)()
        named.CopyFrom(request)
        named.skill, named.version = ASSIGNED_SKILL, version
        return named


class NameTheSkill(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Names the skill of Execute and LoadSkill requests that name none (see AsAssigned)."""

    def __init__(self, assigned: AsAssigned) -> None:
        self._assigned = assigned

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        if isinstance(request, (pb.ExecuteRequest, pb.LoadSkillRequest)):
            request = self._assigned.assign(request)
        return await continuation(client_call_details, request)


@dataclass
class Executor:
    host: ServiceHost
    stub: pb_grpc.ExecutorServiceStub
    source: MemorySource
    channel: grpc.aio.Channel
    data_dir: Path
    assigned: AsAssigned | None = None  # publish skills here to name them in requests (see AsAssigned)


ExecutorFactory = Callable[..., Awaitable[Executor]]


@pytest.fixture
async def make_executor(start_service: Starter, tmp_path: Path) -> AsyncIterator[ExecutorFactory]:
    """Start an executor with TEST_SETTINGS changed by keyword arguments (`source=` to share a
    MemorySource between executors). Each executor gets its own data dir unless `data_dir` is given."""
    channels: list[grpc.aio.Channel] = []
    count = 0

    async def make(source: MemorySource | None = None, **overrides: object) -> Executor:
        nonlocal count
        count += 1
        source = source or MemorySource()
        overrides.setdefault("data_dir", tmp_path / f"executor-{count}")
        settings = replace(TEST_SETTINGS, **overrides)
        assigned = AsAssigned()
        host = await start_service(build_server(settings, module_source=source, provenance_source=assigned))
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}", interceptors=[NameTheSkill(assigned)])
        channels.append(ch)
        return Executor(host, pb_grpc.ExecutorServiceStub(ch), source, ch, settings.data_dir, assigned)

    yield make
    for ch in channels:
        await ch.close()


@pytest.fixture
async def executor(make_executor: ExecutorFactory) -> Executor:
    return await make_executor()


def limits(*, timeout_ms: int = 0, memory: int = 0, output: int = 0, stderr: int = 0,
           max_input: int = 0) -> skill_pb2.Limits:
    """Per-call limits for ExecuteRequest; zero fields take the executor's defaults."""
    result = skill_pb2.Limits(memory_bytes=memory, max_output_bytes=output, max_stderr_bytes=stderr,
                              max_input_bytes=max_input)
    if timeout_ms:
        result.timeout.CopyFrom(duration_pb2.Duration(seconds=timeout_ms // 1000,
                                                      nanos=timeout_ms % 1000 * 1_000_000))
    return result
