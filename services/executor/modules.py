"""Loading modules by digest: hot (compiled, in memory, LRU by module bytes) or cold (from the source).

Concurrent loads of one digest share a single fetch and compile. The bytes are re-checked against the
digest before anything else looks at them, so a corrupt or lying source can never get a module run.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import grpc

from services.executor.sandbox import CompiledModule, ModuleRejected, Sandbox
from services.executor.source import BlobNotFound, ModuleSource, ModuleTooLarge, SourceUnavailable
from services.runtime.errors import Reason, ServiceError
from services.runtime.wasm import sha256_digest

log = logging.getLogger("clawhub.executor.modules")


class ModuleLoader:
    def __init__(self, source: ModuleSource, sandbox: Sandbox, capacity_bytes: int) -> None:
        self._source = source
        self._sandbox = sandbox
        self._capacity = capacity_bytes
        self._hot: OrderedDict[str, CompiledModule] = OrderedDict()
        self._hot_bytes = 0
        self._loading: dict[str, asyncio.Task[CompiledModule]] = {}

    def is_hot(self, digest: str) -> bool:
        return digest in self._hot

    @property
    def hot_bytes(self) -> int:
        return self._hot_bytes

    async def get(self, digest: str) -> tuple[CompiledModule, bool]:
        """The compiled module and whether it was already hot. Raises ServiceError (NOT_FOUND,
        INVALID_ARGUMENT, UNAVAILABLE, DATA_LOSS)."""
        hot = self._hot.get(digest)
        if hot is not None:
            self._hot.move_to_end(digest)
            return hot, True
        task = self._loading.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._load(digest))
            self._loading[digest] = task
            task.add_done_callback(lambda t: self._load_done(digest, t))
        # A cancelled caller must not cancel the load the other callers share.
        return await asyncio.shield(task), False

    def _load_done(self, digest: str, task: asyncio.Task[CompiledModule]) -> None:
        if self._loading.get(digest) is task:
            del self._loading[digest]
        if not task.cancelled():
            # Mark the exception retrieved even if every waiter went away.
            task.exception()

    async def _load(self, digest: str) -> CompiledModule:
        try:
            data = await self._source.fetch(digest)
        except BlobNotFound as exc:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.BLOB_NOT_FOUND, str(exc),
                               metadata={"digest": digest}) from None
        except SourceUnavailable as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE, str(exc),
                               metadata={"digest": digest, "upstream": "registry"},
                               retry_after_seconds=1.0) from None
        except ModuleTooLarge as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MODULE_INVALID, str(exc),
                               metadata={"digest": digest}) from None
        actual = sha256_digest(data)
        if actual != digest:
            log.warning("module source returned bytes with digest %s for %s; refusing them", actual, digest)
            raise ServiceError(
                grpc.StatusCode.DATA_LOSS, Reason.CHECKSUM_MISMATCH,
                f"the module bytes fetched for {digest} have digest {actual}; refusing to run them",
                metadata={"expected_digest": digest, "actual_digest": actual})
        try:
            compiled = await asyncio.to_thread(self._sandbox.compile, digest, data)
        except ModuleRejected as exc:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, Reason.MODULE_INVALID,
                f"the module {digest} cannot run as a skill: {exc}",
                metadata={"digest": digest, "problems": "; ".join(exc.problems)[:1024]}) from None
        self._insert(compiled)
        log.info("loaded module %s (%d bytes)", digest[:19], compiled.size_bytes)
        return compiled

    def _insert(self, compiled: CompiledModule) -> None:
        if compiled.digest in self._hot:
            return
        self._hot[compiled.digest] = compiled
        self._hot_bytes += compiled.size_bytes
        # Evict least recently used, but always keep the newest even when it alone is over capacity.
        while self._hot_bytes > self._capacity and len(self._hot) > 1:
            digest, old = self._hot.popitem(last=False)
            self._hot_bytes -= old.size_bytes
            log.info("evicted module %s from the hot cache", digest[:19])

    def drop(self, digest: str) -> bool:
        """Forget a hot module; whether it was hot. Runs in progress keep their reference."""
        compiled = self._hot.pop(digest, None)
        if compiled is None:
            return False
        self._hot_bytes -= compiled.size_bytes
        return True

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        self._hot.clear()
        self._hot_bytes = 0
