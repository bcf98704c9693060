"""Dependency packages at run time: the modules a skill imports functions from, linked per call.

A deployment pins its dependency resolution; every call (and LoadSkill) carries it. The executor fetches
each dependency module by digest (sha256 re-checked, like any module), compiles it for the call's engine,
checks the whole graph once (`services/runtime/linking.DependencyGraph`) and caches the linked result per
(module, engine, resolution), so a call pays only for instantiating the graph in its fresh Store.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

import grpc
import wasmtime
from clawhub.common.v1 import skill_pb2

from services.executor.sandbox import CompiledModule, Sandbox
from services.executor.singleflight import SingleFlight
from services.executor.source import ModuleSource, fetch_verified
from services.runtime.errors import Reason, ServiceError
from services.runtime.linking import ROOT, Copy, DependencyGraph, LinkError, dependency_imports

# Linked graphs and dependency modules kept compiled; a deployment uses one graph per skill version.
MAX_GRAPHS = 256
MAX_MODULES = 256

GraphKey = tuple[str, bool, tuple[Copy, ...]]


def copies_of(dependencies: Sequence[skill_pb2.ResolvedDependency]) -> tuple[Copy, ...]:
    return tuple(Copy(d.package, d.version, d.digest, d.is_shared, tuple(d.required_by) or (ROOT,))
                 for d in dependencies)


def link_failed(digest: str, problems: list[str]) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPENDENCY_LINK_FAILED,
        f"the module {digest} cannot be linked with its dependencies: " + "; ".join(problems),
        metadata={"digest": digest, "problems": "; ".join(problems)[:1024]})


class DependencyLinker:
    def __init__(self, source: ModuleSource, sandbox: Sandbox) -> None:
        self._source = source
        self._sandbox = sandbox
        self._graphs: OrderedDict[GraphKey, CompiledModule] = OrderedDict()
        self._modules: OrderedDict[tuple[str, bool], wasmtime.Module] = OrderedDict()
        self._linking: SingleFlight[GraphKey, CompiledModule] = SingleFlight()
        self._compiling: SingleFlight[tuple[str, bool], wasmtime.Module] = SingleFlight()

    async def link(self, compiled: CompiledModule, dependencies: Sequence[skill_pb2.ResolvedDependency],
                   ) -> CompiledModule:
        """`compiled` linked with the pinned `dependencies`: itself when it imports from no package.
        Raises ServiceError (DEPENDENCY_LINK_FAILED, or the fetch errors of a dependency module)."""
        if not dependencies and compiled.pre is not None:
            return compiled
        if not dependencies:
            packages = ", ".join(sorted(dependency_imports(compiled.module)))
            raise link_failed(compiled.digest, [f"it imports from {packages}, but the call carries no dependency "
                                                "resolution (deploy it through the deployer, which pins one)"])
        key = (compiled.digest, compiled.metered, copies_of(dependencies))
        linked = self._graphs.get(key)
        if linked is not None:
            self._graphs.move_to_end(key)
            return linked
        return await self._linking.do(key, lambda: self._link(compiled, key))

    async def _link(self, compiled: CompiledModule, key: GraphKey) -> CompiledModule:
        copies = key[2]
        modules: dict[str, wasmtime.Module] = {}
        for copy in copies:
            if copy.digest not in modules:
                modules[copy.digest] = await self._module(copy.digest, compiled.metered)
        engine = self._sandbox.engine_for(compiled.metered)
        try:
            graph = await asyncio.to_thread(DependencyGraph, engine, compiled.module, copies, modules)
        except LinkError as exc:
            raise link_failed(compiled.digest, exc.problems) from None
        linked = compiled.with_graph(graph)
        self._graphs[key] = linked
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return linked

    async def _module(self, digest: str, metered: bool) -> wasmtime.Module:
        key = (digest, metered)
        module = self._modules.get(key)
        if module is not None:
            self._modules.move_to_end(key)
            return module

        async def load() -> wasmtime.Module:
            data = await fetch_verified(self._source, digest)
            try:
                compiled = await asyncio.to_thread(wasmtime.Module, self._sandbox.engine_for(metered), data)
            except wasmtime.WasmtimeError as exc:
                raise link_failed(digest, [f"the dependency module {digest} does not compile: {exc}"]) from None
            self._modules[key] = compiled
            while len(self._modules) > MAX_MODULES:
                self._modules.popitem(last=False)
            return compiled

        return await self._compiling.do(key, load)

    def drop(self, digest: str) -> None:
        """Forget the linked graphs of `digest` (on unload)."""
        for key in [k for k in self._graphs if k[0] == digest]:
            del self._graphs[key]

    async def close(self) -> None:
        await self._linking.close()
        await self._compiling.close()
        self._graphs.clear()
        self._modules.clear()
