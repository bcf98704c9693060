"""The dispatcher as the control plane of the data path (docs/routing.md).

Gateways route calls themselves (services/runtime/routing.py): they follow `DataPlaneService.WatchDataPlane`,
which streams the route table the dispatcher follows from the deployer and the executors with their health,
the whole state on every change. A route-table generation is acknowledged to the deployer only once every
gateway following it acknowledged it too (`DataPlaneHub.wait_acknowledged`), so "the routes changed" means
what it meant when the dispatcher routed every call: a canary's step, a rollback, are in force everywhere. A
gateway that does not acknowledge within GATEWAY_ACK_TIMEOUT is cut off (its stream ends): it reconnects and
gets the newest state first, and meanwhile no longer counts as following.

Gateways report their calls back (`ReportCalls`): per version into the stats the dispatcher reports to the
deployer (release analysis), per skill into the rolling window `GetSkillStats` shows.

`EndpointHealth` asks every executor for its load every ENDPOINT_CHECK_INTERVAL seconds; one that does not
answer is published as not serving (gateways send it nothing while another one serves), and published as
serving again once it answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from clawhub.common.v1 import observability_pb2
from clawhub.dispatcher.v1 import dataplane_pb2 as pb
from clawhub.dispatcher.v1 import dataplane_pb2_grpc as pb_grpc

from services.dispatcher.skillstats import SkillStats, executor_name
from services.runtime.callstats import MAX_REPORT_ENTRIES, VersionStats, bucket
from services.runtime.errors import Reason, invalid
from services.runtime.executors import ExecutorClient
from services.runtime.routing import RouteState
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.dispatcher")

GATEWAY_ACK_TIMEOUT = 3.0
# A gateway whose stream ended this recently still counts as following: it is most likely reconnecting (its
# backoff is at most 2 s), and a generation pushed meanwhile must wait for it as for the others.
RECONNECT_GRACE = 3.0
ENDPOINT_CHECK_INTERVAL = 1.0
ENDPOINT_CHECK_TIMEOUT = 0.5
MAX_CLIENT_ID_CHARS = 256
# The slowest latency bucket a report may name (an hour); beyond it a quantile overflows.
MAX_BUCKET = bucket(3600.0)
# What a health check's failure must be for the executor to count as down.
DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


class _Subscription:
    __slots__ = ("client_id", "wake", "cut")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.wake = asyncio.Event()
        self.cut = False


class DataPlaneHub:
    """The state gateways route with, its subscribers and their acknowledgements."""

    def __init__(self, routes: RouteState, addresses: tuple[str, ...]) -> None:
        self._routes = routes
        # Until the first check, every executor is taken to be serving.
        self._endpoints = [pb.Endpoint(address=a, serving=True) for a in addresses]
        self._subscriptions: set[_Subscription] = set()
        self._acked: dict[str, int] = {}
        self._ack_changed = asyncio.Event()
        # Gateways whose last stream ended, and when (the event loop's clock).
        self._departed: dict[str, float] = {}
        # Set once the deployer's first table arrived: before that (a dispatcher just restarted, a deployer
        # down) the dispatcher has no routes, and a gateway must keep routing with its own last ones.
        self.routes_known = asyncio.Event()

    @property
    def endpoints(self) -> list[pb.Endpoint]:
        return list(self._endpoints)

    def state(self) -> pb.WatchDataPlaneResponse:
        return pb.WatchDataPlaneResponse(route_table=self._routes.table, endpoints=self._endpoints)

    def publish(self) -> None:
        """The routes changed (the caller applied them to the RouteState): every subscriber gets the state."""
        self.routes_known.set()
        for subscription in self._subscriptions:
            subscription.wake.set()

    def set_endpoints(self, endpoints: list[pb.Endpoint]) -> None:
        self._endpoints = endpoints
        for subscription in self._subscriptions:
            subscription.wake.set()

    def following(self) -> list[str]:
        return sorted({s.client_id for s in self._subscriptions})

    async def watch(self, client_id: str) -> AsyncIterator[pb.WatchDataPlaneResponse]:
        """The state now, then again after every change, until the subscriber is cut off or goes away."""
        subscription = _Subscription(client_id)
        self._subscriptions.add(subscription)
        self._departed.pop(client_id, None)
        log.info("gateway %s follows the data plane (%d following)", client_id, len(self.following()))
        try:
            # Nothing to send before the deployer's first table; the stream stays open (the gateway keeps its last
            # state meanwhile).
            while not self.routes_known.is_set():
                if subscription.cut:
                    return
                subscription.wake.clear()
                waiters = (asyncio.ensure_future(subscription.wake.wait()),
                           asyncio.ensure_future(self.routes_known.wait()))
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
            while True:
                subscription.wake.clear()
                yield self.state()
                await subscription.wake.wait()
                if subscription.cut:
                    return
        finally:
            self._subscriptions.discard(subscription)
            if not any(s.client_id == client_id for s in self._subscriptions):
                self._departed[client_id] = asyncio.get_running_loop().time()
            log.info("gateway %s stopped following the data plane", client_id)

    async def close(self) -> None:
        """End every subscriber's stream (the dispatcher stops): gateways keep their last state and reconnect."""
        for subscription in self._subscriptions:
            subscription.cut = True
            subscription.wake.set()

    def acknowledge(self, client_id: str, generation: int) -> None:
        # The generation the gateway routes with now, exactly: a table restored from an older backup carries a
        # lower generation, which a gateway has not acknowledged just because it once acknowledged a higher one.
        self._acked[client_id] = generation
        self._ack_changed.set()

    def pending(self, generation: int) -> list[str]:
        """The gateways that follow (or left less than RECONNECT_GRACE ago) and have not acknowledged
        `generation` yet."""
        now = asyncio.get_running_loop().time()
        for client_id in [c for c, left in self._departed.items() if now - left >= RECONNECT_GRACE]:
            del self._departed[client_id]
            self._acked.pop(client_id, None)
        waiting = set(self.following()) | self._departed.keys()
        return sorted(c for c in waiting if self._acked.get(c) != generation)

    async def wait_acknowledged(self, generation: int, timeout: float) -> list[str]:
        """Wait until every following gateway acknowledged `generation`; the ones that did not within
        `timeout` are cut off and returned."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending(generation):
            left = deadline - loop.time()
            if left <= 0:
                break
            self._ack_changed.clear()
            try:
                await asyncio.wait_for(self._ack_changed.wait(), left)
            except TimeoutError:
                break
        late = self.pending(generation)
        for subscription in [s for s in self._subscriptions if s.client_id in late]:
            subscription.cut = True
            subscription.wake.set()
        return late


class DataPlaneServicer(pb_grpc.DataPlaneServiceServicer):
    def __init__(self, hub: DataPlaneHub, stats: VersionStats, skills: SkillStats) -> None:
        self._hub = hub
        self._stats = stats
        self._skills = skills

    async def WatchDataPlane(self, request: pb.WatchDataPlaneRequest, context: grpc.aio.ServicerContext[Any, Any],
                             ) -> AsyncIterator[pb.WatchDataPlaneResponse]:
        _check_client(request.client_id)
        async for state in self._hub.watch(request.client_id):
            yield state

    async def AcknowledgeDataPlane(self, request: pb.AcknowledgeDataPlaneRequest,
                                   context: grpc.aio.ServicerContext[Any, Any]) -> pb.AcknowledgeDataPlaneResponse:
        _check_client(request.client_id)
        self._hub.acknowledge(request.client_id, request.generation)
        return pb.AcknowledgeDataPlaneResponse()

    async def ReportCalls(self, request: pb.ReportCallsRequest, context: grpc.aio.ServicerContext[Any, Any],
                          ) -> pb.ReportCallsResponse:
        _check_client(request.client_id)
        for name, entries in (("versions", request.versions), ("skills", request.skills)):
            if len(entries) > MAX_REPORT_ENTRIES:
                raise invalid(Reason.INVALID_ARGUMENT, name,
                              f"{len(entries)} entries in one report; at most {MAX_REPORT_ENTRIES}")
        for report in request.versions:
            self._stats.add_report(report)
        for calls in request.skills:
            bad = [index for index in calls.latency_buckets if not 0 <= index <= MAX_BUCKET]
            if bad:
                raise invalid(Reason.INVALID_ARGUMENT, "skills.latency_buckets",
                              f"latency bucket {bad[0]} of {calls.skill!r} is outside 0..{MAX_BUCKET}")
        for calls in request.skills:
            self._skills.merge(calls.skill, calls.calls, dict(calls.errors_by_reason), dict(calls.latency_buckets))
        return pb.ReportCallsResponse()


def _check_client(client_id: str) -> None:
    if not client_id:
        raise invalid(Reason.INVALID_ARGUMENT, "client_id", "client_id is required (the gateway's stable id)")
    if len(client_id) > MAX_CLIENT_ID_CHARS:
        raise invalid(Reason.INVALID_ARGUMENT, "client_id",
                      f"client_id is {len(client_id)} characters; at most {MAX_CLIENT_ID_CHARS}")


class EndpointHealth(BackgroundLoop):
    """Asks every executor for its load; publishes a change of which ones answer (and their load with it)."""

    task_name = "endpoint-health"

    def __init__(self, executors: ExecutorClient, hub: DataPlaneHub,
                 on_change: Callable[[list[pb.Endpoint]], None], *, interval: float = ENDPOINT_CHECK_INTERVAL,
                 timeout: float = ENDPOINT_CHECK_TIMEOUT) -> None:
        super().__init__()
        self._executors = executors
        self._hub = hub
        self._on_change = on_change
        self._interval = interval
        self._timeout = timeout
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Check now rather than at the next interval (the executor set changed)."""
        self._wake.set()

    async def check(self) -> None:
        addresses = self._executors.addresses

        async def one(position: int, address: str) -> pb.Endpoint:
            try:
                load = await self._executors.get_load(address, timeout=self._timeout)
            except (grpc.aio.AioRpcError, OSError) as err:
                # Any other answer (an executor without GetLoad) still says the executor is up.
                down = not isinstance(err, grpc.aio.AioRpcError) or err.code() in DOWN
                return pb.Endpoint(address=address, serving=not down, load=observability_pb2.ExecutorLoad(
                    executor=executor_name(position), reachable=False))
            shown = observability_pb2.ExecutorLoad()
            shown.CopyFrom(load)
            shown.executor, shown.reachable = executor_name(position), True
            return pb.Endpoint(address=address, serving=True, load=shown)

        endpoints = list(await asyncio.gather(*(one(i, a) for i, a in enumerate(addresses))))
        before = {e.address: e.serving for e in self._hub.endpoints}
        now = {e.address: e.serving for e in endpoints}
        if before != now:
            for address, serving in now.items():
                if before.get(address) != serving:
                    log.log(logging.INFO if serving else logging.WARNING, "executor %s is %s", address,
                            "serving" if serving else "not answering; gateways route around it")
            self._on_change(endpoints)
            self._hub.set_endpoints(endpoints)

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the checks must outlive any single failure
                log.exception("checking the executors failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()

