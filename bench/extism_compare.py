"""clawhub's sandbox against the extism Python host SDK, per call, on an equivalent uppercase plugin.

- clawhub: `Sandbox.run` of examples/skills/uppercase (WASI command: stdin → stdout), a fresh Store and
  instance per call, limits on (64 MiB memory, 5 s wall clock, output caps).
- extism, reused plugin: one `extism.Plugin` called again and again — how extism is normally used; the
  instance, its memory and globals live on from call to call (no per-call isolation).
- extism, fresh plugin per call: a new `Plugin` from a `CompiledPlugin` for every call, the nearest
  extism gets to clawhub's per-call isolation.

The extism plugin is written in WAT against the extism kernel ABI (imports from `extism:host/env`) and
exports `upper`, which reads the input, upper-cases ASCII a-z and sets it as the output. Both get the same
limits (64 MiB, 5 s). Target: clawhub no slower per call than extism's reused plugin.

extism is an optional dependency (`pip install -e '.[bench]'`); without it this prints why and exits 0.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import wasmtime
from _support import (
    SMALL_INPUT,
    default_limits,
    fail,
    finish,
    header,
    parse_args,
    per_call_us,
    upper_ascii,
    uppercase_wasm,
    verdict,
)

from services.executor.sandbox import Sandbox, Verdict

TARGET = 1.0
WASM_PAGE = 64 * 1024

EXTISM_UPPER_WAT = r"""
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (memory (export "memory") 1)
  ;; Upper-cases ASCII a-z of the input into a block from the kernel's allocator, which becomes the output.
  (func (export "upper") (result i32)
    (local $n i64) (local $i i64) (local $out i64) (local $c i32)
    (local.set $n (call $input_length))
    (local.set $out (call $alloc (local.get $n)))
    (block $done
      (loop $next
        (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
        (local.set $c (call $input_load_u8 (local.get $i)))
        (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 26))
          (then (local.set $c (i32.sub (local.get $c) (i32.const 32)))))
        (call $store_u8 (i64.add (local.get $out) (local.get $i)) (local.get $c))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $next)))
    (call $output_set (local.get $out) (local.get $n))
    (i32.const 0)))
"""


def main() -> None:
    size = parse_args(__doc__.splitlines()[0])
    header("clawhub sandbox vs extism Python SDK", size)
    try:
        import extism
        from extism.extism import CompiledPlugin
    except ImportError as exc:
        print(f"SKIPPED: the extism host SDK is not importable ({exc}); install the bench extra: "
              ".venv/bin/pip install -e '.[bench]'")
        finish(0)
        return

    calls = size.pick(100, 200, 400)
    rounds = size.pick(15, 60, 150)
    limits = default_limits()
    expected = upper_ascii(SMALL_INPUT)

    manifest = {
        "wasm": [{"data": bytes(wasmtime.wat2wasm(EXTISM_UPPER_WAT))}],
        "memory": {"max_pages": limits.memory_bytes // WASM_PAGE},
        "timeout_ms": int(limits.timeout_seconds * 1000),
    }
    try:
        compiled_plugin = CompiledPlugin(manifest, wasi=False, functions=[])
        reused = extism.Plugin(compiled_plugin)
        got = reused.call("upper", SMALL_INPUT)
    except Exception as exc:  # noqa: BLE001 - any failure of the SDK itself means "cannot run here"
        print(f"SKIPPED: extism {importlib.metadata.version('extism')} cannot run here: "
              f"{type(exc).__name__}: {exc}")
        finish(0)
        return
    print(f"extism {importlib.metadata.version('extism')} (runtime {extism.extism_version()})")
    if got != expected:
        fail(f"extism plugin output {got!r}, expected {expected!r}")

    sandbox = Sandbox()
    compiled = sandbox.compile("sha256:bench-uppercase", uppercase_wasm())

    def clawhub_call() -> None:
        result = sandbox.run(compiled, SMALL_INPUT, limits)
        if result.verdict is not Verdict.OK or result.output != expected:
            fail(f"sandbox: {result.verdict.value} {result.detail} output {result.output!r}")

    def extism_reused() -> None:
        if reused.call("upper", SMALL_INPUT) != expected:
            fail("extism (reused plugin): wrong output")

    def extism_fresh() -> None:
        plugin: Any = extism.Plugin(compiled_plugin)
        try:
            if plugin.call("upper", SMALL_INPUT) != expected:
                fail("extism (fresh plugin): wrong output")
        finally:
            # Free the instance now rather than whenever the garbage collector gets to it.
            plugin.__del__()

    def isolation_only() -> None:
        # What per-call isolation itself costs clawhub: a fresh Store with a WASI config and an instance,
        # without running `_start` (so without WASI stdin/stdout).
        store = wasmtime.Store(sandbox.engine)
        store.set_wasi(wasmtime.WasiConfig())
        compiled.pre.instantiate(store)

    us = per_call_us({"clawhub": clawhub_call, "reused": extism_reused, "fresh": extism_fresh,
                      "isolation": isolation_only}, calls, rounds)
    print(f"per call, {len(SMALL_INPUT)}-byte input (best of {rounds} rounds × {calls} calls):")
    print(f"  clawhub Sandbox.run (fresh instance, limits)  {us['clawhub']:8.1f} µs/call")
    print(f"  extism, reused plugin (no isolation)          {us['reused']:8.1f} µs/call")
    print(f"  extism, fresh plugin per call                 {us['fresh']:8.1f} µs/call")
    print(f"  clawhub's fresh Store + instance alone        {us['isolation']:8.1f} µs/call  (the rest of its time "
          "runs `_start`: mostly WASI stdin/stdout through wasmtime's C API)")
    ratio = us["clawhub"] / us["reused"]
    print(f"  ratio clawhub / extism reused = {ratio:.2f}×  ({verdict(ratio, TARGET, at_most=True)})")
    print(f"  ratio clawhub / extism fresh  = {us['clawhub'] / us['fresh']:.2f}×  (same isolation)")
    sandbox.close()
    finish(0)


if __name__ == "__main__":
    main()
