"""ExecuteStream: Execute calls multiplexed over one stream (services/runtime/mux.py), against a real executor.

Each call must end as its Execute would (output, usage, structured errors), with its own deadline and
cancellation, the stream must outlive failed calls, a server draining must finish the calls open on it, and a
server without the stream method must still be called (unary fallback)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.runtime import mux
from services.runtime.channels import Outgoing, outgoing
from services.runtime.errors import error_info
from services.runtime.executors import EXECUTE_STREAM, GrpcExecutorClient
from services.runtime.identity import load_identity, write_credentials
from services.runtime.mux import MuxChannel
from tests.executor import fixtures as f
from tests.executor.conftest import Executor, limits


def mux_of(ex: Executor) -> MuxChannel:
    stub = ex.stub
    return MuxChannel(ex.channel, EXECUTE_STREAM, pb.ExecuteStreamRequest, pb.ExecuteStreamResponse,
                      fallback=stub.Execute, response_deserializer=pb.ExecuteResponse.FromString)


def request(ex: Executor, module: bytes, data: bytes = b"", **kw: object) -> pb.ExecuteRequest:
    assert ex.assigned is not None
    return ex.assigned.assign(pb.ExecuteRequest(digest=ex.source.add(module), input=data, **kw))


async def test_calls_on_one_stream_answer_as_execute_does(executor: Executor) -> None:
    mux = mux_of(executor)
    try:
        answers = []
        for first in range(0, 200, 8):  # in flight together, within the test executor's 4 threads + 8 waiting
            answers += await asyncio.gather(*(mux.call(request(executor, f.ECHO, f"call {i}".encode()), timeout=10)
                                              for i in range(first, first + 8)))
        assert [a.output for a in answers] == [f"ok:call {i}".encode() for i in range(200)]
        unary = await executor.stub.Execute(request(executor, f.ECHO, b"call 7"), timeout=10)
        assert answers[7].output == unary.output
        assert answers[7].usage.peak_memory_bytes == unary.usage.peak_memory_bytes == 65536
        assert not mux.unsupported
    finally:
        await mux.close()


async def test_a_failed_call_carries_its_structured_error_and_the_stream_goes_on(executor: Executor) -> None:
    mux = mux_of(executor)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mux.call(request(executor, f.TRAP), timeout=10)
        assert caught.value.code() == grpc.StatusCode.ABORTED
        info = error_info(caught.value)
        assert info is not None and (info.domain, info.reason) == ("executor.clawhub", "SKILL_TRAPPED")
        assert "unreachable" in info.metadata["trap"]
        # The skill's own limit, as Execute reports it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mux.call(request(executor, f.INFINITE_LOOP, limits=limits(timeout_ms=150)), timeout=10)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        info = error_info(caught.value)
        assert info is not None and info.reason == "SKILL_TIMEOUT"
        assert (await mux.call(request(executor, f.ECHO, b"after"), timeout=10)).output == b"ok:after"
    finally:
        await mux.close()


async def test_a_malformed_call_is_refused_alone(executor: Executor) -> None:
    """A payload that is no ExecuteRequest: INVALID_ARGUMENT for that call, as Execute would say; the stream and
    the call beside it are unaffected."""
    outbox: asyncio.Queue[pb.ExecuteStreamRequest | None] = asyncio.Queue()

    async def messages():  # type: ignore[no-untyped-def]
        while (message := await outbox.get()) is not None:
            yield message

    good = request(executor, f.ECHO, b"fine")
    call = executor.channel.stream_stream(EXECUTE_STREAM, request_serializer=pb.ExecuteStreamRequest.SerializeToString,
                                          response_deserializer=pb.ExecuteStreamResponse.FromString)(messages())
    outbox.put_nowait(pb.ExecuteStreamRequest(id=1, payload=b"\xff\xff\xff", timeout_seconds=5))
    outbox.put_nowait(pb.ExecuteStreamRequest(id=2, payload=good.SerializeToString(), timeout_seconds=5))
    answers = {}
    async for response in call:
        answers[response.id] = response
        if len(answers) == 2:
            break
    outbox.put_nowait(None)
    assert answers[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert any(e.key == "grpc-status-details-bin" for e in answers[1].trailing)
    assert answers[2].code == 0 and pb.ExecuteResponse.FromString(answers[2].payload).output == b"ok:fine"
    call.cancel()


async def test_the_callers_deadline_ends_the_call_and_frees_the_executor(executor: Executor) -> None:
    mux = mux_of(executor)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mux.call(request(executor, f.INFINITE_LOOP, limits=limits(timeout_ms=20_000)), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0
        # The executor stopped the run too: the worker thread is free again within an epoch slice or so.
        deadline = time.monotonic() + 3.0
        while executor.host is not None:
            load = await executor.stub.GetLoad(pb.GetLoadRequest(), timeout=5)
            if load.load.busy_threads == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert load.load.busy_threads == 0
        assert (await mux.call(request(executor, f.ECHO, b"next"), timeout=10)).output == b"ok:next"
    finally:
        await mux.close()


async def test_a_cancelled_call_is_stopped_on_the_executor(executor: Executor) -> None:
    mux = mux_of(executor)
    try:
        task = asyncio.create_task(mux.call(request(executor, f.INFINITE_LOOP, limits=limits(timeout_ms=20_000)),
                                            timeout=30))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 3.0
        while True:
            load = await executor.stub.GetLoad(pb.GetLoadRequest(), timeout=5)
            if load.load.busy_threads == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert load.load.busy_threads == 0
    finally:
        await mux.close()


async def test_a_stopping_executor_finishes_open_calls_then_ends_the_stream(executor: Executor) -> None:
    mux = mux_of(executor)
    try:
        assert (await mux.call(request(executor, f.ECHO, b"warm"), timeout=10)).output == b"ok:warm"
        slow = asyncio.create_task(mux.call(request(executor, f.INFINITE_LOOP, limits=limits(timeout_ms=400)),
                                            timeout=10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await executor.host.stop(grace=10)
        # The open call ended as its own (the skill's timeout), not cut by the stop; the drain did not wait
        # for the grace period (the stream ended once its calls were answered).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await slow
        info = error_info(caught.value)
        assert info is not None and info.reason == "SKILL_TIMEOUT"
        assert time.monotonic() - started < 5.0
        # Calls after it: UNAVAILABLE (a router tries another executor).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mux.call(request(executor, f.ECHO, b"late"), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await mux.close()


async def test_an_executor_without_the_stream_is_called_with_execute() -> None:
    """An executor of an earlier release (no ExecuteStream): the client notices UNIMPLEMENTED once and calls
    Execute from then on."""
    seen: list[str] = []

    async def execute(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        seen.append(pb.ExecuteRequest.FromString(raw).request_id)
        return pb.ExecuteResponse(output=b"unary").SerializeToString()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "clawhub.executor.v1.ExecutorService", {"Execute": grpc.unary_unary_rpc_method_handler(execute)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcExecutorClient([f"127.0.0.1:{port}"])
    try:
        for i in range(3):
            response = await client.execute(f"127.0.0.1:{port}", pb.ExecuteRequest(digest="sha256:" + "0" * 64,
                                                                                     request_id=f"r{i}"), timeout=5)
            assert response.output == b"unary"
        assert seen == ["r0", "r1", "r2"]
    finally:
        await client.close()
        await server.stop(None)


async def test_the_stream_is_for_platform_services_and_a_refusal_comes_at_once(make_executor: Any,
                                                                               tmp_path: Path) -> None:
    """With internal auth on: a stream without a token is refused UNAUTHENTICATED right away (not after the
    2-second read a refused client stream otherwise gets), one with the executor's own token PERMISSION_DENIED,
    and the gateway's token is admitted, each call then running as the gateway's Execute."""
    write_credentials(tmp_path / "secrets")

    def identity(service: str) -> Any:
        return load_identity(service, tmp_path / "secrets" / f"{service}.token",
                             tmp_path / "secrets" / "identities.json")

    ex = await make_executor(identity=identity("executor"))
    address = f"127.0.0.1:{ex.host.port}"
    expected = {None: (grpc.StatusCode.UNAUTHENTICATED, "PLATFORM_CREDENTIALS_REQUIRED"),
                "executor": (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_ALLOWED")}
    for service, (code, reason) in expected.items():
        security = Outgoing(token=identity(service).token) if service else Outgoing()
        with outgoing(security):
            client = GrpcExecutorClient([address])
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.execute(address, request(ex, f.ECHO, b"x"), timeout=5)
            assert (caught.value.code(), error_info(caught.value).reason) == (code, reason)
            assert time.monotonic() - started < 1.0
        finally:
            await client.close()
    with outgoing(Outgoing(token=identity("gateway").token)):
        client = GrpcExecutorClient([address])
    try:
        answers = await asyncio.gather(*(client.execute(address, request(ex, f.ECHO, f"{i}".encode()), timeout=5)
                                         for i in range(8)))
        assert [a.output for a in answers] == [f"ok:{i}".encode() for i in range(8)]
    finally:
        await client.close()


async def test_a_draining_executor_tells_its_callers_to_stop_sending(executor: Executor) -> None:
    """The drain notice: the caller marks the stream ended at once, so its next call opens another stream (here
    refused: the executor is gone) instead of queueing on one that is closing."""
    mux = mux_of(executor)
    try:
        assert (await mux.call(request(executor, f.ECHO, b"warm"), timeout=10)).output == b"ok:warm"
        stream = mux._stream
        assert stream is not None and not stream.ended
        await executor.host.stop(grace=5)
        assert stream.ended
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mux.call(request(executor, f.ECHO, b"late"), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await mux.close()


class _EarlierRelease:
    """A stream context as a MuxServer of a release before batches sees it: it neither reads the caller's
    BATCH_HEADER nor sends its own."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def invocation_metadata(self) -> Any:
        return tuple(e for e in self._context.invocation_metadata() or () if e[0] != mux.BATCH_HEADER)

    async def send_initial_metadata(self, metadata: Any) -> None:
        await self._context.send_initial_metadata(tuple(e for e in metadata if e[0] != mux.BATCH_HEADER))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


@pytest.mark.parametrize("server_batches", [True, False])
async def test_calls_queued_together_travel_in_one_message_only_where_both_sides_read_batches(
        executor: Executor, monkeypatch: pytest.MonkeyPatch, server_batches: bool) -> None:
    filled: list[tuple[str, int]] = []
    real_fill = mux._fill

    def spy(first: Any, queue: Any, *args: Any) -> None:
        real_fill(first, queue, *args)
        filled.append((type(first).__name__, len(first.batch)))

    monkeypatch.setattr(mux, "_fill", spy)
    if not server_batches:
        serve = mux.MuxServer.serve
        monkeypatch.setattr(mux.MuxServer, "serve", lambda self, requests, context: serve(
            self, requests, _EarlierRelease(context)))
    channel = mux_of(executor)
    try:
        for _ in range(3):
            answers = await asyncio.gather(*(channel.call(request(executor, f.ECHO, f"call {i}".encode()), timeout=10)
                                             for i in range(12)))
            assert [a.output for a in answers] == [f"ok:call {i}".encode() for i in range(12)]
    finally:
        await channel.close()
    if server_batches:
        # Calls sent at once queue behind the stream's first write; their answers behind each other's.
        assert any(kind == "ExecuteStreamRequest" and n for kind, n in filled), filled
        assert any(kind == "ExecuteStreamResponse" and n for kind, n in filled), filled
        assert all(n < mux.BATCH_CALLS for _, n in filled)
    else:
        assert not filled  # neither side batches for a peer that did not say it reads batches


def test_a_batch_stops_at_its_size_bounds_and_leaves_the_rest_queued() -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for i in range(2, 100):
        queue.put_nowait(pb.ExecuteStreamRequest(id=i, payload=b"x" * 10))
    first = pb.ExecuteStreamRequest(id=1, payload=b"x" * 10)
    mux._fill(first, queue)
    assert len(first.batch) == mux.BATCH_CALLS - 1 and [m.id for m in first.batch][:2] == [2, 3]
    assert queue.qsize() == 98 - (mux.BATCH_CALLS - 1)
    big = pb.ExecuteStreamRequest(id=500, payload=b"y" * (mux.BATCH_BYTES - 5))
    queue = asyncio.Queue()
    for message in (pb.ExecuteStreamRequest(id=501, payload=b"z" * 10), None):
        queue.put_nowait(message)
    mux._fill(big, queue)  # the next would pass BATCH_BYTES: it waits for the next write
    assert not big.batch and queue.qsize() == 2
    small = pb.ExecuteStreamRequest(id=502)
    mux._fill(small, queue)  # takes the call, stops at the end of the queue (None stays for the sender)
    assert [m.id for m in small.batch] == [501] and queue.get_nowait() is None
