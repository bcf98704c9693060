"""DispatcherService.TailSkillLogs: the skill logs of every executor the dispatcher knows, as one stream.

Each executor keeps the stderr lines of the calls it ran (services/executor/skilllogs.py); the dispatcher
asks all of them at once and names each by its position in its executor list (`executor-1`, …), never by
address. The kept lines come first, merged by time (an executor that has not sent its own within
INITIAL_WAIT_SECONDS is not waited for: what it sends later comes as it comes); with `follow`, an empty
response then says the kept lines are all sent, and new lines follow as calls end.

An executor that cannot be reached is skipped; while following, it is asked again (every RETRY_INITIAL
seconds at first, backing off to RETRY_MAX), and its new lines join the stream once it answers. Lines it kept
while it could not be reached are not sent again. The streams of all executors feed one bounded queue: a
caller that reads slowly slows the streams down, and the executors drop lines for it (telling it so) rather
than slowing their calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from clawhub.common.v1 import observability_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.executor.v1 import executor_service_pb2 as executor_pb

from services.runtime import logtail
from services.runtime.errors import one_line
from services.runtime.executors import ExecutorClient

log = logging.getLogger("clawhub.dispatcher.logs")

INITIAL_WAIT_SECONDS = 5.0
RETRY_INITIAL = 0.5
RETRY_MAX = 5.0
# Batches of lines waiting for the caller, from every executor together.
QUEUE_BATCHES = 64

Line = observability_pb2.SkillLogLine
# (executor index, lines) or (executor index, None): that executor has sent the lines it kept (or failed).
Event = tuple[int, list[Line] | None]


def executor_name(index: int) -> str:
    """How operators see the executor at `index` of the dispatcher's list: `executor-1` is the first."""
    return f"executor-{index + 1}"


class LogFanIn:
    def __init__(self, executors: ExecutorClient) -> None:
        self._executors = executors
        self.follows: logtail.Follows[Event] = logtail.Follows()

    async def close(self) -> None:
        """End every stream (the dispatcher is stopping): UNAVAILABLE, so callers follow again."""
        await self.follows.close()

    async def tail(self, request: pb.TailSkillLogsRequest,
                   metadata: tuple[tuple[str, str], ...] = ()) -> AsyncIterator[pb.TailSkillLogsResponse]:
        queue = self.follows.open(QUEUE_BATCHES)
        addresses = self._executors.addresses
        pumps = [asyncio.create_task(self._pump(index, address, request, metadata, queue),
                                     name=f"skill-logs-{executor_name(index)}")
                 for index, address in enumerate(addresses)]
        try:
            kept = await self._kept_lines(queue, len(addresses))
            for batch in logtail.batches(kept):
                yield pb.TailSkillLogsResponse(lines=batch)
            if not request.follow:
                return
            yield pb.TailSkillLogsResponse()
            while (event := await queue.get()) is not None:
                for batch in logtail.batches(event[1] or ()):
                    yield pb.TailSkillLogsResponse(lines=batch)
            raise logtail.shutting_down("dispatcher")
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self.follows.release(queue)

    @staticmethod
    async def _kept_lines(queue: asyncio.Queue[Event | None], executors: int) -> list[Line]:
        """The lines the executors kept, by time (a call's lines stay in their order), once each has sent its own
        or INITIAL_WAIT_SECONDS passed."""
        pending = set(range(executors))
        kept: list[Line] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + INITIAL_WAIT_SECONDS
        while pending:
            try:
                event = await asyncio.wait_for(queue.get(), max(0.0, until - loop.time()))
            except TimeoutError:
                break
            if event is None:
                raise logtail.shutting_down("dispatcher")
            index, lines = event
            if lines is None:
                pending.discard(index)
            else:
                kept += lines
        kept.sort(key=lambda line: (line.time.seconds, line.time.nanos))
        return kept

    async def _pump(self, index: int, address: str, request: pb.TailSkillLogsRequest,
                    metadata: tuple[tuple[str, str], ...], queue: asyncio.Queue[Event | None]) -> None:
        """Feed one executor's lines into `queue`, asking it again while following if it cannot be reached."""
        name = executor_name(index)
        ask = executor_pb.TailSkillLogsRequest(skill=request.skill, version=request.version,
                                               tail=min(request.tail, logtail.MAX_TAIL), follow=request.follow)
        sent_kept = False
        pause = RETRY_INITIAL
        while True:
            call = self._executors.tail_logs(address, ask, metadata=metadata)
            try:
                async for response in call:
                    if not response.lines:  # the kept lines are all sent; new ones follow
                        if not sent_kept:
                            sent_kept = True
                            await queue.put((index, None))
                        pause = RETRY_INITIAL
                        continue
                    for line in response.lines:
                        line.executor = name
                    await queue.put((index, list(response.lines)))
            except grpc.aio.AioRpcError as err:
                log.debug("skill logs: %s: %s: %s", name, err.code().name, one_line(err.details() or ""))
            finally:
                call.cancel()
            if not sent_kept:
                sent_kept = True
                await queue.put((index, None))
            if not request.follow:
                return
            # What it kept was sent (or it was unreachable and lost it): ask only for new lines from now on.
            ask.tail = 0
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)
