"""The wasmtime sandbox: compile a module once, then run it in a fresh Store per call, with limits.

Pure wasmtime, no gRPC. ABI v1 (WASI command): input bytes on stdin, output on stdout, exit code 0 is
success, stderr kept (bounded). Limits:

- memory through `Store.set_limits` (a denied `memory.grow` returns -1 to the module, which then usually
  traps; see `_near_limit` for how that is told apart from other traps);
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
capabilities name (values from the request, never the host's), and, with the `files` capability, its
bundle directory preopened read-only at `/skill`.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import wasmtime
from wasmtime import _bindings
from wasmtime import _ffi as ffi

from services.runtime.wasm import (
    BUNDLE_GUEST_DIR,
    FILES_CAPABILITY,
    WASI_COMMAND_V1,
    Abi,
    compile_and_check,
    env_names,
    make_engine,
)

TICK_SECONDS = 0.01
# How often (in ticks) a running store comes back to the host to check its deadline and cancellation.
SLICE_TICKS = 5
WASM_PAGE = 64 * 1024
# At most this many table elements per store (8 bytes each), so a table.grow loop cannot eat the host.
MAX_TABLE_ELEMENTS = 1 << 20


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

    @classmethod
    def of(cls, capabilities: Sequence[str], *, env: Mapping[str, str] | None = None,
           args: Sequence[str] = (), bundle_dir: str | None = None, program: str = "skill") -> Grant:
        """The grant of a call with these declared capabilities: only the `env:NAME` variables named
        (values from `env`; other names in `env` are ignored), the bundle only with `files`."""
        values = env or {}
        names = env_names(capabilities)
        return cls(
            argv=(program, *args),
            env=tuple((n, values[n]) for n in dict.fromkeys(names) if n in values),
            bundle_dir=bundle_dir if FILES_CAPABILITY in capabilities else None,
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
    pre: wasmtime.InstancePre
    # Compiled by the fuel-metering engine (for calls with a fuel budget) or the plain one.
    metered: bool = False
    # ABI problems by capability set (sorted tuple): what `Sandbox.check` found before, so a call pays
    # one dict lookup. A set found fine for one capability set says nothing about another.
    checks: dict[tuple[str, ...], list[str]] = field(default_factory=dict, compare=False, repr=False)


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
_FINALIZER: Any = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[3]
_NO_FINALIZER = _FINALIZER()  # a NULL function pointer: the env is a plain integer
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


class Sandbox:
    """One engine, its epoch ticker, and the compile/run operations. `run` is thread-safe."""

    def __init__(self, abi: Abi = WASI_COMMAND_V1) -> None:
        self.abi = abi
        self.engine = make_engine(epoch_interruption=True)
        self.metered_engine = make_engine(epoch_interruption=True, consume_fuel=True)
        self._stop = threading.Event()
        # Runs in progress by id, for the epoch callback (which gets the id as its `env` pointer).
        self._running: dict[int, _Running] = {}
        self._next_id = 0
        self._ids = threading.Lock()
        self._on_epoch_c = _EPOCH_CALLBACK(self._on_epoch)
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
        return f"abi={self.abi.name};epoch_interruption=1;consume_fuel={int(metered)};opt=speed"

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
        module, problems = compile_and_check(self.engine_for(metered), data, self.abi, capabilities)
        if module is None or problems:
            raise ModuleRejected(problems or ["the module does not compile"])
        return self.link(digest, len(data), module, capabilities, metered=metered)

    def link(self, digest: str, size_bytes: int, module: wasmtime.Module, capabilities: Sequence[str] = (),
             *, metered: bool = False) -> CompiledModule:
        """Check an already compiled module (say, deserialized from disk) against the ABI with
        `capabilities` and pre-link it against WASI. Raises ModuleRejected."""
        problems = self.abi.check(module, capabilities)
        if problems:
            raise ModuleRejected(problems)
        linker = wasmtime.Linker(self.engine_for(metered))
        linker.define_wasi()
        try:
            pre = linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            # Typically an import of a WASI function that does not exist.
            raise ModuleRejected([f"the module cannot be linked: {_first_line(str(exc))}"]) from None
        compiled = CompiledModule(digest=digest, size_bytes=size_bytes, module=module, pre=pre,
                                  metered=metered)
        compiled.checks[_caps_key(capabilities)] = []
        return compiled

    def check(self, compiled: CompiledModule, capabilities: Sequence[str]) -> None:
        """Raise ModuleRejected unless `capabilities` cover what the module imports (remembered per
        capability set, so this is cheap on every call)."""
        key = _caps_key(capabilities)
        problems = compiled.checks.get(key)
        if problems is None:
            problems = self.abi.check(compiled.module, key)
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

        store = wasmtime.Store(self.engine_for(metered))
        # Always a WASI config, even with nothing granted: a WASI import called in a Store without one
        # aborts the whole process. Nothing is inherited from the host: argv, env and preopens are
        # exactly the grant.
        wasi = wasmtime.WasiConfig()
        _stdin_bytes(wasi, stdin)
        wasi.argv = list(grant.argv)
        if grant.env:
            wasi.env = grant.env
        if grant.bundle_dir is not None:
            wasi.preopen_dir(grant.bundle_dir, BUNDLE_GUEST_DIR, fs_mutable=False)
        stdout = _Capture(limits.max_output_bytes)
        stderr = _Capture(limits.max_stderr_bytes)
        wasi.stdout_custom = stdout
        wasi.stderr_custom = stderr
        store.set_wasi(wasi)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=MAX_TABLE_ELEMENTS)
        if metered:
            store.set_fuel(limits.fuel)
        with self._ids:
            self._next_id += 1
            run_id = self._next_id
        running = _Running(time.monotonic() + budget, control, stdout, stderr)
        self._running[run_id] = running
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), self._on_epoch_c, run_id, _NO_FINALIZER)
        # The callback decides at each deadline; +1 because the first tick may come right away.
        store.set_epoch_deadline(min(SLICE_TICKS, math.ceil(budget / TICK_SECONDS)) + 1)

        instance: wasmtime.Instance | None = None
        verdict, exit_code, detail = Verdict.OK, 0, ""
        started = time.perf_counter()
        try:
            instance = compiled.pre.instantiate(store)
            start = instance.exports(store)["_start"]
            if not isinstance(start, wasmtime.Func):  # the ABI check makes this unreachable
                raise wasmtime.WasmtimeError("the export `_start` is not a function")
            start(store)
        except wasmtime.ExitTrap as exc:
            exit_code = exc.code
            if exit_code != 0:
                verdict = Verdict.EXIT_NONZERO
        except wasmtime.Trap as exc:
            detail = _first_line(exc.message)
            if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                verdict = Verdict.TIMEOUT
            elif exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                verdict = Verdict.FUEL_EXHAUSTED
            else:
                verdict = Verdict.TRAPPED
        except wasmtime.WasmtimeError as exc:
            # Instantiation failures (initial memory over the limit, a trapping start function) and host
            # errors land here.
            detail = _first_line(str(exc))
            if "exceeds memory limits" in detail:
                verdict = Verdict.MEMORY_LIMIT
            elif "interrupt" in detail:
                verdict = Verdict.TIMEOUT
            elif "all fuel consumed" in detail:
                verdict = Verdict.FUEL_EXHAUSTED
            else:
                verdict = Verdict.TRAPPED
        finally:
            del self._running[run_id]
        wall = time.perf_counter() - started
        if running.stopped is not None:
            verdict = running.stopped
        fuel_consumed = limits.fuel - store.get_fuel() if metered else 0

        peak = 0
        if instance is not None:
            memory = instance.exports(store).get("memory")
            if isinstance(memory, wasmtime.Memory):
                peak = memory.data_len(store)
        if stdout.overflowed:
            verdict = Verdict.OUTPUT_LIMIT
        elif stderr.overflowed:
            verdict = Verdict.STDERR_LIMIT
        elif verdict is Verdict.TRAPPED and _near_limit(peak, limits.memory_bytes):
            verdict = Verdict.MEMORY_LIMIT
        return RunResult(
            verdict=verdict, output=stdout.value(), stderr=stderr.value(), wall_seconds=wall,
            peak_memory_bytes=peak, budget_seconds=budget, exit_code=exit_code, detail=detail,
            fuel_consumed=fuel_consumed,
        )
