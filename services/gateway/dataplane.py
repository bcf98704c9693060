"""The gateway's side of the proxyless data path (docs/routing.md): it follows the routes and executors the
dispatcher publishes (DataPlaneService.WatchDataPlane), routes each call itself with the shared router
(services/runtime/routing.py) straight to an executor, and reports its calls back (ReportCalls).

The dispatcher is the control plane, not on the path: when its stream breaks, the gateway keeps routing with
the last state it received and reconnects with capped backoff; the first state of the new stream replaces it.
Until the first state arrives (the gateway just started, or the dispatcher is older and has no data plane),
`ready` is False and the gateway sends calls through the dispatcher's `Dispatch` instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import cast

import grpc
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dataplane_pb2 as pb
from clawhub.dispatcher.v1 import dataplane_pb2_grpc as pb_grpc

from services.runtime import tracing
from services.runtime.callstats import SkillCallDeltas, VersionStats
from services.runtime.errors import describe_error
from services.runtime.executors import ExecutorPicker, GrpcExecutorClient
from services.runtime.routing import RouteState
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.gateway.dataplane")

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 2.0
ACK_TIMEOUT = 2.0
REPORT_TIMEOUT = 2.0


def default_client_id() -> str:
    return f"gateway-{socket.gethostname()}-{os.getpid()}"


class DataPlaneFollower(BackgroundLoop):
    """Follows the dispatcher's data-plane stream: applies each state, acknowledges each new generation."""

    task_name = "data-plane-follower"

    def __init__(self, channel: grpc.aio.Channel, client_id: str, routes: RouteState, picker: ExecutorPicker,
                 executors: GrpcExecutorClient, *, on_table: Callable[[routing_pb2.RouteTable], None],
                 backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX) -> None:
        super().__init__()
        self._stub = cast("pb_grpc.DataPlaneServiceAsyncStub", pb_grpc.DataPlaneServiceStub(channel))
        self.client_id = client_id
        self._routes = routes
        self._picker = picker
        self._executors = executors
        self._on_table = on_table
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.ready = False
        # Whether the stream is up now (the routes are current), for logs and tests.
        self.connected = False
        self.updates = 0
        self._told_unimplemented = False

    def apply(self, state: pb.WatchDataPlaneResponse) -> bool:
        """Route with `state` from now on; True when its route table is a new generation."""
        endpoints = [(e.address, e.serving) for e in state.endpoints]
        self._executors.set_addresses(address for address, _ in endpoints)
        self._picker.update(endpoints)
        table = state.route_table
        # The whole table, not just its number: a deployer restored from a backup may reuse a generation.
        new = not self.ready or table != self._routes.table
        if new:
            with tracing.span("gateway.route_apply", {"clawhub.route.generation": table.generation},
                              context=tracing.remote_parent(table.traceparent)):
                self._routes.apply(table)
                self._on_table(table)
        self.ready = True
        self.updates += 1
        return new

    async def run(self) -> None:
        backoff = self._backoff_initial
        while True:
            call = self._stub.WatchDataPlane(pb.WatchDataPlaneRequest(client_id=self.client_id))
            # The generation acknowledged on this stream: a dispatcher (a new one, or one that reconnected to the
            # deployer) waits for every follower's acknowledgement of the generation it sends, even one this
            # gateway already routes with, so the first state of each stream is acknowledged whatever it holds.
            acknowledged: int | None = None
            try:
                async for state in call:
                    if not self.connected:
                        log.info("following the dispatcher's routes (generation %d, %d executors)",
                                 state.route_table.generation, len(state.endpoints))
                    self.connected = True
                    backoff = self._backoff_initial
                    generation = state.route_table.generation
                    if self.apply(state) or generation != acknowledged:
                        await self._acknowledge(generation)
                        acknowledged = generation
                log.info("the dispatcher ended the data-plane stream; routing with the last routes, reconnecting")
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    if not self._told_unimplemented:  # once: it retries every 2 s for as long as it lasts
                        log.warning("the dispatcher has no data plane (an older version?): calls go through it")
                    self._told_unimplemented = True
                elif self.connected or not self.ready:
                    log.info("data-plane stream from the dispatcher broke (%s); %s, reconnecting in %.1fs",
                             describe_error(err),
                             "routing with the last routes" if self.ready else "calls go through the dispatcher",
                             backoff)
            except Exception:  # noqa: BLE001 - the follower must outlive any single failure
                log.exception("data-plane follower failed; reconnecting in %.1fs", backoff)
            finally:
                call.cancel()
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _acknowledge(self, generation: int) -> None:
        try:
            await self._stub.AcknowledgeDataPlane(
                pb.AcknowledgeDataPlaneRequest(client_id=self.client_id, generation=generation),
                timeout=ACK_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            # The stream most likely broke too; the next stream's first state is acknowledged again.
            log.warning("acknowledging route generation %d failed: %s", generation, describe_error(err))


class CallReporter(BackgroundLoop):
    """Sends the gateway's call counts to the dispatcher every `interval` while there are calls; a report
    that cannot be delivered is dropped (the dispatcher that is away analyses nothing meanwhile)."""

    task_name = "call-reporter"

    def __init__(self, channel: grpc.aio.Channel, client_id: str, stats: VersionStats, skills: SkillCallDeltas,
                 *, interval: float) -> None:
        super().__init__()
        self._stub = cast("pb_grpc.DataPlaneServiceAsyncStub", pb_grpc.DataPlaneServiceStub(channel))
        self._client_id = client_id
        self._stats = stats
        self._skills = skills
        self._interval = interval

    def drain(self) -> pb.ReportCallsRequest | None:
        versions = self._stats.drain()
        skills = self._skills.drain()
        if not versions and not skills:
            return None
        return pb.ReportCallsRequest(client_id=self._client_id, versions=versions, skills=[
            pb.SkillCalls(skill=skill, calls=calls, errors_by_reason=reasons, latency_buckets=latency)
            for skill, calls, reasons, latency in skills])

    async def report(self) -> None:
        request = self.drain()
        if request is None:
            return
        try:
            await self._stub.ReportCalls(request, timeout=REPORT_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            log.debug("call report dropped: %s", describe_error(err))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.report()
            except Exception:  # noqa: BLE001 - the reporter must outlive any single failure
                log.exception("call report failed")
