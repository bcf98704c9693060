"""clawhub's sandbox against the extism Python host SDK, per call: a memory-v1 echo against extism's echo,
and the WASI-command uppercase against extism's uppercase.

- clawhub memory-v1: `Sandbox.run` of examples/skills/echo-memory (input and output through guest memory,
  no WASI stdio), a fresh Store and instance per call, limits on (64 MiB memory, 5 s wall clock, output
  caps, epoch deadline and cancellation).
- clawhub wasi-command-v1: `Sandbox.run` of examples/skills/uppercase (stdin → stdout), same limits.
- extism, reused plugin: one `extism.Plugin` called again and again — how extism is normally used; the
  instance, its memory and globals live on from call to call (no per-call isolation).
- extism, fresh plugin per call: a new `Plugin` from a `CompiledPlugin` for every call, the nearest
  extism gets to clawhub's per-call isolation.

The extism plugins are written in WAT against the extism kernel ABI (imports from `extism:host/env`):
`echo` sets its input as its output (`output_set(input_offset(), input_length())`, no copy, as the
clawhub echo returns its input region), `upper` reads the input, upper-cases ASCII a-z and sets it as the
output. All get the same limits (64 MiB, 5 s). Target: clawhub memory-v1 no slower per call than
extism's reused plugin, while giving per-call isolation that it does not. The cases are interleaved round
by round, so the ratios come from the same run under the same load.

extism is an optional dependency (`pip install -e '.[bench]'`); without it this prints why and exits 0.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import wasmtime
from _support import (
    SMALL_INPUT,
    default_limits,
    echo_memory_wasm,
    fail,
    finish,
    header,
    parse_args,
    per_call_us,
    upper_ascii,
    uppercase_wasm,
    verdict,
)

from services.executor import capi
from services.executor.sandbox import Sandbox, Verdict

TARGET = 1.0
WASM_PAGE = 64 * 1024

EXTISM_ECHO_WAT = r"""
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_offset" (func $input_offset (result i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (memory (export "memory") 1)
  ;; The input, where the kernel keeps it, becomes the output.
  (func (export "echo") (result i32)
    (call $output_set (call $input_offset) (call $input_length))
    (i32.const 0)))
"""

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
    upper = upper_ascii(SMALL_INPUT)

    def plugin(wat: str) -> Any:
        manifest = {
            "wasm": [{"data": bytes(wasmtime.wat2wasm(wat))}],
            "memory": {"max_pages": limits.memory_bytes // WASM_PAGE},
            "timeout_ms": int(limits.timeout_seconds * 1000),
        }
        return CompiledPlugin(manifest, wasi=False, functions=[])

    try:
        echo_plugin, upper_plugin = plugin(EXTISM_ECHO_WAT), plugin(EXTISM_UPPER_WAT)
        echo_reused, upper_reused = extism.Plugin(echo_plugin), extism.Plugin(upper_plugin)
        got = (echo_reused.call("echo", SMALL_INPUT), upper_reused.call("upper", SMALL_INPUT))
    except Exception as exc:  # noqa: BLE001 - any failure of the SDK itself means "cannot run here"
        print(f"SKIPPED: extism {importlib.metadata.version('extism')} cannot run here: "
              f"{type(exc).__name__}: {exc}")
        finish(0)
        return
    print(f"extism {importlib.metadata.version('extism')} (runtime {extism.extism_version()})")
    if got != (SMALL_INPUT, upper):
        fail(f"extism plugins output {got!r}")

    sandbox = Sandbox()
    echo = sandbox.compile("sha256:bench-echo-memory", echo_memory_wasm())
    uppercase = sandbox.compile("sha256:bench-uppercase", uppercase_wasm())

    def clawhub_memory() -> None:
        result = sandbox.run(echo, SMALL_INPUT, limits)
        if result.verdict is not Verdict.OK or result.output != SMALL_INPUT:
            fail(f"sandbox (memory-v1): {result.verdict.value} {result.detail} output {result.output!r}")

    def clawhub_wasi() -> None:
        result = sandbox.run(uppercase, SMALL_INPUT, limits)
        if result.verdict is not Verdict.OK or result.output != upper:
            fail(f"sandbox (wasi-command-v1): {result.verdict.value} {result.detail} output {result.output!r}")

    def reused(p: Any, name: str, want: bytes) -> None:
        if p.call(name, SMALL_INPUT) != want:
            fail(f"extism (reused {name}): wrong output")

    def fresh(compiled: Any, name: str, want: bytes) -> None:
        p: Any = extism.Plugin(compiled)
        try:
            if p.call(name, SMALL_INPUT) != want:
                fail(f"extism (fresh {name}): wrong output")
        finally:
            # Free the instance now rather than whenever the garbage collector gets to it.
            p.__del__()

    engine = capi.word(capi.target(sandbox.engine.ptr()))

    def isolation_only() -> None:
        # What per-call isolation itself costs clawhub: a fresh Store and instance of the echo, nothing run,
        # made (and deleted) the way `Sandbox.run` makes them for it: through the C API when the module
        # can take the raw path (memory-v1, no WASI import), else through wasmtime-py's Store.
        if echo.raw_pre_arg is None:
            echo.instantiate(capi.new_store(sandbox.engine))
            return
        trap_arg, _, instance_arg = capi.scratch.raw[:3]
        store = capi.u_store_new(engine, None, None)
        try:
            error = capi.u_instantiate_pre(echo.raw_pre_arg, capi.u_store_context(store), instance_arg, trap_arg)
            capi.raise_failure(error, capi.scratch.trap)
        finally:
            capi.u_store_delete(store)

    us = per_call_us({
        "memory": clawhub_memory,
        "echo_reused": lambda: reused(echo_reused, "echo", SMALL_INPUT),
        "echo_fresh": lambda: fresh(echo_plugin, "echo", SMALL_INPUT),
        "wasi": clawhub_wasi,
        "upper_reused": lambda: reused(upper_reused, "upper", upper),
        "upper_fresh": lambda: fresh(upper_plugin, "upper", upper),
        "isolation": isolation_only,
    }, calls, rounds)
    print(f"per call, {len(SMALL_INPUT)}-byte input (best of {rounds} rounds × {calls} calls, interleaved):")
    print("  echo:")
    print(f"    clawhub memory-v1 Sandbox.run (fresh instance, limits)  {us['memory']:8.1f} µs/call")
    print(f"    extism, reused plugin (no isolation)                    {us['echo_reused']:8.1f} µs/call")
    print(f"    extism, fresh plugin per call                           {us['echo_fresh']:8.1f} µs/call")
    print(f"    clawhub's fresh Store + instance alone                  {us['isolation']:8.1f} µs/call")
    print("  uppercase:")
    print(f"    clawhub wasi-command-v1 Sandbox.run (fresh, limits)     {us['wasi']:8.1f} µs/call  (WASI stdin/stdout "
          "through wasmtime's C API)")
    print(f"    extism, reused plugin (no isolation)                    {us['upper_reused']:8.1f} µs/call")
    print(f"    extism, fresh plugin per call                           {us['upper_fresh']:8.1f} µs/call")
    ratio = us["memory"] / us["echo_reused"]
    print(f"  ratio clawhub memory-v1 / extism reused = {ratio:.2f}×  ({verdict(ratio, TARGET, at_most=True)})")
    print(f"  ratio clawhub memory-v1 / extism fresh  = {us['memory'] / us['echo_fresh']:.2f}×  (same isolation)")
    print(f"  ratio clawhub wasi-command-v1 / extism reused = {us['wasi'] / us['upper_reused']:.2f}×  "
          "(information: the stdio ABI)")
    print(f"  ratio clawhub wasi-command-v1 / extism fresh  = {us['wasi'] / us['upper_fresh']:.2f}×")
    sandbox.close()
    finish(0)


if __name__ == "__main__":
    main()
