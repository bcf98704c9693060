"""Memory soak: the executor's RSS after 1,000 calls against after 100,000 (--quick: 10,000).

The calls run `Sandbox.run` on the servicer's `WorkerPool` (as many threads as the executor would use,
CLAWHUB_EXECUTOR_THREADS), in jobs of 50 calls awaited from an asyncio event loop, at most two jobs per
thread in flight. One
call in ten ends badly on purpose, so the failure paths are soaked too: a trap, a non-zero exit after
writing to stderr, and output past its cap; every verdict and output is checked. RSS is read after a
garbage collection at checkpoints; target: RSS at the end within 10% of RSS after 1,000 calls.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import wasmtime
from _support import (
    SMALL_INPUT,
    default_limits,
    fail,
    finish,
    header,
    parse_args,
    upper_ascii,
    uppercase_wasm,
)

from services.executor.sandbox import CompiledModule, RunLimits, RunResult, Sandbox, Verdict
from services.executor.scheduling import WorkerPool
from services.executor.settings import Settings

TARGET_GROWTH = 0.10
BASELINE_CALLS = 1_000
CHUNK = 50

_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""
TRAP_WAT = f'(module {_IMPORTS} (memory (export "memory") 1) (func (export "_start") unreachable))'
# Writes a line to stderr, then exits with code 3.
EXIT_3_WAT = f"""(module {_IMPORTS} (memory (export "memory") 1) (data (i32.const 16) "something went wrong\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 21))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 3))))"""
# Writes 64 KiB blocks to stdout until a write fails, then exits 1.
FLOOD_WAT = f"""(module {_IMPORTS} (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 0)) (i32.store (i32.const 4) (i32.const 65536))
    (loop $more
      (br_if $more (i32.eqz (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
    (call $proc_exit (i32.const 1))))"""


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size: VmRSS where /proc has it (consistent with the VmHWM peak), else psutil."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # the bench extra; only needed where /proc is missing

    return int(psutil.Process().memory_info().rss)


Case = tuple[CompiledModule, bytes, RunLimits, Callable[[RunResult], bool]]


def cases(sandbox: Sandbox) -> list[Case]:
    """Ten calls: seven good ones and one of each failure."""
    limits = default_limits()
    expected = upper_ascii(SMALL_INPUT)
    upper = sandbox.compile("sha256:soak-uppercase", uppercase_wasm())

    def build(name: str, wat: str) -> CompiledModule:
        return sandbox.compile(f"sha256:soak-{name}", bytes(wasmtime.wat2wasm(wat)))

    good: Case = (upper, SMALL_INPUT, limits, lambda r: r.verdict is Verdict.OK and r.output == expected)
    return [good] * 7 + [
        (build("trap", TRAP_WAT), b"", limits, lambda r: r.verdict is Verdict.TRAPPED),
        (build("exit3", EXIT_3_WAT), b"", limits,
         lambda r: r.verdict is Verdict.EXIT_NONZERO and r.exit_code == 3 and r.stderr == b"something went wrong\n"),
        (build("flood", FLOOD_WAT), b"", replace(limits, max_output_bytes=100_000),
         lambda r: r.verdict is Verdict.OUTPUT_LIMIT and len(r.output) <= 100_000),
    ]


def run_chunk(sandbox: Sandbox, mix: list[Case], first: int, count: int) -> str | None:
    """Run calls `first` .. `first + count - 1` of the mix in turn on this thread; what went wrong, if
    anything."""
    for k in range(first, first + count):
        compiled, stdin, limits, ok = mix[k % len(mix)]
        result = sandbox.run(compiled, stdin, limits)
        if not ok(result):
            return (f"{compiled.digest}: unexpected {result.verdict.value} (exit {result.exit_code}, "
                    f"{result.detail!r}, {len(result.output)} bytes out)")
    return None


async def soak(sandbox: Sandbox, pool: WorkerPool, mix: list[Case], calls: int, done: int,
               window: int) -> None:
    """Run `calls` calls (the mix in turn) on the pool and check every result. Each pool job runs `CHUNK`
    calls (one asyncio future per call would soak the event loop's thread handoffs rather than the
    sandbox), and at most `window` jobs are in flight, as in a server with a bounded queue: queueing them
    all at once would leave RSS at the high-water mark of the queue, which is not a leak."""
    in_flight: set[asyncio.Future[str | None]] = set()
    for first in range(done, done + calls, CHUNK):
        if len(in_flight) >= window:
            finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            check(finished)
        count = min(CHUNK, done + calls - first)
        future = pool.try_submit(functools.partial(run_chunk, sandbox, mix, first, count))
        if future is None:
            fail("the worker pool refused a job although it has room for the window")
            return
        in_flight.add(future)
    if in_flight:
        check((await asyncio.wait(in_flight))[0])


def check(finished: set[asyncio.Future[str | None]]) -> None:
    for future in finished:
        problem = future.result()
        if problem is not None:
            fail(problem)


async def run(total: int) -> None:
    threads = Settings.from_env().threads
    sandbox = Sandbox()
    window = 2 * threads
    pool = WorkerPool(threads=threads, queue=window)
    mix = cases(sandbox)
    checkpoints = sorted({BASELINE_CALLS, *(total * k // 10 for k in (1, 2, 5)), total})
    print(f"{total:,} calls on {threads} worker thread(s), 1 in 10 failing on purpose (trap, exit 3 with "
          f"stderr, output over its cap); RSS after gc at each checkpoint:")
    done = 0
    baseline = 0
    try:
        for checkpoint in checkpoints:
            await soak(sandbox, pool, mix, checkpoint - done, done, window)
            done = checkpoint
            gc.collect()
            rss = rss_bytes()
            baseline = baseline or rss
            print(f"  after {done:>9,} calls: RSS {rss / 2**20:8.1f} MiB  ({(rss - baseline) / baseline:+6.1%})")
    finally:
        pool.shutdown()
        sandbox.close()
    growth = (rss - baseline) / baseline
    met = "met" if growth <= TARGET_GROWTH else "NOT met"
    print(f"  growth from {BASELINE_CALLS:,} to {total:,} calls: {growth:+.1%}  "
          f"(target within {TARGET_GROWTH:.0%}: {met}); peak RSS {peak_rss() / 2**20:.1f} MiB")


def peak_rss() -> int:
    return (_status_kib("VmHWM") or 0) * 1024


def main() -> None:
    size = parse_args(__doc__.splitlines()[0])
    header("memory soak", size)
    asyncio.run(run(size.pick(10_000, 100_000, 1_000_000)))
    finish(0)


if __name__ == "__main__":
    main()
