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
- `kv`: the skill's own key-value store, through the host functions `clawhub.kv_get`, `kv_put`, `kv_delete`
  and `kv_list` (`HOST_IMPORTS`; the contract is docs/skills/host-api.md, the implementation
  services/executor/hostapi.py);
- never: sockets (`sock_*`): a skill has no network.

Host functions (import module `clawhub`) are listed in `HOST_IMPORTS` by the capability kind that grants them
(`kv`; `http` for `http:HOST` later): a module may import one only with that capability, with exactly the
listed type. The registry refuses anything else at publish and the executor at run, by the same check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import wasmtime

from services.runtime.httpcap import HTTP_CAPABILITY_PREFIX, http_capability_problem

WASI_P1 = "wasi_snapshot_preview1"
WASM_MAGIC = b"\0asm"
# The third skill ABI: a WebAssembly component of the WIT world in wit/skill.wit, checked by
# services/runtime/components.py (not an `Abi.check` on a core module) and run by services/executor/components.py.
COMPONENT_ABI = "component-v1"
# What follows the magic number in a component binary (version 0x0d, layer 1); a core module has 1, 0, 0, 0.
_COMPONENT_LAYER = b"\x0d\x00\x01\x00"


def is_component(data: bytes) -> bool:
    """Whether `data` is a WebAssembly component binary (rather than a core module), by its preamble."""
    return data[:4] == WASM_MAGIC and data[4:8] == _COMPONENT_LAYER

FILES_CAPABILITY = "files"
KV_CAPABILITY = "kv"
# The import module of clawhub's host functions (not a valid package name, so never a dependency).
HOST_MODULE = "clawhub"
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


HTTP_KIND = "http"

# Host functions by the capability kind that grants them, then by name: (params, results) as wasm value
# type names. The executor implements each (services/executor/hostapi.py keeps its functions by the same
# kinds); adding a kind here (say `http`, granted by `http:HOST`) is what makes its imports verifiable.
HOST_IMPORTS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    KV_CAPABILITY: {
        "kv_get": (("i32", "i32", "i32", "i32"), ("i64",)),
        "kv_put": (("i32", "i32", "i32", "i32", "i64"), ("i32",)),
        "kv_delete": (("i32", "i32"), ("i32",)),
        "kv_list": (("i32", "i32", "i32", "i32"), ("i64",)),
    },
    # Granted by any `http:HOST` capability (which hosts: services/executor/outbound.py).
    HTTP_KIND: {
        "http_request": (("i32", "i32"), ("i64",)),
        "http_response": (("i32", "i32"), ("i64",)),
    },
}


def capability_kind(capability: str) -> str:
    """The kind of a capability, which `HOST_IMPORTS` is keyed by: `kv` for `kv`, `http` for `http:HOST`."""
    return capability.split(":", 1)[0]


def host_import_kind(name: str) -> str | None:
    """The capability kind whose host functions include `clawhub.<name>`; None for no host function."""
    return next((kind for kind, funcs in HOST_IMPORTS.items() if name in funcs), None)


def _valtype(name: str) -> wasmtime.ValType:
    return {"i32": wasmtime.ValType.i32(), "i64": wasmtime.ValType.i64(),
            "f32": wasmtime.ValType.f32(), "f64": wasmtime.ValType.f64()}[name]


def host_func_type(kind: str, name: str) -> wasmtime.FuncType:
    """The wasm type of host function `name` of capability kind `kind` (`HOST_IMPORTS`)."""
    params, results = HOST_IMPORTS[kind][name]
    return wasmtime.FuncType([_valtype(p) for p in params], [_valtype(r) for r in results])


def imports_host(module: wasmtime.Module) -> bool:
    """Whether the module imports any clawhub host function (so it must be linked with them)."""
    return any(imp.module == HOST_MODULE for imp in module.imports)


def env_names(capabilities: Sequence[str]) -> list[str]:
    """The environment variable names `env:NAME` capabilities declare."""
    return [m[1] for c in capabilities if (m := ENV_CAPABILITY_RE.fullmatch(c))]


# What a capability may be, for messages about one that is not.
CAPABILITY_FORMS = (f"`{FILES_CAPABILITY}` (the skill's bundled files, read-only), `{KV_CAPABILITY}` (a key-value "
                    "store of the skill's own), `http:HOST` (HTTP(S) requests to HOST, `HOST:PORT` or `*.DOMAIN`) "
                    "or `env:NAME` (one environment variable; NAME is a letter or `_`, then up to 127 letters, "
                    "digits or `_`)")


def capability_problem(capability: str) -> str | None:
    """Why one capability string is not understood, naming it and the accepted forms; None when it is."""
    if capability in (FILES_CAPABILITY, KV_CAPABILITY) or ENV_CAPABILITY_RE.fullmatch(capability):
        return None
    if capability.startswith(HTTP_CAPABILITY_PREFIX):
        return http_capability_problem(capability)
    shown = repr(capability[:80]) + ("…" if len(capability) > 80 else "")
    if capability.startswith("env:"):
        return f"{shown} is not a valid `env:NAME` capability; a capability is {CAPABILITY_FORMS}"
    lowered = capability.strip().lower()
    hint = (" (did you mean `files`?)" if lowered in {"file", "files", "fs"}
            else " (did you mean `kv`?)" if lowered in {"kv", "kvstore", "kv-store", "store", "state"} else "")
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
    if cache := compilation_cache_config():
        config.cache = cache
    if configure is not None:
        configure(config)
    return wasmtime.Engine(config)


CACHE_VARIABLE = "CLAWHUB_WASMTIME_CACHE"


def compilation_cache_config() -> str | None:
    """`CLAWHUB_WASMTIME_CACHE=DIR` turns on wasmtime's own on-disk compilation cache in DIR, shared by every
    engine of every process that sets it (the registry's verification, the executor's cold loads, `clawhub run`):
    a module compiled once is not compiled again. Off by default. wasmtime trusts what it finds there, so DIR
    must be writable by clawhub alone. Returns the path of the cache's configuration file, written on first use."""
    directory = os.environ.get(CACHE_VARIABLE, "").strip()
    if not directory:
        return None
    root = Path(directory).expanduser().resolve()
    config = root / "wasmtime-cache.toml"
    if not config.exists():
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        scratch = root / f".wasmtime-cache.toml.{os.getpid()}"
        scratch.write_text(f"[cache]\ndirectory = {json.dumps(str(root / 'modules'))}\n")
        scratch.replace(config)
    return str(config)


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
        problems += [f"a library may not import `{HOST_MODULE}.{imp.name}`: it runs in its dependent's sandbox "
                     "and would act with the dependent's grant" for imp in module.imports if imp.module == HOST_MODULE]
        return problems + [p for p in import_problems(module, capabilities, dependencies)
                           if f"`{HOST_MODULE}." not in p]


LIBRARY_V1 = LibraryV1()


def import_problems(module: wasmtime.Module, capabilities: Sequence[str] = (),
                    dependencies: Collection[str] = ()) -> list[str]:
    """The capability policy: problems with capability strings and with imports that neither the
    capabilities (WASI functions) nor the declared dependency packages cover; empty when none."""
    problems: list[str] = capability_problems(capabilities)
    allowed = allowed_imports(capabilities)
    kinds = {capability_kind(c) for c in capabilities}
    for imp in module.imports:
        if imp.module in dependencies and imp.module != WASI_P1:
            continue  # checked against the resolved dependency's exports when linking
        if imp.module == HOST_MODULE:
            problems += _host_import_problems(imp, kinds, dependencies)
        elif imp.module != WASI_P1:
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


def _host_import_problems(imp: wasmtime.ImportType, kinds: Collection[str],
                          dependencies: Collection[str]) -> list[str]:
    """Problems with one import from `HOST_MODULE`: unknown, of the wrong type, not granted, or in a skill
    with dependencies (whose per-call linking does not provide host functions)."""
    name = imp.name or ""
    kind = host_import_kind(name)
    where = f"`{HOST_MODULE}.{name}`"
    if kind is None:
        known = ", ".join(f"`{n}`" for funcs in HOST_IMPORTS.values() for n in funcs)
        return [f"the module imports {where}, which is not a clawhub host function (there are {known})"]
    expected = host_func_type(kind, name)
    if not isinstance(imp.type, wasmtime.FuncType) or (imp.type.params, imp.type.results) != (
            expected.params, expected.results):
        params, results = HOST_IMPORTS[kind][name]
        return [f"the import {where} must be a function `({', '.join(params)}) -> {', '.join(results)}`"]
    problems = []
    if kind not in kinds:
        example = "http:HOST" if kind == HTTP_KIND else kind
        problems.append(f"the module imports {where}, which its capabilities do not cover: it needs the `{example}` "
                        f"capability (declare capabilities = [\"{example}\"] in skill.toml)")
    if dependencies:
        problems.append(f"the module imports {where} and has dependencies: host functions are not yet available "
                        "to skills with dependencies")
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
    if is_component(data):
        return None, [f"the file is a WebAssembly component, not a core module: declare abi = \"{COMPONENT_ABI}\""]
    try:
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        return None, [f"the module does not compile: {first_line}"]
    return module, (abi or detect_abi(module)).check(module, capabilities, dependencies)
