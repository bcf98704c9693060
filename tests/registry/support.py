"""Helpers for registry tests: modules, publishing, error assertions."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from clawhub.common.v1 import skill_pb2
from clawhub.registry.v1 import registry_internal_pb2 as internal_pb
from clawhub.registry.v1 import registry_internal_pb2_grpc as internal_grpc
from clawhub.registry.v1 import registry_service_pb2 as pb
from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc

from services.registry.settings import Settings
from services.runtime.errors import bad_request, error_info
from services.runtime.server import ServiceHost
from tests.conftest import wat

DOMAIN = "registry.clawhub"
MINIMAL_WAT = '(module (memory (export "memory") 1) (func (export "_start")))'


def wasm(text: str) -> bytes:
    # wat2wasm returns a bytearray; protobuf bytes fields want bytes.
    return bytes(wat(text))


MODULE = wasm(MINIMAL_WAT)


def module(tag: str = "", *, pages: int = 1) -> bytes:
    """A valid WASI command; a different tag gives different bytes."""
    data = f'(data (i32.const 0) "{tag}")' if tag else ""
    return wasm(f'(module (memory (export "memory") {pages}) (func (export "_start")) {data})')


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryStub(pb_grpc.RegistryServiceStub, internal_grpc.RegistryInternalServiceStub):
    """Both of the registry's services over one channel: its public calls, and DownloadBlob
    (RegistryInternalService), which the tests call as an executor would."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        pb_grpc.RegistryServiceStub.__init__(self, channel)
        internal_grpc.RegistryInternalServiceStub.__init__(self, channel)


@dataclass
class Client:
    host: ServiceHost
    stub: Any
    settings: Settings


def metadata(data: bytes, *, name: str = "com.acme.echo", version: str = "1.0.0", sha256: str | None = None,
             size_bytes: int | None = None, abi: skill_pb2.Abi.ValueType = skill_pb2.ABI_WASI_COMMAND_V1,
             description: str = "echoes its input") -> pb.PublishSkillRequest:
    return pb.PublishSkillRequest(metadata=pb.PublishSkillMetadata(
        manifest=skill_pb2.Manifest(name=name, version=version, description=description, abi=abi),
        sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
        size_bytes=len(data) if size_bytes is None else size_bytes,
    ))


async def publish(stub: Any, data: bytes, *, chunk_size: int = 64 * 1024, **meta: Any) -> pb.PublishSkillResponse:
    return await publish_raw(stub, [metadata(data, **meta), *chunks(data, chunk_size)])


def chunks(data: bytes, size: int) -> list[pb.PublishSkillRequest]:
    return [pb.PublishSkillRequest(chunk=data[i:i + size]) for i in range(0, len(data), size)]


async def publish_raw(stub: Any, requests: list[pb.PublishSkillRequest]) -> pb.PublishSkillResponse:
    async def stream() -> AsyncIterator[pb.PublishSkillRequest]:
        for request in requests:
            yield request

    response: pb.PublishSkillResponse = await stub.PublishSkill(stream(), timeout=10)
    return response


async def download(stub: Any, blob_digest: str) -> list[bytes]:
    return [r.chunk async for r in stub.DownloadBlob(internal_pb.DownloadBlobRequest(digest=blob_digest), timeout=10)]


def check_error(err: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    """Assert code, reason and domain; returns the ErrorInfo metadata."""
    assert err.code() == code, (err.code(), err.details())
    info = error_info(err)
    assert info is not None, err.details()
    assert info.reason == reason, (info.reason, err.details())
    assert info.domain == DOMAIN
    return dict(info.metadata)


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    request = bad_request(err)
    assert request is not None, "no BadRequest detail"
    return {v.field: v.description for v in request.field_violations}


async def still_serving(stub: Any) -> None:
    """The registry answers a normal call after a bad one."""
    await stub.ListSkills(pb.ListSkillsRequest(), timeout=5)
