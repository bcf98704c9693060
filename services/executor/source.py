"""Where module bytes come from when they are not hot: the registry's content-addressed blob store.

The bytes a source returns are untrusted: the loader re-checks their sha256 against the digest before
compiling them, whatever the source.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

import grpc
from clawhub.registry.v1 import registry_internal_pb2 as registry_pb
from clawhub.registry.v1 import registry_internal_pb2_grpc as registry_grpc
from google.rpc import error_details_pb2

from services.runtime.errors import Reason, ServiceError, describe_error, status_of
from services.runtime.wasm import sha256_digest

log = logging.getLogger("clawhub.executor.source")

# No skill module is this big; a larger download is refused rather than buffered.
MAX_MODULE_BYTES = 128 * 1024 * 1024
# Refusals a fetch waits out, within its deadline, for as long as their RetryInfo says (with jitter, so the
# executors refused together do not come back together): the registry's download slots are taken
# (TOO_MANY_DOWNLOADS), it is near its descriptor limit (DESCRIPTOR_BUDGET_EXHAUSTED), the blob was repaired
# while it was sent (BLOB_CHANGED). A status without a RetryInfo is not retried.
_RETRIED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
MAX_RETRY_DELAY_SECONDS = 5.0


class BlobNotFound(Exception):
    """The source does not know the digest."""


class SourceUnavailable(Exception):
    """The source could not be reached or failed; trying again later may work (after `retry_after` seconds,
    when the source said so)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModuleTooLarge(Exception):
    """The blob is larger than any module the executor accepts."""


class ModuleSource(Protocol):
    """Fetches module bytes by content digest."""

    async def fetch(self, digest: str) -> bytes:
        """The bytes stored under `digest`. Raises BlobNotFound, SourceUnavailable or ModuleTooLarge."""
        ...


class RegistryModuleSource:
    """Streams `RegistryInternalService.DownloadBlob`, with a deadline on the whole download."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float,
                 max_bytes: int = MAX_MODULE_BYTES) -> None:
        self._stub = registry_grpc.RegistryInternalServiceStub(channel)
        self._timeout = timeout
        self._max_bytes = max_bytes

    async def fetch(self, digest: str) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            try:
                return await self._fetch_once(digest, max(deadline - loop.time(), 0.001))
            except SourceUnavailable as exc:
                delay = exc.retry_after
                if delay is None or loop.time() + delay >= deadline:
                    raise
                log.info("the registry refused the download of %s for now (%s); retrying in %.1f s", digest,
                         exc, delay)
                await asyncio.sleep(delay)

    async def _fetch_once(self, digest: str, timeout: float) -> bytes:
        call = self._stub.DownloadBlob(registry_pb.DownloadBlobRequest(digest=digest), timeout=timeout)
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
                f"downloading {digest} from the registry failed: {describe_error(err)}",
                retry_after=_retry_after(err)) from None
        return b"".join(chunks)


def _retry_after(err: grpc.aio.AioRpcError) -> float | None:
    """How long to wait before asking again, when the registry said to retry (`_RETRIED_CODES` with a
    RetryInfo); None otherwise."""
    if err.code() not in _RETRIED_CODES:
        return None
    status = status_of(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = min(max(float(info.retry_delay.ToNanoseconds()) / 1e9, 0.0), MAX_RETRY_DELAY_SECONDS)
            return delay * random.uniform(1.0, 1.5)
    return None


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
