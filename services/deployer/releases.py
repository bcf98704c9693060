"""Rollouts and rollbacks: the release state machine driven through preload, route pushes, analysis and
acknowledgements.

One operation per skill at a time (a deploy or a manual rollback): a second one is refused with
DEPLOYMENT_IN_PROGRESS, except that a manual rollback aborts a release that is in its bake window or canary
steps. Rollouts run as background tasks owned by the `Releaser`; a deployer stopped in the middle leaves
them Deploying/RollingBack in the store, and `settle()` resolves them on the next start.

A rollout, all within the Deploying state:

1. preload on every executor (LoadSkill runs the smoke examples; per-digest health turns SERVING);
2. for each analysis window (one bake window, or one per canary step): push a route with the new version as
   the candidate at the window's weight and the previous version as the stable target (which takes the
   retries of the candidate's failed calls), wait for the acknowledgements, then watch the dispatchers'
   stats and the executors' per-digest health until the window ends;
3. push the plain route (the new version alone), wait for the acknowledgements, unload the previous
   version (only once every dispatcher acknowledged, so none can still retry on it) → Active.

A breach (stats against the thresholds, per-digest health NOT_SERVING) is evaluated as each stats report
arrives, not on a poll: the release task wakes at once and pushes the previous route (RollingBack), then
ends Failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc
from clawhub.common.v1 import skill_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from grpc_health.v1 import health_pb2

from services.deployer import breaker
from services.deployer.analysis import Tally, breach
from services.deployer.backends import ExecutorFleet
from services.deployer.breaker import BreakerSettings
from services.deployer.events import EventBus
from services.deployer.model import (
    DeploymentRecord,
    RolledBack,
    Transition,
    Verdict,
    env_digest,
    new_deployment_id,
    timestamp,
)
from services.deployer.plan import CANARY, Plan, duration
from services.deployer.routes import Acks, RouteHub
from services.deployer.statemachine import (
    ACTIVE,
    DEPLOYING,
    FAILED,
    READY,
    ROLLING_BACK,
    State,
    check_transition,
    state_name,
)
from services.deployer.store import DeploymentStore, Fenced, StoredRoute
from services.runtime import metrics, tracing
from services.runtime.errors import Reason, ServiceError, describe_error, error_info, invalid

log = logging.getLogger("clawhub.deployer")

RESTART_REASON = "deployer restarted mid-deploy"
MANUAL_ABORT_REASON = "manual rollback requested"
# Pause before watching an executor's per-digest health again after the stream broke.
HEALTH_RETRY_SECONDS = 0.5
DEFAULT_PROGRESS_INTERVAL = 0.25
# Events kept in one deployment's log (progress samples are never kept). Past it only state changes are: a
# rollout has a few events per executor and per analysis window, so only a very large fleet gets there.
MAX_LOGGED_EVENTS = 500

T = TypeVar("T")
Kind: TypeAlias = pb.DeploymentEventKind.ValueType


def in_progress(skill: str, deployment_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPLOYMENT_IN_PROGRESS,
        f"deployment {deployment_id} of {skill} is still in flight; watch it with WatchDeployment and "
        "try again when it ends", metadata={"skill": skill, "deployment_id": deployment_id})


def env_not_set(skill: str, version: str, unset: Sequence[str], previous: DeploymentRecord | None) -> ServiceError:
    """INVALID_ARGUMENT / ENV_NOT_SET naming every declared variable the deploy leaves without a value, and how
    to set it (names only: never values)."""
    them = "it" if len(unset) == 1 else "them"
    kept = f" (nor does {previous.version}, serving now, whose values a deploy keeps)" if previous else ""
    flags = " ".join(f"--env {name}=value" for name in unset)
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, Reason.ENV_NOT_SET,
        f"{skill}@{version} declares {', '.join('env:' + n for n in unset)} but this deploy gives no value for "
        f"{them}{kept}; a skill that needs {them} would fail on every call. Set {them} with "
        f"`clawhub deploy {skill}@{version} {flags}`, or deploy without {them} with --allow-unset-env "
        "(allow_unset_env in the API)",
        metadata={"field": f"env[{unset[0]}]", "skill": skill, "version": version, "unset": ",".join(unset)},
        field_violations=[(f"env[{name}]", f"declared (env:{name}) but given no value") for name in unset])


def not_analysed(requests: int, minimum: int) -> str:
    """Why a release that ended its windows without a breach was not judged."""
    if not requests:
        return "not analysed: no traffic"
    return f"not analysed: {requests} call{'s' if requests != 1 else ''}, fewer than min_requests {minimum}"


def no_previous(skill: str, version: str, deployment_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_PREVIOUS_VERSION,
        f"{skill}@{version} (deployment {deployment_id}) has no previous version to roll back to",
        metadata={"skill": skill, "version": version})


@dataclass(frozen=True)
class Stop:
    """Why a release's analysis ended early."""

    verdict: Verdict
    kind: Kind
    reason: str
    executor: str = ""


@dataclass
class Release:
    """A deployment whose rollout is running."""

    record: DeploymentRecord
    previous: DeploymentRecord | None
    plan: Plan
    stop: asyncio.Future[Stop] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # True from the first candidate route push until the analysis ends: only then do stats count.
    analysing: bool = False
    # The new version's share of traffic in the route pushed last.
    weight: int = 0
    # The generation that restored the previous route, once a failed release restored it.
    restored_generation: int = 0
    task: asyncio.Task[None] | None = None

    def trip(self, stop: Stop) -> bool:
        """End the analysis early; False when it already ended (the first reason wins)."""
        if self.stop.done():
            return False
        self.stop.set_result(stop)
        return True


class Releaser:
    """Runs deployments and rollbacks of skills against the store, the route hub and the executors."""

    def __init__(self, store: DeploymentStore, hub: RouteHub, events: EventBus, fleet: ExecutorFleet, *,
                 ack_timeout: float, clock: Callable[[], int] = time.time_ns,
                 breaker_settings: BreakerSettings | None = None,
                 progress_interval: float = DEFAULT_PROGRESS_INTERVAL) -> None:
        self._store = store
        self._hub = hub
        self._events = events
        self._fleet = fleet
        self._ack_timeout = ack_timeout
        self._clock = clock
        self._breaker = breaker_settings or BreakerSettings()
        self._progress_interval = progress_interval
        self._lock = asyncio.Lock()
        # Skill → id of the deployment whose rollout or rollback is running.
        self._in_flight: dict[str, str] = {}
        # Skill → its running rollout.
        self._releases: dict[str, Release] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Digests this deployer unloaded after a release replaced them: a manual rollback to one of them loads
        # it again first. (Forgotten on restart: an executor then loads it on the first call instead.)
        self._unloaded: set[str] = set()
        # Numbering of each deployment's events (see _emit).
        self._emit_lock = asyncio.Lock()
        self._sequences: dict[str, int] = {}

    # Views.

    def running(self) -> tuple[str, ...]:
        """Ids of the deployments whose rollout or rollback runs now (an executor that joins meanwhile preloads
        their versions too: services/deployer/membership.py)."""
        return tuple(self._in_flight.values())

    def is_serving(self, record: DeploymentRecord) -> bool:
        return self._hub.owner(record.skill) == record.id

    def to_proto(self, record: DeploymentRecord) -> pb.Deployment:
        # A running release's own record is ahead of the stored one (live stats and verdict).
        release = self._releases.get(record.skill)
        live = release.record if release is not None and release.record.id == record.id else record
        return live.to_proto(serving=self.is_serving(record),
                             traffic_weight=self._hub.weight(record.skill, record.version, record.digest))

    # Operations.

    async def find_request(self, method: str, request_id: str) -> tuple[DeploymentRecord, int] | None:
        """The deployment (and generation) an idempotency key of `method` already produced."""
        found = await self._store.find_request(method, request_id)
        if found is None:
            return None
        record = await self._store.get_deployment(found[0])
        return (record, found[1]) if record is not None else None

    async def _replay_create(self, request_id: str, skill: str, version: str, env: dict[str, str],
                             ) -> DeploymentRecord | None:
        found = await self.find_request("create", request_id)
        if found is None:
            return None
        record = found[0]
        if (record.skill, record.version) != (skill, version):
            raise invalid(Reason.INVALID_ARGUMENT, "request_id",
                          f"request_id {request_id!r} was already used to deploy "
                          f"{record.skill}@{record.version} (deployment {record.id})")
        if record.requested_env() != env:
            raise invalid(Reason.INVALID_ARGUMENT, "request_id",
                          f"request_id {request_id!r} was already used to deploy {skill}@{version} with other "
                          f"env values (deployment {record.id})")
        return record

    async def start_deployment(self, skill: str, version: str, digest: str, limits: skill_pb2.Limits,
                               request_id: str = "", *, plan: Plan, env: dict[str, str] | None = None,
                               args: Sequence[str] = (), bundle_digest: str = "",
                               capabilities: Sequence[str] = (),
                               examples: Sequence[skill_pb2.SmokeExample] = (),
                               dependencies: Sequence[skill_pb2.ResolvedDependency] = (),
                               declared_env: Sequence[str] = (), allow_unset_env: bool = False,
                               input_schema: str | None = None,
                               cache_ttl_ms: int | None = None) -> DeploymentRecord:
        """Create a deployment in state Deploying and start its rollout in the background.

        `env` holds the values for the skill's `env:NAME` capabilities (checked by the caller); they are
        persisted with the deployment and go out with its route, and are never logged. A name in
        `declared_env` that `env` leaves out keeps the value of the deployment serving now (so a new version
        does not lose its secrets); one that still has none is refused (ENV_NOT_SET) unless `allow_unset_env`.
        With a `request_id` seen before, returns that deployment instead (an idempotent retry).
        Refused while another operation on the skill runs, or while its circuit breaker is open.
        """
        env = dict(env or {})
        async with self._lock:
            if request_id:
                existing = await self._replay_create(request_id, skill, version, env)
                if existing is not None:
                    return existing
            if skill in self._in_flight:
                raise in_progress(skill, self._in_flight[skill])
            owner = self._hub.owner(skill)
            previous = await self._store.get_deployment(owner) if owner else None
            requested = sorted(env)
            inherited = sorted(n for n in set(declared_env) - set(env) if previous is not None and n in previous.env)
            if previous is not None:
                env.update({name: previous.env[name] for name in inherited})
            unset = sorted(set(declared_env) - set(env))
            if unset and not allow_unset_env:
                raise env_not_set(skill, version, unset, previous)
            now = self._clock()
            outcomes = await self._store.deploy_outcomes(skill, now - int(self._breaker.window_seconds * 1e9))
            refusal = breaker.check(skill, outcomes, now, self._breaker)
            if refusal is not None:
                raise refusal
            check_transition(READY, DEPLOYING)
            replacing = f", replacing {previous.version}" if previous else ""
            # Names only: the values may be secrets.
            with_env = f" with env {', '.join(requested)}" if requested else ""
            if inherited and previous is not None:
                with_env += f" (env {', '.join(inherited)} kept from {previous.version})"
            if unset:
                with_env += f", env {', '.join(unset)} left unset (allowed)"
            record = DeploymentRecord(
                id=new_deployment_id(), skill=skill, version=version, digest=digest, limits=limits,
                state=DEPLOYING, history=[Transition(READY, DEPLOYING, now, f"deploy of {version} requested"
                                                                              f"{with_env}{replacing}")],
                previous_id=previous.id if previous else "",
                previous_version=previous.version if previous else "",
                create_ns=now, update_ns=now, env=env, args=list(args), bundle_digest=bundle_digest,
                capabilities=list(capabilities), examples=list(examples), plan=plan,
                dependencies=list(dependencies), inherited_env=inherited, input_schema=input_schema,
                cache_ttl_ms=cache_ttl_ms, env_digest=env_digest(env))
            await self._store.create_deployment(record, request_id)
            self._in_flight[skill] = record.id
            release = Release(record, previous, plan)
            self._releases[skill] = release
        # The release runs on after the call returns, in the call's trace (services/runtime/tracing.py).
        release.task = self._spawn(tracing.in_span("deployer.release", self._deploy(release), {
            "clawhub.skill": skill, "clawhub.skill.version": version, "clawhub.deployment": record.id,
            "clawhub.release.strategy": str(release.plan.strategy)}))
        return record

    async def rollback(self, skill: str, request_id: str = "") -> tuple[DeploymentRecord, int]:
        """Send the skill's traffic back to the deployment that served before the current one.

        The current deployment goes Active → RollingBack → Active (no longer serving), with the reasons in
        its history; the previous one, still Active, serves again from a new route generation. The rollback
        counts once the generation is persisted: dispatchers that do not acknowledge it within the ack
        timeout get it when they reconnect, and it is not undone (going back to the version the operator
        is rolling away from would be worse). Returns the serving deployment and the generation.

        A release in its bake window or canary steps is aborted instead: it ends Failed (verdict ABORTED)
        and the version that served before it serves again.
        """
        if request_id:
            found = await self.find_request("rollback", request_id)
            if found is not None:
                return found
        async with self._lock:
            if skill in self._in_flight:
                release = self._releases.get(skill)
                if release is None or not release.analysing or release.stop.done():
                    raise in_progress(skill, self._in_flight[skill])
                if release.previous is None or release.previous.state != ACTIVE:
                    record = release.record
                    raise no_previous(skill, record.version, record.id)
                release.trip(Stop(pb.ANALYSIS_VERDICT_ABORTED, pb.DEPLOYMENT_EVENT_KIND_ROLLBACK_STARTED,
                                  MANUAL_ABORT_REASON))
                aborting: Release | None = release
            else:
                aborting = None
                owner = self._hub.owner(skill)
                current = await self._store.get_deployment(owner) if owner else None
                if current is None:
                    raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.SKILL_NOT_DEPLOYED,
                                       f"skill {skill} is not deployed, so there is nothing to roll back",
                                       metadata={"skill": skill})
                target = await self._store.get_deployment(current.previous_id) if current.previous_id else None
                if target is None or target.state != ACTIVE:
                    raise no_previous(skill, current.version, current.id)
                self._in_flight[skill] = current.id
        if aborting is not None:
            return await self._await_abort(aborting, request_id)
        assert current is not None and target is not None
        # Shielded: a caller that gives up (deadline, cancel) must not leave the skill half rolled back.
        task = self._spawn(tracing.in_span("deployer.rollback", self._rollback(current, target, request_id), {
            "clawhub.skill": skill, "clawhub.skill.version": target.version, "clawhub.deployment": current.id,
            "clawhub.rollback.cause": "manual"}))
        return await asyncio.shield(task)

    async def _await_abort(self, release: Release, request_id: str) -> tuple[DeploymentRecord, int]:
        assert release.task is not None and release.previous is not None
        # Shielded for the same reason as a rollback; the release task owns the work anyway.
        await asyncio.shield(release.task)
        if not release.restored_generation:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, Reason.INTERNAL,
                f"the release of {release.record.skill}@{release.record.version} was aborted but the previous "
                f"route could not be restored; see deployment {release.record.id}",
                metadata={"skill": release.record.skill, "deployment_id": release.record.id})
        target = await self._store.get_deployment(release.previous.id) or release.previous
        if request_id:
            await self._store.save_request("rollback", request_id, target.id, release.restored_generation)
        return target, release.restored_generation

    async def report_stats(self, request: internal_pb.ReportStatsRequest) -> None:
        """Add a dispatcher's report to the running releases it concerns, and trip any breach at once."""
        for report in request.reports:
            release = self._releases.get(report.skill)
            if release is None or not release.analysing or release.stop.done():
                continue
            record = release.record
            if report.digest != record.digest or report.version != record.version or record.stats is None:
                continue
            record.stats.add(report)
            reason = breach(record.stats, release.plan.thresholds)
            if reason is not None:
                release.trip(Stop(pb.ANALYSIS_VERDICT_FAILED, pb.DEPLOYMENT_EVENT_KIND_ANALYSIS_BREACH,
                                  f"analysis breach: {reason}"))

    async def settle(self, *, resume: bool = False, only: set[str] | None = None) -> None:
        """Resolve every deployment a previous run left in flight (call before serving).

        A rollout is not resumed: the deployment ends Failed ("deployer restarted mid-deploy") and, if its
        route had already been pushed (during the bake window or the canary steps too), the previous
        version's route is restored (it is still loaded on the executors), so no route points at a failed
        deployment and no two versions claim the route. An interrupted manual rollback ends Active again,
        with the route table as it was persisted.

        With `resume` (a deployer that took the lead from another replica: services/deployer/leader.py) a
        rollout still Deploying is resumed instead: it starts over from its persisted record (preload, which
        executors that have the version answer at once, then its analysis windows from the first, then the
        final route), so a deploy started before a failover completes after it. A rollback it had begun is
        finished as above.
        """
        for record in await self._store.in_flight():
            if only is not None and record.id not in only:
                continue
            if resume and record.state == DEPLOYING and record.plan is not None:
                try:
                    await self._resume(record)
                    continue
                except Exception:  # noqa: BLE001 - settled as after a restart instead
                    log.exception("could not resume deployment %s; settling it", record.id)
            try:
                if record.state == ROLLING_BACK and record.entered_from() == ACTIVE:
                    serving = "route kept as persisted"
                    owner = self._hub.owner(record.skill)
                    if owner and owner != record.id:
                        serving = f"route kept: deployment {owner} serves"
                        # The rollback's route had been persisted: it took place.
                        target = await self._store.get_deployment(owner)
                        if record.rolled_back is None and target is not None:
                            record.rolled_back = RolledBack(target.id, target.version, 0, self._clock())
                            await self._store.save_rolled_back(record)
                    await self._transition(record, ACTIVE, f"deployer restarted mid-rollback; {serving}",
                                           final=True)
                    continue
                if record.verdict == pb.ANALYSIS_VERDICT_RUNNING:
                    self._set_verdict(record, pb.ANALYSIS_VERDICT_ABORTED, RESTART_REASON)
                # No unloading here: the deployer's start must not wait for executors.
                await self._fail(record, RESTART_REASON, unload=False, cause="deployer_restart")
            except Exception:  # noqa: BLE001 - settle the others; this one stays for the next start
                log.exception("could not settle deployment %s", record.id)

    async def adopt(self) -> None:
        """Take up the deployments left in flight that no release of this deployer drives (a deploy a deposed
        leader accepted after this one's takeover): as a takeover would (`settle(resume=True)`)."""
        # Under the lock: a deploy that starts meanwhile is created and registered as driven together.
        async with self._lock:
            driven = set(self._in_flight.values())
            orphans = [r.id for r in await self._store.in_flight() if r.id not in driven]
        if orphans:
            log.info("taking up deployments %s, left in flight by another deployer", ", ".join(orphans))
            await self.settle(resume=True, only=set(orphans))

    async def _resume(self, record: DeploymentRecord) -> None:
        assert record.plan is not None
        previous = await self._store.get_deployment(record.previous_id) if record.previous_id else None
        if record.verdict == pb.ANALYSIS_VERDICT_RUNNING:
            self._set_verdict(record, pb.ANALYSIS_VERDICT_UNSPECIFIED, "")
        async with self._lock:
            self._in_flight[record.skill] = record.id
            release = Release(record, previous, record.plan)
            self._releases[record.skill] = release
        log.info("resuming deployment %s (%s@%s) from its persisted state", record.id, record.skill, record.version)
        # No event kind says "resumed" yet (a proto change): the message does.
        await self._emit(record, "resumed by a new leading deployer: the rollout starts over from its preload",
                         pb.DEPLOYMENT_EVENT_KIND_UNSPECIFIED)
        release.task = self._spawn(tracing.in_span("deployer.release", self._deploy(release), {
            "clawhub.skill": record.skill, "clawhub.skill.version": record.version, "clawhub.deployment": record.id,
            "clawhub.release.strategy": str(release.plan.strategy), "clawhub.release.resumed": True}))

    async def close(self) -> None:
        """Cancel running rollouts (a restart settles them) and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stand_down(self) -> None:
        """Stop everything this deployer was driving, as its leadership ended: the releases stay in flight in
        the store for the next leader to resume; nothing of this term is remembered for a later one."""
        await self.close()
        async with self._lock:
            self._in_flight.clear()
            self._releases.clear()
            self._sequences.clear()
            self._unloaded.clear()

    # Events.

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _transition(self, record: DeploymentRecord, to_state: State, reason: str, *,
                          final: bool = False) -> None:
        """Persist a transition and tell the watchers. `final` ends the skill's in-flight operation first,
        so a watcher that sees the end can start the next deployment at once."""
        transition = record.apply(to_state, reason, self._clock())
        try:
            await self._store.add_transition(record.id, transition, self._hub.epoch)
        except Fenced:
            # Another deployer leads now and drives this release (services/deployer/leader.py).
            self._hub.on_fenced()
            raise
        if to_state == FAILED or (to_state == ACTIVE and transition.from_state == DEPLOYING):
            # A release ended (a manual rollback's return to Active is not one).
            metrics.release_ended(record.plan.strategy if record.plan is not None else "",
                                  "active" if to_state == ACTIVE else "failed")
        if final and self._in_flight.get(record.skill) == record.id:
            del self._in_flight[record.skill]
            release = self._releases.get(record.skill)
            if release is not None and release.record.id == record.id:
                del self._releases[record.skill]
        log.info("deployment %s (%s@%s): %s → %s: %s", record.id, record.skill, record.version,
                 state_name(transition.from_state), state_name(to_state), reason)
        await self._emit(record, f"{state_name(transition.from_state)} → {state_name(to_state)}: {reason}",
                         pb.DEPLOYMENT_EVENT_KIND_STATE_CHANGED, transition=transition.to_proto())

    async def _emit(self, record: DeploymentRecord, message: str, kind: Kind, **fields: Any) -> None:
        """Number the event, add it to the deployment's log, then tell the watchers.

        Logged before it is published, and under one lock so that numbers are published in order: a watcher
        subscribes before it reads the log, so every event is in the log it reads or in its queue (or both:
        it drops what it already replayed by sequence number)."""
        async with self._emit_lock:
            sequence = self._sequences.get(record.id)
            if sequence is None:
                # A deployment this process has not numbered yet (one from before a restart): carry on after
                # its log.
                sequence = await self._store.last_event_sequence(record.id)
            sequence += 1
            self._sequences[record.id] = sequence
            event = pb.DeploymentEvent(kind=kind, time=timestamp(self._clock()), **fields)
            response = pb.WatchDeploymentResponse(deployment=self.to_proto(record), message=message, event=event,
                                                  sequence=sequence)
            # Progress samples come several times a second and say nothing a later event does not: live only.
            if kind != pb.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS:
                try:
                    await self._store.append_event(record.id, response, limit=MAX_LOGGED_EVENTS,
                                                   keep=kind == pb.DEPLOYMENT_EVENT_KIND_STATE_CHANGED)
                except Exception as exc:  # noqa: BLE001 - the log is for people: a release must not fail over it
                    log.warning("event %d of deployment %s could not be logged: %s", sequence, record.id,
                                describe_error(exc))
            self._events.publish(response)

    async def _pushed(self, record: DeploymentRecord, generation: int, weight: int, note: str = "") -> None:
        await self._emit(record, f"route generation {generation} pushed{note}", pb.DEPLOYMENT_EVENT_KIND_ROUTE_PUSHED,
                         generation=generation, weight=weight)

    async def _acked(self, record: DeploymentRecord, acks: Acks) -> None:
        await self._emit(record, acks.describe(), pb.DEPLOYMENT_EVENT_KIND_ACKED, generation=acks.generation,
                         acknowledged=len(acks.acknowledged), dispatchers=len(acks.acknowledged) + len(acks.pending))

    @staticmethod
    def _set_verdict(record: DeploymentRecord, verdict: Verdict, reason: str) -> None:
        record.verdict = verdict
        record.verdict_reason = reason

    # Steps.

    async def _deploy(self, release: Release) -> None:
        record, previous = release.record, release.previous
        try:
            problem, smoke_failed = await self._preload(record)
            if problem:
                if smoke_failed:
                    self._set_verdict(record, pb.ANALYSIS_VERDICT_FAILED, problem)
                await self._fail(record, problem, previous,
                                 cause="smoke_test_failed" if smoke_failed else "preload_failed")
                return
            windows = release.plan.windows()
            if windows:
                stop = await self._analyse(release, windows)
                if self._hub.closed:
                    log.info("deployment %s left in flight by the shutdown", record.id)
                    return
                if stop is not None:
                    await self._abort(release, stop)
                    return
            analysed = await self._judge(release, bool(windows))
            generation = await self._hub.publish(record.skill, StoredRoute(record.id, record.route()))
            release.weight = 100
            await self._pushed(record, generation, 100)
            acks = await self._hub.wait_acked(generation, self._ack_timeout)
            if self._hub.closed:
                # Shutting down: the watch streams ended, so the acknowledgements mean nothing. The next
                # start settles this deployment (Failed, previous route restored).
                log.info("deployment %s left in flight by the shutdown", record.id)
                return
            await self._acked(record, acks)
            if not acks.complete and not windows:
                await self._fail(record, f"route generation {generation} not acknowledged within "
                                         f"{self._ack_timeout:g}s by {', '.join(acks.pending)}", previous,
                                 cause="ack_timeout")
                return
            loaded = len(self._fleet.addresses)
            keep = ""
            if not acks.complete:
                # The analysis passed and every dispatcher already routes to the new version; only the
                # stable fallback's removal is unacknowledged, so the release stands, the previous version
                # stays loaded for dispatchers that may still retry on it.
                keep = f" (still waiting for {', '.join(acks.pending)}: previous version kept loaded)"
            if windows and acks.complete and previous is not None:
                # Before the Active transition, so that watchers (whose stream ends at Active) see it.
                await self._unload_previous(record, previous)
            await self._transition(
                record, ACTIVE, f"preloaded on {loaded} executor{'s' if loaded != 1 else ''}; {analysed}route "
                                f"generation {generation} {acks.describe()}{keep}", final=True)
        except Exception as exc:  # noqa: BLE001 - a rollout must end in a settled state
            log.exception("deployment %s failed unexpectedly", record.id)
            try:
                await self._fail(record, f"internal error: {describe_error(exc)}", previous)
            except Exception:  # noqa: BLE001
                log.exception("deployment %s could not be marked failed; a restart settles it", record.id)
        finally:
            release.analysing = False
            if self._in_flight.get(record.skill) == record.id:
                del self._in_flight[record.skill]
            if self._releases.get(record.skill) is release:
                del self._releases[record.skill]

    async def _judge(self, release: Release, analysed: bool) -> str:
        """The verdict of a release whose windows ended without a breach, for its Active transition's reason.

        Passed only with at least `min_requests` calls of the new version: with fewer, no threshold was ever
        checked (see `breach`), so saying "passed" would claim a judgement that never happened."""
        record, plan = release.record, release.plan
        stats = record.stats or Tally()
        minimum = max(1, plan.thresholds.min_requests)
        if analysed and stats.requests >= minimum:
            reason = f"{plan.describe()} passed ({stats.describe()})"
            self._set_verdict(record, pb.ANALYSIS_VERDICT_PASSED, reason)
            await self._emit(record, f"analysis passed: {stats.describe()}", pb.DEPLOYMENT_EVENT_KIND_ANALYSIS_PASSED,
                             stats=stats.to_proto())
        else:
            why = not_analysed(stats.requests, minimum) if analysed else "not analysed: no bake window"
            reason = f"{why} ({plan.describe()})"
            self._set_verdict(record, pb.ANALYSIS_VERDICT_NOT_ANALYSED, reason)
            await self._emit(record, reason, pb.DEPLOYMENT_EVENT_KIND_NOT_ANALYSED, reason=reason,
                             stats=stats.to_proto())
        await self._store.save_analysis(record)
        return f"{reason}; "

    async def _preload(self, record: DeploymentRecord) -> tuple[str | None, bool]:
        """LoadSkill on every executor at once; the problems (None when every one loaded it), and whether a
        smoke example failed."""
        smoke_failed = False
        self._unloaded.discard(record.digest)

        unreachable: list[str] = []

        async def load(address: str) -> str | None:
            nonlocal smoke_failed
            try:
                already = await self._fleet.load(address, record)
            except grpc.aio.AioRpcError as err:
                problem = f"LoadSkill on {address} failed: {describe_error(err)}"
                info = error_info(err)
                if err.code() == grpc.StatusCode.UNAVAILABLE and (info is None or info.reason == Reason.SHUTTING_DOWN):
                    # The executor is down (not a verdict on the version): the others carry the release;
                    # gateways route around it, and it loads the version on its first call when it is back.
                    unreachable.append(problem)
                    skipped = f"{address} is unreachable, skipped: {describe_error(err)}"
                    await self._emit(record, skipped, pb.DEPLOYMENT_EVENT_KIND_UNSPECIFIED, executor=address,
                                     reason=skipped)
                    return None
                smoke_failed = smoke_failed or Reason.SMOKE_TEST_FAILED in problem
                await self._emit(record, problem, pb.DEPLOYMENT_EVENT_KIND_PRELOAD_FAILED, executor=address,
                                 reason=problem)
                return problem
            await self._emit(record, f"preloaded on {address}{' (already loaded)' if already else ''}",
                             pb.DEPLOYMENT_EVENT_KIND_PRELOADED, executor=address)
            if record.examples:
                count = len(record.examples)
                await self._emit(record, f"{count} smoke example{'s' if count != 1 else ''} passed on {address}",
                                 pb.DEPLOYMENT_EVENT_KIND_SMOKE_PASSED, executor=address, smoke_examples=count)
            return None

        with tracing.span("deployer.preload") as span:
            problems = [p for p in await asyncio.gather(*(load(a) for a in self._fleet.addresses)) if p]
            if unreachable and len(unreachable) == len(self._fleet.addresses):
                problems = unreachable  # no executor at all: the version cannot serve
            if span.is_recording():
                span.set_attributes({"clawhub.skill.digest": record.digest,
                                     "clawhub.executors": len(self._fleet.addresses),
                                     "clawhub.preload.failed": len(problems),
                                     "clawhub.smoke.examples": len(record.examples)})
                if problems:
                    tracing.fail(span, problems[0][:200], str(Reason.SMOKE_TEST_FAILED) if smoke_failed else "")
        return "; ".join(problems) or None, smoke_failed

    async def _analyse(self, release: Release, windows: list[tuple[int, float]]) -> Stop | None:
        """Walk the analysis windows; the reason it ended early, or None when every window passed (or the
        deployer is shutting down: the caller checks)."""
        record = release.record
        stable = release.previous if release.previous is not None and release.previous.state == ACTIVE else None
        record.stats = Tally()
        self._set_verdict(record, pb.ANALYSIS_VERDICT_RUNNING, f"analysing: {release.plan.describe()}")
        await self._store.save_analysis(record)
        release.analysing = True
        watchers = [self._spawn(self._watch_health(release, address)) for address in self._fleet.addresses]
        try:
            for step, (weight, window) in enumerate(windows, start=1):
                generation = await self._hub.publish(
                    record.skill, StoredRoute(record.id, record.release_route(weight, stable)))
                release.weight = weight
                split = f", {stable.version} stable)" if stable else ")"
                await self._pushed(record, generation, weight, f" ({record.version} at {weight}%{split}")
                acks = await self._wait_acked(release, generation)
                if release.stop.done():
                    return release.stop.result()
                if self._hub.closed or acks is None:
                    return None
                await self._acked(record, acks)
                if not acks.complete:
                    return Stop(pb.ANALYSIS_VERDICT_ABORTED, pb.DEPLOYMENT_EVENT_KIND_ROLLBACK_STARTED,
                                f"route generation {generation} not acknowledged within {self._ack_timeout:g}s by "
                                f"{', '.join(acks.pending)}")
                if release.plan.strategy == CANARY:
                    await self._emit(record, f"canary step {step}/{len(windows)}: {record.version} at {weight}% for "
                                       f"{window:g}s", pb.DEPLOYMENT_EVENT_KIND_CANARY_STEP, weight=weight, step=step,
                               steps=len(windows), window=duration(window))
                else:
                    await self._emit(record, f"bake window of {window:g}s started",
                                     pb.DEPLOYMENT_EVENT_KIND_BAKE_STARTED, window=duration(window), weight=weight)
                canary = release.plan.strategy == CANARY
                with tracing.span("deployer.canary_step" if canary else "deployer.bake") as span:
                    if span.is_recording():
                        span.set_attributes({"clawhub.release.weight": weight, "clawhub.release.window_s": window,
                                             "clawhub.release.step": step, "clawhub.release.steps": len(windows)})
                    stop = await self._watch_window(release, weight, window)
                    if stop is not None:
                        tracing.fail(span, stop.reason[:200])
                if stop is not None:
                    return stop
            return None
        finally:
            release.analysing = False
            for watcher in watchers:
                watcher.cancel()

    async def _wait_acked(self, release: Release, generation: int) -> Acks | None:
        """The acknowledgements of `generation`, or None when the analysis was stopped meanwhile."""
        waiting = asyncio.ensure_future(self._hub.wait_acked(generation, self._ack_timeout))
        try:
            pending: list[asyncio.Future[Any]] = [waiting, release.stop]
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        return None if release.stop.done() else waiting.result()

    async def _watch_window(self, release: Release, weight: int, window: float) -> Stop | None:
        """Until the window ends (None) or the analysis is stopped (why), with progress events meanwhile."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        end = started + window
        record = release.record
        while not release.stop.done():
            now = loop.time()
            if now >= end:
                return None
            stats = record.stats or Tally()
            await self._emit(record, f"{weight}% for {now - started:.1f}s/{window:g}s: {stats.describe()}",
                             pb.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS, weight=weight, window=duration(window),
                             elapsed=duration(now - started), stats=stats.to_proto())
            await asyncio.wait({release.stop}, timeout=min(end - now, self._progress_interval))
        return release.stop.result()

    async def _watch_health(self, release: Release, address: str) -> None:
        """Trip the analysis when the executor reports the new version's digest NOT_SERVING while the
        executor itself is SERVING (an executor shutting down turns every name NOT_SERVING: not the
        version's fault)."""
        record = release.record
        while release.analysing and not release.stop.done():
            try:
                async for status in self._fleet.watch_health(address, record.digest):
                    if status != health_pb2.HealthCheckResponse.NOT_SERVING:
                        continue
                    try:
                        overall = await self._fleet.overall_health(address)
                    except grpc.aio.AioRpcError:
                        continue
                    if overall == health_pb2.HealthCheckResponse.SERVING:
                        release.trip(Stop(
                            pb.ANALYSIS_VERDICT_FAILED, pb.DEPLOYMENT_EVENT_KIND_HEALTH_NOT_SERVING,
                            f"executor {address} reports {record.version} ({record.digest[:19]}…) NOT_SERVING",
                            executor=address))
                        return
            except grpc.aio.AioRpcError as err:
                log.debug("health watch of %s on %s broke: %s", record.digest[:19], address, describe_error(err))
            await asyncio.sleep(HEALTH_RETRY_SECONDS)

    async def _abort(self, release: Release, stop: Stop) -> None:
        """Roll a release back after its analysis stopped early: previous route first, then Failed."""
        record = release.record
        self._set_verdict(record, stop.verdict, stop.reason)
        stats = record.stats.to_proto() if record.stats is not None else None
        if stop.kind == pb.DEPLOYMENT_EVENT_KIND_ANALYSIS_BREACH:
            await self._emit(record, stop.reason, stop.kind, reason=stop.reason, stats=stats)
        elif stop.kind == pb.DEPLOYMENT_EVENT_KIND_HEALTH_NOT_SERVING:
            await self._emit(record, stop.reason, stop.kind, reason=stop.reason, executor=stop.executor)
        await self._emit(record, f"rolling back: {stop.reason}", pb.DEPLOYMENT_EVENT_KIND_ROLLBACK_STARTED,
                         reason=stop.reason)
        cause = {pb.DEPLOYMENT_EVENT_KIND_ANALYSIS_BREACH: "analysis_breach",
                 pb.DEPLOYMENT_EVENT_KIND_HEALTH_NOT_SERVING: "health_not_serving"}.get(
            stop.kind, "manual" if stop.reason == MANUAL_ABORT_REASON else "ack_timeout")
        release.restored_generation = await self._fail(record, stop.reason, release.previous, cause=cause)

    async def _fail(self, record: DeploymentRecord, problem: str,
                    previous: DeploymentRecord | None = None, *, unload: bool = True,
                    cause: str = "internal_error") -> int:
        """Deploying → RollingBack → Failed, restoring the previous route if the new one went out; the
        generation that restored it (0 when none did). `cause` labels the rollback (docs/metrics.md)."""
        if record.state == DEPLOYING:
            metrics.rollback_started(cause)
            await self._transition(record, ROLLING_BACK, f"deploy failed: {problem}")
        if previous is None and record.previous_id:
            previous = await self._store.get_deployment(record.previous_id)
        generation = 0
        try:
            with tracing.span("deployer.rollback") as span:
                if span.is_recording():
                    span.set_attributes({"clawhub.deployment": record.id, "clawhub.rollback.cause": problem[:200]})
                outcome, generation = await self._restore(record, previous)
        except Exception as exc:  # noqa: BLE001 - recorded as the reason the rollback failed
            log.exception("rollback of deployment %s failed", record.id)
            outcome = f"rollback failed: {describe_error(exc)}"
        if record.plan is not None or record.verdict != pb.ANALYSIS_VERDICT_UNSPECIFIED:
            await self._store.save_analysis(record)
        # Before the final transition: once the skill is free again, a new deploy may load the same digest.
        if unload:
            await self._unload_unused(record)
        await self._transition(record, FAILED, f"{problem}; {outcome}", final=True)
        return generation

    async def _restore(self, record: DeploymentRecord, previous: DeploymentRecord | None) -> tuple[str, int]:
        """Put the skill's route back as it was before `record`; what happened and the generation."""
        if self._hub.owner(record.skill) != record.id:
            # The new route never went out: whatever served before still does.
            owner = self._hub.owner(record.skill)
            if owner is None:
                return "no version of the skill was serving; route table unchanged", 0
            if previous is not None and owner == previous.id:
                return f"previous version {previous.version} still serving", 0
            return f"route table unchanged (deployment {owner} serves)", 0
        if previous is None or previous.state != ACTIVE:
            generation = await self._hub.publish(record.skill, None)
            await self._pushed(record, generation, 0, " (route removed: no previous version)")
            return f"no previous version: route removed at generation {generation}", generation
        generation = await self._hub.publish(record.skill, StoredRoute(previous.id, previous.route()))
        await self._pushed(record, generation, 0, f" (restoring {previous.version})")
        acks = await self._hub.wait_acked(generation, self._ack_timeout)
        await self._acked(record, acks)
        return (f"previous version {previous.version} restored at route generation {generation}, "
                f"{acks.describe()}", generation)

    async def _unload(self, digest: str) -> list[str]:
        """Best effort: drop a module from every executor; the executors that had it loaded."""

        async def unload(address: str) -> str | None:
            try:
                return address if await self._fleet.unload(address, digest) else None
            except grpc.aio.AioRpcError as err:
                log.warning("UnloadSkill %s on %s failed: %s", digest, address, describe_error(err))
                return None

        return [a for a in await asyncio.gather(*(unload(a) for a in self._fleet.addresses)) if a]

    async def _unload_unused(self, record: DeploymentRecord) -> None:
        """Drop a failed version's module from the executors unless some route still uses it."""
        if record.digest in self._hub.digests() or not self._fleet.addresses:
            return
        await self._unload(record.digest)

    async def _unload_previous(self, record: DeploymentRecord, previous: DeploymentRecord) -> None:
        """After a release passed its analysis and every dispatcher routes without the fallback: free the
        previous version's memory, unless some route still uses it. A later manual rollback loads it again."""
        if previous.digest in self._hub.digests():
            return
        self._unloaded.add(previous.digest)
        for address in await self._unload(previous.digest):
            await self._emit(record, f"unloaded {previous.version} from {address}", pb.DEPLOYMENT_EVENT_KIND_UNLOADED,
                             executor=address)

    async def _reload(self, record: DeploymentRecord) -> None:
        """Best effort: load a rollback target again on every executor unless a route still sends it traffic
        (then it is loaded and the rollback stays one route push). A release may have unloaded it, also
        before a restart of this deployer, which forgets what it unloaded. An executor that cannot still
        loads it on the first call."""
        if record.digest in self._hub.digests() and record.digest not in self._unloaded:
            return
        self._unloaded.discard(record.digest)

        async def load(address: str) -> None:
            try:
                await self._fleet.load(address, record)
            except grpc.aio.AioRpcError as err:
                log.warning("reloading %s on %s for a rollback failed: %s", record.digest, address,
                            describe_error(err))

        await asyncio.gather(*(load(a) for a in self._fleet.addresses))

    async def _rollback(self, current: DeploymentRecord, target: DeploymentRecord, request_id: str,
                        ) -> tuple[DeploymentRecord, int]:
        try:
            await self._transition(current, ROLLING_BACK, f"manual rollback to {target.version}")
            metrics.rollback_started("manual")
            await self._reload(target)
            generation = await self._hub.publish(current.skill, StoredRoute(target.id, target.route()))
            # The rollback counts from here (the route is persisted), whatever happens to the acknowledgements.
            current.rolled_back = RolledBack(target.id, target.version, generation, self._clock())
            await self._store.save_rolled_back(current)
            await self._pushed(current, generation, 0, f" (serving {target.version})")
            acks = await self._hub.wait_acked(generation, self._ack_timeout)
            await self._acked(current, acks)
            if request_id:
                await self._store.save_request("rollback", request_id, target.id, generation)
            await self._transition(
                current, ACTIVE, f"rolled back: {target.version} (deployment {target.id}) serves from route "
                                 f"generation {generation}, {acks.describe()}", final=True)
            return target, generation
        except Exception as exc:
            if current.state == ROLLING_BACK:
                try:
                    await self._transition(current, ACTIVE,
                                           f"rollback to {target.version} failed: {describe_error(exc)}", final=True)
                except Exception:  # noqa: BLE001
                    log.exception("deployment %s could not be settled; a restart settles it", current.id)
            raise
        finally:
            if self._in_flight.get(current.skill) == current.id:
                del self._in_flight[current.skill]
