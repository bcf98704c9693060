"""The `component-v1` ABI: a skill that is a WebAssembly component implementing the WIT world
`clawhub:skill/skill@1.0.0` (wit/skill.wit). Shared by the registry (verification at publish) and the executor
(the same check before a component is run, `services/executor/components.py`).

The world:

- export `run: func(input: list<u8>) -> result<list<u8>, string>`: called once per invocation, in a fresh
  instance; `ok` is the output, `err` a failure message (the call fails as a WASI command exiting with code 1
  would, the message going to stderr);
- import `log: func(line: string)`: a line for the call's log (stderr, within its limit). Always linked;
- capability-gated imports (`CAPABILITY_IMPORTS`): the interfaces `clawhub:skill/kv` (capability `kv`) and
  `clawhub:skill/http` (any `http:HOST`), each refused at publish and at run for a skill that does not declare
  the capability, and each function of exactly its type in wit/skill.wit (`INTERFACE_FUNCTIONS`). A component
  imports every interface of the world it is built for, so wit/skill.wit has one world per combination
  (`skill`, `skill-kv`, `skill-http`, `skill-kv-http`);
- WASI 0.2 (`wasi:*` interfaces): every component toolchain's libc imports them, so they are linked, but the
  grant decides what they reach, as for the core ABIs: stdio captured, no environment beyond `env:NAME`,
  the bundle preopened read-only at `/skill` only with `files`, clocks and randomness. `wasi:sockets` is
  linked (componentize-py's Python imports it whether or not the skill uses it) with no network: every
  address and every name lookup is refused. `wasi:http` and anything else is refused at publish.

Why a separate check rather than `Abi.check`: a component is not a core module, so it has no core imports
and exports to look at; `ComponentV1.check` (the `Abi` interface) only exists to refuse a core module
uploaded as a component.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import wasmtime
from wasmtime import component as wc

from services.runtime.wasm import (
    COMPONENT_ABI,
    HTTP_KIND,
    KV_CAPABILITY,
    WASM_MAGIC,
    WAT_NOT_BINARY,
    capability_kind,
    capability_problems,
    is_component,
    looks_like_wat,
)

WIT_VERSION = "1.0.0"
WIT_PACKAGE = f"clawhub:skill@{WIT_VERSION}"
WIT_WORLD = "skill"
RUN_EXPORT = "run"
LOG_IMPORT = "log"
RUN_SIGNATURE = "run: func(input: list<u8>) -> result<list<u8>, string>"
LOG_SIGNATURE = "log: func(line: string)"

# WASI 0.2 interfaces (the name before `@version`) a component may import whatever its capabilities. They
# are inert without a grant: see the module docstring.
WASI_INTERFACES = frozenset({
    "wasi:io/poll", "wasi:io/error", "wasi:io/streams",
    "wasi:clocks/monotonic-clock", "wasi:clocks/wall-clock",
    "wasi:random/random", "wasi:random/insecure", "wasi:random/insecure-seed",
    "wasi:cli/stdout", "wasi:cli/stderr", "wasi:cli/stdin", "wasi:cli/environment", "wasi:cli/exit",
    "wasi:cli/terminal-input", "wasi:cli/terminal-output", "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout", "wasi:cli/terminal-stderr",
    "wasi:filesystem/types", "wasi:filesystem/preopens",
    # Linked with no network (no address is allowed, no name lookup): see the module docstring.
    "wasi:sockets/network", "wasi:sockets/instance-network", "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket", "wasi:sockets/tcp", "wasi:sockets/tcp-create-socket",
    "wasi:sockets/ip-name-lookup",
})

KV_INTERFACE = "clawhub:skill/kv"
HTTP_INTERFACE = "clawhub:skill/http"

# Host interfaces of this package by the capability kind that grants them (`wasm.capability_kind`): the
# check below refuses an import of one without that kind among the capabilities (at publish, and before every
# call in the executor), and the executor links those a component imports. To add one: the interface in
# wit/skill.wit, its name here, its functions' types in `INTERFACE_FUNCTIONS`, its host functions in
# `services/executor/components.py` (`_HOST_INTERFACES`).
CAPABILITY_IMPORTS: dict[str, str] = {KV_CAPABILITY: KV_INTERFACE, HTTP_KIND: HTTP_INTERFACE}

# The functions of each interface, as `describe` renders their types (WIT syntax; a record as its fields). A
# component may import any subset (componentize-py imports them all), each of exactly this type.
_RESPONSE = "record { status: u16, headers: list<tuple<string, string>>, body: list<u8> }"
INTERFACE_FUNCTIONS: dict[str, dict[str, str]] = {
    KV_INTERFACE: {
        "get": "func(key: list<u8>) -> result<option<list<u8>>, string>",
        "put": "func(key: list<u8>, value: list<u8>, ttl-ms: u64) -> result<_, string>",
        "delete": "func(key: list<u8>) -> result<bool, string>",
        "keys": "func(prefix: list<u8>) -> result<list<list<u8>>, string>",
    },
    HTTP_INTERFACE: {
        "request": "func(method: string, url: string, headers: list<tuple<string, string>>, body: list<u8>) "
                   f"-> result<{_RESPONSE}, string>",
    },
}


def interface_name(import_name: str) -> str:
    """An import's interface without its version: `wasi:io/poll@0.2.9` -> `wasi:io/poll`."""
    return import_name.split("@", 1)[0]


def _is_bytes(ty: object) -> bool:
    return isinstance(ty, wc.ListType) and isinstance(ty.element, wc.U8)


def _run_problem(item: object) -> str | None:
    if item is None:
        return f"the component does not export `{RUN_EXPORT}` (the world {WIT_PACKAGE}/{WIT_WORLD} exports " \
               f"`{RUN_SIGNATURE}`)"
    if isinstance(item, wc.FuncType):
        params, result = item.params, item.result
        if (len(params) == 1 and _is_bytes(params[0][1]) and isinstance(result, wc.ResultType)
                and _is_bytes(result.ok) and isinstance(result.err, wc.String)):
            return None
    return f"the export `{RUN_EXPORT}` must be `{RUN_SIGNATURE}`"


def _log_problem(item: object) -> str | None:
    if (isinstance(item, wc.FuncType) and item.result is None and len(item.params) == 1
            and isinstance(item.params[0][1], wc.String)):
        return None
    return f"the import `{LOG_IMPORT}` must be `{LOG_SIGNATURE}`"


def describe(ty: object) -> str:
    """A component value or function type in WIT syntax (records as `record { field: type, ... }`), to compare
    an import's type with `INTERFACE_FUNCTIONS` and to show it in a refusal."""
    simple = {wc.Bool: "bool", wc.U8: "u8", wc.U16: "u16", wc.U32: "u32", wc.U64: "u64", wc.S8: "s8",
              wc.S16: "s16", wc.S32: "s32", wc.S64: "s64", wc.F32: "f32", wc.F64: "f64", wc.Char: "char",
              wc.String: "string"}
    for cls, name in simple.items():
        if isinstance(ty, cls):
            return name
    if isinstance(ty, wc.ListType):
        return f"list<{describe(ty.element)}>"
    if isinstance(ty, wc.OptionType):
        return f"option<{describe(ty.payload)}>"
    if isinstance(ty, wc.ResultType):
        ok, err = ty.ok, ty.err
        return f"result<{'_' if ok is None else describe(ok)}, {'_' if err is None else describe(err)}>"
    if isinstance(ty, wc.TupleType):
        return f"tuple<{', '.join(describe(e) for e in ty.elements)}>"
    if isinstance(ty, wc.RecordType):
        return f"record {{ {', '.join(f'{n}: {describe(t)}' for n, t in ty.fields)} }}"
    if isinstance(ty, wc.FuncType):
        params = ", ".join(f"{n}: {describe(t)}" for n, t in ty.params)
        result = ty.result
        return f"func({params})" + ("" if result is None else f" -> {describe(result)}")
    return type(ty).__name__


def _interface_problems(engine: wasmtime.Engine, name: str, interface: str, extern: object) -> list[str]:
    """What is wrong with an import of one of this package's interfaces: an unknown function, or one of
    another type than wit/skill.wit's."""
    expected = INTERFACE_FUNCTIONS[interface]
    if not isinstance(extern, wc.ComponentInstanceType):
        return [f"the import `{name}` must be an instance of the interface `{interface}` (wit/skill.wit)"]
    problems = []
    for func_name, item in extern.exports(engine).items():
        ty = item.ty
        if not isinstance(ty, wc.FuncType):  # a type the interface exports (the http `response` record)
            continue
        want = expected.get(func_name)
        if want is None:
            problems.append(f"the import `{name}` has no function `{func_name}` (it has: "
                            f"{', '.join(sorted(expected))}; see wit/skill.wit)")
        elif (got := describe(ty)) != want:
            problems.append(f"the function `{func_name}` of `{name}` must be `{func_name}: {want}`, not `{got}`")
    return problems


def world_problems(engine: wasmtime.Engine, component: wc.Component, capabilities: Sequence[str] = ()) -> list[str]:
    """Problems that keep `component` from implementing the clawhub skill world with these capabilities:
    the `run` export and its type, and every import (known, of the right type, granted). Empty when none."""
    problems: list[str] = capability_problems(capabilities)
    kinds = {capability_kind(c) for c in capabilities}
    ty = component.type
    exports = ty.exports(engine)
    problems += filter(None, [_run_problem(exports[RUN_EXPORT].ty if RUN_EXPORT in exports else None)])
    granted = {iface: kind for kind, iface in CAPABILITY_IMPORTS.items()}
    for name, extern in ty.imports(engine).items():
        interface = interface_name(name)
        if name == LOG_IMPORT:
            problems += filter(None, [_log_problem(extern.ty)])
        elif interface in WASI_INTERFACES:
            continue
        elif interface in granted:
            kind = granted[interface]
            if kind not in kinds:
                need = "an `http:HOST` capability" if kind == HTTP_KIND else f"the `{kind}` capability"
                problems.append(f"the component imports `{name}`, which its capabilities do not cover: it needs "
                                f"{need} (or build it for a world without `{interface}`: wit/skill.wit)")
            elif name != f"{interface}@{WIT_VERSION}":
                problems.append(f"the component imports `{name}`; this platform implements "
                                f"`{interface}@{WIT_VERSION}` (wit/skill.wit)")
            else:
                problems += _interface_problems(engine, name, interface, extern.ty)
        elif interface.startswith("wasi:"):
            problems.append(f"the component imports `{name}`, which a skill may not use (WASI interfaces "
                            "available: io, clocks, random, cli, filesystem; sockets without network)")
        else:
            problems.append(f"the component imports `{name}`, which is not part of the clawhub skill world "
                            f"({WIT_PACKAGE}, wit/skill.wit) nor granted by any capability")
    return problems


def compile_component(engine: wasmtime.Engine, data: bytes, capabilities: Sequence[str] = (),
                      ) -> tuple[wc.Component | None, list[str]]:
    """Compile `data` as a component and check its world (`world_problems`). Returns (component, problems);
    component is None when it does not compile. Never raises for bad input. Slow (a Python skill is some
    18 MB of wasm: seconds of compilation): call it off the event loop."""
    if not data:
        return None, ["the component is empty (0 bytes)"]
    if not data.startswith(WASM_MAGIC):
        if looks_like_wat(data):
            return None, [WAT_NOT_BINARY]
        return None, ["the file is not a WebAssembly binary (missing the \\0asm magic number)"]
    if not is_component(data):
        return None, [NOT_A_COMPONENT]
    try:
        component = wc.Component(engine, data)
    except wasmtime.WasmtimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        return None, [f"the component does not compile: {first_line}"]
    return component, world_problems(engine, component, capabilities)


NOT_A_COMPONENT = (f"the file is a core WebAssembly module, not a component: a {COMPONENT_ABI} skill is a component "
                   f"of the world {WIT_PACKAGE}/{WIT_WORLD} (build it with componentize-py or componentize-js), "
                   "or declare the ABI the module implements (wasi-command-v1 or memory-v1)")


@dataclass(frozen=True)
class ComponentV1:
    """The `component-v1` ABI as an `Abi`: its `check` sees a core module, which is always wrong here. Real
    checks are `compile_component` and `world_problems`."""

    name: str = COMPONENT_ABI

    def check(self, module: wasmtime.Module, capabilities: Sequence[str] = (),
              dependencies: Collection[str] = ()) -> list[str]:
        return [NOT_A_COMPONENT]


COMPONENT_V1 = ComponentV1()
