"""Shared helpers for the benchmarks in bench/ (a package, so `./dev bench`'s `bench/*.py` loop skips it).

Every benchmark prints a one-line machine description, figures measured in the same run and their ratios
against targets. A missed target is reported, not fatal (benchmarks are not tests); a broken run (wrong
output, unexpected verdict) exits non-zero.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi

ROOT = Path(__file__).resolve().parents[2]
# Cold loads are measured as such: wasmtime's own compilation cache (services/runtime/wasm.py) stays off here.
os.environ.pop("CLAWHUB_WASMTIME_CACHE", None)
if str(ROOT) not in sys.path:  # so `python bench/x.py` finds `services` without an installed project
    sys.path.insert(0, str(ROOT))

from services.executor.sandbox import RunLimits  # noqa: E402
from services.executor.settings import Settings  # noqa: E402

UPPERCASE_WAT = ROOT / "examples" / "skills" / "uppercase" / "uppercase.wat"
SMALL_INPUT = b"Hello, clawhub! the quick brown fox jumps over the lazy dog 0123456789"


@dataclass(frozen=True)
class Size:
    """How big a run is: `quick` for CI (< ~10 s), default (< ~60 s), `full` for bigger counts."""

    name: str

    def pick(self, quick: int, default: int, full: int) -> int:
        return {"quick": quick, "default": default, "full": full}[self.name]


def parse_args(description: str) -> Size:
    return parse_args_with(description)[0]


def parse_args_with(description: str, more: Callable[[argparse.ArgumentParser], None] | None = None,
                    ) -> tuple[Size, argparse.Namespace]:
    """`--quick` / `--full` as every benchmark takes them, plus the options `more` adds to the parser (for a
    benchmark with options of its own); returns the size and every parsed option."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CI-size run (under ~10 s)")
    group.add_argument("--full", action="store_true", help="bigger counts (minutes)")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    return Size("quick" if args.quick else "full" if args.full else "default"), args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores ({usable} usable){mem}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"wasmtime-py {importlib.metadata.version('wasmtime')}")


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores the rest of the machine keeps busy, sampled from /proc/stat while this process
    idles: benchmarks on a shared machine are only as good as this is small."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def header(title: str, size: Size) -> None:
    print(f"== {title} ({size.name} run)")
    print(machine_line())
    busy = busy_cores()
    if busy is not None:
        warning = "  (other processes are using the CPU: figures may be disturbed)" if busy > 0.3 else ""
        print(f"other load before the run: {busy:.2f} of {os.cpu_count()} cores busy{warning}")


def default_limits() -> RunLimits:
    """The limits a call with no explicit limits gets from an executor with default settings."""
    s = Settings()
    return RunLimits(memory_bytes=s.default_memory, timeout_seconds=s.default_timeout,
                     max_output_bytes=s.max_output, max_stderr_bytes=s.max_stderr)


def uppercase_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm(UPPERCASE_WAT.read_text()))


ECHO_MEMORY_WAT = ROOT / "examples" / "skills" / "echo-memory" / "echo.wat"


def echo_memory_wasm() -> bytes:
    """examples/skills/echo-memory: the memory-v1 ABI's echo."""
    return bytes(wasmtime.wat2wasm(ECHO_MEMORY_WAT.read_text()))


def upper_ascii(data: bytes) -> bytes:
    return bytes(c - 32 if 97 <= c <= 122 else c for c in data)


def wasi_stdin_bytes(config: wasmtime.WasiConfig, data: bytes) -> None:
    """Set stdin from bytes (wasmtime-py has no setter for it; the C API's takes ownership)."""
    vec = ffi.wasm_byte_vec_t()
    arr = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), arr)
    ffi.wasi_config_set_stdin_bytes(config.ptr(), ctypes.byref(vec))


def per_call_us(cases: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Best (lowest) over `rounds` of the µs per call of each case, as timeit advises: on a shared machine
    the slower rounds measure the neighbours. The cases are interleaved round by round so that drift
    (frequency scaling, other load) hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm up caches and lazily built state
        for _ in range(max(10, calls // 10)):
            fn()
    gc.collect()
    for _ in range(rounds):
        for name, fn in cases.items():
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - started) / calls * 1e6)
    return {name: min(values) for name, values in samples.items()}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs of `fn`, in ms (the least disturbed by the rest of the machine)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def verdict(ratio: float, target: float, *, at_most: bool) -> str:
    met = ratio <= target if at_most else ratio >= target
    sign = "≤" if at_most else "≥"
    return f"target {sign} {target:g}×: {'met' if met else 'NOT met'}"


def fail(message: str) -> None:
    print(f"BROKEN: {message}", file=sys.stderr)
    finish(1)


def finish(code: int = 0) -> None:
    """Exit without running interpreter teardown: wasmtime's WASI worker threads can still call into
    Python while it is being torn down, which has been seen to abort (a Rust panic) after all the
    figures are printed, turning a good run into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
