"""Skill logs through the real chain (gateway → dispatcher → executor, tests/gateway/support.py): a call's stderr
comes back from GatewayService.TailSkillLogs with its version, request id and trace id, a follow gets the lines
of calls made after it started, unreachable executors are skipped (and asked again while following), and the
follow streams end when their services stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.executor.v1 import executor_service_pb2 as executor_pb
from clawhub.executor.v1 import executor_service_pb2_grpc as executor_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as pb

from services.dispatcher.server import build_server as build_dispatcher
from services.dispatcher.settings import Settings as DispatcherSettings
from services.executor.server import build_server as build_executor
from services.executor.settings import Settings as ExecutorSettings
from services.runtime.errors import Reason, error_info
from tests.conftest import Starter, _free_port
from tests.gateway.support import Chain, start_chain

SKILL = "com.example.stderr-echo"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

# Writes its input to stderr and `{"ok":true}` to stdout.
STDERR_ECHO_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "{\\"ok\\":true}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 60000))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 11))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def stderr_skill(directory: Path, version: str = "1.0.0") -> Path:
    """A skill directory for `clawhub publish` (or publish_dir) whose calls write their input to stderr."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "skill.toml").write_text(f'name = "{SKILL}"\nversion = "{version}"\nabi = "wasi-command-v1"\n'
                                          'module = "stderr-echo.wat"\ncapabilities = []\n')
    (directory / "stderr-echo.wat").write_text(STDERR_ECHO_WAT)
    return directory


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path, skill_dir=stderr_skill(tmp_path / "skill"))
    yield chain
    await chain.channel.close()


async def invoke(chain: Chain, text: str, request_id: str = "", traceparent: str = "") -> None:
    await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=SKILL, raw_input=text.encode(), request_id=request_id),
                                 timeout=10, metadata=(("traceparent", traceparent),) if traceparent else None)


async def test_a_calls_stderr_comes_back_with_its_version_request_and_trace(chain: Chain) -> None:
    await invoke(chain, "resizing 1920x1080\ndone\n", request_id="req-1", traceparent=TRACEPARENT)
    await invoke(chain, "untraced\n")
    lines = [line async for response in chain.stub.TailSkillLogs(pb.TailSkillLogsRequest(skill=SKILL), timeout=10)
             for line in response.lines]
    assert [line.text for line in lines] == ["resizing 1920x1080", "done", "untraced"]
    first, second, third = lines
    assert (first.skill, first.version, first.request_id, first.trace_id, first.executor) == (
        SKILL, "1.0.0", "req-1", TRACE_ID, "executor-1")
    assert first.digest.startswith("sha256:") and first.time.seconds > 0
    assert (second.request_id, second.trace_id) == ("req-1", TRACE_ID)
    # Without a request id the gateway makes one up; without a traceparent there is no trace id.
    assert third.request_id and third.request_id != "req-1" and third.trace_id == ""
    # Another version's lines only: none.
    other = [r async for r in chain.stub.TailSkillLogs(pb.TailSkillLogsRequest(skill=SKILL, version="2.0.0"),
                                                        timeout=10)]
    assert not [line for response in other for line in response.lines]


async def test_tail_bounds_the_kept_lines_sent(chain: Chain) -> None:
    await invoke(chain, "".join(f"line {n}\n" for n in range(10)))
    lines = [line async for response in chain.stub.TailSkillLogs(pb.TailSkillLogsRequest(skill=SKILL, tail=3),
                                                                  timeout=10) for line in response.lines]
    assert [line.text for line in lines] == ["line 7", "line 8", "line 9"]


async def test_a_follow_gets_the_lines_of_calls_made_after_it_started(chain: Chain) -> None:
    await invoke(chain, "before\n", request_id="before")
    stream = chain.stub.TailSkillLogs(pb.TailSkillLogsRequest(skill=SKILL, follow=True))
    try:
        # The kept lines, then an empty response: the follow is in place at every executor.
        kept: list[str] = []
        while (response := await asyncio.wait_for(stream.read(), 10)).lines:
            kept += [line.text for line in response.lines]
        assert kept == ["before"]
        await invoke(chain, "after\n", request_id="after", traceparent=TRACEPARENT)
        response = await asyncio.wait_for(stream.read(), 10)
        assert [(line.text, line.request_id, line.trace_id, line.executor) for line in response.lines] == [
            ("after", "after", TRACE_ID, "executor-1")]
    finally:
        stream.cancel()


@pytest.mark.parametrize(("skill", "version", "reason"), [
    ("Not A Name", "", Reason.INVALID_NAME),
    (SKILL, "1.x", Reason.INVALID_VERSION),
])
async def test_bad_names_are_refused(chain: Chain, skill: str, version: str, reason: Reason) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in chain.stub.TailSkillLogs(pb.TailSkillLogsRequest(skill=skill, version=version), timeout=10):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None and info.reason == reason


async def test_unreachable_executors_are_skipped_and_asked_again_while_following(
        chain: Chain, start_service: Starter, tmp_path: Path) -> None:
    """A dispatcher whose first executor is down names the live one `executor-2`, and once the first one comes
    up, the follow gets its lines too, as `executor-1`."""
    await invoke(chain, "kept by the live one\n")
    down = _free_port()
    live = f"127.0.0.1:{chain.executor.port}"
    dispatcher = await start_service(build_dispatcher(DispatcherSettings(
        host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{chain.deployer.port}",
        executor_addresses=(f"127.0.0.1:{down}", live), dispatcher_id="logs-tests", retries=2,
        dispatch_timeout=10.0, grace=0.2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{dispatcher.port}") as channel:
        stub = dispatcher_grpc.DispatcherServiceStub(channel)
        once = [line async for response in stub.TailSkillLogs(
            dispatcher_pb.TailSkillLogsRequest(skill=SKILL, tail=10), timeout=20) for line in response.lines]
        assert [(line.text, line.executor) for line in once] == [("kept by the live one", "executor-2")]
        stream = stub.TailSkillLogs(dispatcher_pb.TailSkillLogsRequest(skill=SKILL, tail=10, follow=True))
        try:
            while (await asyncio.wait_for(stream.read(), 20)).lines:
                pass
            await start_service(build_executor(ExecutorSettings(
                host="127.0.0.1", port=down, registry_address=f"127.0.0.1:{chain.registry.port}", threads=1,
                queue=4, data_dir=tmp_path / "executor-2", grace_seconds=0.5)))
            seen: set[str] = set()

            async def read() -> None:
                while {"executor-1", "executor-2"} - seen:
                    seen.update(line.executor for line in (await stream.read()).lines)

            reading = asyncio.create_task(read())
            # Calls go to either executor; a call executor-1 runs before the dispatcher asked it again is not
            # followed, so call until one it ran after that shows up.
            for call in range(100):
                if reading.done():
                    break
                await stub.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=f"call {call}\n".encode()),
                                    timeout=10)
                await asyncio.sleep(0.2)
            await asyncio.wait_for(reading, 10)
            assert seen == {"executor-1", "executor-2"}
        finally:
            stream.cancel()


async def test_a_stopping_executor_ends_its_follows_at_once(chain: Chain) -> None:
    """Not at the end of its grace period: UNAVAILABLE / SHUTTING_DOWN, so the dispatcher asks again."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.executor.port}") as channel:
        stream = executor_grpc.ExecutorServiceStub(channel).TailSkillLogs(
            executor_pb.TailSkillLogsRequest(skill=SKILL, follow=True))
        assert not (await asyncio.wait_for(stream.read(), 10)).lines
        chain.executor.grace_seconds = 60
        stopping = asyncio.create_task(chain.executor.stop())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(stream.read(), 10)
        await asyncio.wait_for(stopping, 30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None and info.reason == Reason.SHUTTING_DOWN


async def test_a_stopping_gateway_ends_its_follows_at_once(chain: Chain) -> None:
    stream = chain.stub.TailSkillLogs(pb.TailSkillLogsRequest(skill=SKILL, follow=True))
    assert not (await asyncio.wait_for(stream.read(), 10)).lines
    chain.gateway.grace_seconds = 60
    stopping = asyncio.create_task(chain.gateway.stop())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(stream.read(), 10)
    await asyncio.wait_for(stopping, 30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None and info.reason == Reason.SHUTTING_DOWN


async def test_a_successful_call_logs_nothing_at_info(chain: Chain, caplog: pytest.LogCaptureFixture) -> None:
    """At most one line per call at INFO (docs/logs.md), and none for a call that went well: its stderr goes
    to the skill logs, not to the service logs."""
    with caplog.at_level(logging.INFO, logger="clawhub"):
        for call in range(5):
            await invoke(chain, f"call {call}\n", request_id=f"quiet-{call}", traceparent=TRACEPARENT)
    about_calls = [r.getMessage() for r in caplog.records if "quiet-" in r.getMessage() or "call " in r.getMessage()]
    assert about_calls == []
