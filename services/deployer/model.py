"""The deployer's records: deployments with their transition history, and how one becomes a route."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from clawhub.common.v1 import release_pb2, routing_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from google.protobuf import timestamp_pb2

from services.deployer.plan import Plan
from services.deployer.statemachine import State, check_transition
from services.runtime.wasm import env_names

if TYPE_CHECKING:
    from services.deployer.analysis import Tally

Verdict: TypeAlias = pb.AnalysisVerdict.ValueType


def new_deployment_id() -> str:
    """16 lowercase hex digits: short enough to type, 64 random bits."""
    return secrets.token_hex(8)


def env_digest(env: dict[str, str]) -> str:
    """A hash of a deployment's env values that changes whenever they do (the gateway's result cache keys on
    it) yet reveals nothing about them, though operators see it in the route table: an HMAC under a random
    key made for the deployment and dropped, so no one can test guesses of a secret against it."""
    canonical = json.dumps(sorted(env.items()), separators=(",", ":")).encode("utf-8", errors="surrogatepass")
    return "hmac-sha256:" + hmac.new(secrets.token_bytes(32), canonical, hashlib.sha256).hexdigest()


def timestamp(time_ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time_ns)
    return ts


@dataclass(frozen=True)
class Transition:
    """One persisted step of the release state machine."""

    from_state: State
    to_state: State
    time_ns: int
    reason: str

    def to_proto(self) -> release_pb2.StateTransition:
        return release_pb2.StateTransition(from_state=self.from_state, to_state=self.to_state,
                                           time=timestamp(self.time_ns), reason=self.reason)


@dataclass(frozen=True)
class RolledBack:
    """A manual rollback that moved a deployment's traffic back to the deployment before it."""

    deployment_id: str
    version: str
    generation: int
    time_ns: int

    def to_proto(self) -> pb.RolledBack:
        return pb.RolledBack(deployment_id=self.deployment_id, version=self.version, generation=self.generation,
                             time=timestamp(self.time_ns))

    def to_json(self) -> str:
        return json.dumps({"deployment_id": self.deployment_id, "version": self.version,
                           "generation": self.generation, "time_ns": self.time_ns})

    @classmethod
    def from_json(cls, text: str) -> RolledBack | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(str(data["deployment_id"]), str(data["version"]), int(data["generation"]), int(data["time_ns"]))


@dataclass
class DeploymentRecord:
    """One rollout of one version of a skill. `serving` is not stored here: the route table decides it."""

    id: str
    skill: str
    version: str
    digest: str
    limits: skill_pb2.Limits
    state: State
    history: list[Transition]
    # The deployment that served when this one was created: what a rollback goes back to.
    previous_id: str
    previous_version: str
    create_ns: int
    update_ns: int
    # Insertion order in the store (newest first listing, page tokens); 0 until stored.
    seq: int = field(default=0, compare=False)
    # What the skill gets in its sandbox: environment values set at deploy time for its `env:NAME`
    # capabilities (may be secrets: never logged), the manifest's args, its file bundle and capabilities.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    args: list[str] = field(default_factory=list)
    bundle_digest: str = ""
    capabilities: list[str] = field(default_factory=list)
    # The dependency packages the skill is linked with, pinned when the deployment was created.
    dependencies: list[skill_pb2.ResolvedDependency] = field(default_factory=list)
    # The manifest's smoke examples, run by each executor on preload. Only needed while deploying, so not
    # stored: a deployer restarted mid-deploy settles the deployment instead of resuming it.
    examples: list[skill_pb2.SmokeExample] = field(default_factory=list, compare=False, repr=False)
    # How the release rolls out (None for deployments made before plans existed), the analysis verdict and
    # its reason, and the new version's stats during the release.
    plan: Plan | None = None
    verdict: Verdict = pb.ANALYSIS_VERDICT_UNSPECIFIED
    verdict_reason: str = ""
    stats: Tally | None = field(default=None, compare=False)
    # The env names whose values were kept from the deployment serving when this one was created (the request
    # left them out): an idempotent retry is compared with what was asked, not with what was kept.
    inherited_env: list[str] = field(default_factory=list)
    # Set once a manual rollback took the traffic from this deployment.
    rolled_back: RolledBack | None = None
    # The manifest's input_schema ('' for none), carried in the route target for the gateway; None for a
    # deployment made before targets carried it (the gateway asks the registry).
    input_schema: str | None = field(default=None, repr=False)
    # The manifest's cache TTL in milliseconds, carried in the route target for the gateway's result cache;
    # None when the version declares none (or was deployed before targets carried it): never cached.
    cache_ttl_ms: int | None = None
    # HMAC-SHA256 of the env values under a random key (env_digest()): in the route target, part of the
    # gateway's cache key; '' for deployments made before.
    env_digest: str = field(default="", repr=False)

    def requested_env(self) -> dict[str, str]:
        """The env values the CreateDeployment request gave (without those kept from the previous deployment)."""
        return {k: v for k, v in self.env.items() if k not in self.inherited_env}

    def unset_env(self) -> list[str]:
        """Declared `env:NAME` variables with no value (deployed with allow_unset_env), sorted."""
        return sorted(set(env_names(self.capabilities)) - set(self.env))

    def apply(self, to_state: State, reason: str, time_ns: int) -> Transition:
        """Move to `to_state` if the state machine allows it; returns the transition to persist."""
        check_transition(self.state, to_state, deployment_id=self.id)
        transition = Transition(self.state, to_state, time_ns, reason)
        self.state = to_state
        self.history.append(transition)
        self.update_ns = time_ns
        return transition

    def entered_from(self) -> State | None:
        """The state this deployment was in before its current one."""
        return self.history[-1].from_state if self.history else None

    def to_proto(self, *, serving: bool, traffic_weight: int = 0) -> pb.Deployment:
        deployment = pb.Deployment(
            id=self.id, skill=self.skill, version=self.version, digest=self.digest, state=self.state,
            history=[t.to_proto() for t in self.history], previous_version=self.previous_version,
            serving=serving, create_time=timestamp(self.create_ns), update_time=timestamp(self.update_ns),
            traffic_weight=traffic_weight, verdict=self.verdict, verdict_reason=self.verdict_reason,
            dependencies=self.dependencies, unset_env=self.unset_env(), inherited_env=sorted(self.inherited_env),
        )
        if self.rolled_back is not None:
            deployment.rolled_back.CopyFrom(self.rolled_back.to_proto())
        if self.plan is not None:
            self.plan.fill(deployment)
        if self.stats is not None:
            deployment.stats.CopyFrom(self.stats.to_proto())
        return deployment

    def target(self, weight: int = 100,
               role: routing_pb2.RouteTargetRole.ValueType = routing_pb2.ROUTE_TARGET_ROLE_UNSPECIFIED,
               ) -> routing_pb2.RouteTarget:
        """This deployment's version as a route target."""
        target = routing_pb2.RouteTarget(
            version=self.version, digest=self.digest, weight=weight, limits=self.limits, env=self.env,
            args=self.args, bundle_digest=self.bundle_digest, capabilities=self.capabilities, role=role,
            dependencies=self.dependencies)
        if self.input_schema is not None:
            target.input_schema = self.input_schema
        if self.cache_ttl_ms is not None:
            target.cache_ttl.FromMilliseconds(self.cache_ttl_ms)
        target.env_digest = self.env_digest
        return target

    def route(self) -> routing_pb2.Route:
        """The route that sends all of the skill's traffic to this deployment's version."""
        return routing_pb2.Route(skill=self.skill, targets=[self.target()])

    def release_route(self, weight: int, stable: DeploymentRecord | None) -> routing_pb2.Route:
        """The route of a release under analysis: this version (the candidate) at `weight` percent, and the
        stable version with the rest (at 0 it only takes the retries of the candidate's failed calls)."""
        targets = [self.target(weight, routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE)]
        if stable is not None and stable.digest != self.digest:
            targets.append(stable.target(100 - weight, routing_pb2.ROUTE_TARGET_ROLE_STABLE))
        return routing_pb2.Route(skill=self.skill, targets=targets)
