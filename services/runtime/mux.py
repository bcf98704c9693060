"""Unary calls multiplexed over one long-lived bidirectional stream (ExecutorService.ExecuteStream).

A gateway (or a dispatcher) makes thousands of Execute calls a second to the same few executors. As RPCs, each
call costs gRPC its whole per-call work on both sides: a new HTTP/2 stream, initial metadata, the message,
trailing metadata and status, and on the Python side a call object, a task and a batch of completion-queue
operations per step. Sent as messages of one open stream, a call costs one message each way. Measured on
this 2-core machine (docs/routing.md, "One stream per executor"): the executor's CPU per call about 43% lower,
the caller's about 17%, a relay chain 1.23× the throughput.

What stays the same per call, on the server: every call passes the server's interceptors as the unary method
it stands for (`MuxServer` runs them itself: platform authentication of the caller's token, rate limits,
tracing with the call's own `traceparent`, RPC metrics under the unary method's name, structured errors), has
its own deadline (the server cancels it when it passes) and can be cancelled by the caller; its status (code,
message, trailing metadata with the ErrorInfo) comes back in its response message, and the caller raises it
as the `grpc.aio.AioRpcError` the unary call would have raised. A call's context (`MuxedCall`) offers what
the services' handlers and interceptors use of gRPC's.

The stream itself: opened on the first call and kept; when it fails (the executor went away), the calls open
on it fail with its status (UNAVAILABLE, so a router tries another executor) and the next call opens a new
one. A server that stops (`MuxServer.drain`, before the server's drain) refuses new calls on its streams with
UNAVAILABLE, lets the open ones finish, then ends the streams. A server without the stream method
(UNIMPLEMENTED: an older executor) is called with unary RPCs from then on.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

import grpc
from clawhub.common.v1 import mux_pb2

from services.runtime.errors import NO_DRAIN

log = logging.getLogger("clawhub.mux")

Metadata = tuple[tuple[str, str | bytes], ...]
_OK = grpc.StatusCode.OK
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
# The header a MuxServer sends as soon as a stream opens: callers send no call before they see it, so a server
# without the method (which ends the stream with UNIMPLEMENTED instead) has been sent nothing and every call
# waiting for the stream can safely go another way.
SERVING_HEADER = "x-clawhub-mux"
# Both sides say they read batched messages (ExecuteStreamRequest/Response `batch`) with this header: the caller in
# the stream's metadata, the server in its initial metadata. Each sends batches only to a peer that said so (an
# earlier release ignores the field: the calls in it would be lost).
BATCH_HEADER = "x-clawhub-mux-batch"
# What one message may carry at most: calls queued beyond it go in the next. Only what is queued when a write can
# start is batched (no call waits to fill a batch); a call larger than BATCH_BYTES goes alone.
BATCH_CALLS, BATCH_BYTES = 64, 64 * 1024
# What a call may carry of its own; everything else (credentials above all) is the stream's, checked once for it.
_CALL_KEYS = frozenset({"traceparent", "tracestate", "baggage"})
# The id of the notice a draining server sends on each stream (call ids start at 1): send nothing more here.
DRAIN_NOTICE = 0


def _entries(metadata: Iterable[tuple[str, str | bytes]]) -> list[mux_pb2.MuxMetadata]:
    return [mux_pb2.MuxMetadata(key=k, binary=v) if isinstance(v, bytes)
            else mux_pb2.MuxMetadata(key=k, text=v) for k, v in metadata]


def _metadata(entries: Iterable[mux_pb2.MuxMetadata]) -> Metadata:
    return tuple((e.key, e.binary if e.key.endswith("-bin") else e.text) for e in entries)


# The server side.

class _CallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, metadata: Metadata) -> None:
        self.method = method
        self.invocation_metadata = metadata


class MuxedCall:
    """The servicer context of one multiplexed call: what gRPC's `ServicerContext` offers that the services'
    handlers and interceptors use (metadata, deadline, peer, abort and the status it set)."""

    __slots__ = ("_metadata", "_deadline", "_peer", "_code", "_details", "_trailing")

    def __init__(self, metadata: Metadata, deadline: float | None, peer: str) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)
        raise grpc.aio.AbortError(f"{code.name}: {details}")

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def done(self) -> bool:
        return self._code is not None

    def cancelled(self) -> bool:
        return False


class MuxServer:
    """Serves a stream method whose messages are calls of a unary method (`serve` is the stream method's
    handler): each call is run through the server's interceptors (`bind`; as gRPC would run them for the unary
    method) and then `handler`, the unary method's own handler. `request_type` / `response_type` are the
    stream's messages."""

    def __init__(self, stream_method: str, method: str, handler: grpc.RpcMethodHandler, request_type: Any,
                 response_type: Any) -> None:
        self.stream_method = stream_method
        self.method = method
        self._handler = handler
        self._request = request_type
        self._response = response_type
        self._interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
        self._streams: set[_ServedStream] = set()
        self._draining = False

    def bind(self, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> None:
        """The interceptors of the server whose stream method `serve` serves: they run once for the stream, as for
        any call, and once for each call on it."""
        self._interceptors = tuple(interceptors)
        # A refused stream is answered at once: its caller sends no call before the stream is served.
        NO_DRAIN.add(self.stream_method)

    async def drain(self) -> None:
        """Stop taking calls: calls sent from now on get UNAVAILABLE, and each stream ends once the calls open
        on it are answered (the server's own drain then has nothing of them left to wait for)."""
        self._draining = True
        for stream in tuple(self._streams):
            stream.drain()

    async def resolve(self, metadata: Metadata) -> grpc.RpcMethodHandler | None:
        """The unary method's handler as the interceptors hand it out for a call with `metadata`. Resolved once per
        stream, with the stream's metadata: what decides it (the caller's credentials) is the stream's, and the
        context variables the interceptors set (the calling service) are inherited by the calls' tasks."""
        details = _CallDetails(self.method, metadata)
        interceptors = self._interceptors

        async def run(index: int, call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            if index == len(interceptors):
                return self._handler
            return await interceptors[index].intercept_service(lambda d: run(index + 1, d), call_details)

        return await run(0, details)

    async def serve(self, requests: Any, context: Any) -> None:
        # The stream's metadata (the caller's credentials) with each call's own: its trace context is the call's.
        received = context.invocation_metadata() or ()
        metadata = tuple(e for e in received if e[0] not in _TRACE_KEYS and e[0] != BATCH_HEADER)
        stream = _ServedStream(self, await self.resolve(metadata), metadata, str(context.peer() or ""),
                               batching=any(e[0] == BATCH_HEADER for e in received))
        await context.send_initial_metadata(((SERVING_HEADER, "1"), (BATCH_HEADER, "1")))
        self._streams.add(stream)
        if self._draining:
            stream.drain()
        try:
            await stream.run(requests, context)
        finally:
            self._streams.discard(stream)

    async def call(self, handler: grpc.RpcMethodHandler | None, message: Any, metadata: Metadata, peer: str,
                   deadline: float | None) -> Any:
        """One call, with the handler `resolve` gave its stream: its response message (its status in it when it
        failed)."""
        own = tuple((k.lower(), v) for k, v in _metadata(message.metadata) if k.lower() in _CALL_KEYS)
        context = MuxedCall((*metadata, *own), deadline, peer)
        try:
            if handler is None:
                return self._status(message.id, grpc.StatusCode.UNIMPLEMENTED, "Method not found!", ())
            payload = message.payload
            if handler.request_deserializer is not None:
                payload = handler.request_deserializer(payload)
            result = await handler.unary_unary(payload, context)
            if handler.response_serializer is not None:
                result = handler.response_serializer(result)
            return self._response(id=message.id, payload=result)
        except grpc.aio.AbortError:
            return self._status(message.id, context.code() or grpc.StatusCode.UNKNOWN, context.details(),
                                context.trailing_metadata())
        except Exception:  # noqa: BLE001 - the error interceptor turns handler errors into statuses; not this
            log.exception("unexpected error in a call of %s", self.method)
            return self._status(message.id, grpc.StatusCode.INTERNAL, f"internal error in {self.method}", ())

    def _status(self, call_id: int, code: grpc.StatusCode, details: str, trailing: Metadata) -> Any:
        return self._response(id=call_id, code=code.value[0], message=details, trailing=_entries(trailing))


class _ServedStream:
    """One open stream on the server: its calls in flight, answered in the order they end."""

    def __init__(self, server: MuxServer, handler: grpc.RpcMethodHandler | None, metadata: Metadata,
                 peer: str, *, batching: bool = False) -> None:
        self._server = server
        self._batching = batching  # the caller reads batched responses
        self._handler = handler
        self._metadata = metadata
        self._peer = peer
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._draining = False
        self._read_all = False

    def drain(self) -> None:
        if not self._draining:
            self._draining = True
            # The caller stops sending on this stream (its next calls open another, elsewhere once this server is
            # gone); the calls it sent meanwhile are answered UNAVAILABLE.
            self._outbox.put_nowait(self._server._status(
                DRAIN_NOTICE, grpc.StatusCode.UNAVAILABLE, "the executor is shutting down", ()))
        self._end_if_idle()

    def _end_if_idle(self) -> None:
        if (self._draining or self._read_all) and not self._calls:
            self._outbox.put_nowait(None)

    async def run(self, requests: Any, context: Any) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            outbox = self._outbox
            while True:
                response = await outbox.get()
                if response is None:
                    break
                if self._batching and not outbox.empty():
                    _fill(response, outbox)  # the ends of calls that queued up while the last write was under way
                await context.write(response)
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]  # the stream ends with its status
        finally:
            reader.cancel()
            for task in tuple(self._calls.values()):
                task.cancel()

    async def _read(self, requests: Any) -> None:
        try:
            await self._read_calls(requests)
        finally:
            # Read to the end, or reading failed (a malformed message): the stream ends once its calls are answered.
            self._read_all = True
            self._end_if_idle()

    async def _read_calls(self, requests: Any) -> None:
        loop = asyncio.get_running_loop()
        async for message in requests:
            self._take(message, loop)
            for more in message.batch:
                self._take(more, loop)

    def _take(self, message: Any, loop: asyncio.AbstractEventLoop) -> None:
        """One call (or cancel) read from the stream."""
        if message.cancel:
            task = self._calls.get(message.id)
            if task is not None:
                task.cancel()
            return
        if self._draining:
            self._outbox.put_nowait(self._server._status(
                message.id, grpc.StatusCode.UNAVAILABLE, "the executor is shutting down; call another one", ()))
            return
        timeout = message.timeout_seconds
        deadline = time.monotonic() + timeout if timeout > 0 else None
        task = loop.create_task(self._call(message, deadline))
        self._calls[message.id] = task
        if deadline is not None:
            # The server ends a call at its deadline, as gRPC does (the caller stops waiting then too).
            timer = loop.call_at(loop.time() + timeout, task.cancel)
            task.add_done_callback(partial(_stop_timer, timer))

    async def _call(self, message: Any, deadline: float | None) -> None:
        try:
            response = await self._server.call(self._handler, message, self._metadata, self._peer, deadline)
        except asyncio.CancelledError:
            # Cancelled by the caller (who is no longer waiting) or at its deadline.
            response = self._server._status(message.id, grpc.StatusCode.DEADLINE_EXCEEDED
                                            if message.timeout_seconds > 0 else grpc.StatusCode.CANCELLED,
                                            "the call was cancelled or ran past its deadline", ())
        finally:
            self._calls.pop(message.id, None)
        self._outbox.put_nowait(response)
        self._end_if_idle()


def _stop_timer(timer: asyncio.TimerHandle, _: object) -> None:
    timer.cancel()


def _fill(first: Any, queue: asyncio.Queue[Any], sendable: Callable[[Any], bool] = lambda _: True) -> None:
    """Move into `first`'s batch the messages queued after it that `sendable` keeps, within BATCH_CALLS and
    BATCH_BYTES (a message that would not fit stays queued for the next write, as does the queue's end, None)."""
    size = len(first.payload)
    batch = first.batch
    waiting = queue._queue  # type: ignore[attr-defined]  # a peek: a message is taken only if it fits
    while waiting and len(batch) < BATCH_CALLS - 1:
        following = waiting[0]
        if following is None or size + len(following.payload) > BATCH_BYTES:
            return
        queue.get_nowait()
        if sendable(following):
            size += len(following.payload)
            batch.append(following)


# The client side.

class MuxChannel:
    """Calls of one unary method sent over one stream of `stream_method` on `channel`; see the module docstring.
    `request_type` / `response_type` are the stream's messages, `fallback` the unary method's multi-callable
    (used once the server answers the stream UNIMPLEMENTED)."""

    def __init__(self, channel: Any, stream_method: str, request_type: Any, response_type: Any,
                 fallback: Callable[..., Awaitable[Any]], response_deserializer: Callable[[bytes], Any]) -> None:
        self._open_stream = channel.stream_stream(stream_method, request_serializer=request_type.SerializeToString,
                                                  response_deserializer=response_type.FromString)
        self._stream_method = stream_method
        self._request = request_type
        self._fallback = fallback
        self._deserialize = response_deserializer
        self._stream: _OpenStream | None = None
        self._next_id = 0
        # Until when the server is called with the unary method (it answered the stream UNIMPLEMENTED; tried again
        # after UNSUPPORTED_RETRY_SECONDS, in case it was upgraded meanwhile).
        self._unary_until = 0.0

    @property
    def unsupported(self) -> bool:
        return time.monotonic() < self._unary_until

    async def call(self, request: Any, *, timeout: float | None, metadata: Metadata = ()) -> Any:
        """The unary method's response; raises its status as grpc.aio.AioRpcError."""
        if self._unary_until and self.unsupported:
            return await self._fallback(request, timeout=timeout, metadata=metadata or None)
        deadline = time.monotonic() + timeout if timeout else None
        stream = self._stream
        if stream is None or stream.ended:
            # A context of its own: the stream outlives this call (its span, its principal are not the stream's).
            stream = self._stream = contextvars.Context().run(_OpenStream, self)
        self._next_id += 1
        call_id = self._next_id
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        stream.pending[call_id] = answer
        stream.send(self._request(id=call_id, payload=request.SerializeToString(),
                                  timeout_seconds=timeout or 0.0, metadata=_entries(metadata)))
        timer = loop.call_later(timeout, stream.expire, call_id) if timeout else None
        try:
            response = await answer
        except asyncio.CancelledError:
            stream.give_up(call_id)
            raise
        except _StreamUnsupported as exc:
            if not self.unsupported:
                log.info("%s is not served (UNIMPLEMENTED); calling the unary method for %.0f s", exc.method,
                         UNSUPPORTED_RETRY_SECONDS)
            self._unary_until = time.monotonic() + UNSUPPORTED_RETRY_SECONDS
            if timer is not None:
                timer.cancel()
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            return await self._fallback(request, timeout=left, metadata=metadata or None)
        finally:
            if timer is not None:
                timer.cancel()
        if response.code:
            raise grpc.aio.AioRpcError(_CODES.get(response.code, grpc.StatusCode.UNKNOWN), grpc.aio.Metadata(),
                                       grpc.aio.Metadata(*_metadata(response.trailing)), details=response.message)
        return self._deserialize(response.payload)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


class _StreamUnsupported(Exception):
    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.method = method


UNSUPPORTED_RETRY_SECONDS = 60.0


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=details)


class _OpenStream:
    """One stream a MuxChannel keeps open: its calls waiting for answers, a queue of messages to send."""

    def __init__(self, owner: MuxChannel) -> None:
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ended = False
        self._dropped: set[int] = set()  # calls given up before they were sent: neither they nor their cancel go
        self._owner = owner
        self._serving = asyncio.Event()  # the server's SERVING_HEADER arrived: calls may be sent
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._batching = False  # the server reads batched calls (its BATCH_HEADER)
        self._call = owner._open_stream(self._messages(), metadata=((BATCH_HEADER, "1"),))
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _messages(self) -> Any:
        await self._serving.wait()
        outbox = self._outbox
        while not self.ended:
            message = await outbox.get()
            if message is None:
                return
            if not self._sendable(message):
                continue
            if self._batching and not outbox.empty():
                # What queued up while the last write was under way goes in one message.
                _fill(message, outbox, self._sendable)
            yield message

    def _sendable(self, message: Any) -> bool:
        if message.cancel:
            if message.id in self._dropped:
                self._dropped.discard(message.id)
                return False
        elif message.id not in self.pending:
            self._dropped.add(message.id)  # the caller gave up before it was sent (deadline, cancel)
            return False
        return True

    def send(self, message: Any) -> None:
        self._outbox.put_nowait(message)

    def give_up(self, call_id: int) -> None:
        """The caller stopped waiting for call `call_id`: the server stops it too."""
        if self.pending.pop(call_id, None) is not None and not self.ended:
            self.send(self._owner._request(id=call_id, cancel=True))

    def expire(self, call_id: int) -> None:
        answer = self.pending.pop(call_id, None)
        if answer is not None and not answer.done():
            answer.set_exception(grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                                      grpc.aio.Metadata(), details="Deadline Exceeded"))
            if not self.ended:
                self.send(self._owner._request(id=call_id, cancel=True))

    async def _read(self) -> None:
        error: BaseException
        try:
            headers = await self._call.initial_metadata()
            if not any(key == SERVING_HEADER for key, _ in headers or ()):
                # Not a MuxServer: the stream ends with a status and nothing was sent on it.
                code = await self._call.code()
                if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OK):
                    raise _StreamUnsupported(self._owner._stream_method)
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), await self._call.trailing_metadata(),
                                           details=await self._call.details())
            self._batching = any(key == BATCH_HEADER for key, _ in headers)
            self._serving.set()
            async for response in self._call:
                self._answer(response)
                for more in response.batch:
                    self._answer(more)
            error = _unavailable("the server ended the call stream (it is shutting down)")
        except grpc.aio.AioRpcError as err:
            if not self._serving.is_set():
                error = _StreamUnsupported(self._owner._stream_method) \
                    if err.code() == grpc.StatusCode.UNIMPLEMENTED else err
            else:
                # Once served, whatever ended the stream (the server went away or finished its drain while calls
                # were on their way: gRPC may then say INTERNAL) is UNAVAILABLE for the calls still waiting, as a
                # broken connection is for unary calls: a router tries them on another executor.
                error = _unavailable(f"the call stream ended: {err.code().name} {err.details() or ''}".strip())
        except _StreamUnsupported as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - the calls waiting must end, whatever broke the stream
            log.exception("the call stream of %s failed", self._owner._stream_method)
            error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                         details=f"the call stream failed: {exc}")
        except asyncio.CancelledError:
            error = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                         details="the call stream was closed")
        self.ended = True
        self._outbox.put_nowait(None)
        self._serving.set()  # lets the message generator see `ended` and stop
        pending, self.pending = self.pending, {}
        for answer in pending.values():
            if not answer.done():
                answer.set_exception(error)

    def _answer(self, response: Any) -> None:
        if response.id == DRAIN_NOTICE:
            self.ended = True  # the server is draining: the next calls open another stream
            return
        answer = self.pending.pop(response.id, None)
        if answer is not None and not answer.done():
            answer.set_result(response)

    def close(self) -> None:
        self.ended = True
        self._call.cancel()
        self._reader.cancel()
