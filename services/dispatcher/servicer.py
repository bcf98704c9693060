"""DispatcherService: route an invocation to an executor of the skill's active version."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from services.dispatcher.logfanin import LogFanIn
from services.dispatcher.skillstats import SkillStats, active_version, executor_loads, to_proto
from services.runtime import logtail
from services.runtime.callstats import VersionStats
from services.runtime.executors import ExecutorClient, ExecutorPicker
from services.runtime.routing import Router, RouteState, pick_target, trace_metadata

__all__ = ["DispatcherServicer", "pick_target"]

log = logging.getLogger("clawhub.dispatcher")
# What GetRouteTable shows instead of an env value.
MASKED = "(hidden)"


class DispatcherServicer(pb_grpc.DispatcherServiceServicer):
    """Dispatch routes in the path (services/runtime/routing.py's Router, the same code gateways route with);
    the other methods are the operators' views."""

    def __init__(self, routes: RouteState, executors: ExecutorClient, picker: ExecutorPicker, *,
                 retries: int, default_timeout: float, rng: random.Random | None = None,
                 stats: VersionStats | None = None, skills: SkillStats | None = None) -> None:
        self._routes = routes
        # Every ended call by skill, for operators (`clawhub top`, GetSkillStats): its own and gateways' reports.
        self.skills = skills or SkillStats()
        self._executors = executors
        # TailSkillLogs: every executor's skill logs as one stream (services/dispatcher/logfanin.py).
        self.logs = LogFanIn(executors)
        self.router = Router(routes, executors, picker, retries=retries, default_timeout=default_timeout,
                             stats=stats or VersionStats(), skills=self.skills, rng=rng)

    @property
    def stats(self) -> VersionStats:
        return self.router.stats

    async def Dispatch(self, request: pb.DispatchRequest, context: grpc.aio.ServicerContext[Any, Any],
                       ) -> pb.DispatchResponse:
        routed = await self.router.invoke(request.skill, request.input, request.request_id,
                                          time_remaining=context.time_remaining, metadata=trace_metadata(context))
        return pb.DispatchResponse(output=routed.output, version=routed.version, digest=routed.digest,
                                   usage=routed.usage, executor=routed.executor)

    async def GetSkillStats(self, request: pb.GetSkillStatsRequest, context: grpc.aio.ServicerContext[Any, Any],
                            ) -> pb.GetSkillStatsResponse:
        """Every skill with calls in the window or a route (or only `request.skill`), by name, and every
        executor's pool use (asked meanwhile, each with a short timeout)."""
        loads = asyncio.ensure_future(executor_loads(self._executors))
        summaries = self.skills.snapshot(request.skill)
        names = set(summaries)
        if request.skill:
            names |= {request.skill} if self._routes.route(request.skill) is not None else set()
        else:
            names |= {route.skill for route in self._routes.table.routes}
        window = self.skills.window
        skills = [to_proto(name, summaries.get(name), window, active_version(self._routes.route(name)))
                  for name in sorted(names)]
        return pb.GetSkillStatsResponse(skills=skills, executors=await loads)

    async def TailSkillLogs(self, request: pb.TailSkillLogsRequest, context: grpc.aio.ServicerContext[Any, Any],
                            ) -> AsyncIterator[pb.TailSkillLogsResponse]:
        logtail.check_request(request.skill, request.version)
        async for response in self.logs.tail(request, trace_metadata(context)):
            yield response

    async def GetRouteTable(self, request: pb.GetRouteTableRequest, context: grpc.aio.ServicerContext[Any, Any],
                            ) -> pb.GetRouteTableResponse:
        """The table routed with now, for operators: env values are deploy-time secrets, so each is replaced by
        MASKED (the keys show what is set)."""
        table = type(self._routes.table)()
        table.CopyFrom(self._routes.table)
        for route in table.routes:
            for target in route.targets:
                for key in target.env:
                    target.env[key] = MASKED
        return pb.GetRouteTableResponse(route_table=table)
