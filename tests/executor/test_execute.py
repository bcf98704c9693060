"""Execute over a real channel: well-behaved and hostile modules, limits, and recovery after each."""

from __future__ import annotations

import json

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb
from google.rpc import error_details_pb2

from services.runtime.errors import bad_request, error_info, status_of
from tests.executor import fixtures as f
from tests.executor.conftest import Executor, limits

MiB = 1024 * 1024


async def execute(ex: Executor, module: bytes, data: bytes = b"", lim: skill_pb2.Limits | None = None,
                  timeout: float = 10) -> pb.ExecuteResponse:
    digest = ex.source.add(module)
    return await ex.stub.Execute(pb.ExecuteRequest(digest=digest, input=data, limits=lim), timeout=timeout)


async def failure(ex: Executor, module: bytes, data: bytes = b"", lim: skill_pb2.Limits | None = None,
                  timeout: float = 10) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(ex, module, data, lim, timeout)
    err = caught.value
    info = error_info(err)
    assert info is not None, f"no ErrorInfo on {err.code()}: {err.details()}"
    assert info.domain == "executor.clawhub"
    return err.code(), info.reason, dict(info.metadata)


async def still_works(ex: Executor) -> None:
    response = await execute(ex, f.ECHO, b"still alive")
    assert response.output == b"ok:still alive"


async def test_echo_returns_output_and_usage(executor: Executor) -> None:
    response = await execute(executor, f.ECHO, b"hello")
    assert response.output == b"ok:hello"
    assert response.stderr == b""
    assert response.usage.wall_time.ToNanoseconds() > 0
    assert response.usage.peak_memory_bytes == 65536


async def test_empty_input(executor: Executor) -> None:
    assert (await execute(executor, f.ECHO, b"")).output == b"ok:"


async def test_explicit_exit_zero_is_success(executor: Executor) -> None:
    assert (await execute(executor, f.EXIT_0_EXPLICIT)).output == b""


async def test_trap_is_aborted_skill_trapped(executor: Executor) -> None:
    code, reason, meta = await failure(executor, f.TRAP)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SKILL_TRAPPED")
    assert "unreachable" in meta["trap"]
    await still_works(executor)


async def test_stack_overflow_is_a_trap(executor: Executor) -> None:
    code, reason, meta = await failure(executor, f.STACK_OVERFLOW)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SKILL_TRAPPED")
    assert "stack exhausted" in meta["trap"]
    await still_works(executor)


async def test_infinite_loop_stopped_by_wall_clock_limit(executor: Executor) -> None:
    code, reason, meta = await failure(executor, f.INFINITE_LOOP, lim=limits(timeout_ms=200))
    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT")
    assert meta["timeout_ms"] == "200"
    await still_works(executor)


async def test_loop_in_start_function_stopped_too(executor: Executor) -> None:
    code, reason, _ = await failure(executor, f.LOOP_IN_START_FUNCTION, lim=limits(timeout_ms=150))
    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT")
    await still_works(executor)


async def test_default_timeout_applies(make_executor) -> None:
    ex = await make_executor(default_timeout=0.15)
    code, reason, meta = await failure(ex, f.INFINITE_LOOP)
    assert (code, reason, meta["timeout_ms"]) == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT", "150")


async def test_requested_timeout_capped_by_max_timeout(make_executor) -> None:
    ex = await make_executor(max_timeout=0.2)
    code, reason, meta = await failure(ex, f.INFINITE_LOOP, lim=limits(timeout_ms=60_000))
    assert (code, reason, meta["timeout_ms"]) == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT", "200")


async def test_caller_deadline_stops_the_skill(make_executor) -> None:
    # One thread: if the looping call kept its worker past the caller's deadline, the next call would
    # wait for the 5 s skill timeout and miss its own deadline.
    ex = await make_executor(threads=1, queue=4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(ex, f.INFINITE_LOOP, lim=limits(timeout_ms=5000), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    response = await execute(ex, f.ECHO, b"next", timeout=1.5)
    assert response.output == b"ok:next"


async def test_nonzero_exit_is_aborted_with_exit_code_and_stderr_tail(executor: Executor) -> None:
    code, reason, meta = await failure(executor, f.EXIT_3)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SKILL_EXIT_NONZERO")
    assert meta["exit_code"] == "3"
    assert meta["stderr_tail"] == "something went wrong here\n"
    await still_works(executor)


async def test_stderr_tail_is_the_end_of_stderr(executor: Executor) -> None:
    """The lines just before a failure explain it: the tail keeps them, within the ErrorInfo value limit."""
    code, reason, meta = await failure(executor, f.EXIT_1_LONG_STDERR)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SKILL_EXIT_NONZERO")
    tail = meta["stderr_tail"]
    assert tail.endswith(f.LONG_STDERR_LAST_LINE) and tail.startswith("…")
    assert len(tail) <= 512


async def test_memory_bomb_is_memory_limit_exceeded(executor: Executor) -> None:
    code, reason, meta = await failure(executor, f.MEMORY_BOMB, lim=limits(memory=2 * MiB))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT_EXCEEDED")
    assert meta["memory_limit_bytes"] == str(2 * MiB)
    assert meta["peak_memory_bytes"] == str(2 * MiB)
    await still_works(executor)


async def test_memory_bomb_under_default_limit(make_executor) -> None:
    ex = await make_executor(default_memory=4 * MiB)
    code, reason, meta = await failure(ex, f.MEMORY_BOMB)
    assert (code, reason, meta["memory_limit_bytes"]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT_EXCEEDED", str(4 * MiB))


async def test_requested_memory_capped_by_platform_max(make_executor) -> None:
    ex = await make_executor(max_memory=3 * MiB)
    _, reason, meta = await failure(ex, f.MEMORY_BOMB, lim=limits(memory=1024 * MiB))
    assert (reason, meta["memory_limit_bytes"]) == ("MEMORY_LIMIT_EXCEEDED", str(3 * MiB))


async def test_initial_memory_over_the_limit(executor: Executor) -> None:
    code, reason, _ = await failure(executor, f.BIG_INITIAL_MEMORY, lim=limits(memory=1 * MiB))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT_EXCEEDED")
    # The same module fits a larger limit.
    await execute(executor, f.BIG_INITIAL_MEMORY, lim=limits(memory=8 * MiB))


async def test_output_flood_is_output_limit_exceeded(executor: Executor) -> None:
    code, reason, meta = await failure(executor, f.OUTPUT_FLOOD, lim=limits(output=MiB, timeout_ms=200))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUTPUT_LIMIT_EXCEEDED")
    assert meta["max_output_bytes"] == str(MiB)
    await still_works(executor)


async def test_output_flood_that_stops_on_write_error(executor: Executor) -> None:
    code, reason, _ = await failure(executor, f.OUTPUT_FLOOD_STOPS_ON_ERROR, lim=limits(output=100_000))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUTPUT_LIMIT_EXCEEDED")
    await still_works(executor)


async def test_output_exactly_at_the_limit_is_fine(executor: Executor) -> None:
    response = await execute(executor, f.ECHO, b"x" * 7, lim=limits(output=10))
    assert response.output == b"ok:xxxxxxx"


async def test_stderr_over_its_limit_stops_the_call(executor: Executor) -> None:
    code, reason, meta = await failure(executor, f.STDERR_FLOOD, lim=limits(stderr=1000))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STDERR_LIMIT_EXCEEDED")
    assert meta["max_stderr_bytes"] == "1000" and meta["stderr_tail"]
    await still_works(executor)


async def test_imports_beyond_the_capabilities_are_module_invalid(executor: Executor) -> None:
    # path_open needs `files`: without it the module is refused before it runs, naming what it lacks.
    code, reason, meta = await failure(executor, f.PROBES_WASI)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")
    assert "path_open" in meta["problems"] and "`files`" in meta["problems"]
    await still_works(executor)


async def test_unrequested_wasi_capabilities_are_denied_cleanly(executor: Executor) -> None:
    # With `files` declared but no bundle, /skill is an empty read-only directory: /etc/passwd is not
    # reachable and no environment variable leaks in.
    digest = executor.source.add(f.PROBES_WASI)
    response = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, capabilities=["files"]), timeout=5)
    open_errno, env_count = response.output
    assert open_errno != 0  # /etc/passwd is an absolute path outside the preopen
    assert env_count == 0  # no environment variables leak in


@pytest.mark.parametrize("module", [f.GARBAGE, f.TRUNCATED_WASM, f.EMPTY, f.IMPORTS_UNKNOWN_HOST_FUNCTION,
                                    f.IMPORTS_UNKNOWN_WASI_FUNCTION, f.NO_START],
                         ids=["garbage", "truncated", "empty", "unknown-host-import", "unknown-wasi-import",
                              "no-start"])
async def test_modules_that_cannot_run_are_module_invalid(executor: Executor, module: bytes) -> None:
    code, reason, meta = await failure(executor, module)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")
    assert meta["problems"]
    await still_works(executor)


async def test_unknown_host_import_is_named(executor: Executor) -> None:
    _, _, meta = await failure(executor, f.IMPORTS_UNKNOWN_HOST_FUNCTION)
    assert "env.steal_credentials" in meta["problems"]


async def test_invalid_digest(executor: Executor) -> None:
    for digest in ["", "sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await executor.stub.Execute(pb.ExecuteRequest(digest=digest), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "INVALID_DIGEST"
        assert bad_request(caught.value).field_violations[0].field == "digest"


async def test_unknown_digest_is_blob_not_found(executor: Executor) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.Execute(pb.ExecuteRequest(digest="sha256:" + "0" * 64), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "BLOB_NOT_FOUND"


async def test_unreachable_source_is_upstream_unavailable(executor: Executor) -> None:
    executor.source.unavailable = True
    digest = executor.source.add(f.ECHO)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.Execute(pb.ExecuteRequest(digest=digest), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"
    details = status_of(caught.value).details
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
    # A failed load is not cached: once the source is back, the module loads.
    executor.source.unavailable = False
    await still_works(executor)
    assert (await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"x"), timeout=5)).output == b"ok:x"


async def test_source_returning_wrong_bytes_is_refused(executor: Executor) -> None:
    digest = executor.source.add(f.ECHO)
    executor.source.blobs[digest] = f.TRAP  # a lying or corrupted source
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.Execute(pb.ExecuteRequest(digest=digest), timeout=5)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    info = error_info(caught.value)
    assert info.reason == "CHECKSUM_MISMATCH"
    assert info.metadata["expected_digest"] == digest
    assert status_of(caught.value) is not None


async def test_input_too_large(make_executor) -> None:
    ex = await make_executor(max_input=1000)
    code, reason, meta = await failure(ex, f.ECHO, b"x" * 1001)
    assert (code, reason, meta["max_input_bytes"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE",
                                                       "1000")
    # A smaller per-call limit applies too; a larger one is capped by the executor's.
    code, reason, _ = await failure(ex, f.ECHO, b"x" * 11, limits(max_input=10))
    assert reason == "INPUT_TOO_LARGE"
    _, reason, _ = await failure(ex, f.ECHO, b"x" * 1001, limits(max_input=10_000))
    assert reason == "INPUT_TOO_LARGE"
    assert (await execute(ex, f.ECHO, b"x" * 1000)).output == b"ok:" + b"x" * 1000


async def test_calls_do_not_share_state(executor: Executor) -> None:
    # A module that counts calls in a global: a fresh instance per call always sees zero.
    counter = f.command("""
      (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
      (i32.store8 (i32.const 100) (i32.add (i32.const 48) (global.get $calls)))
      (i32.store (i32.const 0) (i32.const 100))
      (i32.store (i32.const 4) (i32.const 1))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    """, extra="(global $calls (mut i32) (i32.const 0))")
    outputs = {(await execute(executor, counter)).output for _ in range(3)}
    assert outputs == {b"1"}


async def test_json_round_trip_through_echo(executor: Executor) -> None:
    payload = json.dumps({"a": [1, 2, 3]}).encode()
    assert (await execute(executor, f.ECHO, payload)).output == b"ok:" + payload
