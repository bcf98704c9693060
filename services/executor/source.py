"""Where module bytes come from when they are not hot: the registry's content-addressed blob store.

The bytes a source returns are untrusted: the loader re-checks their sha256 against the digest before
compiling them, whatever the source.
"""

from __future__ import annotations

from typing import Protocol

import grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

# No skill module is this big; a larger download is refused rather than buffered.
MAX_MODULE_BYTES = 128 * 1024 * 1024


class BlobNotFound(Exception):
    """The source does not know the digest."""


class SourceUnavailable(Exception):
    """The source could not be reached or failed; trying again later may work."""


class ModuleTooLarge(Exception):
    """The blob is larger than any module the executor accepts."""


class ModuleSource(Protocol):
    """Fetches module bytes by content digest."""

    async def fetch(self, digest: str) -> bytes:
        """The bytes stored under `digest`. Raises BlobNotFound, SourceUnavailable or ModuleTooLarge."""
        ...


class RegistryModuleSource:
    """Streams `RegistryService.DownloadBlob`, with a deadline on the whole download."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float,
                 max_bytes: int = MAX_MODULE_BYTES) -> None:
        self._stub = registry_grpc.RegistryServiceStub(channel)
        self._timeout = timeout
        self._max_bytes = max_bytes

    async def fetch(self, digest: str) -> bytes:
        call = self._stub.DownloadBlob(registry_pb.DownloadBlobRequest(digest=digest), timeout=self._timeout)
        chunks: list[bytes] = []
        total = 0
        try:
            async for response in call:
                total += len(response.chunk)
                if total > self._max_bytes:
                    call.cancel()
                    raise ModuleTooLarge(f"the blob {digest} is larger than {self._max_bytes} bytes")
                chunks.append(response.chunk)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise BlobNotFound(f"the registry has no blob {digest}") from None
            raise SourceUnavailable(
                f"downloading {digest} from the registry failed: {err.code().name}: {err.details()}"
            ) from None
        return b"".join(chunks)
