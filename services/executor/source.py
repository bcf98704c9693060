"""Where module bytes come from when they are not hot: the registry's content-addressed blob store.

The bytes a source returns are untrusted: the loader re-checks their sha256 against the digest before
compiling them, whatever the source.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.runtime.errors import Reason, ServiceError
from services.runtime.wasm import sha256_digest

log = logging.getLogger("clawhub.executor.source")

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


async def fetch_verified(source: ModuleSource, digest: str, *, what: str = "module",
                         key: str = "digest") -> bytes:
    """The bytes of `digest` from `source`, refused unless they hash to it (the source is untrusted).
    `what` names the blob in messages ("module", "bundle"), `key` its digest in ErrorInfo metadata. Raises
    ServiceError (NOT_FOUND, UNAVAILABLE, INVALID_ARGUMENT, DATA_LOSS)."""
    meta = {key: digest}
    try:
        data = await source.fetch(digest)
    except BlobNotFound as exc:
        raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.BLOB_NOT_FOUND, str(exc), metadata=meta) from None
    except SourceUnavailable as exc:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE, str(exc),
                           metadata={**meta, "upstream": "registry"}, retry_after_seconds=1.0) from None
    except ModuleTooLarge as exc:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MODULE_INVALID, str(exc),
                           metadata=meta) from None
    actual = sha256_digest(data)
    if actual != digest:
        log.warning("the source returned bytes with digest %s for %s %s; refusing them", actual, what, digest)
        raise ServiceError(
            grpc.StatusCode.DATA_LOSS, Reason.CHECKSUM_MISMATCH,
            f"the {what} bytes fetched for {digest} have digest {actual}; refusing to use them",
            metadata={"expected_digest": digest, "actual_digest": actual})
    return data
