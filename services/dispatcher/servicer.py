"""DispatcherService: route an invocation to an executor of the skill's active version."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc
from clawhub.executor.v1 import executor_service_pb2 as executor_pb

from services.dispatcher.executors import ExecutorClient, ExecutorPicker
from services.dispatcher.routes import RouteState
from services.runtime.errors import Reason, ServiceError, invalid, upstream_error
from services.runtime.names import skill_name_problem

log = logging.getLogger("clawhub.dispatcher")

RETRY_BACKOFF_INITIAL = 0.02
RETRY_BACKOFF_MAX = 0.2
# W3C trace context travels on to the executor, so the hop joins the caller's trace.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def trace_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k in TRACE_HEADERS)


class DispatcherServicer(pb_grpc.DispatcherServiceServicer):
    def __init__(self, routes: RouteState, executors: ExecutorClient, picker: ExecutorPicker, *,
                 retries: int, default_timeout: float, rng: random.Random | None = None) -> None:
        self._routes = routes
        self._executors = executors
        self._picker = picker
        self._retries = retries
        self._default_timeout = default_timeout
        self._rng = rng or random.Random()

    async def Dispatch(self, request: pb.DispatchRequest, context: grpc.aio.ServicerContext[Any, Any],
                       ) -> pb.DispatchResponse:
        problem = skill_name_problem(request.skill)
        if problem:
            raise invalid(Reason.INVALID_NAME, "skill", problem)
        route = self._routes.route(request.skill)
        targets = [t for t in route.targets if t.weight > 0] if route else []
        if not targets:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, Reason.SKILL_NOT_DEPLOYED,
                f"skill {request.skill} is not deployed; deploy a version first "
                f"(clawhub deploy {request.skill}@VERSION)", metadata={"skill": request.skill})
        target = self._rng.choices(targets, weights=[t.weight for t in targets])[0]
        execute = executor_pb.ExecuteRequest(digest=target.digest, input=request.input, limits=target.limits,
                                             request_id=request.request_id, env=target.env, args=target.args,
                                             bundle_digest=target.bundle_digest,
                                             capabilities=target.capabilities)

        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        # The caller's deadline propagates; without one, the dispatcher's own budget bounds the call.
        deadline = loop.time() + (remaining if remaining is not None else self._default_timeout)
        metadata = trace_metadata(context)
        tried: list[str] = []
        last_problem = "no executors are configured"
        for attempt in range(self._retries + 1):
            address = self._picker.pick(exclude=tried)
            if address is None:
                break
            left = deadline - loop.time()
            if left <= 0:
                break
            self._picker.begin(address)
            try:
                response = await self._executors.execute(address, execute, timeout=left, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise upstream_error(err, "executor", address) from None
                tried.append(address)
                last_problem = f"{address}: {err.details() or 'unavailable'}"
                log.info("executor %s unavailable for %s (attempt %d): %s", address, request.skill,
                         attempt + 1, err.details())
                if attempt < self._retries:
                    pause = min(RETRY_BACKOFF_INITIAL * 2**attempt, RETRY_BACKOFF_MAX)
                    await asyncio.sleep(max(0.0, min(pause, (deadline - loop.time()) / 2)))
                continue
            finally:
                self._picker.end(address)
            return pb.DispatchResponse(output=response.output, version=target.version, digest=target.digest,
                                       usage=response.usage, executor=address)
        if deadline - loop.time() <= 0:
            waited = f" while retrying unavailable executors ({', '.join(tried)})" if tried else ""
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED,
                f"the deadline of the call to {request.skill} expired{waited}",
                metadata={"skill": request.skill, "executors": ",".join(tried)})
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE, Reason.NO_EXECUTOR_AVAILABLE,
            f"no executor could run {request.skill}@{target.version} after {len(tried)} attempt(s); "
            f"last: {last_problem}",
            metadata={"skill": request.skill, "version": target.version, "executors": ",".join(tried)},
            retry_after_seconds=1.0)

    async def GetRouteTable(self, request: pb.GetRouteTableRequest, context: grpc.aio.ServicerContext[Any, Any],
                            ) -> pb.GetRouteTableResponse:
        return pb.GetRouteTableResponse(route_table=self._routes.table)
