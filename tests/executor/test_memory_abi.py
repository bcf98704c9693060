"""The memory-v1 ABI through the executor: output, usage, every limit, and hostile modules (each followed by a
good call). The contract is in `services/runtime/wasm.py`."""

from __future__ import annotations

import threading

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.executor.sandbox import RunControl, RunLimits, Sandbox, Verdict
from services.runtime.errors import error_info
from services.runtime.wasm import MEMORY_V1, WASI_COMMAND_V1, detect_abi, make_engine
from tests.conftest import wat
from tests.executor import fixtures as f
from tests.executor.conftest import Executor, limits

MiB = 1024 * 1024
_WASI = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""
# Grows the memory so that [1024, 1024 + len) fits, and returns 1024 (as examples/skills/echo-memory does).
_ALLOC = """
  (local $pages i32)
  (local.set $pages (i32.wrap_i64 (i64.shr_u (i64.add (i64.extend_i32_u (local.get $len)) (i64.const 66559))
                                             (i64.const 16))))
  (if (i32.gt_u (local.get $pages) (memory.size))
    (then (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
      (then unreachable))))
  (i32.const 1024)
"""


def module(run: str, *, alloc: str = _ALLOC, wasi: bool = False, extra: str = "") -> bytes:
    """A memory-v1 module whose `clawhub_run` is `run` (params $ptr, $len; returns the packed i64)."""
    return wat(f"""(module {_WASI if wasi else ""}
      (memory (export "memory") 1)
      {extra}
      (func (export "clawhub_alloc") (param $len i32) (result i32) {alloc})
      (func (export "clawhub_run") (param $ptr i32) (param $len i32) (result i64) (local $i i32) {run}))""")


def packed(ptr: str, length: str, *, failed: bool = False) -> str:
    """WAT for the result `(failed << 63) | (ptr << 32) | length`."""
    value = f"(i64.or (i64.shl (i64.extend_i32_u {ptr}) (i64.const 32)) (i64.extend_i32_u {length}))"
    return f"(i64.or {value} (i64.const 0x8000000000000000))" if failed else value


ECHO = module(packed("(local.get $ptr)", "(local.get $len)"))
FAILS = module(packed("(i32.const 16)", "(i32.const 9)", failed=True), extra='(data (i32.const 16) "bad input")')
TRAPS = module("unreachable")
LOOPS = module("(loop $forever (br $forever)) (i64.const 0)")
MEMORY_BOMB = module("""
  (block $refused (loop $grow
    (br_if $refused (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
    (br $grow)))
  unreachable""")
HUGE_OUT_LEN = module(packed("(i32.const 1024)", "(i32.const -1)"))
OUT_OF_BOUNDS = module(packed("(i32.const 0x7fff0000)", "(i32.const 16)"))
BOGUS_ALLOC = module(packed("(local.get $ptr)", "(local.get $len)"), alloc="(i32.const -16)")
GARBAGE = module("(i64.const -1)")
# Prints "dbg" on stdout (memory-v1 keeps it with stderr) and returns "x".
PRINTS = module("""
  (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 3))
  (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
  """ + packed("(i32.const 19)", "(i32.const 1)"), wasi=True, extra='(data (i32.const 16) "dbgx")')
STDERR_FOREVER = module("""
  (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 4096))
  (loop $more (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8))) (br $more))
  (i64.const 0)""", wasi=True)
EXITS_3 = module("(call $proc_exit (i32.const 3)) (i64.const 0)", wasi=True)
# Declares memory-v1's names with the wrong types.
WRONG_TYPES = wat("""(module (memory (export "memory") 1)
  (func (export "clawhub_alloc") (param i64) (result i32) (i32.const 0))
  (func (export "clawhub_run") (param i32 i32) (result i32) (i32.const 0)))""")


async def call(ex: Executor, data: bytes, mod: bytes = ECHO, lim: skill_pb2.Limits | None = None,
               capabilities: tuple[str, ...] = ()) -> pb.ExecuteResponse:
    digest = ex.source.add(mod)
    return await ex.stub.Execute(pb.ExecuteRequest(digest=digest, input=data, limits=lim,
                                                   capabilities=capabilities), timeout=10)


async def refused(ex: Executor, mod: bytes, lim: skill_pb2.Limits | None = None,
                  data: bytes = b"") -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(ex, data, mod, lim)
    info = error_info(caught.value)
    return caught.value.code(), info.reason, dict(info.metadata)


async def still_works(ex: Executor) -> None:
    assert (await call(ex, b"alive")).output == b"alive"


def test_detect_abi_and_the_checks() -> None:
    import wasmtime

    engine = make_engine()
    echo = wasmtime.Module(engine, ECHO)
    assert detect_abi(echo) is MEMORY_V1 and MEMORY_V1.check(echo) == []
    # Each ABI refuses a module whose exports say the other one, and says which to declare.
    assert any('declare abi = "memory-v1"' in p for p in WASI_COMMAND_V1.check(echo))
    command = wasmtime.Module(engine, f.ECHO)
    assert detect_abi(command) is WASI_COMMAND_V1
    assert any('declare abi = "wasi-command-v1"' in p for p in MEMORY_V1.check(command))
    problems = MEMORY_V1.check(wasmtime.Module(engine, WRONG_TYPES))
    assert problems == ["the export `clawhub_run` must be a function `(ptr: i32, len: i32) -> i64`",
                        "the export `clawhub_alloc` must be a function `(len: i32) -> i32`"]


async def test_echo_returns_output_and_usage(executor: Executor) -> None:
    for data in (b"hello", b"", bytes(range(256)) * 1024):
        response = await call(executor, data)
        assert response.output == data and response.stderr == b""
    # 256 KiB of input made clawhub_alloc grow the memory to 5 pages.
    assert response.usage.peak_memory_bytes == 5 * 64 * 1024
    assert response.usage.wall_time.ToNanoseconds() > 0


async def test_a_failure_is_exit_nonzero_with_its_message(executor: Executor) -> None:
    code, reason, meta = await refused(executor, FAILS)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SKILL_EXIT_NONZERO")
    assert (meta["exit_code"], meta["stderr_tail"]) == ("1", "bad input")
    await still_works(executor)


async def test_wasi_output_goes_to_stderr_and_proc_exit_is_an_exit(executor: Executor) -> None:
    response = await call(executor, b"", PRINTS)
    assert (response.output, response.stderr) == (b"x", b"dbg")
    code, reason, meta = await refused(executor, EXITS_3)
    assert (code, reason, meta["exit_code"]) == (grpc.StatusCode.ABORTED, "SKILL_EXIT_NONZERO", "3")
    await still_works(executor)


async def test_trap(executor: Executor) -> None:
    code, reason, meta = await refused(executor, TRAPS)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SKILL_TRAPPED")
    assert "unreachable" in meta["trap"]
    await still_works(executor)


async def test_memory_bomb_is_memory_limit_exceeded(executor: Executor) -> None:
    code, reason, meta = await refused(executor, MEMORY_BOMB, limits(memory=2 * MiB))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT_EXCEEDED")
    assert meta["peak_memory_bytes"] == str(2 * MiB)
    # An input that does not fit the memory limit: clawhub_alloc's growth is refused.
    code, reason, _ = await refused(executor, ECHO, limits(memory=1 * MiB, max_input=2 * MiB), b"x" * (MiB + 1))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT_EXCEEDED")
    await still_works(executor)


async def test_input_over_its_limit_is_refused_before_running(executor: Executor) -> None:
    code, reason, meta = await refused(executor, ECHO, limits(max_input=4), b"12345")
    assert (code, reason, meta["max_input_bytes"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE", "4")
    await still_works(executor)


async def test_infinite_loop_is_stopped_by_the_timeout(executor: Executor) -> None:
    code, reason, meta = await refused(executor, LOOPS, limits(timeout_ms=200))
    assert (code, reason, meta["timeout_ms"]) == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT", "200")
    await still_works(executor)


async def test_fuel_budget(executor: Executor) -> None:
    code, reason, _ = await refused(executor, LOOPS, skill_pb2.Limits(fuel=50_000))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "FUEL_EXHAUSTED")
    response = await call(executor, b"metered", lim=skill_pb2.Limits(fuel=1_000_000))
    assert response.output == b"metered" and 0 < response.usage.fuel_consumed < 1_000_000
    await still_works(executor)


async def test_output_over_the_cap_by_a_huge_out_len(executor: Executor) -> None:
    code, reason, meta = await refused(executor, HUGE_OUT_LEN, limits(output=1024))
    assert (code, reason, meta["max_output_bytes"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                        "OUTPUT_LIMIT_EXCEEDED", "1024")
    # Exactly at the cap is fine.
    assert (await call(executor, b"x" * 1024, lim=limits(output=1024))).output == b"x" * 1024
    await still_works(executor)


async def test_stderr_flood_is_stopped_by_the_stderr_limit(executor: Executor) -> None:
    code, reason, meta = await refused(executor, STDERR_FOREVER, limits(timeout_ms=5000, stderr=4096))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STDERR_LIMIT_EXCEEDED")
    assert 0 < len(meta["stderr_tail"]) <= 1024
    await still_works(executor)


@pytest.mark.parametrize("mod, what", [
    (OUT_OF_BOUNDS, "returned its output at [2147418112, 2147418128), outside the 65536-byte memory"),
    (BOGUS_ALLOC, "`clawhub_alloc(5)` returned address 4294967280"),
    (GARBAGE, "returned its error message at [2147483647, 6442450942)"),
])
async def test_hostile_addresses_are_abi_violations(executor: Executor, mod: bytes, what: str) -> None:
    code, reason, meta = await refused(executor, mod, data=b"hello")
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SKILL_TRAPPED")
    assert meta["trap"].startswith("ABI violation: ") and what in meta["trap"]
    await still_works(executor)


async def test_a_module_with_the_wrong_signatures_is_module_invalid(executor: Executor) -> None:
    code, reason, meta = await refused(executor, WRONG_TYPES)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")
    assert "`clawhub_run` must be a function" in meta["problems"]
    await still_works(executor)


def test_sandbox_cancellation_and_no_wasi_config_without_wasi_imports() -> None:
    sandbox = Sandbox()
    try:
        echo = sandbox.compile("echo", ECHO)
        assert (echo.abi, echo.wasi) == (MEMORY_V1, False)
        assert sandbox.compile("prints", PRINTS).wasi
        looping = sandbox.compile("loop", LOOPS)
        control = RunControl()
        threading.Timer(0.1, control.cancel).start()
        result = sandbox.run(looping, b"", RunLimits(1 * MiB, 5.0, 100, 100), control=control)
        assert result.verdict is Verdict.CANCELLED and result.wall_seconds < 1.0
        result = sandbox.run(echo, b"after", RunLimits(1 * MiB, 5.0, 100, 100))
        assert (result.verdict, result.output) == (Verdict.OK, b"after")
    finally:
        sandbox.close()


def test_concurrent_calls_on_threads_keep_their_own_data() -> None:
    # The C-API path keeps per-thread scratch structures: calls on several threads at once must each get
    # their own input back (and no thread may see another's store: that would abort the process).
    sandbox = Sandbox()
    errors: list[str] = []
    try:
        echo = sandbox.compile("echo", ECHO)

        def worker(n: int) -> None:
            for i in range(300):
                data = f"thread {n} call {i} ".encode() * (1 + i % 7)
                result = sandbox.run(echo, data, RunLimits(4 * MiB, 5.0, 1 * MiB, 1024))
                if (result.verdict, result.output) != (Verdict.OK, data):
                    errors.append(f"{n}/{i}: {result.verdict} {result.detail}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sandbox.close()
    assert errors == []
