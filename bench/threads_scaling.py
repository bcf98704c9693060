"""Throughput of one executor process with 2 worker threads against 1, on a CPU-bound skill.

The calls go through the executor's own path minus gRPC: the servicer's `WorkerPool` (bounded thread pool
with admission control) running `Sandbox.run` with default limits, awaited from an asyncio event loop as
`Execute` does. The skill sums i*i over 20 million 64-bit iterations and writes the sum (8 bytes, little
endian) to stdout; every output is checked against the closed form. wasm calls release the GIL, so two
threads should nearly double throughput on two cores: target ≥ 1.7×.

For information it then does the same with a tiny I/O skill (examples/skills/uppercase, 70-byte input),
whose time goes to instantiation and WASI I/O rather than to wasm code.

The number of calls is calibrated from one timed call so each phase lasts a few seconds; rounds alternate
1 and 2 threads and the best of each is reported (on a shared machine, slower rounds measure the
neighbours).
"""

from __future__ import annotations

import asyncio
import os
import struct
import time

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
    verdict,
)

from services.executor.sandbox import CompiledModule, Sandbox, Verdict
from services.executor.scheduling import WorkerPool

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


async def run_calls(sandbox: Sandbox, compiled: CompiledModule, threads: int, calls: int,
                    stdin: bytes = b"", expected: bytes = EXPECTED) -> tuple[float, float]:
    """Run `calls` calls on a pool of `threads`: calls per second, and cores this process kept busy."""
    pool = WorkerPool(threads=threads, queue=calls)
    limits = default_limits()
    cpu_started = time.process_time()
    started = time.perf_counter()
    try:
        futures = []
        for _ in range(calls):
            future = pool.try_submit(lambda: sandbox.run(compiled, stdin, limits))
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
        if result.verdict is not Verdict.OK or result.output != expected:
            fail(f"{result.verdict.value} {result.detail} output {result.output!r}, expected {expected!r}")
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
    one_thread, two_threads = max(rates[1]), max(rates[2])
    ratio = two_threads / one_thread
    # CPU time per call does not depend on how many cores the rest of the machine leaves us, so it tells a
    # busy machine (cores busy < threads) from contention inside the process (CPU per call grows).
    for threads, rate in ((1, one_thread), (2, two_threads)):
        cores = busy[threads][rates[threads].index(rate)]
        print(f"  {threads} thread{'s' if threads > 1 else ' '}  {rate:8.2f} calls/s   "
              f"{cores:.2f} cores busy, {cores / rate * 1e3:6.1f} ms CPU per call")
    print(f"  ratio 2 threads / 1 thread = {ratio:.2f}×  ({verdict(ratio, TARGET, at_most=False)})")
    cpu_per_call = [busy[t][rates[t].index(r)] / r for t, r in ((1, one_thread), (2, two_threads))]
    if abs(cpu_per_call[1] / cpu_per_call[0] - 1) > 0.15:
        print("  note: CPU time per call differs by more than 15% between the phases, so other load on the "
              "machine (or contention) skewed them; re-run on a quiet machine")
    if usable < 2:
        print("  note: fewer than 2 usable cores, so the target cannot be met on this machine")

    # For information: a tiny skill, whose time goes to instantiation and WASI I/O rather than wasm code.
    small_calls = size.pick(1000, 4000, 10000)
    upper = sandbox.compile("sha256:bench-uppercase", uppercase_wasm())
    small = {threads: asyncio.run(run_calls(sandbox, upper, threads, small_calls, SMALL_INPUT,
                                            upper_ascii(SMALL_INPUT)))
             for threads in (1, 2)}
    print(f"small I/O skill (uppercase, {len(SMALL_INPUT)}-byte input), {small_calls} calls, for information:")
    for threads, (rate, cores) in small.items():
        print(f"  {threads} thread{'s' if threads > 1 else ' '}  {rate:8.1f} calls/s   {cores:.2f} cores busy")
    print(f"  ratio 2 threads / 1 thread = {small[2][0] / small[1][0]:.2f}×  (each WASI output write is "
          "handed to a wasmtime worker thread and back: small calls wait on thread handoffs, not on cores)")
    sandbox.close()
    finish(0)


if __name__ == "__main__":
    main()
