"""The dispatcher's copy of the route table, kept current from the deployer's WatchRoutes stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol, cast

import grpc
from clawhub.common.v1 import routing_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_grpc

from services.runtime.errors import describe_error
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

    def __init__(self, channel: grpc.aio.Channel, *, ack_timeout: float = ACK_TIMEOUT) -> None:
        self._stub = cast("deployer_grpc.DeployerInternalServiceAsyncStub",
                          deployer_grpc.DeployerInternalServiceStub(channel))
        self._ack_timeout = ack_timeout

    async def watch(self, dispatcher_id: str) -> AsyncIterator[routing_pb2.RouteTable]:
        call = self._stub.WatchRoutes(deployer_pb.WatchRoutesRequest(dispatcher_id=dispatcher_id))
        try:
            async for response in call:
                table: routing_pb2.RouteTable = response.route_table
                yield table
        finally:
            call.cancel()

    async def acknowledge(self, dispatcher_id: str, generation: int) -> None:
        await self._stub.AcknowledgeRoutes(
            deployer_pb.AcknowledgeRoutesRequest(dispatcher_id=dispatcher_id, generation=generation),
            timeout=self._ack_timeout)


class RouteState:
    """The table the dispatcher routes with now; replaced whole on every generation."""

    def __init__(self) -> None:
        self._table = routing_pb2.RouteTable()
        self._routes: dict[str, routing_pb2.Route] = {}

    @property
    def table(self) -> routing_pb2.RouteTable:
        return self._table

    def route(self, skill: str) -> routing_pb2.Route | None:
        return self._routes.get(skill)

    def apply(self, table: routing_pb2.RouteTable) -> None:
        # The deployer is the source of truth: a new stream may even carry a lower generation (a deployer
        # restored from an older backup), and it still wins.
        self._routes = {route.skill: route for route in table.routes}
        self._table = table


class RouteWatcher(BackgroundLoop):
    """Follows the feed forever: apply each table, acknowledge it, reconnect with capped backoff."""

    task_name = "route-watcher"

    def __init__(self, feed: RouteFeed, state: RouteState, dispatcher_id: str, *,
                 backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX) -> None:
        super().__init__()
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
                    self._state.apply(table)
                    backoff = self._backoff_initial
                    log.info("routing with generation %d (%d routes)", table.generation, len(table.routes))
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
