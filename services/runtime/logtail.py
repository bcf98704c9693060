"""What every hop of TailSkillLogs shares (gateway → dispatcher → executors; docs/logs.md): the checks of a
request, the trace id of a call, response batches that fit every hop's message limit, and the set of open
follow streams a service ends when it stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import grpc
from clawhub.common.v1 import observability_pb2

from services.runtime.errors import Reason, ServiceError, invalid
from services.runtime.names import skill_name_problem, version_problem

# A response holds lines up to this many bytes (and one more line): well under the smallest receive limit on
# the way (the dispatcher's from an executor is CLAWHUB_EXECUTOR_MAX_OUTPUT + 64 KiB at least).
BATCH_BYTES = 32 * 1024
# `tail` 0 at the gateway; and the most lines one executor sends first, whatever is asked.
DEFAULT_TAIL = 100
MAX_TAIL = 1000
TRACEPARENT = "traceparent"
# What a follow stream ended by a stopping service suggests as a pause before following again.
RESUME_SECONDS = 1.0

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


def check_request(skill: str, version: str) -> None:
    """INVALID_ARGUMENT (INVALID_NAME / INVALID_VERSION) for a bad skill name or a bad non-empty version."""
    problem = skill_name_problem(skill)
    if problem:
        raise invalid(Reason.INVALID_NAME, "skill", problem)
    if version:
        problem = version_problem(version)
        if problem:
            raise invalid(Reason.INVALID_VERSION, "version", problem)


def trace_id_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The trace id of a call from its W3C `traceparent` (`00-<trace id>-<span id>-<flags>`: the second field),
    or "" when it has none or an invalid one (not 32 lowercase hex digits, or all zeros)."""
    for key, value in metadata or ():
        if key != TRACEPARENT:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        fields = text.strip().split("-")
        if len(fields) >= 4 and _is_hex(fields[1], 32) and fields[1] != "0" * 32:
            return fields[1]
        return ""
    return ""


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def batches(lines: Sequence[observability_pb2.SkillLogLine]) -> Iterator[list[observability_pb2.SkillLogLine]]:
    """`lines` in order, cut into batches of about BATCH_BYTES each."""
    batch: list[observability_pb2.SkillLogLine] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += line.ByteSize() + 4
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def shutting_down(service: str) -> ServiceError:
    """How a follow stream ends when its service stops: UNAVAILABLE, so the caller follows again (elsewhere)."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN,
                        f"the {service} is shutting down; follow the logs again", retry_after_seconds=RESUME_SECONDS)


class Follows(Generic[T]):
    """The queues of the follow streams open on a service. `close` (when the service stops, before its drain)
    puts `None` in each, which its stream reads as "end now"; the queues are bounded, so a full one loses its
    oldest item to make room."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[T | None]] = set()
        self.closed = False

    def open(self, maxsize: int) -> asyncio.Queue[T | None]:
        queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize)
        if self.closed:
            queue.put_nowait(None)
        self._queues.add(queue)
        return queue

    def release(self, queue: asyncio.Queue[T | None]) -> None:
        self._queues.discard(queue)

    async def close(self) -> None:
        self.closed = True
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    def __len__(self) -> int:
        return len(self._queues)


class _Call(Protocol[T_co]):
    def __aiter__(self) -> AsyncIterator[T_co]: ...

    def cancel(self) -> bool: ...


_END = object()


async def relay(call: _Call[T], follows: Follows[object], service: str,
                failed: Callable[[grpc.aio.AioRpcError], Exception], *, queue_size: int = 16) -> AsyncIterator[T]:
    """The responses of an upstream stream, until it ends (its error becomes `failed(error)`) or `follows`
    closes (the service is stopping: UNAVAILABLE). The upstream call is cancelled as soon as the relay ends,
    however it ends."""
    queue = follows.open(queue_size)

    async def pump() -> None:
        try:
            async for response in call:
                await queue.put(response)
            await queue.put(_END)
        except grpc.aio.AioRpcError as err:
            await queue.put(err)

    task = asyncio.create_task(pump(), name=f"relay-to-{service}")
    try:
        while True:
            item = await queue.get()
            if item is None:
                raise shutting_down(service)
            if item is _END:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                raise failed(item)
            yield item  # type: ignore[misc]
    finally:
        task.cancel()
        call.cancel()
        await asyncio.gather(task, return_exceptions=True)
        follows.release(queue)
