"""WebAssembly helpers shared by the registry (verification) and the executor (re-check before load).

ABI v1 is the WASI preview-1 command: the module exports `_start` (no params, no results) and `memory`,
and imports nothing but `wasi_snapshot_preview1` functions that its capabilities cover. Later ABIs plug in
behind `Abi`; `detect_abi` tells from a module's exports which skill ABI it implements:

- `wasi-command-v1`: input on stdin, output on stdout, exit code 0 is success.
- `memory-v1`: input and output through guest memory, no WASI stdio on the hot path (much cheaper per
  call). The module exports `memory`, `clawhub_alloc(len: i32) -> i32` and
  `clawhub_run(ptr: i32, len: i32) -> i64`. Per call, in a fresh instance, the host calls
  `clawhub_alloc(n)` for the n-byte input and writes it at the returned address, then calls
  `clawhub_run(address, n)`, whose result packs `(failed << 63) | (out_ptr << 32) | out_len` (so out_ptr
  is below 2 GiB). Not failed: bytes `[out_ptr, out_ptr + out_len)` are the output. Failed (bit 63 set,
  i.e. a negative i64): those bytes are an error message, and the call fails as a WASI command exiting
  with code 1 would (the message is appended to stderr). The host bounds-checks every address and length
  against the memory: a region outside it is an ABI violation (the call is reported as trapped), an
  out_len over the output limit is over the output limit. WASI imports stay available under the same
  capability policy; fd 1 and fd 2 both go to the (bounded) stderr, stdin is empty.

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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import wasmtime

WASI_P1 = "wasi_snapshot_preview1"
WASM_MAGIC = b"\0asm"
FILES_CAPABILITY = "files"
# Applied with fullmatch: `$` would accept a trailing "\n".
ENV_CAPABILITY_RE = re.compile(r"env:([A-Za-z_][A-Za-z0-9_]{0,127})")
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
    return [m[1] for c in capabilities if (m := ENV_CAPABILITY_RE.fullmatch(c))]


# What a capability may be, for messages about one that is not.
CAPABILITY_FORMS = (f"`{FILES_CAPABILITY}` (the skill's bundled files, read-only) or `env:NAME` (one environment "
                    "variable; NAME is a letter or `_`, then up to 127 letters, digits or `_`)")


def capability_problem(capability: str) -> str | None:
    """Why one capability string is not understood, naming it and the accepted forms; None when it is."""
    if capability == FILES_CAPABILITY or ENV_CAPABILITY_RE.fullmatch(capability):
        return None
    shown = repr(capability[:80]) + ("…" if len(capability) > 80 else "")
    if capability.startswith("env:"):
        return f"{shown} is not a valid `env:NAME` capability; a capability is {CAPABILITY_FORMS}"
    hint = " (did you mean `files`?)" if capability.strip().lower() in {"file", "files", "fs"} else ""
    return f"unknown capability {shown}{hint}; a capability is {CAPABILITY_FORMS}"


def capability_problems(capabilities: Sequence[str]) -> list[str]:
    """Why some capability strings are not understood; empty when all are."""
    return [p for c in capabilities if (p := capability_problem(c)) is not None]


def allowed_imports(capabilities: Sequence[str]) -> frozenset[str]:
    """The WASI preview-1 functions a module with these capabilities may import."""
    return BASELINE_IMPORTS | FILES_IMPORTS if FILES_CAPABILITY in capabilities else BASELINE_IMPORTS


def make_engine(*, epoch_interruption: bool = True, consume_fuel: bool = False,
                configure: Callable[[wasmtime.Config], None] | None = None) -> wasmtime.Engine:
    """An engine with clawhub's code-generation settings; `configure` can set more (say, the executor's
    pooling allocator) on the config before the engine is made."""
    config = wasmtime.Config()
    config.epoch_interruption = epoch_interruption
    config.consume_fuel = consume_fuel
    config.cranelift_opt_level = "speed"
    if configure is not None:
        configure(config)
    return wasmtime.Engine(config)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Abi(Protocol):
    """An application binary interface a skill module can implement."""

    @property
    def name(self) -> str: ...

    def check(self, module: wasmtime.Module, capabilities: Sequence[str] = (),
              dependencies: Collection[str] = ()) -> list[str]:
        """Problems that keep `module` from implementing this ABI with these capabilities; empty when none.
        Imports from the packages in `dependencies` are left to linking (`services/runtime/linking.py`)."""
        ...


@dataclass(frozen=True)
class WasiCommandV1:
    name: str = "wasi-command-v1"

    def check(self, module: wasmtime.Module, capabilities: Sequence[str] = (),
              dependencies: Collection[str] = ()) -> list[str]:
        problems: list[str] = []
        exports = {e.name: e.type for e in module.exports}
        if MEMORY_RUN in exports:
            problems.append(f"the module exports `{MEMORY_RUN}`, so it implements the memory-v1 ABI, not "
                            "wasi-command-v1: declare abi = \"memory-v1\"")
        start = exports.get("_start")
        if start is None:
            problems.append("the module does not export `_start` (a WASI command entry point)")
        elif not isinstance(start, wasmtime.FuncType) or start.params or start.results:
            problems.append("the export `_start` must be a function with no parameters and no results")
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            problems.append("the module does not export its linear memory as `memory`")
        return problems + import_problems(module, capabilities, dependencies)


@dataclass(frozen=True)
class LibraryV1:
    """A dependency package: exports functions that dependents import by its package name; never invoked
    on its own, so no entry point is required."""

    name: str = "library-v1"

    def check(self, module: wasmtime.Module, capabilities: Sequence[str] = (),
              dependencies: Collection[str] = ()) -> list[str]:
        problems: list[str] = []
        if not any(isinstance(e.type, wasmtime.FuncType) for e in module.exports):
            problems.append("a library must export at least one function for its dependents to import")
        problems += [f"a library may not import `{WASI_P1}.{imp.name}`: it runs in its dependent's sandbox "
                     "and would act with the dependent's grant; it may import only functions of its own "
                     "dependencies" for imp in module.imports if imp.module == WASI_P1]
        return problems + import_problems(module, capabilities, dependencies)


LIBRARY_V1 = LibraryV1()


def import_problems(module: wasmtime.Module, capabilities: Sequence[str] = (),
                    dependencies: Collection[str] = ()) -> list[str]:
    """The capability policy: problems with capability strings and with imports that neither the
    capabilities (WASI functions) nor the declared dependency packages cover; empty when none."""
    problems: list[str] = capability_problems(capabilities)
    allowed = allowed_imports(capabilities)
    for imp in module.imports:
        if imp.module in dependencies and imp.module != WASI_P1:
            continue  # checked against the resolved dependency's exports when linking
        if imp.module != WASI_P1:
            problems.append(
                f"the module imports `{imp.module}.{imp.name}`, which no declared capability provides "
                f"(only `{WASI_P1}` functions and functions of declared dependencies are available)")
        elif not isinstance(imp.type, wasmtime.FuncType):
            problems.append(f"the import `{imp.module}.{imp.name}` must be a function")
        elif imp.name not in allowed:
            need = (f"it needs the `{FILES_CAPABILITY}` capability" if imp.name in FILES_IMPORTS
                    else "no capability grants it")
            problems.append(f"the module imports `{imp.module}.{imp.name}`, which its capabilities do not "
                            f"cover: {need}")
    return problems


WASI_COMMAND_V1 = WasiCommandV1()

MEMORY_ALLOC = "clawhub_alloc"
MEMORY_RUN = "clawhub_run"
# Bit 63 of `clawhub_run`'s result: the skill failed and the region is its error message.
MEMORY_FAILED_BIT = 1 << 63


def _func_problem(exports: dict[str, object], name: str, params: list[wasmtime.ValType],
                  results: list[wasmtime.ValType], signature: str) -> str | None:
    func = exports.get(name)
    if func is None:
        return f"the module does not export `{name}`"
    if not isinstance(func, wasmtime.FuncType) or func.params != params or func.results != results:
        return f"the export `{name}` must be a function `{signature}`"
    return None


@dataclass(frozen=True)
class MemoryV1:
    """Input and output through guest memory (the contract is in the module docstring)."""

    name: str = "memory-v1"

    def check(self, module: wasmtime.Module, capabilities: Sequence[str] = (),
              dependencies: Collection[str] = ()) -> list[str]:
        problems: list[str] = []
        exports: dict[str, object] = {e.name: e.type for e in module.exports}
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        if MEMORY_RUN not in exports and "_start" in exports:
            problems.append(f"the module does not export `{MEMORY_RUN}` but exports `_start`: it is a WASI "
                            "command, so declare abi = \"wasi-command-v1\" (or export the memory-v1 functions)")
        else:
            problems += filter(None, [_func_problem(exports, MEMORY_RUN, [i32, i32], [i64],
                                                    "(ptr: i32, len: i32) -> i64")])
        problems += filter(None, [_func_problem(exports, MEMORY_ALLOC, [i32], [i32], "(len: i32) -> i32")])
        memory = exports.get("memory")
        if not isinstance(memory, wasmtime.MemoryType):
            problems.append("the module does not export its linear memory as `memory`")
        elif memory.is_64 or memory.is_shared:
            problems.append("the exported `memory` must be a plain 32-bit memory (not memory64, not shared)")
        return problems + import_problems(module, capabilities, dependencies)


MEMORY_V1 = MemoryV1()

# The skill ABIs (those a call can run) by their manifest name.
SKILL_ABIS: dict[str, Abi] = {WASI_COMMAND_V1.name: WASI_COMMAND_V1, MEMORY_V1.name: MEMORY_V1}


def detect_abi(module: wasmtime.Module) -> Abi:
    """The skill ABI a module's exports say it implements: exporting `clawhub_run` makes it memory-v1,
    anything else is taken for a WASI command (whose check then says what is missing). The executor runs
    a module by this; the registry checks it against the ABI the manifest declares (and each ABI's check
    refuses a module whose exports say the other), so the two agree for every published skill."""
    return MEMORY_V1 if any(e.name == MEMORY_RUN for e in module.exports) else WASI_COMMAND_V1


def imports_wasi(module: wasmtime.Module) -> bool:
    """Whether the module imports any WASI function. Only then does its Store need a WASI config: a WASI
    call in a Store without one aborts the process, but a module that imports none cannot make one."""
    return any(imp.module == WASI_P1 for imp in module.imports)


# Where WAT text may begin: after whitespace, `;;` line comments and `(; ;)` block comments (and a BOM).
_WAT_START = re.compile(rb"\A(?:\xef\xbb\xbf)?(?:\s|;;[^\n]*(?:\n|\Z)|\(;(?:[^;]|;(?!\)))*;\))*"
                        rb"\((?:module|component)\b", re.DOTALL)


def looks_like_wat(data: bytes) -> bool:
    """Whether `data` is WebAssembly text (`(module ...)` or `(component ...)`) rather than a binary."""
    return bool(_WAT_START.match(data[:4096]))


WAT_NOT_BINARY = ("the module is WebAssembly text (WAT), not a binary: compile it with wat2wasm, or give the "
                  "file the .wat extension so that `clawhub publish` compiles it")

_WAT_LOCATION = re.compile(r"^\s*--> [^\n]*?:(\d+):(\d+)\s*$", re.MULTILINE)


def wat_error(text: str, filename: str, lead: str = "") -> str:
    """wasmtime's error for WAT that does not compile, as `FILE:LINE:COLUMN: {lead}what`, then wasmtime's
    excerpt of the source line (with a caret under the column) when it has one."""
    text = text.strip()
    what = text.splitlines()[0].strip() if text else "unknown error"
    location = _WAT_LOCATION.search(text)
    if location is None:
        return f"{filename}: {lead}{what}"
    excerpt = [line.rstrip() for line in text[location.end():].splitlines() if line.strip()]
    return "\n".join([f"{filename}:{location[1]}:{location[2]}: {lead}{what}", *excerpt])


def compile_and_check(engine: wasmtime.Engine, data: bytes, abi: Abi | None = WASI_COMMAND_V1,
                      capabilities: Sequence[str] = (), dependencies: Collection[str] = (),
                      ) -> tuple[wasmtime.Module | None, list[str]]:
    """Compile `data` and check it against `abi` (None: the skill ABI `detect_abi` finds). Returns
    (module, problems); module is None if it does not compile. Never raises for bad input."""
    if not data:
        return None, ["the module is empty (0 bytes)"]
    if not data.startswith(WASM_MAGIC):
        if looks_like_wat(data):
            return None, [WAT_NOT_BINARY]
        return None, ["the file is not a WebAssembly binary (missing the \\0asm magic number)"]
    try:
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        return None, [f"the module does not compile: {first_line}"]
    return module, (abi or detect_abi(module)).check(module, capabilities, dependencies)
