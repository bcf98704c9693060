"""Running `component-v1` skills: WebAssembly components of the world in wit/skill.wit (contract and import
policy in `services/runtime/components.py`), through wasmtime-py's `wasmtime.component`.

The sandbox hands components here by ABI (`Sandbox.compile`, `link`, `check`, `run`); everything else about a
call (loading by digest, the hot cache, scheduling, errors) is the same as for core modules, so a
`CompiledComponent` is a `CompiledModule` whose `module` is the `Component` and whose `pre` is the component
`Linker` it is instantiated with (never None: a component has no dependency packages, so the dependency
linker passes it through as it does a module without any).

Per call, as for the other ABIs: a fresh Store, with

- memory through the Store's limiter (`RunLimits.memory_bytes` is the ceiling of each linear memory; a
  componentize-py component keeps its Python heap in one);
- wall clock and cancellation through epoch deadlines handled by the sandbox's own callback (so timeout,
  cancel and the stderr limit behave exactly as for modules);
- fuel when the call has a budget (a metered engine, as for modules);
- stdout and stderr of the component (WASI) and its `log` lines all go to the call's stderr, bounded; the
  output is `run`'s `ok` value, bounded by the output limit.

Why engines of its own, without the pooling allocator the sandbox's use: a componentize-py component is some
14 core instances, so the sandbox's pool (128 core instances) would hold 9 component calls at once and
starve the core-module calls of slots. On-demand allocation costs a component call little next to its own
cost (about 1.4 ms for the Python example). A ticker thread bumps these engines' epochs; it ends with the
sandbox (`Sandbox.close`).

Capability-gated interfaces (`kv`, `http`; types in wit/skill.wit): linked for a component that imports them,
which the world check lets run only for calls whose capabilities cover them; each function acts through the
same code as the core ABIs' `clawhub` host functions (`hostapi.kv_namespace`, `hostapi.fetch`) on the call's
`HostGrant`, counted in its usage under the same names, and a refusal is the `err` string "REASON: message".
Their values are converted by hand in the C API's representation (`_HostFunc`), as `run`'s are.

Warm tier: the loader's `ArtifactCache` stores a component's `serialize()` output flagged as a component, and
hands it back to `Sandbox.link`, which comes here (`ComponentRunner.load`): deserializing the Python example
takes about 0.1 s against 7-30 s of compiling it.

What a trap means is told as for modules (`sandbox._verdict_of`). Peak memory is not observable: the
component API exposes no core memory, and the C API's store limiter reports nothing, so `peak_memory_bytes`
is 0 and "memory limit" is reported when instantiation exceeds the limit (wasmtime says so) or when the
guest's own report of a failed allocation is at the end of its stderr (`_OUT_OF_MEMORY`: Python's MemoryError, Rust's
allocation failure) before the trap.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import component as wc

from services.executor import hostapi
from services.executor.hostapi import HostCall
from services.executor.outbound import HttpRefused
from services.executor.sandbox import (
    _NOTHING,
    _RUN_FAILURES,
    TICK_SECONDS,
    CompiledModule,
    Grant,
    ModuleRejected,
    RunControl,
    RunLimits,
    RunResult,
    Sandbox,
    Verdict,
    _caps_key,
    _Capture,
    _first_line,
    _result,
    _verdict_of,
    arm,
)
from services.runtime import tracing
from services.runtime.components import (
    CAPABILITY_IMPORTS,
    COMPONENT_V1,
    HTTP_INTERFACE,
    KV_INTERFACE,
    LOG_IMPORT,
    RUN_EXPORT,
    WIT_VERSION,
    compile_component,
    interface_name,
    world_problems,
)
from services.runtime.errors import Reason, ServiceError
from services.runtime.wasm import BUNDLE_GUEST_DIR, HTTP_KIND, KV_CAPABILITY, capability_kind, make_engine

# How a guest reports a failed allocation on its stderr just before it traps (see the module docstring).
_OUT_OF_MEMORY = (b"MemoryError", b"memory allocation of ", b"out of memory")

_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_component_val_t)
_VAL_OF = ffi.wasmtime_component_val_t.of.offset
_KIND_U8 = ffi.WASMTIME_COMPONENT_U8.value
_KIND_LIST = ffi.WASMTIME_COMPONENT_LIST.value
_KIND_RESULT = ffi.WASMTIME_COMPONENT_RESULT.value
_KIND_STRING = ffi.WASMTIME_COMPONENT_STRING.value
_KIND_BOOL = ffi.WASMTIME_COMPONENT_BOOL.value
_KIND_U16 = ffi.WASMTIME_COMPONENT_U16.value
_KIND_TUPLE = ffi.WASMTIME_COMPONENT_TUPLE.value
_KIND_RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
_KIND_OPTION = ffi.WASMTIME_COMPONENT_OPTION.value


@dataclass(frozen=True)
class CompiledComponent(CompiledModule):
    """A component compiled and world-checked once; each call instantiates it in a fresh Store. See the
    module docstring for what `module` and `pre` hold."""

    @property
    def component(self) -> wc.Component:
        return cast(wc.Component, self.module)

    @property
    def linker(self) -> wc.Linker:
        return cast(wc.Linker, self.pre)

    def instantiate(self, store: wasmtime.Store) -> wasmtime.Instance:
        raise TypeError("a component is run by services/executor/components.py, not instantiated as a module")


class _CallState(threading.local):
    """The run in progress on this thread, for the host functions (called on the run's thread): its stderr
    for `log`, its `HostCall` (grant and usage) for `kv` and `http`."""

    stderr: _Capture = _NOTHING
    host: HostCall | None = None


_call = _CallState()


def _log(_store: object, line: str) -> None:
    """`log: func(line: string)`: one line to the call's stderr. Past the stderr limit the line is cut and
    the run is stopped at the next epoch slice (the capture remembers the overflow). Never raises: wasmtime-py
    keeps a host function's exception in a process-wide slot that any thread's next error would pick up."""
    _call.stderr(line.encode("utf-8", "replace") + b"\n")


# --- the capability-gated interfaces (wit/skill.wit: `kv`, `http`) ---------------------------------------------
#
# Each function takes the call's `HostCall` and its arguments as Python values, and returns its `ok` value;
# a refusal is raised as the same ServiceError / HttpRefused the core ABIs' host functions raise, by the same
# code (`hostapi.kv_namespace`, `hostapi.fetch`), and the guest gets `err("REASON: message")`. Calls are
# counted in the grant's usage under the core ABI's names (`kv_get`...), so the executor's Usage reports
# kv operations and HTTP requests the same way for every ABI.


def _kv_get(call: HostCall, key: bytes) -> bytes | None:
    return hostapi.kv_namespace(call, "kv.get").get(key)


def _kv_put(call: HostCall, key: bytes, value: bytes, ttl_ms: int) -> None:
    hostapi.kv_namespace(call, "kv.put").put(key, value, ttl_ms)


def _kv_delete(call: HostCall, key: bytes) -> bool:
    return hostapi.kv_namespace(call, "kv.delete").delete(key)


def _kv_keys(call: HostCall, prefix: bytes) -> list[bytes]:
    return list(hostapi.kv_namespace(call, "kv.keys").keys(prefix))


# Largest HTTP response body handed to a component (1 MiB: 32 MiB of host memory while it is lowered).
MAX_COMPONENT_HTTP_BODY = 1 << 20


def _http_request(call: HostCall, method: str, url: str, headers: list[tuple[str, str]],
                  body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    response = hostapi.fetch(hostapi.http_grant(call, "http.request"), method, url, headers, body)
    if len(response.body) > MAX_COMPONENT_HTTP_BODY:
        # Lowered into the component, each body byte is a 32-byte C value (wasmtime's list<u8>), outside the
        # store's memory limit: a lower cap than the core ABIs' keeps a call's host memory bounded.
        raise HttpRefused(Reason.HTTP_RESPONSE_TOO_LARGE,
                          f"the response body is {len(response.body)} bytes; a component gets at most "
                          f"{MAX_COMPONENT_HTTP_BODY} bytes of one (each byte costs the host 32 while handed over)")
    return response.status, response.headers, response.body


# How each argument is lifted from, and the `ok` value lowered to, the C API's values (`_lift_*`, `_lower_*`
# below): wasmtime-py's generic conversion goes one list element at a time in Python, seconds per MiB of
# body, and cannot tell `option<list<u8>>` from `string` in a `result` (both pass its `isinstance` test).
_Lift = Callable[[Any], Any]
_Lower = Callable[[Any, Any], None]


@dataclass(frozen=True)
class _HostFunc:
    impl: Callable[..., Any]
    params: tuple[_Lift, ...]
    ok: _Lower | None  # None: `result<_, string>`
    usage: str  # the name the call is counted under in `HostGrant.usage`


def _lift_bytes(val: Any) -> bytes:
    n = val.of.list.size
    return _values(val.of.list.data, n)[_VAL_OF::_VAL_SIZE].tobytes() if n else b""


def _lift_str(val: Any) -> str:
    return ctypes.string_at(val.of.string.data, val.of.string.size).decode("utf-8")


def _lift_u64(val: Any) -> int:
    return int(val.of.u64)


def _lift_pairs(val: Any) -> list[tuple[str, str]]:
    items = val.of.list.data
    return [(_lift_str(items[i].of.tuple.data[0]), _lift_str(items[i].of.tuple.data[1]))
            for i in range(val.of.list.size)]


def _lower_bytes(val: Any, data: bytes) -> None:
    size = len(data)
    ffi.wasmtime_component_vallist_new_uninit(ctypes.byref(val.of.list), size)
    if size:
        values = _values(val.of.list.data, size)
        values[0::_VAL_SIZE] = bytes((_KIND_U8,)) * size
        values[_VAL_OF::_VAL_SIZE] = data
    val.kind = _KIND_LIST


def _lower_str(val: Any, text: str) -> None:
    val.of.string = ffi.str_to_capi(text)
    val.kind = _KIND_STRING


def _lower_bool(val: Any, value: bool) -> None:
    val.of.boolean = bool(value)
    val.kind = _KIND_BOOL


def _lower_option_bytes(val: Any, data: bytes | None) -> None:
    if data is None:
        val.of.option = None
    else:
        inner = ffi.wasmtime_component_val_t()
        _lower_bytes(inner, data)
        val.of.option = ffi.wasmtime_component_val_new(ctypes.byref(inner))  # moves `inner`
    val.kind = _KIND_OPTION


def _lower_byte_lists(val: Any, items: list[bytes]) -> None:
    ffi.wasmtime_component_vallist_new_uninit(ctypes.byref(val.of.list), len(items))
    for i, item in enumerate(items):
        _lower_bytes(val.of.list.data[i], item)
    val.kind = _KIND_LIST


def _lower_pairs(val: Any, pairs: list[tuple[str, str]]) -> None:
    ffi.wasmtime_component_vallist_new_uninit(ctypes.byref(val.of.list), len(pairs))
    for i, (name, value) in enumerate(pairs):
        pair = val.of.list.data[i]
        ffi.wasmtime_component_valtuple_new_uninit(ctypes.byref(pair.of.tuple), 2)
        _lower_str(pair.of.tuple.data[0], name)
        _lower_str(pair.of.tuple.data[1], value)
        pair.kind = _KIND_TUPLE
    val.kind = _KIND_LIST


def _lower_response(val: Any, response: tuple[int, list[tuple[str, str]], bytes]) -> None:
    status, headers, body = response
    ffi.wasmtime_component_valrecord_new_uninit(ctypes.byref(val.of.record), 3)
    fields = val.of.record.data
    for i, name in enumerate(("status", "headers", "body")):
        fields[i].name = ffi.str_to_capi(name)
    fields[0].val.of.u16 = status
    fields[0].val.kind = _KIND_U16
    _lower_pairs(fields[1].val, headers)
    _lower_bytes(fields[2].val, body)
    val.kind = _KIND_RECORD


_HOST_INTERFACES: dict[str, dict[str, _HostFunc]] = {
    KV_CAPABILITY: {
        "get": _HostFunc(_kv_get, (_lift_bytes,), _lower_option_bytes, "kv_get"),
        "put": _HostFunc(_kv_put, (_lift_bytes, _lift_bytes, _lift_u64), None, "kv_put"),
        "delete": _HostFunc(_kv_delete, (_lift_bytes,), _lower_bool, "kv_delete"),
        "keys": _HostFunc(_kv_keys, (_lift_bytes,), _lower_byte_lists, "kv_list"),
    },
    HTTP_KIND: {
        "request": _HostFunc(_http_request, (_lift_str, _lift_str, _lift_pairs, _lift_bytes), _lower_response,
                             "http_request"),
    },
}
if set(_HOST_INTERFACES) != set(CAPABILITY_IMPORTS) or set(CAPABILITY_IMPORTS) != {KV_CAPABILITY, HTTP_KIND} \
        or CAPABILITY_IMPORTS[KV_CAPABILITY] != KV_INTERFACE or CAPABILITY_IMPORTS[HTTP_KIND] != HTTP_INTERFACE:
    raise RuntimeError("components._HOST_INTERFACES is out of step with runtime.components.CAPABILITY_IMPORTS")


def _host_call(host_func: _HostFunc, label: str, args: Any, nargs: int, results: Any) -> None:
    """One call of a capability-gated function: `results[0]` is set to its `result<T, string>`. Never raises
    (see `_log`): a refusal, a bug or a bad argument all become `err`."""
    ok, value, message = False, None, ""
    call = _call.host
    try:
        if call is None:  # instantiated outside a run: nothing to act for
            message = f"{Reason.PERMISSION_DENIED}: `{label}` was called outside a skill call"
        else:
            call.grant.usage[host_func.usage] += 1
            if nargs != len(host_func.params):  # the world check and the linker make this unreachable
                raise TypeError(f"`{label}` takes {len(host_func.params)} arguments, not {nargs}")
            value = host_func.impl(call, *(lift(args[i]) for i, lift in enumerate(host_func.params)))
            ok = True
    except (ServiceError, HttpRefused) as exc:
        message = f"{exc.reason}: {exc.message}"
    except UnicodeDecodeError:  # the canonical ABI guarantees UTF-8 strings: unreachable
        message = f"{Reason.HTTP_INVALID_REQUEST}: a string argument is not UTF-8"
    except Exception:  # a bug or an unexpected backend error: the guest sees "unavailable", never a crash
        hostapi.log.exception("component host function %s failed", label)
        message = f"{Reason.INTERNAL}: internal error in the host"
    result = results[0]
    result.kind = _KIND_RESULT
    result.of.result.is_ok = ok
    if ok and host_func.ok is None:
        result.of.result.val = None
        return
    payload = ffi.wasmtime_component_val_t()
    try:
        if ok:
            assert host_func.ok is not None
            host_func.ok(payload, value)
        else:
            _lower_str(payload, message)
    except Exception:  # a value the type cannot hold (say a status over 65535): `err` instead
        hostapi.log.exception("component host function %s returned an unrepresentable value", label)
        result.of.result.is_ok = False
        payload = ffi.wasmtime_component_val_t()
        _lower_str(payload, f"{Reason.INTERNAL}: internal error in the host")
    result.of.result.val = ffi.wasmtime_component_val_new(ctypes.byref(payload))  # moves `payload`


# The C callbacks and their data must outlive every linker that holds them: kept here for the process.
_CALLBACKS: list[tuple[Any, Any]] = []
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()  # a null function pointer


def _add_host_func(iface: wc.LinkerInstance, label: str, name: str, host_func: _HostFunc) -> None:
    """Define `name` in `iface` with a C callback of our own (not `LinkerInstance.add_func`: see `_Lift`);
    `label` names it in diagnostics (`kv.get`)."""

    @ffi.wasmtime_component_func_callback_t  # type: ignore[untyped-decorator]
    def callback(_env: Any, _context: Any, _ty: Any, args: Any, nargs: int, results: Any, _nresults: int) -> int:
        _host_call(host_func, label, args, nargs, results)
        return 0

    _CALLBACKS.append((callback, host_func))
    name_bytes = name.encode()
    error = ffi.wasmtime_component_linker_instance_add_func(iface.ptr(), ctypes.create_string_buffer(name_bytes),
                                                            len(name_bytes), callback, None, _NO_FINALIZER)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


class ComponentRunner:
    """The component engines, linkers and run; one per `Sandbox` (`runner_for`), sharing its run table and
    epoch callback."""

    def __init__(self, sandbox: Sandbox) -> None:
        # Not the sandbox itself (which keeps the runner alive in `_RUNNERS`, weakly keyed): what a run needs.
        self._running = sandbox._running
        self._ids = sandbox._ids
        self._on_epoch_at = sandbox._on_epoch_at
        self._stop = sandbox._stop
        self.engines = (make_engine(epoch_interruption=True), make_engine(epoch_interruption=True, consume_fuel=True))
        self._linkers: dict[tuple[bool, frozenset[str]], wc.Linker] = {}
        self._linkers_lock = threading.Lock()
        self._ticker = threading.Thread(target=self._tick, name="component-epoch-ticker", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        engines = self.engines
        while not self._stop.wait(TICK_SECONDS):
            for engine in engines:
                engine.increment_epoch()

    def engine_for(self, metered: bool) -> wasmtime.Engine:
        return self.engines[metered]

    @staticmethod
    def engine_settings(metered: bool) -> str:
        """What makes code compiled by `engine_for(metered)` incompatible with other engines (a warm-tier
        key, as `Sandbox.engine_settings`). Keep in step with the engines made above."""
        return f"abi=component-v1;epoch_interruption=1;consume_fuel={int(metered)};opt=speed;pooling=0"

    def linker(self, metered: bool, capabilities: Sequence[str] = ()) -> wc.Linker:
        """The linker for components of this engine that may use these capabilities (or capability kinds):
        WASI 0.2, `log`, and the host interfaces of the kinds among them (`CAPABILITY_IMPORTS`: `kv`,
        `http`). Built once per (engine, kinds)."""
        kinds = frozenset(k for k in map(capability_kind, capabilities) if k in CAPABILITY_IMPORTS)
        key = (metered, kinds)
        linker = self._linkers.get(key)
        if linker is None:
            with self._linkers_lock:
                linker = self._linkers.get(key)
                if linker is None:
                    linker = wc.Linker(self.engines[metered])
                    linker.add_wasip2()
                    with linker.root() as root:
                        root.add_func(LOG_IMPORT, _log)
                        # The capability-gated interfaces of these kinds; their functions find the call's
                        # grant the way `_log` finds its stderr: through `_call`, set for the run.
                        for kind in sorted(kinds):
                            with root.add_instance(f"{CAPABILITY_IMPORTS[kind]}@{WIT_VERSION}") as iface:
                                for name, host_func in _HOST_INTERFACES[kind].items():
                                    _add_host_func(iface, f"{kind}.{name}", name, host_func)
                    self._linkers[key] = linker
        return linker

    def compile(self, digest: str, data: bytes, capabilities: Sequence[str] = (), *,
                metered: bool = False) -> CompiledComponent:
        """Compile and world-check a component (slow: seconds for a Python skill). Raises ModuleRejected."""
        component, problems = compile_component(self.engines[metered], data, capabilities)
        if component is None:
            raise ModuleRejected(problems or ["the component does not compile"])
        if problems:
            raise ModuleRejected(problems)
        return self.link(digest, len(data), component, capabilities, metered=metered)

    def link(self, digest: str, size_bytes: int, component: wc.Component, capabilities: Sequence[str] = (), *,
             metered: bool = False) -> CompiledComponent:
        """Check an already compiled component (say, deserialized) and attach its linker: the interfaces it
        imports, which every call's own capabilities must cover (`check`, before each call, as the loader
        does); `capabilities` here are those it is compiled for (the loader's: every grantable kind). Raises
        ModuleRejected."""
        engine = self.engines[metered]
        problems = world_problems(engine, component, capabilities)
        if problems:
            raise ModuleRejected(problems)
        interfaces = {interface_name(name) for name in component.type.imports(engine)}
        kinds = [kind for kind, interface in CAPABILITY_IMPORTS.items() if interface in interfaces]
        compiled = CompiledComponent(digest=digest, size_bytes=size_bytes, module=cast(wasmtime.Module, component),
                                     pre=cast(wasmtime.InstancePre, self.linker(metered, kinds)),
                                     metered=metered, abi=COMPONENT_V1, wasi=True)
        compiled.checks[_caps_key(capabilities)] = []
        return compiled

    def check(self, compiled: CompiledComponent, capabilities: Sequence[str]) -> None:
        """Raise ModuleRejected unless `capabilities` grant what the component imports (remembered)."""
        key = _caps_key(capabilities)
        problems = compiled.checks.get(key)
        if problems is None:
            problems = world_problems(self.engines[compiled.metered], compiled.component, key)
            compiled.checks[key] = problems
        if problems:
            raise ModuleRejected(problems)

    def deserialize(self, data: bytes, *, metered: bool = False) -> wc.Component:
        """A component from `Component.serialize()` output of an engine like `engine_for(metered)` (the warm
        tier). Trusts its input: only ever give it integrity-checked artifacts."""
        return wc.Component.deserialize(self.engines[metered], data)

    def load(self, digest: str, size_bytes: int, artifact: bytes, capabilities: Sequence[str] = (), *,
             metered: bool = False) -> CompiledComponent:
        """A verified warm-tier artifact (`artifacts.SerializedComponent`) deserialized and linked. Raises
        ModuleRejected when it does not deserialize (another wasmtime or engine) or no longer passes the world
        check; the loader then deletes it and compiles afresh."""
        try:
            component = self.deserialize(artifact, metered=metered)
        except wasmtime.WasmtimeError as exc:
            raise ModuleRejected([f"the component artifact does not load: {_first_line(str(exc))}"]) from None
        return self.link(digest, size_bytes, component, capabilities, metered=metered)

    def run(self, compiled: CompiledComponent, data: bytes, limits: RunLimits, grant: Grant,
            control: RunControl | None, budget: float) -> RunResult:
        """One call of `run(data)` in a fresh Store (`Sandbox.run` has checked the engine, the budget and a
        cancellation before). Skill failures are results, never exceptions."""
        metered = limits.fuel > 0
        store = wasmtime.Store(self.engines[metered])
        wasi = wasmtime.WasiConfig()
        wasi.argv = list(grant.argv)
        if grant.env:
            wasi.env = grant.env
        if grant.bundle_dir is not None:
            wasi.preopen_dir(grant.bundle_dir, BUNDLE_GUEST_DIR, fs_mutable=False)
        # What a component prints is diagnostics: stdout and stderr both go to the bounded stderr.
        stderr = _Capture(limits.max_stderr_bytes)
        wasi.stdout_custom = stderr
        wasi.stderr_custom = stderr
        store.set_wasi(wasi)
        run_id, running, _ = arm(store, limits, metered, budget, control, _NOTHING, stderr,
                                 runs=self._running, ids=self._ids, on_epoch_at=self._on_epoch_at)

        verdict, exit_code, detail = Verdict.OK, 0, ""
        output, message = b"", b""
        # `kv` and `http` act for this call and count into its grant; with none (no capability, or a caller
        # that passed none) they refuse with PERMISSION_DENIED.
        host = HostCall(grant.host, stderr.note)
        if host.grant.http is not None:  # a request gets what is left of the run's budget
            host.grant.http.deadline = time.monotonic() + budget
        previous, _call.stderr = _call.stderr, stderr
        previous_host, _call.host = _call.host, host
        started = time.perf_counter()
        try:
            instance = compiled.linker.instantiate(store, compiled.component)
            tracing.annotate({"clawhub.sandbox.instantiate_ms": round((time.perf_counter() - started) * 1e3, 3)})
            func = instance.get_func(store, RUN_EXPORT)
            if func is None:  # the world check makes this unreachable
                raise wasmtime.WasmtimeError(f"the component does not export `{RUN_EXPORT}`")
            ok, value = _call_run(func, store, data)
            if ok:
                if len(value) > limits.max_output_bytes:
                    verdict = Verdict.OUTPUT_LIMIT
                else:
                    output = value
            else:
                verdict, exit_code, message = Verdict.EXIT_NONZERO, 1, value
        except wasmtime.ExitTrap as exc:
            verdict, exit_code, detail = ((Verdict.EXIT_NONZERO, exc.code, "") if exc.code != 0 else
                                          (Verdict.TRAPPED, 0, f"ABI violation: the skill exited instead of "
                                                               f"returning from `{RUN_EXPORT}`"))
        except _RUN_FAILURES as exc:
            verdict, exit_code, detail = _verdict_of(exc, True)
        finally:
            _call.stderr, _call.host = previous, previous_host
            del self._running[run_id]
        wall = time.perf_counter() - started
        if running.stopped is not None:
            verdict = running.stopped
        fuel_consumed = limits.fuel - store.get_fuel() if metered else 0
        if stderr.overflowed:
            verdict = Verdict.STDERR_LIMIT
        errors = stderr.value()
        if verdict is Verdict.TRAPPED and any(sign in errors[-4096:] for sign in _OUT_OF_MEMORY):
            verdict = Verdict.MEMORY_LIMIT
        if message:  # an `err` result: its message goes after what the skill printed, within the stderr cap
            errors += message[:max(0, limits.max_stderr_bytes - len(errors))]
        return _result(verdict, output if verdict is Verdict.OK else b"", errors, wall, 0, budget, exit_code,
                       detail, fuel_consumed)


def _call_run(func: wc.Func, store: wasmtime.Store, data: bytes) -> tuple[bool, bytes]:
    """`run(data)`, then its post-return: (True, output) for `ok`, (False, message) for `err`.

    wasmtime-py's generic `Func.__call__` converts a `list<u8>` one element at a time in Python (seconds per
    MB); here the input list is laid out with two strided slice assignments and the output read with one,
    in place in the C API's value arrays. What remains is the C API's own representation: a 32-byte value
    per byte, so about 30-80 ms per MiB each way (allocating 32 MiB of values dominates). Raises wasmtime's
    errors and traps."""
    size = len(data)
    param = ffi.wasmtime_component_val_t()
    ffi.wasmtime_component_vallist_new_uninit(ctypes.byref(param.of.list), size)
    if size:
        values = _values(param.of.list.data, size)
        values[0::_VAL_SIZE] = bytes((_KIND_U8,)) * size
        values[_VAL_OF::_VAL_SIZE] = data
    param.kind = _KIND_LIST
    result = ffi.wasmtime_component_val_t()
    try:
        error = ffi.wasmtime_component_func_call(ctypes.byref(func._func), store._context(), ctypes.byref(param), 1,
                                                 ctypes.byref(result), 1)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        try:
            if result.kind != _KIND_RESULT:
                raise wasmtime.WasmtimeError(f"`{RUN_EXPORT}` returned a value of kind {result.kind}, not a result")
            ok = bool(result.of.result.is_ok)
            payload = result.of.result.val
            if not payload:
                return ok, b""
            value = payload.contents
            if ok and value.kind == _KIND_LIST:
                n = value.of.list.size
                return True, _values(value.of.list.data, n)[_VAL_OF::_VAL_SIZE].tobytes() if n else b""
            if not ok and value.kind == _KIND_STRING:
                return False, ctypes.string_at(value.of.string.data, value.of.string.size)
            raise wasmtime.WasmtimeError(f"`{RUN_EXPORT}` returned a payload of kind {value.kind}")
        finally:
            ffi.wasmtime_component_val_delete(ctypes.byref(result))
            error = ffi.wasmtime_component_func_post_return(ctypes.byref(func._func), store._context())
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)
    finally:
        ffi.wasmtime_component_val_delete(ctypes.byref(param))


def _values(data: Any, count: int) -> memoryview:
    """The bytes of a C array of `count` component values at `data` (a ctypes pointer), writable in place."""
    address = ctypes.cast(data, ctypes.c_void_p).value or 0
    return memoryview((ctypes.c_char * (count * _VAL_SIZE)).from_address(address)).cast("B")


_RUNNERS: weakref.WeakKeyDictionary[Sandbox, ComponentRunner] = weakref.WeakKeyDictionary()
_RUNNERS_LOCK = threading.Lock()


def runner_for(sandbox: Sandbox) -> ComponentRunner:
    """The sandbox's component runner, made on first use (a sandbox that never sees a component never
    starts its ticker)."""
    runner = _RUNNERS.get(sandbox)
    if runner is None:
        with _RUNNERS_LOCK:
            runner = _RUNNERS.get(sandbox)
            if runner is None:
                runner = _RUNNERS[sandbox] = ComponentRunner(sandbox)
    return runner

