"""Verification of published skills: compile the module with wasmtime and check it against the ABI and the
capabilities the manifest declares (unknown capabilities and imports they do not cover are problems); check
the file bundle holds exactly the manifest's `files` and is granted by the `files` capability.

Compiling is CPU-bound and releases the GIL, so it runs on worker threads, bounded so that a burst of
publishes cannot take every core from the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import wasmtime
from clawhub.common.v1 import skill_pb2
from opentelemetry.trace import Span

from services.runtime import bundle, tracing
from services.runtime.components import COMPONENT_V1, compile_component
from services.runtime.linking import Copy, DependencyGraph, LinkError, dependency_imports, undeclared_imports
from services.runtime.wasm import (
    FILES_CAPABILITY,
    LIBRARY_V1,
    MEMORY_V1,
    WASI_COMMAND_V1,
    Abi,
    compile_and_check,
    make_engine,
)

# The ABIs a manifest may declare, by their enum value; later ABIs (component model) are added here.
ABIS: dict[skill_pb2.Abi.ValueType, Abi] = {skill_pb2.ABI_WASI_COMMAND_V1: WASI_COMMAND_V1,
                                            skill_pb2.ABI_MEMORY_V1: MEMORY_V1,
                                            skill_pb2.ABI_LIBRARY_V1: LIBRARY_V1}
# component-v1 needs its enum value (`ABI_COMPONENT_V1 = 4;` in protos/clawhub/common/v1/skill.proto, then gen/):
# registered as soon as the generated code has it (until then a manifest cannot declare it).
if hasattr(skill_pb2, "ABI_COMPONENT_V1"):
    ABIS[skill_pb2.ABI_COMPONENT_V1] = COMPONENT_V1


# Compiled modules the verifier keeps (libraries checked again on every publish of a dependent).
COMPILED_CACHE = 64
# At most this many bytes of dependency modules are read to check one publish's links.
MAX_LINKED_BYTES = 256 * 1024 * 1024


class Verifier:
    """Checks that module bytes compile and implement the manifest's ABI."""

    def __init__(self, *, max_parallel: int | None = None) -> None:
        self._engine: wasmtime.Engine = make_engine()
        self._slots = asyncio.Semaphore(max_parallel or max(1, min(4, os.cpu_count() or 1)))
        # Compiled modules by sha256 of their bytes (see `_module`); only touched on worker threads, one at a
        # time per module, and OrderedDict operations are atomic under the GIL.
        self._compiled: OrderedDict[bytes, wasmtime.Module] = OrderedDict()

    @staticmethod
    def abi_of(manifest: skill_pb2.Manifest) -> Abi | None:
        return ABIS.get(manifest.abi)

    async def verify(self, data: bytes, manifest: skill_pb2.Manifest) -> list[str]:
        """Problems that keep `data` from being served as `manifest` says; empty when it passes."""
        abi = self.abi_of(manifest)
        if abi is None:
            name = skill_pb2.Abi.Name(manifest.abi) if manifest.abi in skill_pb2.Abi.values() else manifest.abi
            return [f"the manifest declares ABI {name}, which this registry does not support"]
        with tracing.span("registry.verify.module") as span:
            if span.is_recording():
                span.set_attributes({**_about(manifest), "clawhub.skill.abi": abi.name,
                                     "clawhub.module.bytes": len(data)})
            async with self._slots:
                problems = await asyncio.to_thread(self.check, data, abi, list(manifest.capabilities),
                                                   {d.package for d in manifest.dependencies})
            _noted(span, problems)
        return problems

    def check(self, data: bytes, abi: Abi, capabilities: list[str], dependencies: set[str]) -> list[str]:
        """`verify`'s check of the bytes against `abi` (blocking, CPU-bound): a core module against its ABI,
        a component (`component-v1`) against the clawhub skill world, which takes seconds for a Python skill
        (wasmtime compiles it: there is no validate-only call for components)."""
        if abi is COMPONENT_V1:
            problems = compile_component(self._engine, data, capabilities)[1]
            return problems + (["a component-v1 skill cannot have dependencies: a component is linked whole "
                                "(compose it before publishing)"] if dependencies else [])
        return compile_and_check(self._engine, data, abi, capabilities, dependencies)[1]

    async def verify_bundle(self, path: Path | None, manifest: skill_pb2.Manifest) -> list[str]:
        """Problems with the file bundle at `path` (None: no bundle was uploaded); empty when it passes."""
        files_declared = FILES_CAPABILITY in manifest.capabilities
        if path is None:
            if manifest.files:
                return [f"the manifest lists {len(manifest.files)} file(s) but no file bundle was uploaded"]
            return []
        problems: list[str] = []
        if not files_declared:
            problems.append(f"a file bundle was uploaded but the manifest does not declare the "
                            f"`{FILES_CAPABILITY}` capability, so the skill could never read it")
        if not manifest.files:
            problems.append("a file bundle was uploaded but the manifest lists no files")
        with tracing.span("registry.verify.bundle") as span:
            if span.is_recording():
                span.set_attributes({**_about(manifest), "clawhub.bundle.files": len(manifest.files)})
            async with self._slots:
                problems += await asyncio.to_thread(bundle.problems, path, list(manifest.files))
            _noted(span, problems)
        return problems

    def _module(self, data: bytes) -> wasmtime.Module:
        """`data` compiled, from a small cache by content (blobs are immutable and content-addressed, and a
        popular library is linked-checked on every publish of its dependents). Raises WasmtimeError."""
        key = hashlib.sha256(data).digest()
        module = self._compiled.get(key)
        if module is None:
            module = wasmtime.Module(self._engine, data)
            self._compiled[key] = module
            while len(self._compiled) > COMPILED_CACHE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return module

    async def dependency_packages(self, data: bytes) -> set[str]:
        """The packages the module imports functions from (its run-time dependencies); empty when it
        imports only WASI, or when it does not compile (`verify` reports that)."""
        def find() -> set[str]:
            try:
                return set(dependency_imports(self._module(data)))
            except wasmtime.WasmtimeError:
                return set()
        async with self._slots:
            return await asyncio.to_thread(find)

    async def verify_links(self, data: bytes, manifest: skill_pb2.Manifest, copies: list[Copy],
                           modules: dict[str, bytes]) -> list[str]:
        """Problems linking the module with the resolved dependency `copies` (`modules`: the bytes, by
        digest, of every copy its imports reach): each import from a package must be a declared dependency
        whose resolved version exports a function of that name and type, transitively, with no cycle and
        within the per-call instance bound. Empty when it links."""
        declared = {d.package for d in manifest.dependencies}

        def check() -> list[str]:
            root = self._module(data)
            problems = undeclared_imports(root, declared)
            if problems:
                return problems
            compiled: dict[str, wasmtime.Module] = {}
            for digest, blob in modules.items():
                try:
                    compiled[digest] = self._module(blob)
                except wasmtime.WasmtimeError:
                    problems.append(f"the dependency module {digest} does not compile")
            if problems:
                return problems
            try:
                DependencyGraph(self._engine, root, copies, compiled,
                                root_label=f"{manifest.name}@{manifest.version}")
            except LinkError as exc:
                return exc.problems
            return []

        with tracing.span("registry.verify.links") as span:
            if span.is_recording():
                span.set_attributes({**_about(manifest), "clawhub.dependencies": len(copies)})
            async with self._slots:
                problems = await asyncio.to_thread(check)
            _noted(span, problems)
        return problems


def _about(manifest: skill_pb2.Manifest) -> dict[str, str]:
    return {"clawhub.skill": manifest.name, "clawhub.skill.version": manifest.version}


def _noted(span: Span, problems: list[str]) -> None:
    """The outcome of a verification step on its span: how many problems, and the first one."""
    if span.is_recording():
        span.set_attribute("clawhub.verify.problems", len(problems))
        if problems:
            tracing.fail(span, problems[0][:200], "VERIFICATION_FAILED")
