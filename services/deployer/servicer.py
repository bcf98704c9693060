"""DeployerService: deployments, rollbacks, and the route table stream for dispatchers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import grpc
from clawhub.common.v1 import audit_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as internal_grpc
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as pb_grpc
from google.protobuf.message import Message

from services.deployer.analysis import report_problem
from services.deployer.backends import VersionSource
from services.deployer.events import EventBus
from services.deployer.leader import Leadership, SoleLeader
from services.deployer.membership import Registrations
from services.deployer.model import DeploymentRecord
from services.deployer.plan import Defaults, resolve
from services.deployer.releases import Releaser
from services.deployer.routes import RouteHub
from services.deployer.secrets import REDACTOR
from services.deployer.statemachine import READY, SETTLED, state_name
from services.deployer.store import DeploymentStore
from services.runtime.auth import AuditRecord, authorize, current_principal
from services.runtime.errors import Reason, ServiceError, invalid
from services.runtime.linking import ROOT
from services.runtime.names import skill_name_problem, version_problem
from services.runtime.wasm import env_names

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Applied with fullmatch: `$` would accept a trailing "\n".
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_skill(skill: str, field_name: str = "skill") -> None:
    problem = skill_name_problem(skill)
    if problem:
        raise invalid(Reason.INVALID_NAME, field_name, problem)


def _check_id(deployment_id: str) -> None:
    if not _ID_RE.fullmatch(deployment_id):
        problem = ("a deployment id is required" if not deployment_id
                   else f"{deployment_id[:80]!r} is not a deployment id")
        raise invalid(Reason.INVALID_ARGUMENT, "id", problem)


MAX_ENV_VALUE_BYTES = 32 * 1024


def narrowed_capabilities(skill: str, version: str, capabilities: list[str], http_allow: list[str]) -> list[str]:
    """The manifest's capabilities with its `http:HOST` ones narrowed to `http_allow` (all of them when it is
    empty); a listed one the manifest does not declare is refused: a deployment can take away, never add."""
    if not http_allow:
        return capabilities
    declared = {c for c in capabilities if c.startswith("http:")}
    if unknown := sorted(set(http_allow) - declared):
        shown = ", ".join(sorted(declared)) or "none"
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT,
            f"http_allow names {', '.join(unknown)}, which {skill}@{version} does not declare (its http "
            f"capabilities: {shown}); a deployment can only narrow what the manifest declares",
            metadata={"skill": skill, "version": version}, field_violations=[("http_allow", "not declared")])
    allowed = set(http_allow)
    return [c for c in capabilities if not c.startswith("http:") or c in allowed]


def _check_env(skill: str, version: str, env: dict[str, str], capabilities: Sequence[str]) -> None:
    """INVALID_ARGUMENT naming every `env[KEY]` the manifest does not declare as `env:KEY`, or whose value is
    unusable. Messages name keys, never values (they may be secrets)."""
    declared = env_names(capabilities)
    problems: list[tuple[str, str]] = []
    for key in sorted(env):
        value = env[key]
        if key not in declared:
            offer = f"it declares {', '.join(declared)}" if declared else "it declares no environment variables"
            problems.append((f"env[{key}]", f"{skill}@{version} does not declare the capability env:{key} ({offer}); "
                                            "a skill gets only the variables its manifest names"))
        elif "\0" in value:
            problems.append((f"env[{key}]", "the value contains a NUL character"))
        elif len(value.encode()) > MAX_ENV_VALUE_BYTES:
            problems.append((f"env[{key}]", f"the value is longer than {MAX_ENV_VALUE_BYTES} bytes"))
    if problems:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT,
                           "; ".join(f"{f}: {p}" for f, p in problems),
                           metadata={"field": problems[0][0], "skill": skill, "version": version},
                           field_violations=problems)


def _not_found(deployment_id: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, Reason.DEPLOYMENT_NOT_FOUND,
                        f"no deployment {deployment_id}", metadata={"id": deployment_id})


def encode_page_token(skill: str, before_seq: int) -> str:
    raw = json.dumps({"v": 1, "skill": skill, "before": before_seq}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, skill: str) -> int:
    """The sequence number the page starts below; INVALID_PAGE_TOKEN if the token is not ours or was
    issued for another filter (AIP-158)."""
    bad = invalid(Reason.INVALID_PAGE_TOKEN, "page_token",
                  "the page token is not one this deployer issued for this request; start without one")
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(data, dict) or data.get("v") != 1 or data.get("skill") != skill:
        raise bad
    before = data.get("before")
    if not isinstance(before, int) or isinstance(before, bool) or before < 1:
        raise bad
    return before


_M = TypeVar("_M", bound=Message)


def _masked(response: _M) -> _M:
    """`response` with every known env value replaced by `[redacted]` in its text (reasons, messages): a
    Deployment carries env names only, but a failure's text may quote a value (a smoke example that printed
    it). The deployer's public responses all pass through here; only the internal route feed carries values."""
    return REDACTOR.redact_message(response)


# How long a WatchDeployment stream waits for an event before it re-reads the deployment.
WATCH_RECHECK_SECONDS = 1.0


class DeployerServicer(pb_grpc.DeployerServiceServicer, internal_grpc.DeployerInternalServiceServicer):
    def __init__(self, store: DeploymentStore, hub: RouteHub, events: EventBus, releaser: Releaser,
                 registry: VersionSource, *, registry_timeout: float, defaults: Defaults | None = None,
                 leadership: Leadership | None = None) -> None:
        self._store = store
        # Writes and the dispatchers' feeds only on the leading replica (services/deployer/leader.py).
        self._leadership = leadership or SoleLeader("deployer")
        self._defaults = defaults or Defaults()
        self._hub = hub
        self._events = events
        self._releaser = releaser
        self._registry = registry
        self._registry_timeout = registry_timeout

    async def _get(self, deployment_id: str) -> DeploymentRecord:
        _check_id(deployment_id)
        record = await self._store.get_deployment(deployment_id)
        if record is None:
            raise _not_found(deployment_id)
        return record

    async def CreateDeployment(self, request: pb.CreateDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any],
                               ) -> pb.CreateDeploymentResponse:
        self._leadership.require("deploying")
        _check_skill(request.skill)
        problem = version_problem(request.version)
        if problem:
            raise invalid(Reason.INVALID_VERSION, "version", problem)
        plan = resolve(request, self._defaults)
        if request.request_id:
            found = await self._releaser.find_request("create", request.request_id)
            if found is not None and (found[0].skill, found[0].version, found[0].requested_env()) == (
                    request.skill, request.version, dict(request.env)):
                return _masked(pb.CreateDeploymentResponse(deployment=self._releaser.to_proto(found[0])))
        remaining = context.time_remaining()
        timeout = min(self._registry_timeout, remaining if remaining is not None else math.inf)
        version = await self._registry.get_skill_version(request.skill, request.version, timeout=timeout)
        if version.state != READY:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_NOT_READY,
                f"{request.skill}@{request.version} is {state_name(version.state)}, not Ready; only a "
                "version that passed verification can be deployed",
                metadata={"skill": request.skill, "version": request.version,
                          "state": state_name(version.state)})
        manifest = version.manifest
        if manifest.abi == skill_pb2.ABI_LIBRARY_V1:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, Reason.NOT_DEPLOYABLE,
                f"{request.skill}@{request.version} is a library (ABI_LIBRARY_V1): it is linked into the skills "
                "that depend on it and cannot be deployed on its own; deploy a skill that imports it",
                metadata={"skill": request.skill, "version": request.version})
        _check_env(request.skill, request.version, dict(request.env), manifest.capabilities)
        capabilities = narrowed_capabilities(request.skill, request.version, list(manifest.capabilities),
                                             list(request.http_allow))
        if request.WhichOneof("strategy") == "canary":
            await self._check_canary_possible(request.skill, request.version, version.digest)
        dependencies = await self._pin_dependencies(request.skill, request.version, manifest, timeout)
        record = await self._releaser.start_deployment(
            request.skill, request.version, version.digest, manifest.limits, request.request_id, plan=plan,
            env=dict(request.env), args=list(manifest.args), bundle_digest=version.bundle_digest,
            capabilities=capabilities, examples=list(manifest.examples),
            dependencies=dependencies, declared_env=env_names(manifest.capabilities),
            allow_unset_env=request.allow_unset_env, input_schema=manifest.input_schema,
            cache_ttl_ms=manifest.cache_ttl.ToMilliseconds() if manifest.HasField("cache_ttl") else None)
        return _masked(pb.CreateDeploymentResponse(deployment=self._releaser.to_proto(record)))

    async def _check_canary_possible(self, skill: str, version: str, digest: str) -> None:
        """A canary splits traffic and stats by module digest: a redeploy of the module that serves now
        (new env or limits) cannot be told apart from it, so it has to go blue-green."""
        owner = self._hub.owner(skill)
        serving = await self._store.get_deployment(owner) if owner else None
        if serving is not None and serving.digest == digest:
            same = ("is the version serving now" if serving.version == version
                    else f"has the same module as {serving.version}, which serves now")
            problem = (f"{skill}@{version} {same} ({digest[:19]}…); a canary splits traffic and stats by module, so "
                       "it cannot compare a module with itself. To roll out new env values or limits of this module, "
                       "deploy it blue-green (leave out --canary / the canary field); to canary a change, publish a "
                       "new version with a changed module and canary that")
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT, problem,
                               metadata={"field": "canary", "skill": skill, "version": version,
                                         "serving_version": serving.version},
                               field_violations=[("canary", "a canary needs a module other than the one serving")])

    async def _pin_dependencies(self, skill: str, version: str, manifest: skill_pb2.Manifest,
                                timeout: float) -> list[skill_pb2.ResolvedDependency]:
        """The version's dependency resolution as of now, pinned in the deployment so that a dependency
        published later never changes what runs; the skill itself is `(root)` in `required_by`."""
        if not manifest.dependencies:
            return []
        resolved = await self._registry.resolve_dependencies(skill, version, timeout=timeout)
        itself = f"{skill}@{version}"
        for dependency in resolved:
            required_by = [ROOT if r == itself else r for r in dependency.required_by]
            del dependency.required_by[:]
            dependency.required_by.extend(required_by)
        return resolved

    @staticmethod
    def _check_scope(record: DeploymentRecord, permission: str) -> None:
        """A deployment read by id: the caller's scopes must cover its skill (the gateway could not tell which
        skill an id is for)."""
        principal = current_principal()
        if principal is not None and principal.scopes is not None:
            authorize(principal, permission, record.skill)

    async def GetDeployment(self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any],
                            ) -> pb.GetDeploymentResponse:
        record = await self._get(request.id)
        self._check_scope(record, "deployments.read")
        return _masked(pb.GetDeploymentResponse(deployment=self._releaser.to_proto(record)))

    async def ListDeployments(self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext[Any, Any],
                              ) -> pb.ListDeploymentsResponse:
        if request.skill:
            _check_skill(request.skill)
        if request.page_size < 0:
            raise invalid(Reason.INVALID_ARGUMENT, "page_size", "page_size must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = decode_page_token(request.page_token, request.skill) if request.page_token else None
        # One extra row tells whether another page follows.
        records = await self._store.list_deployments(request.skill, before, size + 1)
        token = encode_page_token(request.skill, records[size - 1].seq) if len(records) > size else ""
        return _masked(pb.ListDeploymentsResponse(
            deployments=[self._releaser.to_proto(r) for r in records[:size]], next_page_token=token))

    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext[Any, Any],
                       ) -> pb.RollbackResponse:
        self._leadership.require("rolling back")
        _check_skill(request.skill)
        record, generation = await self._releaser.rollback(request.skill, request.request_id)
        fresh = await self._store.get_deployment(record.id) or record
        return _masked(pb.RollbackResponse(deployment=self._releaser.to_proto(fresh), generation=generation))

    async def WatchDeployment(self, request: pb.WatchDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any],
                              ) -> AsyncIterator[pb.WatchDeploymentResponse]:
        _check_id(request.id)
        # Subscribe before reading the log: the releaser logs an event before it publishes it, so each event is
        # in the log read below or in the queue (or both: the sequence numbers drop what was already sent).
        queue = self._events.subscribe(request.id)
        try:
            record = await self._get(request.id)
            self._check_scope(record, "deployments.watch")
            logged = await self._store.list_events(request.id)
            yield _masked(pb.WatchDeploymentResponse(deployment=self._releaser.to_proto(record),
                                                     message=f"currently {state_name(record.state)}"))
            sent = 0
            for response in logged:
                yield _masked(response)
                sent = response.sequence
            # The log was read after the record: its last event is at least as new (a deployment from before
            # the log existed has none, and its record says).
            state = logged[-1].deployment.state if logged else record.state
            if state in SETTLED:
                return
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=WATCH_RECHECK_SECONDS)
                except TimeoutError:
                    # A quiet stream reads the stored log now and then: on a standby the events of the leader's
                    # release arrive only there, and should one ever be missed here, the watcher gets it still.
                    for response in await self._store.list_events(request.id):
                        if response.sequence > sent:
                            sent = response.sequence
                            yield _masked(response)
                            if response.deployment.state in SETTLED:
                                return
                    # And re-reads the record: a deployment whose log ends early still ends for its watcher.
                    record = await self._get(request.id)
                    if record.state in SETTLED:
                        yield _masked(pb.WatchDeploymentResponse(deployment=self._releaser.to_proto(record),
                                                                 message=f"ended {state_name(record.state)}"))
                        return
                    continue
                if event is None:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN,
                                       "the deployer is shutting down; watch the deployment again",
                                       metadata={"id": request.id}, retry_after_seconds=0.5)
                # Events queued before the log was read were replayed from it already.
                if event.sequence <= sent:
                    continue
                sent = event.sequence
                yield _masked(event)
                if event.deployment.state in SETTLED:
                    return
        finally:
            self._events.unsubscribe(request.id, queue)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext[Any, Any],
                              ) -> pb.ListAuditEventsResponse:
        if request.page_size < 0:
            raise invalid(Reason.INVALID_ARGUMENT, "page_size", "page_size must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = None
        if request.page_token:
            try:
                before = int(base64.urlsafe_b64decode(request.page_token.encode()).decode().removeprefix("audit/"))
            except (ValueError, binascii.Error, UnicodeError):
                raise invalid(Reason.INVALID_PAGE_TOKEN, "page_token",
                              "the page token is not one this deployer issued; start without one") from None
        rows = await self._store.list_audit(before, size + 1)
        events = []
        for seq, time_ns, principal, method, target, request_id, outcome in rows[:size]:
            event = audit_pb2.AuditEvent(sequence=seq, principal=principal, method=method, target=target,
                                         request_id=request_id, outcome=outcome, service="deployer")
            event.time.FromNanoseconds(time_ns)
            events.append(event)
        token = base64.urlsafe_b64encode(f"audit/{rows[size - 1][0]}".encode()).decode() if len(rows) > size else ""
        return pb.ListAuditEventsResponse(events=events, next_page_token=token)

    async def record_audit(self, event: AuditRecord) -> None:
        await self._store.append_audit(event.time_ns, event.principal, event.method, event.target,
                                       event.request_id, event.outcome)

    async def WatchRoutes(self, request: internal_pb.WatchRoutesRequest, context: grpc.aio.ServicerContext[Any, Any],
                          ) -> AsyncIterator[internal_pb.WatchRoutesResponse]:
        self._leadership.require("the route feed")
        async for table in self._hub.watch(request.dispatcher_id):
            executors = self._hub.executors
            yield internal_pb.WatchRoutesResponse(
                route_table=table,
                executors=internal_pb.ExecutorSet(addresses=executors) if executors is not None else None)

    async def AcknowledgeRoutes(self, request: internal_pb.AcknowledgeRoutesRequest,
                                context: grpc.aio.ServicerContext[Any, Any]) -> internal_pb.AcknowledgeRoutesResponse:
        self._leadership.require("acknowledging routes")
        if not request.dispatcher_id:
            raise invalid(Reason.INVALID_ARGUMENT, "dispatcher_id",
                          "dispatcher_id is required: the id the dispatcher gave to WatchRoutes")
        self._hub.acknowledge(request.dispatcher_id, request.generation)
        return internal_pb.AcknowledgeRoutesResponse()

    # Set by the composition root (services/deployer/membership.py keeps the leases).
    registrations: Registrations | None = None

    async def RegisterExecutor(self, request: internal_pb.RegisterExecutorRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> internal_pb.RegisterExecutorResponse:
        assert self.registrations is not None, "set by build_server"
        return await self.registrations.register(request)

    async def DeregisterExecutor(self, request: internal_pb.DeregisterExecutorRequest,
                                 context: grpc.aio.ServicerContext[Any, Any],
                                 ) -> internal_pb.DeregisterExecutorResponse:
        assert self.registrations is not None, "set by build_server"
        return await self.registrations.deregister(request)

    async def ReportStats(self, request: internal_pb.ReportStatsRequest, context: grpc.aio.ServicerContext[Any, Any],
                          ) -> internal_pb.ReportStatsResponse:
        self._leadership.require("release analysis")
        problem = report_problem(request)
        if problem is not None:
            raise invalid(Reason.INVALID_ARGUMENT, *problem)
        await self._releaser.report_stats(request)
        return internal_pb.ReportStatsResponse()
