"""RegistryModuleSource against a stand-in RegistryInternalService speaking the real contract over gRPC."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from clawhub.executor.v1 import executor_service_pb2 as pb
from clawhub.executor.v1 import executor_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_internal_pb2 as registry_pb
from clawhub.registry.v1 import registry_internal_pb2_grpc as registry_grpc

from services.executor.server import build_server
from services.executor.source import BlobNotFound, ModuleTooLarge, RegistryModuleSource, SourceUnavailable
from services.runtime.errors import error_info
from services.runtime.wasm import sha256_digest
from tests.conftest import Starter
from tests.executor import fixtures as f
from tests.executor.conftest import TEST_SETTINGS, AsAssigned, NameTheSkill


class BlobServer(registry_grpc.RegistryInternalServiceServicer):
    """Only DownloadBlob, streamed in small chunks; the real registry has its own tests."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.delay = 0.0

    async def DownloadBlob(self, request, context) -> AsyncIterator[registry_pb.DownloadBlobResponse]:
        data = self.blobs.get(request.digest)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no blob {request.digest}")
        if self.delay:
            await asyncio.sleep(self.delay)
        for i in range(0, len(data), 100):
            yield registry_pb.DownloadBlobResponse(chunk=data[i:i + 100])


@pytest.fixture
async def registry() -> AsyncIterator[tuple[BlobServer, str]]:
    blobs = BlobServer()
    server = grpc.aio.server()
    registry_grpc.add_RegistryInternalServiceServicer_to_server(blobs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield blobs, f"127.0.0.1:{port}"
    await server.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_fetch_streams_the_whole_blob(registry) -> None:
    blobs, address = registry
    digest = sha256_digest(f.ECHO)
    blobs.blobs[digest] = f.ECHO
    async with grpc.aio.insecure_channel(address) as ch:
        source = RegistryModuleSource(ch, timeout=5)
        assert await source.fetch(digest) == f.ECHO
        with pytest.raises(BlobNotFound):
            await source.fetch("sha256:" + "2" * 64)
        with pytest.raises(ModuleTooLarge):
            await RegistryModuleSource(ch, timeout=5, max_bytes=len(f.ECHO) - 1).fetch(digest)
        blobs.delay = 1.0
        with pytest.raises(SourceUnavailable, match="DEADLINE_EXCEEDED"):
            await RegistryModuleSource(ch, timeout=0.2).fetch(digest)


async def test_unreachable_registry(registry) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as ch:
        with pytest.raises(SourceUnavailable, match="UNAVAILABLE"):
            await RegistryModuleSource(ch, timeout=5).fetch(sha256_digest(b"x"))


async def test_executor_runs_modules_from_the_registry(registry, start_service: Starter, tmp_path) -> None:
    blobs, address = registry
    echo = sha256_digest(f.ECHO)
    blobs.blobs[echo] = f.ECHO
    lying = sha256_digest(f.GARBAGE)
    blobs.blobs[lying] = f.ECHO  # the registry serves other bytes than the digest names
    assigned = AsAssigned()
    host = await start_service(build_server(replace(TEST_SETTINGS, registry_address=address, data_dir=tmp_path),
                                            provenance_source=assigned))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}", interceptors=[NameTheSkill(assigned)]) as ch:
        stub = pb_grpc.ExecutorServiceStub(ch)
        response = await stub.Execute(pb.ExecuteRequest(digest=echo, input=b"via registry"), timeout=5)
        assert response.output == b"ok:via registry"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Execute(pb.ExecuteRequest(digest=lying), timeout=5)
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.LoadSkill(pb.LoadSkillRequest(digest="sha256:" + "3" * 64), timeout=5)
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND")


async def test_executor_with_registry_down(start_service: Starter, tmp_path) -> None:
    settings = replace(TEST_SETTINGS, registry_address=f"127.0.0.1:{free_port()}", data_dir=tmp_path)
    assigned = AsAssigned()
    host = await start_service(build_server(settings, provenance_source=assigned))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}", interceptors=[NameTheSkill(assigned)]) as ch:
        stub = pb_grpc.ExecutorServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Execute(pb.ExecuteRequest(digest=sha256_digest(f.ECHO)), timeout=5)
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
