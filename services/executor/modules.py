"""Loading modules by digest: hot (compiled, in memory, LRU by module bytes), warm (precompiled artifact on
disk) or cold (from the source).

Concurrent loads of one digest share a single fetch and compile. Cold bytes are re-checked against the
digest before anything else looks at them, so a corrupt or lying source can never get a module run; warm
artifacts are only ever written from such checked bytes, and are integrity-checked when read.

A module is compiled once per engine (plain, or fuel-metered for calls with a fuel budget) and checked
against the ABI with every grantable capability; each caller's own capabilities are then checked against
its imports (cheap, remembered per capability set), so a module found fine for a caller with `files` is
still refused for one without.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path

import grpc

from services.executor.artifacts import ArtifactCache
from services.executor.sandbox import CompiledModule, ModuleRejected, Sandbox
from services.executor.singleflight import SingleFlight
from services.executor.source import ModuleSource, fetch_verified
from services.runtime import tracing
from services.runtime.errors import Reason, ServiceError
from services.runtime.wasm import FILES_CAPABILITY, KV_CAPABILITY

log = logging.getLogger("clawhub.executor.modules")

# Every capability that changes which imports a module may have (`env:NAME` does not): a module is loaded
# if some capability set could run it, and each call is checked with its own. Which host an `http:`
# capability names does not change the imports (only where requests may go, decided per call): any one
# stands for the kind.
GRANTABLE = (FILES_CAPABILITY, KV_CAPABILITY, "http:grantable.invalid")

Key = tuple[str, bool]  # (digest, metered)


def _invalid(digest: str, exc: ModuleRejected) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, Reason.MODULE_INVALID,
        f"the module {digest} cannot run as a skill: {exc}",
        metadata={"digest": digest, "problems": "; ".join(exc.problems)[:1024]})


class ModuleLoader:
    def __init__(self, source: ModuleSource, sandbox: Sandbox, capacity_bytes: int,
                 artifacts_dir: Path | None = None) -> None:
        self._source = source
        self._sandbox = sandbox
        self._capacity = capacity_bytes
        self._hot: OrderedDict[Key, CompiledModule] = OrderedDict()
        self._hot_bytes = 0
        self._loading: SingleFlight[Key, CompiledModule] = SingleFlight()
        self._artifacts: dict[bool, ArtifactCache] = {}
        if artifacts_dir is not None:
            self._artifacts = {m: ArtifactCache(artifacts_dir, sandbox.engine_settings(m)) for m in (False, True)}
        # Loads served by each tier ("hot", "warm", "cold"), for tests and metrics.
        self.tiers: Counter[str] = Counter()

    @property
    def source(self) -> ModuleSource:
        return self._source

    def is_hot(self, digest: str, *, metered: bool | None = None) -> bool:
        if metered is None:
            return (digest, False) in self._hot or (digest, True) in self._hot
        return (digest, metered) in self._hot

    @property
    def hot_bytes(self) -> int:
        return self._hot_bytes

    def artifact_path(self, digest: str, *, metered: bool = False) -> Path | None:
        cache = self._artifacts.get(metered)
        return None if cache is None else cache.path(digest)

    async def get(self, digest: str, capabilities: Sequence[str] = (), *,
                  metered: bool = False) -> tuple[CompiledModule, bool]:
        """The compiled module and whether it was already hot, after checking that `capabilities` cover
        its imports. Raises ServiceError (NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE, DATA_LOSS)."""
        key = (digest, metered)
        compiled = self._hot.get(key)
        was_hot = compiled is not None
        if compiled is not None:
            self._hot.move_to_end(key)
            self.tiers["hot"] += 1
        else:
            compiled = await self._loading.do(key, lambda: self._load(digest, metered))
        try:
            self._sandbox.check(compiled, capabilities)
        except ModuleRejected as exc:
            raise _invalid(digest, exc) from None
        return compiled, was_hot

    async def _load(self, digest: str, metered: bool) -> CompiledModule:
        compiled = await self._load_warm(digest, metered)
        if compiled is None:
            compiled = await self._load_cold(digest, metered)
        self._insert((digest, metered), compiled)
        return compiled

    async def _load_warm(self, digest: str, metered: bool) -> CompiledModule | None:
        cache = self._artifacts.get(metered)
        if cache is None:
            return None
        engine = self._sandbox.engine_for(metered)
        found = await asyncio.to_thread(cache.load, engine, digest)
        if found is None:
            return None
        module, size = found
        try:
            compiled = await asyncio.to_thread(self._sandbox.link, digest, size, module, GRANTABLE,
                                               metered=metered)
        except ModuleRejected as exc:
            # Only modules that passed are ever stored; a refusal means the rules changed. Start over.
            log.warning("artifact for %s no longer passes (%s); recompiling", digest[:19], exc)
            await asyncio.to_thread(cache.delete, digest)
            return None
        self.tiers["warm"] += 1
        tracing.current_span().set_attributes({"clawhub.module.tier": "warm", "clawhub.skill.digest": digest})
        log.info("loaded module %s from its precompiled artifact", digest[:19])
        return compiled

    async def _load_cold(self, digest: str, metered: bool) -> CompiledModule:
        data = await fetch_verified(self._source, digest)
        cache = self._artifacts.get(metered)

        def compile_and_store() -> CompiledModule:
            compiled = self._sandbox.compile(digest, data, GRANTABLE, metered=metered)
            if cache is not None:
                cache.store(digest, compiled.module, compiled.size_bytes)
            return compiled

        try:
            compiled = await asyncio.to_thread(compile_and_store)
        except ModuleRejected as exc:
            raise _invalid(digest, exc) from None
        self.tiers["cold"] += 1
        tracing.current_span().set_attributes({"clawhub.module.tier": "cold", "clawhub.skill.digest": digest,
                                               "clawhub.module.bytes": compiled.size_bytes})
        log.info("loaded module %s (%d bytes)%s", digest[:19], compiled.size_bytes, " metered" if metered else "")
        return compiled

    def _insert(self, key: Key, compiled: CompiledModule) -> None:
        if key in self._hot:
            return
        self._hot[key] = compiled
        self._hot_bytes += compiled.size_bytes
        # Evict least recently used, but always keep the newest even when it alone is over capacity.
        while self._hot_bytes > self._capacity and len(self._hot) > 1:
            (digest, _), old = self._hot.popitem(last=False)
            self._hot_bytes -= old.size_bytes
            log.info("evicted module %s from the hot cache", digest[:19])

    def drop(self, digest: str) -> bool:
        """Forget a hot module (both engines' compilations); whether it was hot. Runs in progress keep
        their reference; the warm artifact stays on disk."""
        dropped = False
        for metered in (False, True):
            compiled = self._hot.pop((digest, metered), None)
            if compiled is not None:
                self._hot_bytes -= compiled.size_bytes
                dropped = True
        return dropped

    async def close(self) -> None:
        await self._loading.close()
        self._hot.clear()
        self._hot_bytes = 0
