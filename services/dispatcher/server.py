"""Composition root of the dispatcher: route watcher, executor clients, servicer, server."""

from __future__ import annotations

import random
from typing import cast

import grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from services.dispatcher.executors import ExecutorClient, ExecutorPicker, GrpcExecutorClient
from services.dispatcher.routes import GrpcRouteFeed, RouteFeed, RouteState, RouteWatcher
from services.dispatcher.servicer import DispatcherServicer
from services.dispatcher.settings import Settings
from services.dispatcher.stats import GrpcStatsSink, StatsReporter, StatsSink, VersionStats
from services.runtime.channels import CONTROL_MESSAGE_BYTES, InvocationLimits, channel, outgoing
from services.runtime.identity import outgoing_security
from services.runtime.server import ServiceHost, create_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DispatcherService"].full_name


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
    deployer_channel = channel(settings.deployer_address) if feed is None or stats_sink is None else None
    feed = feed or GrpcRouteFeed(cast(grpc.aio.Channel, deployer_channel))
    stats_sink = stats_sink or GrpcStatsSink(cast(grpc.aio.Channel, deployer_channel))
    # Dispatch carries the skill's input and output: bounded by the executors' limits.
    sizes = InvocationLimits.from_env()
    executors = executors or GrpcExecutorClient(settings.executor_addresses, sizes)
    routes = RouteState()
    watcher = RouteWatcher(feed, routes, settings.dispatcher_id)
    stats = VersionStats()
    reporter = StatsReporter(stats, stats_sink, settings.dispatcher_id, interval=settings.stats_interval)
    servicer = DispatcherServicer(routes, executors, ExecutorPicker(executors.addresses),
                                  retries=settings.retries, default_timeout=settings.dispatch_timeout, rng=rng,
                                  stats=stats)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_DispatcherServiceServicer_to_server(servicer, server)

    try:
        host = create_server("dispatcher", [SERVICE_NAME], host=settings.host, port=settings.port,
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
    host.on_start.append(watcher.start)
    host.on_start.append(reporter.start)
    host.closers.append(watcher.stop)
    host.closers.append(reporter.stop)
    host.closers.append(executors.close)
    if deployer_channel is not None:
        host.closers.append(deployer_channel.close)
    return host
