"""WebAssembly helpers shared by the registry (verification) and the executor (re-check before load).

ABI v1 is the WASI preview-1 command: the module exports `_start` (no params, no results) and `memory`,
and imports nothing but `wasi_snapshot_preview1` functions that its capabilities cover. Later ABIs plug in
behind `Abi`.

Capabilities (manifest `capabilities`), and the WASI imports they cover:

- always: stdio and process functions, arguments (only the manifest's own `args`), the environment (empty
  unless `env:NAME` is declared), clocks and randomness (WASI defaults), preopen queries (none exist
  unless `files` is declared);
- `env:NAME`: the sandbox gets variable NAME, with the value the operator set at deploy time;
- `files`: the skill's bundled files, preopened read-only at `/skill` (path and directory functions);
- never: sockets (`sock_*`): a skill has no network.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import wasmtime

WASI_P1 = "wasi_snapshot_preview1"
WASM_MAGIC = b"\0asm"
FILES_CAPABILITY = "files"
ENV_CAPABILITY_RE = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]{0,127})$")
# Where the bundle is preopened inside the sandbox.
BUNDLE_GUEST_DIR = "/skill"

BASELINE_IMPORTS = frozenset({
    "fd_read", "fd_write", "fd_close", "fd_seek", "fd_tell", "fd_sync", "fd_datasync", "fd_advise",
    "fd_allocate", "fd_fdstat_get", "fd_fdstat_set_flags", "fd_fdstat_set_rights", "fd_filestat_get",
    "fd_prestat_get", "fd_prestat_dir_name", "fd_pread", "fd_pwrite", "fd_renumber",
    "proc_exit", "proc_raise", "sched_yield", "args_get", "args_sizes_get", "environ_get",
    "environ_sizes_get", "clock_time_get", "clock_res_get", "poll_oneoff", "random_get",
})
FILES_IMPORTS = frozenset({
    "path_open", "path_filestat_get", "path_filestat_set_times", "path_readlink", "path_create_directory",
    "path_remove_directory", "path_unlink_file", "path_rename", "path_link", "path_symlink", "fd_readdir",
    "fd_filestat_set_size", "fd_filestat_set_times",
})


def env_names(capabilities: Sequence[str]) -> list[str]:
    """The environment variable names `env:NAME` capabilities declare."""
    return [m[1] for c in capabilities if (m := ENV_CAPABILITY_RE.match(c))]


def capability_problems(capabilities: Sequence[str]) -> list[str]:
    """Why some capability strings are not understood; empty when all are."""
    return [f"unknown capability {c[:80]!r} (known: env:NAME, {FILES_CAPABILITY})" for c in capabilities
            if c != FILES_CAPABILITY and not ENV_CAPABILITY_RE.match(c)]


def allowed_imports(capabilities: Sequence[str]) -> frozenset[str]:
    """The WASI preview-1 functions a module with these capabilities may import."""
    return BASELINE_IMPORTS | FILES_IMPORTS if FILES_CAPABILITY in capabilities else BASELINE_IMPORTS


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

    def check(self, module: wasmtime.Module, capabilities: Sequence[str] = ()) -> list[str]:
        """Problems that keep `module` from implementing this ABI with these capabilities; empty when none."""
        ...


@dataclass(frozen=True)
class WasiCommandV1:
    name: str = "wasi-command-v1"

    def check(self, module: wasmtime.Module, capabilities: Sequence[str] = ()) -> list[str]:
        problems: list[str] = capability_problems(capabilities)
        allowed = allowed_imports(capabilities)
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
            elif imp.name not in allowed:
                need = (f"it needs the `{FILES_CAPABILITY}` capability" if imp.name in FILES_IMPORTS
                        else "no capability grants it")
                problems.append(f"the module imports `{imp.module}.{imp.name}`, which its capabilities do not "
                                f"cover: {need}")
        return problems


WASI_COMMAND_V1 = WasiCommandV1()


def compile_and_check(engine: wasmtime.Engine, data: bytes, abi: Abi = WASI_COMMAND_V1,
                      capabilities: Sequence[str] = ()) -> tuple[wasmtime.Module | None, list[str]]:
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
    return module, abi.check(module, capabilities)
