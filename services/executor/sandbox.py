"""The wasmtime sandbox: compile a module once, then run it in a fresh Store per call, with limits.

Pure wasmtime, no gRPC. Each module runs under the skill ABI its exports say (`detect_abi`; the contracts
are in `services/runtime/wasm.py`):

- wasi-command-v1: input bytes on stdin, output on stdout, exit code 0 is success, stderr kept (bounded);
- memory-v1: input written into guest memory at the address `clawhub_alloc` returns, output read from
  the region `clawhub_run` returns, both bounds-checked by the host; no WASI stdio on the way, and the
  calls go straight to wasmtime's C API (`capi`), which makes a small call about as cheap as the fresh
  instance it needs. A module that imports no WASI function and has no dependencies (`raw_pre`) runs
  without any wasmtime-py object (`Sandbox._run_raw`: a raw Store, the same limits, about 9 µs per echo);
- component-v1: a WebAssembly component of wit/skill.wit, handed to `services/executor/components.py` (its
  own engines, the same limits and verdicts) by `compile`, `link`, `check` and `run`.

Instances come from a pooling allocator (`capi.pooling_config`): a fresh instance per call reuses a
reserved slot instead of mapping and unmapping memory (measured on the bare C-API sequence of a memory-v1
echo: 30 µs per call without, 10 µs with). Its limits: `pool_slots` instances at once per engine, one
memory and one table per module. A Store gets a WASI config only when its module imports WASI functions.

Limits:

- memory through the Store's limiter (a denied `memory.grow` returns -1 to the module, which then usually
  traps; see `_near_limit` for how that is told apart from other traps, and `_call_memory` for an input
  that does not fit);
- wall clock through epoch interruption: one daemon thread per sandbox bumps the engines' epochs every
  `TICK_SECONDS`; each Store reaches its epoch deadline at least every `SLICE_TICKS` ticks, where a
  callback checks the run's wall-clock end and its `RunControl` (a caller who went away cancels it), and
  either lets it go on or stops it. So a cancelled call frees its thread within about one slice;
- deterministic CPU through fuel, when a call asks for a budget (`RunLimits.fuel`);
- stdout and stderr through capturing callbacks that fail writes past their caps (EFBIG); the run is then
  stopped at the next epoch slice and reported as over its output or stderr limit.

Two engines: fuel metering makes CPU-bound code up to 2.5x slower (measured, best of 5: a tight
100M-iteration arithmetic loop took 62 ms unmetered and 157 ms metered; the per-call cost of a fresh
instance is the same), so unmetered calls run modules compiled by an engine without fuel, and only calls
with a fuel budget pay for metering. A module compiled for one engine cannot run on the other, so
`CompiledModule.metered` says which it belongs to.

What a call may see besides stdio is its `Grant`: argv, the environment variables its `env:NAME`
capabilities name (values from the request, never the host's), with the `files` capability its bundle
directory preopened read-only at `/skill`, and with `kv` its skill's key-value namespace, reached through the
`clawhub` host functions (`hostapi`). A module importing host functions is pre-linked with them, and its
calls bind their `HostCall` to the worker thread for the run (so they never take the raw path, which is
unchanged for modules without them); a host function's refusal goes to the call's stderr, within its cap.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import itertools
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import wasmtime
from wasmtime import _bindings
from wasmtime import _ffi as ffi

from services.executor import capi, hostapi
from services.executor.artifacts import SerializedComponent
from services.executor.capi import read_bytes as _read_bytes
from services.executor.capi import u_call_unchecked as _call_unchecked
from services.executor.capi import u_epoch_deadline_callback as _epoch_deadline_callback
from services.executor.capi import u_export_get as _export_get
from services.executor.capi import u_instantiate_pre as _instantiate_pre
from services.executor.capi import u_memory_data as _memory_data
from services.executor.capi import u_memory_data_size as _memory_data_size
from services.executor.capi import u_set_epoch_deadline as _set_epoch_deadline
from services.executor.capi import u_store_context as _store_context
from services.executor.capi import u_store_delete as _store_delete
from services.executor.capi import u_store_limiter as _store_limiter
from services.executor.capi import u_store_new as _store_new
from services.executor.capi import word as _word
from services.executor.capi import words as _words
from services.executor.capi import write_bytes as _write_bytes
from services.executor.hostapi import HostCall, HostFault, HostGrant, HttpGrant
from services.executor.kvstore import KvNamespace
from services.executor.outbound import OutboundHttp
from services.runtime import tracing
from services.runtime.components import COMPONENT_V1
from services.runtime.linking import DependencyGraph, dependency_imports
from services.runtime.wasm import (
    BUNDLE_GUEST_DIR,
    FILES_CAPABILITY,
    HTTP_KIND,
    KV_CAPABILITY,
    MEMORY_ALLOC,
    MEMORY_FAILED_BIT,
    MEMORY_RUN,
    MEMORY_V1,
    WASI_COMMAND_V1,
    Abi,
    capability_kind,
    compile_and_check,
    detect_abi,
    env_names,
    imports_host,
    imports_wasi,
    is_component,
    make_engine,
)

TICK_SECONDS = 0.01
# How often (in ticks) a running store comes back to the host to check its deadline and cancellation.
SLICE_TICKS = 5
_SLICE_SECONDS = SLICE_TICKS * TICK_SECONDS
WASM_PAGE = 64 * 1024
# At most this many table elements per store (8 bytes each), so a table.grow loop cannot eat the host.
MAX_TABLE_ELEMENTS = 1 << 20
# Instances (and memories, and tables) each engine's pooling allocator holds at once: at least the number
# of calls that run at the same time, times the instances one call makes. Each memory slot reserves about
# 4 GiB of address space (not memory). An instantiation past this fails (the call reports it as trapped).
DEFAULT_POOL_SLOTS = 128
_MASK64 = (1 << 64) - 1
_ALLOC_NAME = MEMORY_ALLOC.encode()
_RUN_NAME = MEMORY_RUN.encode()
_MEMORY_NAME = b"memory"
# Constant arguments of `_run_raw`'s C calls (`capi.word`).
_ALLOC_LEN, _RUN_LEN, _MEMORY_LEN = (capi.word(len(name)) for name in (_ALLOC_NAME, _RUN_NAME, _MEMORY_NAME))
_TABLE_LIMIT, _NO_LIMIT, _TWO, _SLICE_DEADLINE = (capi.word(n) for n in (MAX_TABLE_ELEMENTS, -1, 2,
                                                                         SLICE_TICKS + 1))


class ModuleRejected(Exception):
    """The bytes are not a module this sandbox can run; `problems` says why, for people."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Verdict(enum.Enum):
    """How one run ended."""

    OK = "ok"
    EXIT_NONZERO = "exit_nonzero"
    TRAPPED = "trapped"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    STDERR_LIMIT = "stderr_limit"
    FUEL_EXHAUSTED = "fuel_exhausted"
    CANCELLED = "cancelled"


class RunControl:
    """Lets another thread stop a run in progress: `cancel()` makes it end within about one slice
    (`SLICE_TICKS` epoch ticks) with Verdict.CANCELLED. Cancelling before the run starts stops it at
    once."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        # A plain attribute write is atomic under the GIL; the epoch callback reads it.
        self.cancelled = True


class _Running:
    """What the epoch callback knows about one run."""

    __slots__ = ("ends", "control", "stopped", "stdout", "stderr")

    def __init__(self, ends: float, control: RunControl | None, stdout: _Capture, stderr: _Capture) -> None:
        self.ends = ends
        self.control = control
        self.stopped: Verdict | None = None
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class RunLimits:
    """Limits of one run, already resolved against the executor's defaults and ceilings."""

    memory_bytes: int
    timeout_seconds: float
    max_output_bytes: int
    max_stderr_bytes: int
    # time.monotonic() by which the caller stops waiting (the gRPC deadline); the run's budget is the
    # smaller of this and timeout_seconds, counted from when the run actually starts.
    deadline: float | None = None
    # Deterministic CPU budget in wasmtime fuel units; 0 is unmetered (the module must then come from
    # `compile(..., metered=False)`, and from `metered=True` otherwise).
    fuel: int = 0


@dataclass(frozen=True)
class Grant:
    """What one call may see besides stdin/stdout/stderr. Build it with `Grant.of`, which applies the
    capability policy; the default grants nothing (argv is just the program name)."""

    argv: tuple[str, ...] = ("skill",)
    env: tuple[tuple[str, str], ...] = ()
    # Host directory preopened read-only at BUNDLE_GUEST_DIR; None preopens nothing.
    bundle_dir: str | None = None
    # What the `clawhub` host functions may use (the skill's kv namespace with `kv`), and their usage count;
    # per call (it is mutable), None for none.
    host: HostGrant | None = field(default=None, compare=False)

    @classmethod
    def of(cls, capabilities: Sequence[str], *, env: Mapping[str, str] | None = None,
           args: Sequence[str] = (), bundle_dir: str | None = None, program: str = "skill",
           kv: KvNamespace | None = None, http: OutboundHttp | None = None) -> Grant:
        """The grant of a call with these declared capabilities: only the `env:NAME` variables named
        (values from `env`; other names in `env` are ignored), the bundle only with `files`, the key-value
        namespace `kv` only with `kv`, the executor's HTTP client `http` only with an `http:HOST` capability."""
        values = env or {}
        names = env_names(capabilities)
        return cls(
            argv=(program, *args),
            env=tuple((n, values[n]) for n in dict.fromkeys(names) if n in values),
            bundle_dir=bundle_dir if FILES_CAPABILITY in capabilities else None,
            host=HostGrant(kv=kv if KV_CAPABILITY in capabilities else None,
                           http=HttpGrant(http, tuple(capabilities)) if http is not None and any(
                               capability_kind(c) == HTTP_KIND for c in capabilities) else None)
            if KV_CAPABILITY in capabilities or any(capability_kind(c) == HTTP_KIND for c in capabilities) else None,
        )


NO_GRANT = Grant()


@dataclass(frozen=True)
class RunResult:
    verdict: Verdict
    output: bytes
    stderr: bytes
    wall_seconds: float
    peak_memory_bytes: int
    # The wall-clock budget the run had, in seconds.
    budget_seconds: float
    exit_code: int = 0
    # First meaningful line of a trap or instantiation error.
    detail: str = ""
    # Fuel the run burnt, when it was metered.
    fuel_consumed: int = 0


@dataclass(frozen=True)
class CompiledModule:
    """A module compiled, ABI-checked and linked against WASI once; each call only instantiates it."""

    digest: str
    size_bytes: int
    module: wasmtime.Module
    # Pre-linked against WASI; None when the module imports functions from dependency packages, which are
    # linked per call through `graph` instead.
    pre: wasmtime.InstancePre | None
    # Compiled by the fuel-metering engine (for calls with a fuel budget) or the plain one.
    metered: bool = False
    # The skill ABI the module implements (how `Sandbox.run` passes input and output).
    abi: Abi = WASI_COMMAND_V1
    # Whether a call's Store needs a WASI config: whenever anything instantiated in it imports a WASI
    # function (a WASI call in a Store without one aborts the process). Keep it true if `instantiate`
    # also instantiates other modules that do.
    wasi: bool = True
    # ABI problems by capability set (sorted tuple): what `Sandbox.check` found before, so a call pays
    # one dict lookup. A set found fine for one capability set says nothing about another.
    checks: dict[tuple[str, ...], list[str]] = field(default_factory=dict, compare=False, repr=False)
    # The module linked with its pinned dependency modules (`with_graph`); None for a module without any.
    graph: DependencyGraph | None = field(default=None, compare=False, repr=False)
    # Whether the module imports `clawhub` host functions (`hostapi`): its calls bind their `HostCall`, so
    # they never take the raw path.
    host: bool = False
    # The address of `pre`'s C object when a call can take `Sandbox.run`'s raw path (memory-v1, no WASI
    # import, no host function, no dependencies), else 0. Derived from the fields above (kept in step by `replace`).
    raw_pre: int = field(default=0, init=False, compare=False, repr=False)
    # The same address as an argument for `capi`'s untyped functions (`capi.word`), or None.
    raw_pre_arg: Any = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.pre is not None and self.abi is MEMORY_V1 and not self.wasi and self.graph is None and not self.host:
            address = capi.target(self.pre.ptr())
            object.__setattr__(self, "raw_pre", address)
            object.__setattr__(self, "raw_pre_arg", ctypes.byref(ctypes.c_char.from_address(address)))

    def instantiate(self, store: wasmtime.Store) -> wasmtime.Instance:
        """The instance a call runs, in its fresh `store`: the one place instantiation happens. A module
        with dependencies instantiates its graph (dependencies first); others go through the InstancePre,
        with the same C call as `InstancePre.instantiate` without the wrapper's overhead."""
        if self.graph is not None:
            return self.graph.instantiate(store)
        if self.pre is None:  # `DependencyLinker` never hands such a module to a run
            raise wasmtime.WasmtimeError("the module imports from dependency packages but was not linked")
        return capi.instantiate(self.pre, store)

    def with_graph(self, graph: DependencyGraph) -> CompiledModule:
        """This module, run linked with `graph` (built for this module and engine)."""
        return replace(self, graph=graph, wasi=self.wasi or graph.imports_wasi, checks=self.checks)


class _AbiViolation(Exception):
    """A memory-v1 module returned an address or length the host refuses; reported as a trap."""


_RESULT_FIELDS = ("verdict", "output", "stderr", "wall_seconds", "peak_memory_bytes", "budget_seconds",
                  "exit_code", "detail", "fuel_consumed")
if tuple(f.name for f in fields(RunResult)) != _RESULT_FIELDS:  # keep `_result` in step with RunResult
    raise RuntimeError("sandbox._result is out of step with RunResult's fields")


_new = object.__new__
_set_attribute = object.__setattr__


def _result(verdict: Verdict, output: bytes, stderr: bytes, wall_seconds: float, peak_memory_bytes: int,
            budget_seconds: float, exit_code: int, detail: str, fuel_consumed: int) -> RunResult:
    """`RunResult(...)` (all fields, in order) without the frozen dataclass's per-field
    `object.__setattr__` (1.4 µs of a 17 µs call; this takes 0.4). The instance is the same as the
    constructor's."""
    result = _new(RunResult)
    _set_attribute(result, "__dict__", {
        "verdict": verdict, "output": output, "stderr": stderr, "wall_seconds": wall_seconds,
        "peak_memory_bytes": peak_memory_bytes, "budget_seconds": budget_seconds, "exit_code": exit_code,
        "detail": detail, "fuel_consumed": fuel_consumed})
    return result


class _Capture:
    """A WASI output callback that keeps at most `cap` bytes."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._chunks: list[bytes] = []
        self.size = 0
        self.overflowed = False

    def __call__(self, data: bytes) -> int | None:
        room = self._cap - self.size
        if len(data) <= room:
            self._chunks.append(data)
            self.size += len(data)
            return None
        self.overflowed = True
        if room > 0:  # keep what fits: the start of a flood is what helps debugging
            self._chunks.append(data[:room])
            self.size += room
        # The write fails in the guest (errno FBIG); the run is stopped at the next epoch slice and reported
        # as over its limit however the skill reacts.
        return -errno.EFBIG

    def value(self) -> bytes:
        return b"".join(self._chunks)

    def note(self, data: bytes) -> None:
        """Keep what fits of a host diagnostic: unlike the skill's own writes, never an overflow."""
        room = self._cap - self.size
        if room > 0 and data:
            self._chunks.append(data[:room])
            self.size += min(room, len(data))


# Stands for an output nothing can write to (no WASI, or memory-v1's stdout): never overflows, stays empty.
_NOTHING = _Capture(0)


def _first_line(message: str) -> str:
    """The useful line of a wasmtime error: the cause rather than the 'error while executing' banner."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if "Caused by:" in lines:
        for line in lines[lines.index("Caused by:") + 1:]:
            if line:
                return line
    for line in lines:
        if line:
            return line
    return "unknown error"


def _near_limit(peak: int, limit: int) -> bool:
    """Whether memory this close to the limit makes a denied `memory.grow` the likely cause of a trap.

    wasmtime's C API does not report denied growths, so this is a heuristic: allocators ask for more than
    one page at a time, so within a sixteenth of the limit (or one page) counts as having hit it."""
    return limit - peak <= max(WASM_PAGE, limit // 16)


_EPOCH_CALLBACK: Any = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
_DEADLINE_CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE


def _stop_error(message: str) -> int:
    """A new `wasmtime_error_t*` (as an address) that stops the run; wasmtime takes ownership."""
    error = ffi.wasmtime_error_new(message.encode())
    return ctypes.cast(error, ctypes.c_void_p).value or 0


def _caps_key(capabilities: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(capabilities)))


def _stdin_bytes(config: wasmtime.WasiConfig, data: bytes) -> None:
    # wasmtime-py has no stdin-from-bytes setter; the C API's takes ownership of the vector.
    vec = ffi.wasm_byte_vec_t()
    arr = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), arr)
    ffi.wasi_config_set_stdin_bytes(config.ptr(), ctypes.byref(vec))


def arm(store: wasmtime.Store, limits: RunLimits, metered: bool, budget: float, control: RunControl | None,
        stdout: Any, stderr: Any, *, runs: dict[int, _Running], ids: Iterator[int], on_epoch_at: Any,
        ) -> tuple[int, _Running, Any]:
    """Set a Store up for one run, the same for every ABI: its memory limiter, its fuel, the run registered in
    `runs` for the epoch callback, and the first epoch deadline. Returns (run id, the run, the store's context
    address); the caller removes `runs[run id]` when the run ends."""
    store_at, context_at = capi.target(store.ptr()), capi.target(store._context())
    capi.store_limiter(store_at, limits.memory_bytes, MAX_TABLE_ELEMENTS, -1, -1, -1)
    if metered:
        store.set_fuel(limits.fuel)
    run_id = next(ids)
    running = _Running(time.monotonic() + budget, control, stdout, stderr)
    runs[run_id] = running
    capi.epoch_deadline_callback(store_at, on_epoch_at, run_id, None)
    # The callback decides at each deadline; +1 because the first tick may come right away.
    capi.set_epoch_deadline(context_at, min(SLICE_TICKS, math.ceil(budget / TICK_SECONDS)) + 1)
    return run_id, running, context_at


def _verdict_of(exc: BaseException, memory_abi: bool) -> tuple[Verdict, int, str]:
    """The (verdict, exit code, detail) of a run that raised `exc` (one of `_RUN_FAILURES`)."""
    if isinstance(exc, _OverOutput):
        return Verdict.OUTPUT_LIMIT, 0, ""
    if isinstance(exc, _OverMemory):
        return Verdict.MEMORY_LIMIT, 0, str(exc)
    if isinstance(exc, (_AbiViolation, HostFault)):
        return Verdict.TRAPPED, 0, f"ABI violation: {exc}"
    if isinstance(exc, wasmtime.ExitTrap):
        if exc.code != 0:
            return Verdict.EXIT_NONZERO, exc.code, ""
        if memory_abi:
            return (Verdict.TRAPPED, 0, f"ABI violation: the skill called proc_exit(0) instead of returning from "
                                        f"`{MEMORY_RUN}`")
        return Verdict.OK, 0, ""
    if isinstance(exc, wasmtime.Trap):
        detail = _first_line(exc.message)
        if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
            return Verdict.TIMEOUT, 0, detail
        if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return Verdict.FUEL_EXHAUSTED, 0, detail
        return Verdict.TRAPPED, 0, detail
    # A WasmtimeError: instantiation failures (initial memory over the limit, a trapping start function) and
    # host errors (the epoch callback's stop) land here.
    detail = _first_line(str(exc))
    if "exceeds memory limits" in detail:
        return Verdict.MEMORY_LIMIT, 0, detail
    if "interrupt" in detail:
        return Verdict.TIMEOUT, 0, detail
    if "all fuel consumed" in detail:
        return Verdict.FUEL_EXHAUSTED, 0, detail
    return Verdict.TRAPPED, 0, detail


class Sandbox:
    """One engine, its epoch ticker, and the compile/run operations. `run` is thread-safe."""

    def __init__(self, abi: Abi | None = None, *, pool_slots: int = DEFAULT_POOL_SLOTS) -> None:
        """`abi` None runs each module under the ABI its exports say (`detect_abi`); an ABI refuses
        modules that do not implement it. `pool_slots`: see DEFAULT_POOL_SLOTS; 0 allocates each
        instance on demand instead (three times slower per call)."""
        self.abi = abi
        self.pool_slots = pool_slots

        def configure(config: wasmtime.Config) -> None:
            if pool_slots > 0:
                capi.pooling_config(config, pool_slots, MAX_TABLE_ELEMENTS)

        self.engine = make_engine(epoch_interruption=True, configure=configure)
        self.metered_engine = make_engine(epoch_interruption=True, consume_fuel=True, configure=configure)
        self._stop = threading.Event()
        # Runs in progress by id, for the epoch callback (which gets the id as its `env` pointer).
        self._running: dict[int, _Running] = {}
        self._raw_threads = threading.local()  # per-thread `_raw_slot`
        self._ids = itertools.count(1)  # next() is atomic under the GIL
        self._on_epoch_c = _EPOCH_CALLBACK(self._on_epoch)
        self._on_epoch_at = capi.address(self._on_epoch_c)
        # For `_run_raw`: the engines' C objects, by `metered` (False, True), and the callback, as arguments.
        self._engine_arg = (capi.word(capi.target(self.engine.ptr())),
                            capi.word(capi.target(self.metered_engine.ptr())))
        self._on_epoch_arg = capi.word(self._on_epoch_at)
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch-ticker", daemon=True)
        self._ticker.start()

    def _on_epoch(self, _context: object, env: int | None, delta: Any, kind: Any) -> int:
        """Called (on the run's thread) when a store reaches its epoch deadline: go on for another
        slice, or stop the run with an error (returned as a `wasmtime_error_t*`)."""
        running = self._running.get(env or 0)
        if running is None:
            return _stop_error("the run is no longer tracked")
        if running.control is not None and running.control.cancelled:
            running.stopped = Verdict.CANCELLED
            return _stop_error("the caller cancelled the call")
        if running.stdout.overflowed or running.stderr.overflowed:
            running.stopped = Verdict.OUTPUT_LIMIT if running.stdout.overflowed else Verdict.STDERR_LIMIT
            return _stop_error("an output limit was reached")
        left = running.ends - time.monotonic()
        if left <= 0:
            running.stopped = Verdict.TIMEOUT
            return _stop_error("the wall-clock limit was reached")
        delta[0] = min(SLICE_TICKS, math.ceil(left / TICK_SECONDS))
        kind[0] = _DEADLINE_CONTINUE
        return 0

    def engine_for(self, metered: bool) -> wasmtime.Engine:
        return self.metered_engine if metered else self.engine

    def engine_settings(self, metered: bool) -> str:
        """What, besides the wasmtime version, makes code compiled by `engine_for(metered)` incompatible
        with other engines (part of the warm tier's key). Keep in step with `make_engine`'s arguments."""
        abi = self.abi.name if self.abi is not None else "detected"
        return (f"abi={abi};epoch_interruption=1;consume_fuel={int(metered)};opt=speed;"
                f"pooling={int(self.pool_slots > 0)}")

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self.engine.increment_epoch()
            self.metered_engine.increment_epoch()

    def close(self) -> None:
        """Stop the ticker. Runs still in progress would then never time out: stop them first."""
        self._stop.set()
        self._ticker.join(timeout=1.0)

    def compile(self, digest: str, data: bytes, capabilities: Sequence[str] = (), *,
                metered: bool = False) -> CompiledModule:
        """Compile, check the ABI against `capabilities` and resolve the WASI imports. Raises
        ModuleRejected; slow, so call it off the event loop. Calls with other capabilities must pass
        `check` first."""
        if self.abi is COMPONENT_V1 or (self.abi is None and is_component(data)):  # services/executor/components.py
            from services.executor.components import runner_for
            return runner_for(self).compile(digest, data, capabilities, metered=metered)
        module, problems = compile_and_check(self.engine_for(metered), data, self.abi, capabilities)
        if module is None:
            raise ModuleRejected(problems or ["the module does not compile"])
        # `link` checks the ABI, leaving imports from dependency packages to dependency linking.
        return self.link(digest, len(data), module, capabilities, metered=metered)

    def link(self, digest: str, size_bytes: int, module: wasmtime.Module | SerializedComponent,
             capabilities: Sequence[str] = (), *, metered: bool = False) -> CompiledModule:
        """Check an already compiled module (say, deserialized from disk) against the ABI with
        `capabilities` and pre-link it against WASI. Raises ModuleRejected."""
        if isinstance(module, SerializedComponent):  # a component's warm artifact: services/executor/components.py
            from services.executor.components import runner_for
            return runner_for(self).load(digest, size_bytes, module.data, capabilities, metered=metered)
        abi = self.abi or detect_abi(module)
        # Imports from dependency packages are checked when the module is linked with the versions a
        # deployment pinned (`DependencyGraph`), which then instantiates it per call instead of a pre-link.
        packages = dependency_imports(module).keys()
        problems = abi.check(module, capabilities, packages)
        if problems:
            raise ModuleRejected(problems)
        pre: wasmtime.InstancePre | None = None
        if not packages:
            linker = wasmtime.Linker(self.engine_for(metered))
            linker.define_wasi()
            hostapi.define(linker, module)  # the `clawhub` functions it imports, if any
            try:
                pre = linker.instantiate_pre(module)
            except wasmtime.WasmtimeError as exc:
                # Typically an import of a WASI function that does not exist.
                raise ModuleRejected([f"the module cannot be linked: {_first_line(str(exc))}"]) from None
        compiled = CompiledModule(digest=digest, size_bytes=size_bytes, module=module, pre=pre,
                                  metered=metered, abi=abi, wasi=imports_wasi(module), host=imports_host(module))
        compiled.checks[_caps_key(capabilities)] = []
        return compiled

    def check(self, compiled: CompiledModule, capabilities: Sequence[str]) -> None:
        """Raise ModuleRejected unless `capabilities` cover what the module imports (remembered per
        capability set, so this is cheap on every call)."""
        if compiled.abi is COMPONENT_V1:
            from services.executor.components import CompiledComponent, runner_for
            return runner_for(self).check(cast(CompiledComponent, compiled), capabilities)
        key = _caps_key(capabilities)
        problems = compiled.checks.get(key)
        if problems is None:
            problems = compiled.abi.check(compiled.module, key, dependency_imports(compiled.module).keys())
            compiled.checks[key] = problems
        if problems:
            raise ModuleRejected(problems)

    def run(self, compiled: CompiledModule, stdin: bytes, limits: RunLimits,
            grant: Grant = NO_GRANT, control: RunControl | None = None) -> RunResult:
        """Run `compiled` once in a fresh Store with what `grant` allows; `control` can cancel it from
        another thread. Blocks (wasm releases the GIL): call it on a worker thread. Skill failures are
        results, not exceptions; a module compiled for the wrong engine (fuel budget vs
        `compiled.metered`) is a ValueError."""
        metered = limits.fuel > 0
        if metered != compiled.metered:
            raise ValueError("a call with a fuel budget needs a module compiled with metered=True, "
                             "and one without needs metered=False")
        budget = limits.timeout_seconds
        if limits.deadline is not None:
            budget = min(budget, limits.deadline - time.monotonic())
        if budget <= 0:
            return RunResult(Verdict.TIMEOUT, b"", b"", 0.0, 0, budget_seconds=max(budget, 0.0))
        if control is not None and control.cancelled:
            return RunResult(Verdict.CANCELLED, b"", b"", 0.0, 0, budget_seconds=budget)
        if compiled.raw_pre:
            return self._run_raw(compiled.raw_pre_arg, stdin, limits, control, budget, metered)
        if compiled.abi is COMPONENT_V1:
            from services.executor.components import CompiledComponent, runner_for
            return runner_for(self).run(cast(CompiledComponent, compiled), stdin, limits, grant, control, budget)

        memory_abi = compiled.abi is MEMORY_V1
        store = capi.new_store(self.engine_for(metered))
        # Watched by the epoch callback: stdout for the output limit (WASI commands only), stderr for its own.
        stdout = stderr = _NOTHING
        if compiled.wasi:
            # Nothing is inherited from the host: argv, env and preopens are exactly the grant. A module
            # without WASI imports gets no config (`CompiledModule.wasi`): it cannot call WASI, and the
            # config is a good part of a small call's cost.
            wasi = wasmtime.WasiConfig()
            wasi.argv = list(grant.argv)
            if grant.env:
                wasi.env = grant.env
            if grant.bundle_dir is not None:
                wasi.preopen_dir(grant.bundle_dir, BUNDLE_GUEST_DIR, fs_mutable=False)
            stderr = _Capture(limits.max_stderr_bytes)
            if memory_abi:
                # The output is in memory: what a memory-v1 skill prints is diagnostics, kept with stderr.
                wasi.stdout_custom = stderr
            else:
                _stdin_bytes(wasi, stdin)
                stdout = _Capture(limits.max_output_bytes)
                wasi.stdout_custom = stdout
            wasi.stderr_custom = stderr
            store.set_wasi(wasi)
        call: HostCall | None = None
        if compiled.host:
            if stderr is _NOTHING:  # host functions write their refusals there
                stderr = _Capture(limits.max_stderr_bytes)
            call = HostCall(grant.host, stderr.note)
            if call.grant.http is not None:  # an HTTP request gets what is left of the run's budget
                call.grant.http.deadline = time.monotonic() + budget
        run_id, running, context_at = arm(store, limits, metered, budget, control, stdout, stderr,
                                          runs=self._running, ids=self._ids, on_epoch_at=self._on_epoch_at)

        instance: wasmtime.Instance | None = None
        peak = -1  # unknown
        verdict, exit_code, detail = Verdict.OK, 0, ""
        output, message = b"", b""
        started = time.perf_counter()
        if call is not None:
            hostapi.bind(call)
        try:
            instantiating = time.perf_counter()
            instance = compiled.instantiate(store)
            # An attribute of the sandbox.run span: a span of its own would cost about what instantiation takes.
            tracing.annotate({"clawhub.sandbox.instantiate_ms": round((time.perf_counter() - instantiating) * 1e3, 3)})
            if memory_abi:
                output, failed, peak = self._call_memory(context_at, instance, stdin, limits)
                if failed:
                    verdict, exit_code, message, output = Verdict.EXIT_NONZERO, 1, output, b""
            else:
                start = instance.exports(store)["_start"]
                if not isinstance(start, wasmtime.Func):  # the ABI check makes this unreachable
                    raise wasmtime.WasmtimeError("the export `_start` is not a function")
                start(store)
        except _RUN_FAILURES as exc:
            if isinstance(exc, HostFault) and (call is None or call.fault is not exc):
                # wasmtime-py keeps a host function's exception in a process-wide global, which a trap on another
                # thread can pick up: another call's ABI violation, not this one's. This call trapped.
                verdict, exit_code, detail = Verdict.TRAPPED, 0, "the skill trapped"
            else:
                verdict, exit_code, detail = _verdict_of(exc, memory_abi)
        finally:
            del self._running[run_id]
            if call is not None:
                hostapi.unbind(call)
        wall = time.perf_counter() - started
        if call is not None and call.fault is not None:  # a host function refused a region: an ABI violation
            verdict, exit_code, detail = Verdict.TRAPPED, 0, f"ABI violation: {call.fault}"
        if running.stopped is not None:
            verdict = running.stopped
        fuel_consumed = limits.fuel - store.get_fuel() if metered else 0

        if peak < 0:
            peak = 0 if instance is None else _memory_size(context_at, instance)
        if stdout.overflowed:
            verdict = Verdict.OUTPUT_LIMIT
        elif stderr.overflowed:
            verdict = Verdict.STDERR_LIMIT
        elif verdict is Verdict.TRAPPED and _near_limit(peak, limits.memory_bytes):
            verdict = Verdict.MEMORY_LIMIT
        if not memory_abi:
            output = stdout.value()
        elif verdict is not Verdict.OK:
            output = b""
        errors = stderr.value()
        if message:  # a memory-v1 failure: its message goes after what it printed, within the stderr cap
            errors += message[:max(0, limits.max_stderr_bytes - len(errors))]
        return _result(verdict, output, errors, wall, peak, budget, exit_code, detail, fuel_consumed)

    def _run_raw(self, pre: Any, data: bytes, limits: RunLimits, control: RunControl | None, budget: float,
                 metered: bool) -> RunResult:
        """`run` of a memory-v1 module without WASI imports or dependencies (`CompiledModule.raw_pre`),
        entirely through wasmtime's C API: a fresh Store (deleted on the way out, whatever happens) with
        the same limiter, fuel, epoch deadline and callback as `run`'s, an instance from the InstancePre,
        then the memory-v1 call with the host-side checks of `_call_memory`. No wasmtime-py wrapper object
        is made. Every line here is per call, so it is written for speed: C functions bound at import and
        called with arguments ctypes need not convert (`capi`'s `u_` functions; never pass them a bare
        int), per-thread slots, no C call that can be skipped (each costs ctypes about 0.15 µs)."""
        try:
            slot = self._raw_threads.slot
        except AttributeError:
            slot = self._raw_slot()
        (running, run_id, run_arg, trap_ref, args_ref, instance_ref, alloc_ref, run_ref, memory_ref, alloc_func,
         run_func, memory, arg0, arg1, result, trap) = slot
        store = _store_new(self._engine_arg[metered], None, None)
        try:
            ctx = _store_context(store)
            memory_limit = limits.memory_bytes
            _store_limiter(store, _words.get(memory_limit) or _word(memory_limit), _TABLE_LIMIT, _NO_LIMIT,
                           _NO_LIMIT, _NO_LIMIT)
            trap.value = None
            if metered:
                capi.raise_failure(capi.set_fuel(ctx, limits.fuel), trap)
            _epoch_deadline_callback(store, self._on_epoch_arg, run_arg, None)
            # As in `run`: the callback decides at each deadline; +1 as the first tick may come right away.
            _set_epoch_deadline(ctx, _SLICE_DEADLINE if budget >= _SLICE_SECONDS
                                else _word(math.ceil(budget / TICK_SECONDS) + 1))
            verdict, exit_code, detail, output, message = Verdict.OK, 0, "", b"", b""
            peak = -1  # unknown
            instantiated = False
            started = time.monotonic()
            running.ends, running.control, running.stopped = started + budget, control, None
            self._running[run_id] = running
            try:
                instantiating = time.perf_counter()
                error = _instantiate_pre(pre, ctx, instance_ref, trap_ref)
                tracing.annotate({"clawhub.sandbox.instantiate_ms":
                                  round((time.perf_counter() - instantiating) * 1e3, 3)})
                if error or trap.value:
                    capi.raise_failure(error, trap)
                instantiated = True
                # The ABI check makes these exist with the right types in every instance of the module.
                if not (_export_get(ctx, instance_ref, _ALLOC_NAME, _ALLOC_LEN, alloc_ref)
                        and _export_get(ctx, instance_ref, _RUN_NAME, _RUN_LEN, run_ref)
                        and _export_get(ctx, instance_ref, _MEMORY_NAME, _MEMORY_LEN, memory_ref)):
                    raise _AbiViolation("the instance lacks the memory-v1 exports")
                size = len(data)
                arg0.value = size
                error = _call_unchecked(ctx, alloc_func, args_ref, _TWO, trap_ref)
                if error or trap.value:
                    _raise_alloc_failure(error, trap, ctx, memory, size, memory_limit)
                ptr = arg0.value
                peak = memory_size = _memory_data_size(ctx, memory)
                if ptr + size > memory_size:
                    raise _AbiViolation(f"`{MEMORY_ALLOC}({size})` returned address {ptr}, but {size} bytes "
                                        f"there do not fit in the {memory_size}-byte memory")
                base = _memory_data(ctx, memory)
                if size:
                    _write_bytes(base + ptr, data, size)
                arg0.value = ptr
                arg1.value = size
                error = _call_unchecked(ctx, run_func, args_ref, _TWO, trap_ref)
                if error or trap.value:
                    peak = -1  # the run may have grown the memory before it failed
                    capi.raise_failure(error, trap)
                packed = result.value
                peak = _memory_data_size(ctx, memory)
                if peak != memory_size:
                    # Only a growth moves a memory (and only one that is not reserved in full up front).
                    memory_size, base = peak, _memory_data(ctx, memory)
                out_len = packed & 0xFFFFFFFF
                if packed >= MEMORY_FAILED_BIT:
                    out_ptr = (packed >> 32) & 0x7FFFFFFF
                    if out_ptr + out_len > memory_size:
                        raise _AbiViolation(f"`{MEMORY_RUN}` returned its error message at "
                                            f"[{out_ptr}, {out_ptr + out_len}), outside the {memory_size}-byte "
                                            f"memory")
                    # The message is for stderr: read no more than fits there.
                    out_len = min(out_len, limits.max_stderr_bytes)
                    if out_len:
                        message = _read_bytes(base + out_ptr, out_len)
                    verdict, exit_code = Verdict.EXIT_NONZERO, 1
                else:
                    out_ptr = packed >> 32
                    if out_len > limits.max_output_bytes:
                        raise _OverOutput
                    if out_ptr + out_len > memory_size:
                        raise _AbiViolation(f"`{MEMORY_RUN}` returned its output at "
                                            f"[{out_ptr}, {out_ptr + out_len}), outside the {memory_size}-byte "
                                            f"memory")
                    if out_len:
                        output = _read_bytes(base + out_ptr, out_len)
            except _RUN_FAILURES as exc:
                verdict, exit_code, detail = _verdict_of(exc, True)
            finally:
                del self._running[run_id]
                running.control = None
            wall = time.monotonic() - started
            if running.stopped is not None:
                verdict = running.stopped
            fuel_consumed = limits.fuel - capi.fuel_left(ctx) if metered else 0
            if peak < 0:
                peak = _raw_memory_size(ctx) if instantiated else 0
        finally:
            _store_delete(store)
        if verdict is Verdict.OK:
            ok = _new(RunResult)
            _set_attribute(ok, "__dict__", {
                "verdict": verdict, "output": output, "stderr": b"", "wall_seconds": wall,
                "peak_memory_bytes": peak, "budget_seconds": budget, "exit_code": 0, "detail": "",
                "fuel_consumed": fuel_consumed})  # `_result`, inline
            return ok
        if verdict is Verdict.TRAPPED and _near_limit(peak, memory_limit):
            verdict = Verdict.MEMORY_LIMIT
        # A memory-v1 failure's message is its stderr (there is no WASI stderr here), within the cap.
        return _result(verdict, b"", message[:limits.max_stderr_bytes], wall, peak, budget, exit_code, detail,
                       fuel_consumed)

    def _raw_slot(self) -> tuple[Any, ...]:
        """This thread's slot for `_run_raw`: a `_Running` record with its own id, reset for each run (a
        thread runs one call at a time, and the record is in `_running` only during a run), then the
        thread's C-API scratch (`capi.Scratch.raw`). It goes away with the thread."""
        run_id = next(self._ids)
        slot = (_Running(0.0, None, _NOTHING, _NOTHING), run_id, capi.word(run_id), *capi.scratch.raw)
        self._raw_threads.slot = slot
        return slot

    @staticmethod
    def _call_memory(ctx: int, instance: wasmtime.Instance, data: bytes,
                     limits: RunLimits) -> tuple[bytes, bool, int]:
        """One memory-v1 call through the C API: `clawhub_alloc`, write the input, `clawhub_run`, read the
        region it returns. Returns (bytes, failed, memory size). Raises wasmtime's errors and traps,
        _AbiViolation for an address or length outside the memory, _OverOutput for an output over its
        limit. Every line here is per call, so it is written for speed."""
        s = capi.scratch
        trap_at, args_at, alloc_at, run_at, memory_at, alloc_func, run_func, memory = s.at
        at = ctypes.addressof(instance._instance)
        # The ABI check makes these exist with the right types in every instance of the module.
        if not (capi.export_get(ctx, at, _ALLOC_NAME, len(_ALLOC_NAME), alloc_at)
                and capi.export_get(ctx, at, _RUN_NAME, len(_RUN_NAME), run_at)
                and capi.export_get(ctx, at, _MEMORY_NAME, len(_MEMORY_NAME), memory_at)):
            raise _AbiViolation("the instance lacks the memory-v1 exports")
        args, trap = s.args, s.trap
        size = len(data)
        args[0].i32 = size
        trap.value = None
        try:
            capi.raise_failure(capi.call_unchecked(ctx, alloc_func, args_at, 2, trap_at), trap)
        except wasmtime.Trap as exc:
            # An allocator traps when its growth is refused; the `_near_limit` guess misses that when the
            # input alone is what does not fit, but here the host knows the size asked for.
            if (exc.trap_code not in (wasmtime.TrapCode.INTERRUPT, wasmtime.TrapCode.OUT_OF_FUEL)
                    and capi.memory_data_size(ctx, memory) + size > limits.memory_bytes):
                raise _OverMemory(_first_line(exc.message)) from None
            raise
        ptr = args[0].i32 & 0xFFFFFFFF
        memory_size = capi.memory_data_size(ctx, memory)
        if ptr + size > memory_size:
            raise _AbiViolation(f"`{MEMORY_ALLOC}({size})` returned address {ptr}, but {size} bytes there do "
                                f"not fit in the {memory_size}-byte memory")
        if size:
            capi.write_bytes(capi.memory_data(ctx, memory) + ptr, data, size)
        args[0].i32 = ptr  # truncated to 32 bits, as wasm sees it
        args[1].i32 = size
        capi.raise_failure(capi.call_unchecked(ctx, run_func, args_at, 2, trap_at), trap)
        result = args[0].i64 & _MASK64
        failed = result >= MEMORY_FAILED_BIT
        out_ptr, out_len = (result >> 32) & 0x7FFFFFFF, result & 0xFFFFFFFF
        if not failed and out_len > limits.max_output_bytes:
            raise _OverOutput
        memory_size = capi.memory_data_size(ctx, memory)
        if out_ptr + out_len > memory_size:
            what = "error message" if failed else "output"
            raise _AbiViolation(f"`{MEMORY_RUN}` returned its {what} at [{out_ptr}, {out_ptr + out_len}), "
                                f"outside the {memory_size}-byte memory")
        if failed:  # the message is for stderr: read no more than fits there
            out_len = min(out_len, limits.max_stderr_bytes)
        if not out_len:
            return b"", failed, memory_size
        return capi.read_bytes(capi.memory_data(ctx, memory) + out_ptr, out_len), failed, memory_size


class _OverOutput(Exception):
    """A memory-v1 module returned more output than its limit allows."""


class _OverMemory(Exception):
    """A memory-v1 module's `clawhub_alloc` trapped for an input that does not fit its memory limit."""


# What a run turns into a verdict (`_verdict_of`) rather than letting through.
_RUN_FAILURES = (_OverOutput, _OverMemory, _AbiViolation, HostFault, wasmtime.Trap, wasmtime.WasmtimeError)


def _raise_alloc_failure(error: int | None, trap: ctypes.c_void_p, ctx: Any, memory: Any, size: int,
                         memory_limit: int) -> None:
    """Raise what a failed `clawhub_alloc` call reported (see `_call_memory`): an allocator traps when its
    growth is refused; the `_near_limit` guess misses that when the input alone is what does not fit, but
    the host knows the size asked for."""
    try:
        capi.raise_failure(error, trap)
    except wasmtime.Trap as exc:
        if (exc.trap_code not in (wasmtime.TrapCode.INTERRUPT, wasmtime.TrapCode.OUT_OF_FUEL)
                and capi.memory_data_size(ctx, memory) + size > memory_limit):
            raise _OverMemory(_first_line(exc.message)) from None
        raise


def _raw_memory_size(ctx: Any) -> int:
    """`_memory_size` for `_run_raw`'s instance (in this thread's scratch), using its memory extern slot."""
    s = capi.scratch
    extern_at = s.at[4]
    if (capi.export_get(ctx, s.instance_at, _MEMORY_NAME, len(_MEMORY_NAME), extern_at)
            and ctypes.c_uint8.from_address(extern_at).value == capi.EXTERN_MEMORY):
        return int(capi.memory_data_size(ctx, extern_at + capi.EXTERN_OF))
    return 0


def _memory_size(ctx: int, instance: wasmtime.Instance) -> int:
    """The size of the instance's exported memory (its peak: wasm memories never shrink), 0 without one."""
    extern = ffi.wasmtime_extern_t()
    if (capi.export_get(ctx, ctypes.addressof(instance._instance), _MEMORY_NAME, len(_MEMORY_NAME),
                        ctypes.addressof(extern)) and capi.kind(extern) == capi.EXTERN_MEMORY):
        return int(capi.memory_data_size(ctx, ctypes.addressof(extern.of.memory)))
    return 0
