"""Throughput of one executor process with 2 worker threads against 1, on a CPU-bound skill.

The calls go through the executor's own path minus gRPC: the servicer's `WorkerPool` (bounded thread pool
with admission control) running `Sandbox.run` with default limits, awaited from an asyncio event loop as
`Execute` does. The skill sums i*i over 20 million 64-bit iterations and writes the sum (8 bytes, little
endian) to stdout; every output is checked against the closed form. wasm calls release the GIL, so two
threads should nearly double throughput on two cores: target ≥ 1.7×.

The number of calls is calibrated from one timed call so each phase lasts a few seconds; rounds alternate
1 and 2 threads and the median of each is reported.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import struct
import time

import wasmtime
from _support import default_limits, fail, finish, header, parse_args, verdict

from services.executor.sandbox import CompiledModule, Sandbox, Verdict
from services.executor.servicer import WorkerPool

TARGET = 1.7
ITERATIONS = 20_000_000

CPU_WAT = f"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $i i64) (local $acc i64)
    (block $done
      (loop $next
        (br_if $done (i64.ge_u (local.get $i) (i64.const {ITERATIONS})))
        (local.set $acc (i64.add (local.get $acc) (i64.mul (local.get $i) (local.get $i))))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $next)))
    ;; iovec {{ptr 16, len 8}} at 0, the sum at 16.
    (i64.store (i32.const 16) (local.get $acc))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
EXPECTED = struct.pack("<Q", ((ITERATIONS - 1) * ITERATIONS * (2 * ITERATIONS - 1) // 6) % (1 << 64))


async def run_calls(sandbox: Sandbox, compiled: CompiledModule, threads: int, calls: int) -> tuple[float, float]:
    """Run `calls` calls on a pool of `threads`: calls per second, and cores this process kept busy."""
    pool = WorkerPool(threads=threads, queue=calls)
    limits = default_limits()
    cpu_started = time.process_time()
    started = time.perf_counter()
    try:
        futures = []
        for _ in range(calls):
            future = pool.try_submit(lambda: sandbox.run(compiled, b"", limits))
            if future is None:
                fail("the worker pool refused a call although its queue has room for all")
                raise AssertionError  # unreachable: fail() exits
            futures.append(future)
        results = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        pool.shutdown()
    for result in results:
        if result.verdict is not Verdict.OK or result.output != EXPECTED:
            fail(f"{result.verdict.value} {result.detail} output {result.output!r}, expected {EXPECTED!r}")
    return calls / elapsed, cpu / elapsed


def main() -> None:
    size = parse_args(__doc__.splitlines()[0])
    header("executor thread-pool scaling: 2 threads vs 1", size)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    phase_seconds = size.pick(1.2, 6.0, 15.0)
    rounds = size.pick(1, 3, 5)

    sandbox = Sandbox()
    compiled = sandbox.compile("sha256:bench-cpu", bytes(wasmtime.wat2wasm(CPU_WAT)))
    # Calibrate: one call's time sets how many calls fill a phase with one thread.
    asyncio.run(run_calls(sandbox, compiled, 1, 3))
    one = 1 / asyncio.run(run_calls(sandbox, compiled, 1, 4))[0]
    calls = max(4, round(phase_seconds / one / 2) * 2)
    print(f"skill: {ITERATIONS:,} iterations of 64-bit multiply-add, {one * 1e3:.1f} ms per call alone; "
          f"{calls} calls per phase, {rounds} round(s), {usable} usable core(s)")

    rates: dict[int, list[float]] = {1: [], 2: []}
    busy: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for threads in (1, 2):
            rate, cores = asyncio.run(run_calls(sandbox, compiled, threads, calls))
            rates[threads].append(rate)
            busy[threads].append(cores)
    one_thread, two_threads = statistics.median(rates[1]), statistics.median(rates[2])
    ratio = two_threads / one_thread
    # CPU time per call does not depend on how many cores the rest of the machine leaves us, so it tells a
    # busy machine (cores busy < threads) from contention inside the process (CPU per call grows).
    for threads, rate in ((1, one_thread), (2, two_threads)):
        cores = statistics.median(busy[threads])
        print(f"  {threads} thread{'s' if threads > 1 else ' '}  {rate:8.2f} calls/s   "
              f"{cores:.2f} cores busy, {cores / rate * 1e3:6.1f} ms CPU per call")
    print(f"  ratio 2 threads / 1 thread = {ratio:.2f}×  ({verdict(ratio, TARGET, at_most=False)})")
    if usable < 2:
        print("  note: fewer than 2 usable cores, so the target cannot be met on this machine")
    sandbox.close()
    finish(0)


if __name__ == "__main__":
    main()
