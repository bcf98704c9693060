"""WebAssembly helpers shared by the registry (verification) and the executor (re-check before load).

ABI v1 is the WASI preview-1 command: the module exports `_start` (no params, no results) and `memory`,
and imports nothing but `wasi_snapshot_preview1` functions. Later ABIs plug in behind `Abi`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import wasmtime

WASI_P1 = "wasi_snapshot_preview1"
WASM_MAGIC = b"\0asm"


def make_engine(*, epoch_interruption: bool = True, consume_fuel: bool = False) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = epoch_interruption
    config.consume_fuel = consume_fuel
    config.cranelift_opt_level = "speed"
    return wasmtime.Engine(config)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Abi(Protocol):
    """An application binary interface a skill module can implement."""

    @property
    def name(self) -> str: ...

    def check(self, module: wasmtime.Module) -> list[str]:
        """Problems that keep `module` from implementing this ABI; empty when it does."""
        ...


@dataclass(frozen=True)
class WasiCommandV1:
    name: str = "wasi-command-v1"

    def check(self, module: wasmtime.Module) -> list[str]:
        problems: list[str] = []
        exports = {e.name: e.type for e in module.exports}
        start = exports.get("_start")
        if start is None:
            problems.append("the module does not export `_start` (a WASI command entry point)")
        elif not isinstance(start, wasmtime.FuncType) or start.params or start.results:
            problems.append("the export `_start` must be a function with no parameters and no results")
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            problems.append("the module does not export its linear memory as `memory`")
        for imp in module.imports:
            if imp.module != WASI_P1:
                problems.append(
                    f"the module imports `{imp.module}.{imp.name}`, which no declared capability provides "
                    f"(only `{WASI_P1}` functions are available)")
            elif not isinstance(imp.type, wasmtime.FuncType):
                problems.append(f"the import `{imp.module}.{imp.name}` must be a function")
        return problems


WASI_COMMAND_V1 = WasiCommandV1()


def compile_and_check(engine: wasmtime.Engine, data: bytes, abi: Abi = WASI_COMMAND_V1,
                      ) -> tuple[wasmtime.Module | None, list[str]]:
    """Compile `data` and check it against `abi`. Returns (module, problems); module is None if it
    does not compile. Never raises for bad input."""
    if not data:
        return None, ["the module is empty (0 bytes)"]
    if not data.startswith(WASM_MAGIC):
        return None, ["the file is not a WebAssembly binary (missing the \\0asm magic number)"]
    try:
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        return None, [f"the module does not compile: {first_line}"]
    return module, abi.check(module)
