"""The routing of one invocation, in one place: which version (by the route's weights), which executor, the
retries — shared by the gateway (which calls executors itself, with the routes and executors the dispatcher
streams to it) and the dispatcher's own `Dispatch` (for clients that cannot route themselves). docs/routing.md.

A call goes to a target of the skill's route chosen at random in proportion to its weight. A call of a
candidate version (a release under analysis) gets half the caller's budget, and when it fails because of the
version (or does not end within its half) it is counted against the version and run again on the route's
stable version, so the caller does not see it. On each version, an executor that is UNAVAILABLE or sheds load
(EXECUTOR_OVERLOADED) is retried on another executor after a jittered exponential backoff, within the
caller's deadline and a retry budget. Each (executor, version) pair has an adaptive concurrency limit: calls
beyond it wait here, in a deadline-aware queue, instead of piling up in the executor (docs/routing.md,
"Backpressure, retries and ejection"; services/runtime/resilience.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from clawhub.common.v1 import routing_pb2, skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as executor_pb

from services.runtime import metrics, tracing
from services.runtime.callstats import SkillCalls, VersionStats, reason_of
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
from services.runtime.executors import ExecutorClient, ExecutorPicker
from services.runtime.names import skill_name_problem
from services.runtime.resilience import AdaptiveLimit, RetryBudget, Shed, backoff

RETRY_BACKOFF_INITIAL = 0.01
RETRY_BACKOFF_MAX = 0.2
# Adaptive limits kept at most (one per executor and version in use); idle ones are dropped beyond it.
MAX_LIMITS = 4096
# W3C trace context travels on to the executor, so the hop joins the caller's trace.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def trace_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str], ...]:
    """The caller's trace context, for the next hop (nothing else of the caller's metadata goes on)."""
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k in TRACE_HEADERS)


class RouteState:
    """The route table routed with now; replaced whole on every generation."""

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


def pick_target(targets: Sequence[routing_pb2.RouteTarget], rng: random.Random) -> routing_pb2.RouteTarget:
    """A target chosen at random in proportion to its weight (targets with weight 0 are never chosen)."""
    if len(targets) == 1:
        return targets[0]
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


def caller_fault(exc: BaseException, time_remaining: Callable[[], float | None]) -> bool:
    """Whether a failed call was its caller's doing (bad input, cancelled while it still had time), which
    does not count against the skill's availability; a deadline that ran out does."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = time_remaining()
        return remaining is None or remaining > 0
    return classify(exc) is Outcome.CALLER


def _retryable(err: grpc.aio.AioRpcError) -> bool:
    """An executor that is down, or that shed the call before running it: another executor may take it."""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        info = error_info(err)
        return info is not None and info.reason == Reason.EXECUTOR_OVERLOADED
    return False


@dataclass(frozen=True)
class Routed:
    """What a routed call returns: the skill's output and where it ran."""

    output: bytes
    version: str
    digest: str
    usage: skill_pb2.Usage
    executor: str


class Router:
    """Routes invocations by `routes` over the executors of `picker`, through `executors`, counting each
    call per version (`stats`, for release analysis) and per skill (`skills`, for `clawhub top`)."""

    def __init__(self, routes: RouteState, executors: ExecutorClient, picker: ExecutorPicker, *, retries: int,
                 default_timeout: float, stats: VersionStats, skills: SkillCalls,
                 rng: random.Random | None = None, domain: str = "dispatcher.clawhub",
                 service: str = "dispatcher") -> None:
        self.routes = routes
        self.executors = executors
        self.picker = picker
        self.stats = stats
        self.skills = skills
        self._retries = retries
        self._default_timeout = default_timeout
        self._rng = rng or random.Random()
        self._domain = domain
        self._log = logging.getLogger(f"clawhub.{service}")
        self.budget = RetryBudget()
        self.limits: dict[tuple[str, str], AdaptiveLimit] = {}

    def limit(self, address: str, digest: str) -> AdaptiveLimit:
        """The adaptive limit of calls of the version `digest` on the executor `address`: per version, so that
        a skill whose calls take a second does not make a quick one's calls look like queueing."""
        key = (address, digest)
        limit = self.limits.get(key)
        if limit is None:
            if len(self.limits) >= MAX_LIMITS:
                self.limits = {k: v for k, v in self.limits.items() if v.in_flight or v.queued}
            limit = self.limits[key] = AdaptiveLimit(clock=asyncio.get_running_loop().time, rng=self._rng)
        return limit

    async def invoke(self, skill: str, data: bytes, request_id: str, *,
                     time_remaining: Callable[[], float | None], metadata: tuple[tuple[str, str], ...],
                     ) -> Routed:
        """`_invoke`, with the call counted in its skill's stats and availability metric. A failure is counted
        only for a routed (or already counted) skill: names callers make up are not kept."""
        started = time.perf_counter()
        try:
            routed = await self._invoke(skill, data, request_id, time_remaining, metadata)
        except (Exception, asyncio.CancelledError) as exc:
            if self.routes.route(skill) is not None or self.skills.knows(skill):
                self.skills.record(skill, time.perf_counter() - started, reason_of(exc))
                fault = caller_fault(exc, time_remaining)
                metrics.skill_requested(skill, "caller_error" if fault else "failure")
            raise
        self.skills.record(skill, time.perf_counter() - started)
        metrics.skill_requested(skill, "success")  # availability (docs/metrics.md)
        return routed

    async def _invoke(self, skill: str, data: bytes, request_id: str, time_remaining: Callable[[], float | None],
                      metadata: tuple[tuple[str, str], ...]) -> Routed:
        problem = skill_name_problem(skill)
        if problem:
            raise invalid(Reason.INVALID_NAME, "skill", problem)
        route = self.routes.route(skill)
        targets = [t for t in route.targets if t.weight > 0] if route else []
        if route is None or not targets:
            raise self.not_deployed(skill, suggest=route is None)
        target = pick_target(targets, self._rng)
        loop = asyncio.get_running_loop()
        remaining = time_remaining()
        # The caller's deadline propagates; without one, the router's own budget bounds the call.
        deadline = loop.time() + (remaining if remaining is not None else self._default_timeout)
        stable = stable_target(route, target) if target.role == routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE else None
        # A version under analysis gets half the caller's budget, the stable version keeps the rest: a
        # candidate that hangs is cut off, counted as a failure and retried instead of failing the caller.
        attempt_deadline = deadline if stable is None else loop.time() + (deadline - loop.time()) / 2
        try:
            return await self._call_version(skill, data, request_id, target, attempt_deadline, metadata,
                                            candidate=stable is not None)
        except Exception as exc:
            if stable is None or classify(exc) not in (Outcome.VERSION, Outcome.DEADLINE):
                raise
            if deadline - loop.time() <= 0:
                raise
            # A release under analysis: the failure is counted against the new version (it was recorded
            # above) and the caller gets the stable version's answer instead.
            self.stats.retried(VersionStats.key(skill, target))
            self._log.info("%s@%s failed (%s); retrying on stable %s", skill, target.version, describe_error(exc),
                     stable.version)
            return await self._call_version(skill, data, request_id, stable, deadline, metadata)

    def not_deployed(self, skill: str, *, suggest: bool) -> ServiceError:
        """SKILL_NOT_DEPLOYED, with the routed names close to `skill` when it has no route at all (the table
        is in memory: cheap)."""
        routed = (r.skill for r in self.routes.table.routes)
        suggestions = close_names(skill, routed) if suggest else []
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION, Reason.SKILL_NOT_DEPLOYED,
            f"skill {skill} is not deployed{did_you_mean(suggestions)}; deploy a version first "
            f"(clawhub deploy {skill}@VERSION)",
            metadata={"skill": skill, DID_YOU_MEAN: ",".join(suggestions)}, domain="dispatcher.clawhub")

    async def _call_version(self, skill: str, data: bytes, request_id: str, target: routing_pb2.RouteTarget,
                            deadline: float, metadata: tuple[tuple[str, str], ...], *, candidate: bool = False,
                            ) -> Routed:
        """One call of one version (on any executor), counted in the version's stats. For a `candidate`
        (a version under analysis), not finishing within its budget, or before the caller gave up, is a
        failure too: a version that hangs must not pass its analysis for lack of finished calls."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        key = VersionStats.key(skill, target)
        try:
            # The route choice takes microseconds: attributes on the call's span, not a span of its own.
            if tracing.recording():
                tracing.annotate({"clawhub.skill": skill, "clawhub.skill.version": target.version,
                                  "clawhub.skill.digest": target.digest, "clawhub.route.weight": target.weight,
                                  "clawhub.route.role": routing_pb2.RouteTargetRole.Name(target.role),
                                  "clawhub.route.candidate": candidate})
            routed = await self._call_executors(skill, data, request_id, target, deadline, metadata)
        except asyncio.CancelledError:
            if candidate:
                self.stats.record(key, loop.time() - started, failed=True)
            raise
        except Exception as exc:
            outcome = classify(exc)
            if outcome in (Outcome.VERSION, Outcome.DEADLINE):
                self.stats.record(key, loop.time() - started, failed=outcome is Outcome.VERSION or candidate)
            raise
        self.stats.record(key, loop.time() - started, failed=False)
        return routed

    async def _call_executors(self, skill: str, data: bytes, request_id: str, target: routing_pb2.RouteTarget,
                              deadline: float, metadata: tuple[tuple[str, str], ...]) -> Routed:
        """Run the call on an executor, retrying on another one an executor that is UNAVAILABLE or sheds the
        call (EXECUTOR_OVERLOADED); any other status passes."""
        execute = executor_pb.ExecuteRequest(digest=target.digest, input=data, limits=target.limits,
                                             request_id=request_id, env=target.env, args=target.args,
                                             bundle_digest=target.bundle_digest,
                                             capabilities=target.capabilities,
                                             skill=skill, version=target.version,
                                             dependencies=target.dependencies)
        loop = asyncio.get_running_loop()
        tried: list[str] = []
        last: grpc.aio.AioRpcError | None = None
        last_address = ""
        shed: Shed | None = None
        self.budget.deposit()
        for attempt in range(self._retries + 1):
            # A retry after an executor's refusal spends the budget; trying the next executor after shedding the
            # call here (nothing was sent) does not.
            if attempt and last is not None and tried[-1:] == [last_address] and not self.budget.try_withdraw():
                break  # the retry budget is spent: the last answer stands (no retry storm)
            address = self.picker.pick(exclude=tried)
            if address is None or (shed is not None and address in tried):
                break  # no executor, or none that has not shed the call already
            if deadline - loop.time() <= 0:
                break
            limit = self.limit(address, target.digest)
            if not limit.try_acquire():
                try:
                    # Wait for a slot, if one can come while the call still has time to run.
                    await limit.acquire(deadline - limit.rtt)
                except Shed as refused:
                    tried.append(address)
                    shed = refused
                    continue
            left = deadline - loop.time()
            self.picker.begin(address)
            if tracing.recording():
                tracing.current_span().set_attribute("clawhub.executor", address)
            started = loop.time()
            try:
                response = await self.executors.execute(address, execute, timeout=max(left, 0.001),
                                                        metadata=metadata)
            except grpc.aio.AioRpcError as err:
                retryable = _retryable(err)
                down = err.code() == grpc.StatusCode.UNAVAILABLE
                limit.release(loop.time() - started, dropped=retryable and not down, ignore=down)
                if down:
                    self.picker.outliers.failure(address)
                else:  # it answered (a refusal or the skill's own error): the executor is up
                    self.picker.outliers.success(address)
                if not retryable:
                    raise upstream_error(err, "executor", address) from None
                tried.append(address)
                last, last_address = err, address
                # Debug: one per attempt (the caller's status, and the metrics, tell of an executor that stays down).
                self._log.debug("executor %s refused %s (attempt %d): %s", address, skill, attempt + 1,
                                one_line(err.details() or err.code().name))
                if attempt < self._retries:
                    pause = backoff(attempt, base=RETRY_BACKOFF_INITIAL, cap=RETRY_BACKOFF_MAX, rng=self._rng)
                    await asyncio.sleep(max(0.0, min(pause, (deadline - loop.time()) / 2)))
                continue
            except BaseException:
                limit.release(0.0, ignore=True)
                raise
            finally:
                self.picker.end(address)
            limit.release(loop.time() - started)
            self.picker.outliers.success(address)
            return Routed(response.output, target.version, target.digest, response.usage, address)
        if shed is not None and (last is None or last.code() != grpc.StatusCode.UNAVAILABLE):
            # Shed here, before it was sent: no executor could take it before its deadline.
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.EXECUTOR_OVERLOADED,
                f"the executors of {skill}@{target.version} are busy: the call could not start before its "
                f"deadline ({shed.cause}); retry later",
                metadata={"skill": skill, "version": target.version, "cause": shed.cause},
                retry_after_seconds=shed.retry_after, domain=self._domain)
        if deadline - loop.time() <= 0:
            waited = f" while retrying executors ({', '.join(tried)})" if tried else ""
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED,
                f"the deadline of the call to {skill} expired{waited}",
                metadata={"skill": skill, "executors": ",".join(tried)}, domain=self._domain)
        if last is not None and last.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Every executor tried shed the call: the caller sees the shedding (with its RetryInfo) as it is.
            raise upstream_error(last, "executor", tried[-1]) from None
        problem = f"{tried[-1]}: {last.details() or 'unavailable'}" if last is not None else \
            "no executors are known"
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE, Reason.NO_EXECUTOR_AVAILABLE,
            f"no executor could run {skill}@{target.version} after {len(tried)} attempt(s); last: {problem}",
            metadata={"skill": skill, "version": target.version, "executors": ",".join(tried)},
            retry_after_seconds=1.0, domain=self._domain)
