"""Rollouts and rollbacks: the release state machine driven through preload, route push and acknowledgements.

One operation per skill at a time (a deploy or a manual rollback): a second one is refused with
DEPLOYMENT_IN_PROGRESS. Rollouts run as background tasks owned by the `Releaser`; a deployer stopped in the
middle leaves them Deploying/RollingBack in the store, and `settle()` resolves them on the next start.

The rollout steps are kept separate (preload, push, acknowledge) so that later steps (per-digest health,
smoke examples, a bake window, canary weights) slot in between them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
from clawhub.common.v1 import skill_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as pb

from services.deployer.backends import ExecutorFleet, describe_error
from services.deployer.events import EventBus
from services.deployer.model import DeploymentRecord, Transition, new_deployment_id
from services.deployer.routes import RouteHub
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
from services.deployer.store import DeploymentStore, StoredRoute
from services.runtime.errors import Reason, ServiceError, invalid

log = logging.getLogger("clawhub.deployer")

RESTART_REASON = "deployer restarted mid-deploy"

T = TypeVar("T")


def in_progress(skill: str, deployment_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPLOYMENT_IN_PROGRESS,
        f"deployment {deployment_id} of {skill} is still in flight; watch it with WatchDeployment and "
        "try again when it ends", metadata={"skill": skill, "deployment_id": deployment_id})


class Releaser:
    """Runs deployments and rollbacks of skills against the store, the route hub and the executors."""

    def __init__(self, store: DeploymentStore, hub: RouteHub, events: EventBus, fleet: ExecutorFleet, *,
                 ack_timeout: float, clock: Callable[[], int] = time.time_ns) -> None:
        self._store = store
        self._hub = hub
        self._events = events
        self._fleet = fleet
        self._ack_timeout = ack_timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        # Skill → id of the deployment whose rollout or rollback is running.
        self._in_flight: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # Views.

    def is_serving(self, record: DeploymentRecord) -> bool:
        return self._hub.owner(record.skill) == record.id

    def to_proto(self, record: DeploymentRecord) -> pb.Deployment:
        return record.to_proto(serving=self.is_serving(record))

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
        if record.env != env:
            raise invalid(Reason.INVALID_ARGUMENT, "request_id",
                          f"request_id {request_id!r} was already used to deploy {skill}@{version} with other "
                          f"env values (deployment {record.id})")
        return record

    async def start_deployment(self, skill: str, version: str, digest: str, limits: skill_pb2.Limits,
                               request_id: str = "", *, env: dict[str, str] | None = None,
                               args: Sequence[str] = (), bundle_digest: str = "",
                               capabilities: Sequence[str] = (),
                               examples: Sequence[skill_pb2.SmokeExample] = ()) -> DeploymentRecord:
        """Create a deployment in state Deploying and start its rollout in the background.

        `env` holds the values for the skill's `env:NAME` capabilities (checked by the caller); they are
        persisted with the deployment and go out with its route, and are never logged.
        With a `request_id` seen before, returns that deployment instead (an idempotent retry).
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
            now = self._clock()
            check_transition(READY, DEPLOYING)
            replacing = f", replacing {previous.version}" if previous else ""
            # Names only: the values may be secrets.
            with_env = f" with env {', '.join(sorted(env))}" if env else ""
            record = DeploymentRecord(
                id=new_deployment_id(), skill=skill, version=version, digest=digest, limits=limits,
                state=DEPLOYING, history=[Transition(READY, DEPLOYING, now, f"deploy of {version} requested"
                                                                              f"{with_env}{replacing}")],
                previous_id=previous.id if previous else "",
                previous_version=previous.version if previous else "",
                create_ns=now, update_ns=now, env=env, args=list(args), bundle_digest=bundle_digest,
                capabilities=list(capabilities), examples=list(examples))
            await self._store.create_deployment(record, request_id)
            self._in_flight[skill] = record.id
        self._spawn(self._deploy(record, previous))
        return record

    async def rollback(self, skill: str, request_id: str = "") -> tuple[DeploymentRecord, int]:
        """Send the skill's traffic back to the deployment that served before the current one.

        The current deployment goes Active → RollingBack → Active (no longer serving), with the reasons in
        its history; the previous one, still Active, serves again from a new route generation. The rollback
        counts once the generation is persisted: dispatchers that do not acknowledge it within the ack
        timeout get it when they reconnect, and it is not undone (going back to the version the operator
        is rolling away from would be worse). Returns the serving deployment and the generation.
        """
        if request_id:
            found = await self.find_request("rollback", request_id)
            if found is not None:
                return found
        async with self._lock:
            if skill in self._in_flight:
                raise in_progress(skill, self._in_flight[skill])
            owner = self._hub.owner(skill)
            current = await self._store.get_deployment(owner) if owner else None
            if current is None:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.SKILL_NOT_DEPLOYED,
                                   f"skill {skill} is not deployed, so there is nothing to roll back",
                                   metadata={"skill": skill})
            target = await self._store.get_deployment(current.previous_id) if current.previous_id else None
            if target is None or target.state != ACTIVE:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_PREVIOUS_VERSION,
                    f"{skill}@{current.version} (deployment {current.id}) has no previous version to roll "
                    "back to", metadata={"skill": skill, "version": current.version})
            self._in_flight[skill] = current.id
        # Shielded: a caller that gives up (deadline, cancel) must not leave the skill half rolled back.
        task = self._spawn(self._rollback(current, target, request_id))
        return await asyncio.shield(task)

    async def settle(self) -> None:
        """Resolve every deployment a previous run left in flight (call before serving).

        A rollout is not resumed: the deployment ends Failed ("deployer restarted mid-deploy") and, if its
        route had already been pushed, the previous version's route is restored (it is still loaded on
        the executors), so no route points at a failed deployment. An interrupted manual rollback ends
        Active again, with the route table as it was persisted.
        """
        for record in await self._store.in_flight():
            try:
                if record.state == ROLLING_BACK and record.entered_from() == ACTIVE:
                    serving = "route kept as persisted"
                    owner = self._hub.owner(record.skill)
                    if owner and owner != record.id:
                        serving = f"route kept: deployment {owner} serves"
                    await self._transition(record, ACTIVE, f"deployer restarted mid-rollback; {serving}",
                                           final=True)
                    continue
                # No unloading here: the deployer's start must not wait for executors.
                await self._fail(record, RESTART_REASON, unload=False)
            except Exception:  # noqa: BLE001 - settle the others; this one stays for the next start
                log.exception("could not settle deployment %s", record.id)

    async def close(self) -> None:
        """Cancel running rollouts (a restart settles them) and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # Steps.

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
        await self._store.add_transition(record.id, transition)
        if final and self._in_flight.get(record.skill) == record.id:
            del self._in_flight[record.skill]
        log.info("deployment %s (%s@%s): %s → %s: %s", record.id, record.skill, record.version,
                 state_name(transition.from_state), state_name(to_state), reason)
        self._emit(record, f"{state_name(transition.from_state)} → {state_name(to_state)}: {reason}")

    def _emit(self, record: DeploymentRecord, message: str) -> None:
        self._events.publish(pb.WatchDeploymentResponse(deployment=self.to_proto(record), message=message))

    async def _deploy(self, record: DeploymentRecord, previous: DeploymentRecord | None) -> None:
        try:
            problem = await self._preload(record)
            if problem:
                await self._fail(record, problem, previous)
                return
            generation = await self._hub.publish(record.skill, StoredRoute(record.id, record.route()))
            self._emit(record, f"route generation {generation} pushed")
            acks = await self._hub.wait_acked(generation, self._ack_timeout)
            if self._hub.closed:
                # Shutting down: the watch streams ended, so the acknowledgements mean nothing. The next
                # start settles this deployment (Failed, previous route restored).
                log.info("deployment %s left in flight by the shutdown", record.id)
                return
            self._emit(record, acks.describe())
            if not acks.complete:
                await self._fail(record, f"route generation {generation} not acknowledged within "
                                         f"{self._ack_timeout:g}s by {', '.join(acks.pending)}", previous)
                return
            loaded = len(self._fleet.addresses)
            await self._transition(
                record, ACTIVE, f"preloaded on {loaded} executor{'s' if loaded != 1 else ''}; route "
                                f"generation {generation} {acks.describe()}", final=True)
        except Exception as exc:  # noqa: BLE001 - a rollout must end in a settled state
            log.exception("deployment %s failed unexpectedly", record.id)
            try:
                await self._fail(record, f"internal error: {exc}", previous)
            except Exception:  # noqa: BLE001
                log.exception("deployment %s could not be marked failed; a restart settles it", record.id)
        finally:
            if self._in_flight.get(record.skill) == record.id:
                del self._in_flight[record.skill]

    async def _preload(self, record: DeploymentRecord) -> str | None:
        """LoadSkill on every executor at once; the problems, or None when every one loaded it."""

        async def load(address: str) -> str | None:
            try:
                already = await self._fleet.load(address, record)
            except grpc.aio.AioRpcError as err:
                problem = f"LoadSkill on {address} failed: {describe_error(err)}"
                self._emit(record, problem)
                return problem
            self._emit(record, f"preloaded on {address}{' (already loaded)' if already else ''}")
            return None

        problems = [p for p in await asyncio.gather(*(load(a) for a in self._fleet.addresses)) if p]
        return "; ".join(problems) or None

    async def _fail(self, record: DeploymentRecord, problem: str,
                    previous: DeploymentRecord | None = None, *, unload: bool = True) -> None:
        """Deploying → RollingBack → Failed, restoring the previous route if the new one went out."""
        if record.state == DEPLOYING:
            await self._transition(record, ROLLING_BACK, f"deploy failed: {problem}")
        if previous is None and record.previous_id:
            previous = await self._store.get_deployment(record.previous_id)
        try:
            outcome = await self._restore(record, previous)
        except Exception as exc:  # noqa: BLE001 - recorded as the reason the rollback failed
            log.exception("rollback of deployment %s failed", record.id)
            outcome = f"rollback failed: {exc}"
        # Before the final transition: once the skill is free again, a new deploy may load the same digest.
        if unload:
            await self._unload_unused(record)
        await self._transition(record, FAILED, f"{problem}; {outcome}", final=True)

    async def _restore(self, record: DeploymentRecord, previous: DeploymentRecord | None) -> str:
        """Put the skill's route back as it was before `record`; describes what happened."""
        if self._hub.owner(record.skill) != record.id:
            # The new route never went out: whatever served before still does.
            owner = self._hub.owner(record.skill)
            if owner is None:
                return "no version of the skill was serving; route table unchanged"
            if previous is not None and owner == previous.id:
                return f"previous version {previous.version} still serving"
            return f"route table unchanged (deployment {owner} serves)"
        if previous is None or previous.state != ACTIVE:
            generation = await self._hub.publish(record.skill, None)
            self._emit(record, f"route generation {generation} pushed (route removed: no previous version)")
            return f"no previous version: route removed at generation {generation}"
        generation = await self._hub.publish(record.skill, StoredRoute(previous.id, previous.route()))
        self._emit(record, f"route generation {generation} pushed (restoring {previous.version})")
        acks = await self._hub.wait_acked(generation, self._ack_timeout)
        self._emit(record, acks.describe())
        return f"previous version {previous.version} restored at route generation {generation}, {acks.describe()}"

    async def _unload_unused(self, record: DeploymentRecord) -> None:
        """Best effort: drop a failed version's module from the executors unless some route still uses it."""
        if record.digest in self._hub.digests() or not self._fleet.addresses:
            return

        async def unload(address: str) -> None:
            try:
                await self._fleet.unload(address, record.digest)
            except grpc.aio.AioRpcError as err:
                log.warning("UnloadSkill %s on %s failed: %s", record.digest, address, describe_error(err))

        await asyncio.gather(*(unload(a) for a in self._fleet.addresses))

    async def _rollback(self, current: DeploymentRecord, target: DeploymentRecord, request_id: str,
                        ) -> tuple[DeploymentRecord, int]:
        try:
            await self._transition(current, ROLLING_BACK, f"manual rollback to {target.version}")
            generation = await self._hub.publish(current.skill, StoredRoute(target.id, target.route()))
            self._emit(current, f"route generation {generation} pushed (serving {target.version})")
            acks = await self._hub.wait_acked(generation, self._ack_timeout)
            self._emit(current, acks.describe())
            if request_id:
                await self._store.save_request("rollback", request_id, target.id, generation)
            await self._transition(
                current, ACTIVE, f"rolled back: {target.version} (deployment {target.id}) serves from route "
                                 f"generation {generation}, {acks.describe()}", final=True)
            return target, generation
        except Exception as exc:
            if current.state == ROLLING_BACK:
                try:
                    await self._transition(current, ACTIVE, f"rollback to {target.version} failed: {exc}",
                                           final=True)
                except Exception:  # noqa: BLE001
                    log.exception("deployment %s could not be settled; a restart settles it", current.id)
            raise
        finally:
            if self._in_flight.get(current.skill) == current.id:
                del self._in_flight[current.skill]
