"""DispatcherService: route an invocation to an executor of the skill's active version."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from clawhub.common.v1 import routing_pb2
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc
from clawhub.executor.v1 import executor_service_pb2 as executor_pb

from services.dispatcher.executors import ExecutorClient, ExecutorPicker
from services.dispatcher.logfanin import LogFanIn
from services.dispatcher.routes import RouteState
from services.dispatcher.skillstats import SkillStats, active_version, executor_loads, reason_of, to_proto
from services.dispatcher.stats import VersionStats
from services.runtime import logtail, metrics, tracing
from services.runtime.errors import (
    DID_YOU_MEAN,
    Reason,
    ServiceError,
    close_names,
    describe_error,
    did_you_mean,
    error_info,
    invalid,
    one_line,
    upstream_error,
)
from services.runtime.names import skill_name_problem

log = logging.getLogger("clawhub.dispatcher")
# What GetRouteTable shows instead of an env value.
MASKED = "(hidden)"

RETRY_BACKOFF_INITIAL = 0.02
RETRY_BACKOFF_MAX = 0.2
# W3C trace context travels on to the executor, so the hop joins the caller's trace.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def trace_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k in TRACE_HEADERS)


def pick_target(targets: Sequence[routing_pb2.RouteTarget], rng: random.Random) -> routing_pb2.RouteTarget:
    """A target chosen at random in proportion to its weight (targets with weight 0 are never chosen)."""
    return rng.choices(targets, weights=[t.weight for t in targets])[0]


def stable_target(route: routing_pb2.Route, candidate: routing_pb2.RouteTarget) -> routing_pb2.RouteTarget | None:
    """The known-good target that takes a retry of the candidate's failed call, if the route has one."""
    for target in route.targets:
        if target.role == routing_pb2.ROUTE_TARGET_ROLE_STABLE and target.digest != candidate.digest:
            return target
    return None


class Outcome(enum.Enum):
    """How a failed call counts against the version it ran on."""

    # The skill or the executor failed: a failure of the version, retried on the stable version.
    VERSION = "version"
    # The caller's fault (bad input, cancelled): not a call of the version at all.
    CALLER = "caller"
    # The caller's deadline ran out: a (slow) call, not a failure; no time left to retry.
    DEADLINE = "deadline"
    # The executor sheds load: says nothing about the version, and the stable one runs on the same executors.
    OVERLOAD = "overload"


CALLER_REASONS = frozenset({Reason.INVALID_INPUT, Reason.INPUT_TOO_LARGE, Reason.INVALID_ARGUMENT,
                            Reason.INVALID_NAME})


def classify(exc: BaseException) -> Outcome:
    if isinstance(exc, ServiceError):
        code, reason = exc.code, str(exc.reason)
    elif isinstance(exc, grpc.aio.AioRpcError):
        info = error_info(exc)
        code, reason = exc.code(), info.reason if info is not None else ""
    else:
        return Outcome.VERSION
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED) or reason in CALLER_REASONS:
        return Outcome.CALLER
    if reason == Reason.EXECUTOR_OVERLOADED:
        return Outcome.OVERLOAD
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and reason != Reason.SKILL_TIMEOUT:
        return Outcome.DEADLINE
    return Outcome.VERSION


def caller_fault(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether a failed call was its caller's doing (bad input, cancelled while it still had time), which
    does not count against the skill's availability; a deadline that ran out does."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        return remaining is None or remaining > 0
    return classify(exc) is Outcome.CALLER


class DispatcherServicer(pb_grpc.DispatcherServiceServicer):
    def __init__(self, routes: RouteState, executors: ExecutorClient, picker: ExecutorPicker, *,
                 retries: int, default_timeout: float, rng: random.Random | None = None,
                 stats: VersionStats | None = None, skills: SkillStats | None = None) -> None:
        self._routes = routes
        # Every ended call by skill, for operators (`clawhub top`, GetSkillStats).
        self._skills = skills or SkillStats()
        self._executors = executors
        # TailSkillLogs: every executor's skill logs as one stream (services/dispatcher/logfanin.py).
        self.logs = LogFanIn(executors)
        self._picker = picker
        self._retries = retries
        self._default_timeout = default_timeout
        self._rng = rng or random.Random()
        self._stats = stats or VersionStats()

    @property
    def stats(self) -> VersionStats:
        return self._stats

    async def Dispatch(self, request: pb.DispatchRequest, context: grpc.aio.ServicerContext[Any, Any],
                       ) -> pb.DispatchResponse:
        """`_dispatch`, with the call counted in its skill's rolling stats (services/dispatcher/skillstats.py).
        A failure is counted only for a routed (or already counted) skill: names callers make up are not kept."""
        started = time.perf_counter()
        try:
            response = await self._dispatch(request, context)
        except (Exception, asyncio.CancelledError) as exc:
            if self._routes.route(request.skill) is not None or self._skills.knows(request.skill):
                self._skills.record(request.skill, time.perf_counter() - started, reason_of(exc))
                metrics.skill_requested(request.skill, "caller_error" if caller_fault(exc, context) else "failure")
            raise
        self._skills.record(request.skill, time.perf_counter() - started)
        metrics.skill_requested(request.skill, "success")  # availability (docs/metrics.md)
        return response

    async def _dispatch(self, request: pb.DispatchRequest, context: grpc.aio.ServicerContext[Any, Any],
                        ) -> pb.DispatchResponse:
        problem = skill_name_problem(request.skill)
        if problem:
            raise invalid(Reason.INVALID_NAME, "skill", problem)
        route = self._routes.route(request.skill)
        targets = [t for t in route.targets if t.weight > 0] if route else []
        if route is None or not targets:
            # A name with no route at all may be a typo of a routed one (the table is in memory: cheap).
            routed = (r.skill for r in self._routes.table.routes)
            suggestions = close_names(request.skill, routed) if route is None else []
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, Reason.SKILL_NOT_DEPLOYED,
                f"skill {request.skill} is not deployed{did_you_mean(suggestions)}; deploy a version first "
                f"(clawhub deploy {request.skill}@VERSION)",
                metadata={"skill": request.skill, DID_YOU_MEAN: ",".join(suggestions)})
        target = pick_target(targets, self._rng)
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        # The caller's deadline propagates; without one, the dispatcher's own budget bounds the call.
        deadline = loop.time() + (remaining if remaining is not None else self._default_timeout)
        metadata = trace_metadata(context)
        stable = stable_target(route, target) if target.role == routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE else None
        # A version under analysis gets half the caller's budget, the stable version keeps the rest: a
        # candidate that hangs is cut off, counted as a failure and retried instead of failing the caller.
        attempt_deadline = deadline if stable is None else loop.time() + (deadline - loop.time()) / 2
        try:
            return await self._call_version(request, target, attempt_deadline, metadata,
                                            candidate=stable is not None)
        except Exception as exc:
            if stable is None or classify(exc) not in (Outcome.VERSION, Outcome.DEADLINE):
                raise
            if deadline - loop.time() <= 0:
                raise
            # A release under analysis: the failure is counted against the new version (it was recorded
            # above) and the caller gets the stable version's answer instead.
            self._stats.retried(VersionStats.key(request.skill, target))
            log.info("%s@%s failed (%s); retrying on stable %s", request.skill, target.version, describe_error(exc),
                     stable.version)
            return await self._call_version(request, stable, deadline, metadata)

    async def _call_version(self, request: pb.DispatchRequest, target: routing_pb2.RouteTarget, deadline: float,
                            metadata: tuple[tuple[str, str], ...], *, candidate: bool = False,
                            ) -> pb.DispatchResponse:
        """One call of one version (on any executor), counted in the version's stats. For a `candidate`
        (a version under analysis), not finishing within its budget, or before the caller gave up, is a
        failure too: a version that hangs must not pass its analysis for lack of finished calls."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        key = VersionStats.key(request.skill, target)
        try:
            # The route choice takes microseconds: attributes on the Dispatch span, not a span of its own.
            if tracing.enabled():
                tracing.annotate({"clawhub.skill": request.skill, "clawhub.skill.version": target.version,
                                  "clawhub.skill.digest": target.digest, "clawhub.route.weight": target.weight,
                                  "clawhub.route.role": routing_pb2.RouteTargetRole.Name(target.role),
                                  "clawhub.route.candidate": candidate})
            response = await self._call_executors(request, target, deadline, metadata)
        except asyncio.CancelledError:
            if candidate:
                self._stats.record(key, loop.time() - started, failed=True)
            raise
        except Exception as exc:
            outcome = classify(exc)
            if outcome in (Outcome.VERSION, Outcome.DEADLINE):
                self._stats.record(key, loop.time() - started,
                                   failed=outcome is Outcome.VERSION or candidate)
            raise
        self._stats.record(key, loop.time() - started, failed=False)
        return response

    async def _call_executors(self, request: pb.DispatchRequest, target: routing_pb2.RouteTarget,
                              deadline: float, metadata: tuple[tuple[str, str], ...]) -> pb.DispatchResponse:
        """Run the call on an executor, retrying UNAVAILABLE ones on another; any other status passes."""
        execute = executor_pb.ExecuteRequest(digest=target.digest, input=request.input, limits=target.limits,
                                             request_id=request.request_id, env=target.env, args=target.args,
                                             bundle_digest=target.bundle_digest,
                                             capabilities=target.capabilities,
                                             skill=request.skill, version=target.version,
                                             dependencies=target.dependencies)
        loop = asyncio.get_running_loop()
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
            tracing.current_span().set_attribute("clawhub.executor", address)  # the route span's; a no-op when off
            try:
                response = await self._executors.execute(address, execute, timeout=left, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise upstream_error(err, "executor", address) from None
                tried.append(address)
                last_problem = f"{address}: {err.details() or 'unavailable'}"
                # Debug: one per attempt (the caller's status, and the metrics, tell of an executor that stays down).
                log.debug("executor %s unavailable for %s (attempt %d): %s", address, request.skill,
                          attempt + 1, one_line(err.details() or "no details"))
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

    async def GetSkillStats(self, request: pb.GetSkillStatsRequest, context: grpc.aio.ServicerContext[Any, Any],
                            ) -> pb.GetSkillStatsResponse:
        """Every skill with calls in the window or a route (or only `request.skill`), by name, and every
        executor's pool use (asked meanwhile, each with a short timeout)."""
        loads = asyncio.ensure_future(executor_loads(self._executors))
        summaries = self._skills.snapshot(request.skill)
        names = set(summaries)
        if request.skill:
            names |= {request.skill} if self._routes.route(request.skill) is not None else set()
        else:
            names |= {route.skill for route in self._routes.table.routes}
        window = self._skills.window
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
