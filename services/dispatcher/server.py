"""Composition root of the dispatcher: route watcher, executor clients, servicer, server."""

from __future__ import annotations

import logging
import random
from typing import cast

import grpc
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dataplane_pb2, dataplane_pb2_grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from services.dispatcher.dataplane import GATEWAY_ACK_TIMEOUT, DataPlaneHub, DataPlaneServicer, EndpointHealth
from services.dispatcher.routes import GrpcRouteFeed, RouteFeed, RouteWatcher
from services.dispatcher.servicer import DispatcherServicer
from services.dispatcher.settings import Settings
from services.runtime.callstats import GrpcStatsSink, StatsReporter, StatsSink, VersionStats
from services.runtime.channels import CONTROL_MESSAGE_BYTES, InvocationLimits, channel, outgoing
from services.runtime.executors import ExecutorClient, ExecutorPicker, GrpcExecutorClient
from services.runtime.identity import outgoing_security
from services.runtime.leaderchannel import LeaderChannel
from services.runtime.routing import RouteState
from services.runtime.server import ServiceHost, create_server

log = logging.getLogger("clawhub.dispatcher")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DispatcherService"].full_name
DATA_PLANE_SERVICE = dataplane_pb2.DESCRIPTOR.services_by_name["DataPlaneService"].full_name


async def build_server(settings: Settings, *, feed: RouteFeed | None = None,
                       executors: ExecutorClient | None = None, stats_sink: StatsSink | None = None,
                       rng: random.Random | None = None) -> ServiceHost:
    """Build the dispatcher; the route watcher and the stats reporter start with the server and stop when it
    stops.

    `feed`, `stats_sink` and `executors` default to gRPC clients of `settings.deployer_address` and
    `settings.executor_addresses`; other implementations may be passed instead (the host closes
    `executors`). `rng` (seeded in tests) picks targets by weight. Its calls carry its platform token.
    """
    with outgoing(outgoing_security(settings.identity, settings.tls)):
        return await _build(settings, feed=feed, executors=executors, stats_sink=stats_sink, rng=rng)


async def _build(settings: Settings, *, feed: RouteFeed | None, executors: ExecutorClient | None,
                 stats_sink: StatsSink | None, rng: random.Random | None) -> ServiceHost:
    # Follows the leading deployer when a standby names it (services/runtime/leaderchannel.py).
    deployer_channel = (LeaderChannel(channel(settings.deployer_address), channel)
                        if feed is None or stats_sink is None else None)
    feed = feed or GrpcRouteFeed(cast(grpc.aio.Channel, deployer_channel),
                                 on_executors=lambda published: follow_executors(published))
    stats_sink = stats_sink or GrpcStatsSink(cast(grpc.aio.Channel, deployer_channel))
    # Dispatch carries the skill's input and output: bounded by the executors' limits.
    sizes = InvocationLimits.from_env()
    # `dns:///NAME:PORT` entries are the deployer's to follow: it publishes what they resolve to, preloaded.
    executors = executors or GrpcExecutorClient(
        tuple(a for a in settings.executor_addresses if not a.startswith("dns:")), sizes,
        stream=settings.executor_calls == "stream")
    configured = executors.addresses
    routes = RouteState()
    # Gateways that follow this dispatcher route with what it follows (services/dispatcher/dataplane.py).
    hub = DataPlaneHub(routes, executors.addresses)

    async def applied(table: routing_pb2.RouteTable) -> None:
        hub.publish()
        late = await hub.wait_acknowledged(table.generation, GATEWAY_ACK_TIMEOUT)
        if late:
            log.warning("gateways %s did not acknowledge route generation %d within %gs; their streams were "
                        "ended (they reconnect to the newest routes)", ", ".join(late), table.generation,
                        GATEWAY_ACK_TIMEOUT)

    watcher = RouteWatcher(feed, routes, settings.dispatcher_id, applied=applied)
    stats = VersionStats()
    reporter = StatsReporter(stats, stats_sink, settings.dispatcher_id, interval=settings.stats_interval)
    picker = ExecutorPicker(executors.addresses)
    servicer = DispatcherServicer(routes, executors, picker, retries=settings.retries,
                                  default_timeout=settings.dispatch_timeout, rng=rng, stats=stats)
    health = EndpointHealth(executors, hub, lambda endpoints: picker.update((e.address, e.serving)
                                                                            for e in endpoints))

    def follow_executors(published: tuple[str, ...]) -> None:
        """The deployer's executor set (executors that joined or left at run time), with the configured ones."""
        if not isinstance(executors, GrpcExecutorClient):
            return
        addresses = (*configured, *(a for a in published if a not in configured))
        if addresses != executors.addresses:
            joined = [a for a in addresses if a not in executors.addresses]
            left = [a for a in executors.addresses if a not in addresses]
            log.info("executors joined: %s; left: %s", ", ".join(joined) or "none", ", ".join(left) or "none")
            executors.set_addresses(addresses)
            health.wake()

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_DispatcherServiceServicer_to_server(servicer, server)
        dataplane_pb2_grpc.add_DataPlaneServiceServicer_to_server(
            DataPlaneServicer(hub, stats, servicer.skills), server)

    try:
        host = create_server("dispatcher", [SERVICE_NAME, DATA_PLANE_SERVICE], host=settings.host, port=settings.port,
                             grace_seconds=settings.grace, register=register,
                             identity=settings.identity, tls=settings.tls.server, rate_limits=settings.rate_limits,
                             metrics=settings.metrics,
                             max_receive_bytes=sizes.dispatch_request,
                             max_send_bytes=max(sizes.dispatch_response, CONTROL_MESSAGE_BYTES))
    except BaseException:
        await executors.close()
        if deployer_channel is not None:
            await deployer_channel.close()
        raise
    host.end_streams.append(servicer.logs.close)
    host.end_streams.append(hub.close)
    host.on_start.append(watcher.start)
    host.on_start.append(reporter.start)
    host.on_start.append(health.start)
    host.closers.append(health.stop)
    host.closers.append(watcher.stop)
    host.closers.append(reporter.stop)
    host.closers.append(executors.close)
    if deployer_channel is not None:
        host.closers.append(deployer_channel.close)
    return host
