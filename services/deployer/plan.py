"""How a release rolls out: its strategy (blue-green bake window or canary steps) and analysis thresholds.

A `Plan` is resolved once, when the deployment is created: every field the request leaves unset takes the
deployer's default (settings), so the stored plan says exactly what ran even if the defaults change later.
Requests are checked here; every bad field is reported at once in a BadRequest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from google.protobuf import duration_pb2

from services.runtime.errors import Reason, ServiceError

BLUE_GREEN = "blue_green"
CANARY = "canary"

MAX_WINDOW_SECONDS = 3600.0
MIN_P99_SECONDS = 0.001
MAX_P99_SECONDS = 600.0
MAX_MIN_REQUESTS = 1_000_000
MAX_STEPS = 20


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def seconds_of(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


@dataclass(frozen=True)
class Thresholds:
    """What the new version must keep to during the analysis; a breach rolls the release back."""

    min_success_rate: float = 0.99
    max_p99_seconds: float = 1.0
    min_requests: int = 20

    def to_proto(self) -> pb.Analysis:
        return pb.Analysis(min_success_rate=self.min_success_rate, max_p99_latency=duration(self.max_p99_seconds),
                           min_requests=self.min_requests)


@dataclass(frozen=True)
class Plan:
    """A resolved strategy plus thresholds."""

    strategy: str
    bake_seconds: float
    weights: tuple[int, ...]
    step_seconds: float
    thresholds: Thresholds

    def windows(self) -> list[tuple[int, float]]:
        """(weight of the new version, seconds analysed at it) per step; empty: no analysis at all."""
        if self.strategy == CANARY:
            return [(weight, self.step_seconds) for weight in self.weights]
        return [(100, self.bake_seconds)] if self.bake_seconds > 0 else []

    def describe(self) -> str:
        if self.strategy == CANARY:
            return f"canary {'→'.join(f'{w}%' for w in self.weights)}, {self.step_seconds:g}s per step"
        return f"blue-green, bake {self.bake_seconds:g}s"

    def fill(self, deployment: pb.Deployment) -> None:
        if self.strategy == CANARY:
            deployment.canary.CopyFrom(pb.CanaryStrategy(weights=self.weights, step=duration(self.step_seconds)))
        else:
            deployment.blue_green.CopyFrom(pb.BlueGreenStrategy(bake=duration(self.bake_seconds)))
        deployment.analysis.CopyFrom(self.thresholds.to_proto())

    def to_json(self) -> str:
        t = self.thresholds
        return json.dumps({"strategy": self.strategy, "bake": self.bake_seconds, "weights": list(self.weights),
                           "step": self.step_seconds, "min_success_rate": t.min_success_rate,
                           "max_p99": t.max_p99_seconds, "min_requests": t.min_requests}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan | None:
        """The stored plan; None for deployments made before plans were stored."""
        if not text:
            return None
        data = json.loads(text)
        return cls(strategy=str(data["strategy"]), bake_seconds=float(data["bake"]),
                   weights=tuple(int(w) for w in data["weights"]), step_seconds=float(data["step"]),
                   thresholds=Thresholds(float(data["min_success_rate"]), float(data["max_p99"]),
                                         int(data["min_requests"])))


@dataclass(frozen=True)
class Defaults:
    """The deployer's defaults for everything a request may leave unset."""

    bake_seconds: float = 10.0
    weights: tuple[int, ...] = (5, 25, 50, 100)
    step_seconds: float = 10.0
    thresholds: Thresholds = Thresholds()


def weights_problem(weights: Sequence[int]) -> str | None:
    """Why a canary weight list is unusable, or None."""
    if len(weights) > MAX_STEPS:
        return f"at most {MAX_STEPS} steps, not {len(weights)}"
    for index, weight in enumerate(weights):
        if not 1 <= weight <= 100:
            return f"weight {weight} (step {index + 1}) is not between 1 and 100"
        if index and weight <= weights[index - 1]:
            return f"weights must increase strictly: {weights[index - 1]} then {weight}"
    if weights and weights[-1] != 100:
        return f"the last weight must be 100 (the new version takes all traffic at the end), not {weights[-1]}"
    return None


def _window(value: duration_pb2.Duration, name: str, problems: list[tuple[str, str]]) -> float:
    seconds = seconds_of(value)
    if value.nanos < 0 or seconds < 0 or seconds > MAX_WINDOW_SECONDS or value.nanos > 999_999_999:
        problems.append((name, f"must be between 0s and {MAX_WINDOW_SECONDS:g}s, not {seconds:g}s"))
    return seconds


def resolve(request: pb.CreateDeploymentRequest, defaults: Defaults) -> Plan:
    """The plan a CreateDeployment request asks for, defaults filled in; INVALID_ARGUMENT naming each bad
    field (`canary.weights`, `canary.step`, `blue_green.bake`, `analysis.*`)."""
    problems: list[tuple[str, str]] = []
    strategy = request.WhichOneof("strategy") or BLUE_GREEN
    bake, weights, step = defaults.bake_seconds, defaults.weights, defaults.step_seconds
    if strategy == BLUE_GREEN and request.blue_green.HasField("bake"):
        bake = _window(request.blue_green.bake, "blue_green.bake", problems)
    if strategy == CANARY:
        if request.canary.weights:
            weights = tuple(request.canary.weights)
            problem = weights_problem(weights)
            if problem:
                problems.append(("canary.weights", problem))
        if request.canary.HasField("step"):
            step = _window(request.canary.step, "canary.step", problems)
    analysis, base = request.analysis, defaults.thresholds
    rate = analysis.min_success_rate or base.min_success_rate
    if not (math.isfinite(rate) and 0 < rate <= 1):
        problems.append(("analysis.min_success_rate", f"must be in (0, 1], not {rate!r}"))
    p99 = base.max_p99_seconds
    if analysis.HasField("max_p99_latency") and seconds_of(analysis.max_p99_latency) != 0:
        p99 = seconds_of(analysis.max_p99_latency)
        if not MIN_P99_SECONDS <= p99 <= MAX_P99_SECONDS:
            problems.append(("analysis.max_p99_latency",
                             f"must be between {MIN_P99_SECONDS * 1000:g}ms and {MAX_P99_SECONDS:g}s, not {p99:g}s"))
    min_requests = analysis.min_requests or base.min_requests
    if min_requests > MAX_MIN_REQUESTS:
        problems.append(("analysis.min_requests", f"must be at most {MAX_MIN_REQUESTS}, not {min_requests}"))
    if problems:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT,
                           "; ".join(f"{f}: {p}" for f, p in problems), metadata={"field": problems[0][0]},
                           field_violations=problems)
    return Plan(strategy=strategy, bake_seconds=bake, weights=weights, step_seconds=step,
                thresholds=Thresholds(rate, p99, min_requests))
