"""Per-call cost of the executor's sandbox path against the raw wasmtime-py minimum; cold and warm loads.

1. Per call, on examples/skills/uppercase with a small input, in one process:
   - sandbox: `Sandbox.run` — fresh Store and instance from the `InstancePre`, WASI config with stdin,
     stdout/stderr captured under caps, memory and table limits, epoch deadline, verdict and peak memory;
   - raw: the least wasmtime-py needs for the same result — Store, WasiConfig with the same stdin, stdout
     captured by a bare `list.append`, instantiate from an `InstancePre`, call `_start` (no limits);
   - raw, output discarded: the same without capturing stdout (a floor, not a fair baseline: the caller
     gets nothing back). Target: sandbox ≤ 1.5× raw.
   And for the memory-v1 ABI, on examples/skills/echo-memory: `Sandbox.run` against the least the public
   wasmtime-py API needs for the same call (Store, instantiate from an `InstancePre`, look up the exports,
   `clawhub_alloc`, `Memory.write`, `clawhub_run`, `Memory.read`; no limits, default engine). The sandbox
   goes through the C API directly and a pooling allocator, so it is faster than this "minimum".
2. Loading a module: cold (compile from bytes, as `Sandbox.compile` does: compile + ABI check + link) and
   warm (`Module.deserialize` of a serialized artifact, from memory and from a file, then link), for the
   uppercase module and for a generated module with a few thousand functions.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import wasmtime
from _support import (
    SMALL_INPUT,
    best_ms,
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
    wasi_stdin_bytes,
)

from services.executor.sandbox import Sandbox, Verdict
from services.runtime.wasm import sha256_digest

TARGET = 1.5


def big_module_wat(functions: int) -> str:
    """A valid skill with `functions` small functions, each calling the previous one."""
    parts = [
        '(module',
        '  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))',
        '  (memory (export "memory") 1)',
        '  (func $f0 (param $x i64) (result i64) (local.get $x))',
    ]
    for i in range(1, functions):
        parts.append(
            f"  (func $f{i} (param $x i64) (result i64)"
            f" (i64.xor (call $f{i - 1} (i64.add (i64.mul (local.get $x) (i64.const 3)) (i64.const {i})))"
            f" (i64.rotl (local.get $x) (i64.const {i % 63 + 1}))))")
    parts.append(f'  (func (export "_start") (drop (call $f{functions - 1} (i64.const 7)))))')
    return "\n".join(parts)


def warm_tier(sandbox: Sandbox, directory: Path) -> Any:
    """The executor's warm tier (`ArtifactCache` + `Sandbox.link`) when this checkout has one, else None."""
    try:
        from services.executor.artifacts import ArtifactCache
    except ImportError:
        return None
    if not hasattr(sandbox, "link") or not hasattr(sandbox, "engine_settings"):
        return None
    return ArtifactCache(directory, sandbox.engine_settings(False))


def load_warm(sandbox: Any, tier: Any, digest: str) -> Any:
    """What the executor does on a warm hit: read and verify the artifact, deserialize, check and link."""
    loaded = tier.load(sandbox.engine, digest)
    if loaded is None:
        fail(f"the warm tier lost the artifact of {digest}")
    module, size = loaded
    return sandbox.link(digest, size, module)


def memory_v1(sandbox: Sandbox, calls: int, rounds: int) -> None:
    """Per call, memory-v1 echo: the sandbox against the plain wasmtime-py API."""
    wasm = echo_memory_wasm()
    compiled = sandbox.compile("sha256:bench-echo-memory", wasm)
    limits = default_limits()
    raw_engine = wasmtime.Engine()
    raw_pre = wasmtime.Linker(raw_engine).instantiate_pre(wasmtime.Module(raw_engine, wasm))

    def sandbox_call() -> None:
        result = sandbox.run(compiled, SMALL_INPUT, limits)
        if result.verdict is not Verdict.OK or result.output != SMALL_INPUT:
            fail(f"sandbox (memory-v1): {result.verdict.value} {result.detail} output {result.output!r}")

    def raw_call() -> None:
        store = wasmtime.Store(raw_engine)
        exports = raw_pre.instantiate(store).exports(store)
        alloc, run, memory = exports["clawhub_alloc"], exports["clawhub_run"], exports["memory"]
        assert isinstance(alloc, wasmtime.Func) and isinstance(run, wasmtime.Func)
        assert isinstance(memory, wasmtime.Memory)
        ptr = alloc(store, len(SMALL_INPUT))
        memory.write(store, SMALL_INPUT, ptr)
        packed = run(store, ptr, len(SMALL_INPUT)) & ((1 << 64) - 1)
        start = packed >> 32
        if memory.read(store, start, start + (packed & 0xFFFFFFFF)) != SMALL_INPUT:
            fail("raw (memory-v1): wrong output")

    us = per_call_us({"sandbox": sandbox_call, "raw": raw_call}, calls, rounds)
    print(f"per call, memory-v1 echo, {len(SMALL_INPUT)}-byte input (best of {rounds} rounds × {calls} calls):")
    print(f"  sandbox (fresh instance, limits, C API, pooling)   {us['sandbox']:8.1f} µs/call")
    print(f"  raw wasmtime-py API (no limits, default engine)    {us['raw']:8.1f} µs/call")
    ratio = us["sandbox"] / us["raw"]
    print(f"  ratio sandbox / raw = {ratio:.2f}×  ({verdict(ratio, TARGET, at_most=True)})")


def main() -> None:
    size = parse_args(__doc__.splitlines()[0])
    header("sandbox overhead: Sandbox.run vs raw wasmtime-py", size)
    calls = size.pick(100, 200, 400)
    rounds = size.pick(15, 60, 150)
    big_functions = size.pick(1000, 3000, 10000)
    load_repeats = size.pick(2, 5, 10)

    wasm = uppercase_wasm()
    expected = upper_ascii(SMALL_INPUT)
    sandbox = Sandbox()
    compiled = sandbox.compile("sha256:bench-uppercase", wasm)
    limits = default_limits()

    def sandbox_call() -> None:
        result = sandbox.run(compiled, SMALL_INPUT, limits)
        if result.verdict is not Verdict.OK or result.output != expected:
            fail(f"sandbox: {result.verdict.value} {result.detail} output {result.output!r}")

    raw_engine = wasmtime.Engine()
    raw_linker = wasmtime.Linker(raw_engine)
    raw_linker.define_wasi()
    raw_pre = raw_linker.instantiate_pre(wasmtime.Module(raw_engine, wasm))

    def raw_call(capture: bool) -> list[bytes]:
        store = wasmtime.Store(raw_engine)
        wasi = wasmtime.WasiConfig()
        wasi_stdin_bytes(wasi, SMALL_INPUT)
        out: list[bytes] = []
        if capture:
            wasi.stdout_custom = out.append
        store.set_wasi(wasi)
        instance = raw_pre.instantiate(store)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        return out

    def raw_captured() -> None:
        out = b"".join(raw_call(True))
        if out != expected:
            fail(f"raw: output {out!r}")

    us = per_call_us({"sandbox": sandbox_call, "raw": raw_captured, "raw_discard": lambda: raw_call(False)},
                     calls, rounds)
    ratio = us["sandbox"] / us["raw"]
    print(f"per call, uppercase, {len(SMALL_INPUT)}-byte input (best of {rounds} rounds × {calls} calls):")
    print(f"  sandbox (fresh instance, limits, capture)  {us['sandbox']:8.1f} µs/call")
    print(f"  raw wasmtime-py (same stdin, capture)      {us['raw']:8.1f} µs/call")
    print(f"  raw wasmtime-py, output discarded (floor)  {us['raw_discard']:8.1f} µs/call")
    print(f"  ratio sandbox / raw = {ratio:.2f}×  ({verdict(ratio, TARGET, at_most=True)})")
    print(f"  ratio sandbox / raw-discard = {us['sandbox'] / us['raw_discard']:.2f}×  (information: the gap is "
          f"{us['raw'] - us['raw_discard']:.0f} µs of wasmtime's WASI stdout capture)")

    memory_v1(sandbox, calls, rounds)

    print(f"loading a module (best of {load_repeats}):")
    big = bytes(wasmtime.wat2wasm(big_module_wat(big_functions)))
    with tempfile.TemporaryDirectory() as tmp:
        tier = warm_tier(sandbox, Path(tmp))
        if tier is None:
            print("  (this checkout has no executor warm tier: warm = Module.deserialize + WASI link)")
        for label, data, want in (("uppercase", wasm, expected), (f"{big_functions} functions", big, b"")):
            digest = sha256_digest(data)
            cold_ms = best_ms(lambda d=data, g=digest: sandbox.compile(g, d), load_repeats)  # type: ignore[misc]
            module = wasmtime.Module(sandbox.engine, data)
            artifact = bytes(module.serialize())

            def raw_warm(a: bytes = artifact) -> wasmtime.InstancePre:
                linker = wasmtime.Linker(sandbox.engine)
                linker.define_wasi()
                return linker.instantiate_pre(wasmtime.Module.deserialize(sandbox.engine, a))

            raw_ms = best_ms(raw_warm, load_repeats)
            if tier is not None:
                tier.store(digest, module, len(data))
                warm_load = functools.partial(load_warm, sandbox, tier, digest)
                warm_ms = best_ms(warm_load, load_repeats)
                # The module from the warm tier must run like the compiled one.
                warm = warm_load()
            else:
                warm_ms = raw_ms
                # replace(): keeps working if CompiledModule gains fields.
                warm = replace(compiled, digest=digest, size_bytes=len(data), module=module, pre=raw_warm())
            check = sandbox.run(warm, SMALL_INPUT, limits)
            if check.verdict is not Verdict.OK or check.output != want:
                fail(f"{label}: the warm-loaded module gave {check.verdict.value} {check.detail} {check.output!r}")
            print(f"  {label:>16}: {len(data) / 1024:7.1f} KiB wasm, {len(artifact) / 1024:7.1f} KiB artifact; "
                  f"cold {cold_ms:8.2f} ms, warm {warm_ms:6.2f} ms (raw deserialize + link {raw_ms:6.2f} ms); "
                  f"cold / warm {cold_ms / warm_ms:7.1f}×")
    sandbox.close()
    finish(0)


if __name__ == "__main__":
    main()
