"""component-v1 costs: loading a component (cold compile; warm from a precompiled artifact) and calling one.

    .venv/bin/python bench/component_cost.py [--quick]

- cold: `Component(engine, bytes)` plus the world check (`ComponentRunner.compile`), best of N;
- warm: what a warm tier does: read the serialized artifact from a file, sha256 it (as `ArtifactCache`
  does before trusting it), `Component.deserialize`, world check and linker (`ComponentRunner.link`), best of N;
- per call: `Sandbox.run` (fresh Store and instance, limits, stderr capture) of the Python example
  (`examples/skills/hello-python`, its first example) and of a minimal hand-written echo component, p50 and
  mean; and the Python example with 1 MiB of input (the `list<u8>` conversion).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.executor.components import CompiledComponent, runner_for  # noqa: E402
from services.executor.sandbox import RunLimits, Sandbox, Verdict  # noqa: E402
from tests.executor.test_components import ECHO  # noqa: E402

# Cold loads are measured as such: wasmtime's own compilation cache (services/runtime/wasm.py; the test
# helpers imported above turn it on for test sessions) stays off here.
os.environ.pop("CLAWHUB_WASMTIME_CACHE", None)

HELLO = ROOT / "examples" / "skills" / "hello-python" / "hello.wasm"
MiB = 1024 * 1024
LIMITS = RunLimits(memory_bytes=64 * MiB, timeout_seconds=10.0, max_output_bytes=4 * MiB, max_stderr_bytes=64 * 1024)


def best_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def per_call(sandbox: Sandbox, compiled: CompiledComponent, data: bytes, expected: bytes | None,
             calls: int) -> tuple[float, float]:
    result = sandbox.run(compiled, data, LIMITS)
    if result.verdict is not Verdict.OK or (expected is not None and result.output != expected):
        sys.exit(f"unexpected result: {result}")
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        sandbox.run(compiled, data, LIMITS)
        times.append(time.perf_counter() - started)
    return statistics.median(times), statistics.fmean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI size)")
    args = parser.parse_args()
    loads, calls = (2, 100) if args.quick else (3, 500)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}")
    sandbox = Sandbox()
    runner = runner_for(sandbox)
    data = HELLO.read_bytes()
    print(f"hello-python component: {len(data) / MiB:.1f} MiB")

    cold = best_s(lambda: runner.compile("sha256:hello", data), loads)
    compiled = runner.compile("sha256:hello", data)
    artifact = bytes(compiled.component.serialize())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hello.cwasm"
        path.write_bytes(hashlib.sha256(artifact).digest() + artifact)

        def warm_load() -> CompiledComponent:
            blob = path.read_bytes()
            if hashlib.sha256(blob[32:]).digest() != blob[:32]:
                sys.exit("artifact corrupt")
            return runner.link("sha256:hello", len(data), runner.deserialize(blob[32:]))

        warm = best_s(warm_load, loads * 2)
        warmed = warm_load()
    print(f"load: cold (compile + world check) {cold:.2f} s; warm (read {len(artifact) / MiB:.0f} MiB artifact, "
          f"sha256, deserialize, link) {warm * 1e3:.0f} ms; {cold / warm:.0f}x")

    p50, mean = per_call(sandbox, warmed, b'"Ada"', b'"Hello, Ada!"', calls)
    print(f"per call, hello-python (warm-loaded): p50 {p50 * 1e3:.2f} ms, mean {mean * 1e3:.2f} ms")
    big = b'"' + b"a" * MiB + b'"'
    p50, mean = per_call(sandbox, compiled, big, None, max(5, calls // 50))
    print(f"per call, hello-python, 1 MiB input: p50 {p50 * 1e3:.1f} ms")
    echo = runner.compile("sha256:echo", ECHO)
    p50, mean = per_call(sandbox, echo, b"hello", b"hello", calls * 10)
    print(f"per call, minimal echo component: p50 {p50 * 1e6:.0f} µs, mean {mean * 1e6:.0f} µs")
    p50, mean = per_call(sandbox, echo, bytes(MiB), bytes(MiB), max(5, calls // 10))
    print(f"per call, minimal echo component, 1 MiB in and out: p50 {p50 * 1e3:.1f} ms")
    sandbox.close()


if __name__ == "__main__":
    main()
