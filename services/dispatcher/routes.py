"""The dispatcher's copy of the route table, kept current from the deployer's WatchRoutes stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, cast

import grpc
from clawhub.common.v1 import routing_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_grpc

from services.runtime import tracing
from services.runtime.errors import describe_error
from services.runtime.routing import RouteState
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.dispatcher")

ACK_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 2.0


class RouteFeed(Protocol):
    """Where route tables come from (the deployer) and where their acknowledgements go."""

    def watch(self, dispatcher_id: str) -> AsyncIterator[routing_pb2.RouteTable]:
        """The current table, then every new generation, until the stream breaks (raises)."""
        ...

    async def acknowledge(self, dispatcher_id: str, generation: int) -> None: ...


class GrpcRouteFeed:
    """DeployerInternalService.WatchRoutes / AcknowledgeRoutes over one channel.

    The watch stream has no deadline (it lives as long as the deployer); the channel's keepalive detects a
    dead peer, and the watcher reconnects.
    """

    def __init__(self, channel: grpc.aio.Channel, *, ack_timeout: float = ACK_TIMEOUT,
                 on_executors: Callable[[tuple[str, ...]], None] | None = None) -> None:
        self._stub = cast("deployer_grpc.DeployerInternalServiceAsyncStub",
                          deployer_grpc.DeployerInternalServiceStub(channel))
        self._ack_timeout = ack_timeout
        # Called with the deployer's executor set (WatchRoutesResponse.executors) whenever a response has one.
        self._on_executors = on_executors

    async def watch(self, dispatcher_id: str) -> AsyncIterator[routing_pb2.RouteTable]:
        call = self._stub.WatchRoutes(deployer_pb.WatchRoutesRequest(dispatcher_id=dispatcher_id))
        try:
            sent: int | None = None
            async for response in call:
                if response.HasField("executors") and self._on_executors is not None:
                    self._on_executors(tuple(response.executors.addresses))
                table: routing_pb2.RouteTable = response.route_table
                # The same generation again within one stream: only the executor set changed.
                if table.generation != sent:
                    sent = table.generation
                    yield table
        finally:
            call.cancel()

    async def acknowledge(self, dispatcher_id: str, generation: int) -> None:
        await self._stub.AcknowledgeRoutes(
            deployer_pb.AcknowledgeRoutesRequest(dispatcher_id=dispatcher_id, generation=generation),
            timeout=self._ack_timeout)


class RouteWatcher(BackgroundLoop):
    """Follows the feed forever: apply each table, pass it on (`applied`: to the gateways that follow this
    dispatcher, waiting for theirs), acknowledge it, reconnect with capped backoff."""

    task_name = "route-watcher"

    def __init__(self, feed: RouteFeed, state: RouteState, dispatcher_id: str, *,
                 backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX,
                 applied: Callable[[routing_pb2.RouteTable], Awaitable[None]] | None = None) -> None:
        super().__init__()
        self._applied = applied
        self._feed = feed
        self._state = state
        self._dispatcher_id = dispatcher_id
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

    async def run(self) -> None:
        backoff = self._backoff_initial
        while True:
            try:
                async for table in self._feed.watch(self._dispatcher_id):
                    backoff = self._backoff_initial
                    with tracing.span("dispatcher.route_apply", {"clawhub.route.generation": table.generation},
                                      context=tracing.remote_parent(table.traceparent)):
                        self._state.apply(table)
                        log.info("routing with generation %d (%d routes)", table.generation, len(table.routes))
                        if self._applied is not None:
                            await self._applied(table)
                        await self._acknowledge(table.generation)
                log.info("the deployer ended the route stream; reconnecting")
            except grpc.aio.AioRpcError as err:
                log.info("route stream from the deployer broke (%s); reconnecting in %.1fs",
                         describe_error(err), backoff)
            except Exception:  # noqa: BLE001 - the watcher must outlive any single failure
                log.exception("route watcher failed; reconnecting in %.1fs", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _acknowledge(self, generation: int) -> None:
        try:
            await self._feed.acknowledge(self._dispatcher_id, generation)
        except grpc.aio.AioRpcError as err:
            # The stream most likely broke too; the next stream's first table is acknowledged again.
            log.warning("acknowledging route generation %d failed: %s", generation, describe_error(err))
