"""The wasmtime sandbox: compile a module once, then run it in a fresh Store per call, with limits.

Pure wasmtime, no gRPC. ABI v1 (WASI command): input bytes on stdin, output on stdout, exit code 0 is
success, stderr kept (bounded). Limits:

- memory through `Store.set_limits` (a denied `memory.grow` returns -1 to the module, which then usually
  traps; see `_near_limit` for how that is told apart from other traps);
- wall clock through epoch interruption: one daemon thread per sandbox bumps the engine epoch every
  `TICK_SECONDS`, each Store gets a deadline in ticks;
- stdout through a capturing callback that fails writes past the cap (EFBIG), stderr through one that
  silently drops what is past its cap.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import math
import threading
import time
from dataclasses import dataclass

import wasmtime
from wasmtime import _ffi as ffi

from services.runtime.wasm import WASI_COMMAND_V1, Abi, compile_and_check, make_engine

TICK_SECONDS = 0.01
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
    stderr_truncated: bool = False


@dataclass(frozen=True)
class CompiledModule:
    """A module compiled, ABI-checked and linked against WASI once; each call only instantiates it."""

    digest: str
    size_bytes: int
    module: wasmtime.Module
    pre: wasmtime.InstancePre


class _Capture:
    """A WASI output callback that keeps at most `cap` bytes."""

    def __init__(self, cap: int, *, fail_past_cap: bool) -> None:
        self._cap = cap
        self._fail = fail_past_cap
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
        if self._fail:
            # The write fails in the guest (errno FBIG); the run is reported as over the output limit
            # however the skill reacts.
            return -errno.EFBIG
        if room > 0:
            self._chunks.append(data[:room])
            self.size += room
        # Pretend the write succeeded: stderr is best-effort logging and must not change behaviour.
        return None

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
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch-ticker", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self.engine.increment_epoch()

    def close(self) -> None:
        """Stop the ticker. Runs still in progress would then never time out: stop them first."""
        self._stop.set()
        self._ticker.join(timeout=1.0)

    def compile(self, digest: str, data: bytes) -> CompiledModule:
        """Compile, check the ABI and resolve the WASI imports. Raises ModuleRejected; slow, so call it
        off the event loop."""
        module, problems = compile_and_check(self.engine, data, self.abi)
        if module is None or problems:
            raise ModuleRejected(problems or ["the module does not compile"])
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        try:
            pre = linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            # Typically an import of a WASI function that does not exist.
            raise ModuleRejected([f"the module cannot be linked: {_first_line(str(exc))}"]) from None
        return CompiledModule(digest=digest, size_bytes=len(data), module=module, pre=pre)

    def run(self, compiled: CompiledModule, stdin: bytes, limits: RunLimits) -> RunResult:
        """Run `compiled` once in a fresh Store. Blocks (wasm releases the GIL): call it on a worker
        thread. Skill failures are results, not exceptions."""
        budget = limits.timeout_seconds
        if limits.deadline is not None:
            budget = min(budget, limits.deadline - time.monotonic())
        if budget <= 0:
            return RunResult(Verdict.TIMEOUT, b"", b"", 0.0, 0, budget_seconds=max(budget, 0.0))

        store = wasmtime.Store(self.engine)
        # Always a WASI config, even with nothing granted: a WASI import called in a Store without one
        # aborts the whole process.
        wasi = wasmtime.WasiConfig()
        _stdin_bytes(wasi, stdin)
        stdout = _Capture(limits.max_output_bytes, fail_past_cap=True)
        stderr = _Capture(limits.max_stderr_bytes, fail_past_cap=False)
        wasi.stdout_custom = stdout
        wasi.stderr_custom = stderr
        store.set_wasi(wasi)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=MAX_TABLE_ELEMENTS)
        # +1: the first tick may come right away, and a budget should never be cut short.
        store.set_epoch_deadline(math.ceil(budget / TICK_SECONDS) + 1)

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
            verdict = Verdict.TIMEOUT if exc.trap_code == wasmtime.TrapCode.INTERRUPT else Verdict.TRAPPED
        except wasmtime.WasmtimeError as exc:
            # Instantiation failures (initial memory over the limit, a trapping start function) and host
            # errors land here.
            detail = _first_line(str(exc))
            if "exceeds memory limits" in detail:
                verdict = Verdict.MEMORY_LIMIT
            elif "interrupt" in detail:
                verdict = Verdict.TIMEOUT
            else:
                verdict = Verdict.TRAPPED
        wall = time.perf_counter() - started

        peak = 0
        if instance is not None:
            memory = instance.exports(store).get("memory")
            if isinstance(memory, wasmtime.Memory):
                peak = memory.data_len(store)
        if stdout.overflowed:
            verdict = Verdict.OUTPUT_LIMIT
        elif verdict is Verdict.TRAPPED and _near_limit(peak, limits.memory_bytes):
            verdict = Verdict.MEMORY_LIMIT
        return RunResult(
            verdict=verdict, output=stdout.value(), stderr=stderr.value(), wall_seconds=wall,
            peak_memory_bytes=peak, budget_seconds=budget, exit_code=exit_code, detail=detail,
            stderr_truncated=stderr.overflowed,
        )
