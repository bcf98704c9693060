"""Release counts and rollbacks by cause (docs/metrics.md), as real releases end: a deployer and a dispatcher over
gRPC with fake registry and executors (tests/deployer/conftest.py). The endpoint itself is scraped over HTTP in
tests/runtime/test_metrics.py and tests/e2e/test_metrics.py; here the process's registry is read directly."""

from __future__ import annotations

import grpc
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from grpc_health.v1 import health_pb2

from services.runtime.errors import Reason, ServiceError
from services.runtime.metrics import REGISTRY
from tests.deployer.conftest import Env
from tests.deployer.fakes import SKILL, digest_of
from tests.deployer.test_release import FAILED, K, bake, platform, release

OUTCOMES = ("active", "failed")
CAUSES = ("health_not_serving", "smoke_test_failed", "preload_failed", "manual")


def counts() -> dict[str, float]:
    found = {f"release {o}": REGISTRY.get_sample_value("clawhub_releases_total", {"strategy": "blue_green",
                                                                                    "outcome": o}) or 0.0
             for o in OUTCOMES}
    found |= {f"rollback {c}": REGISTRY.get_sample_value("clawhub_rollbacks_total", {"cause": c}) or 0.0
              for c in CAUSES}
    return found


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


async def test_releases_and_rollbacks_are_counted_by_outcome_and_cause(env: Env) -> None:
    before = counts()
    _, stub, _ = await platform(env, bake_seconds=10)  # 1.0.0 goes Active
    assert delta(before, counts()) == {"release active": 1}

    # An executor reports the new version NOT_SERVING during its bake: rolled back, the release failed.
    start = counts()
    new_digest = digest_of(SKILL, "2.0.0")

    async def on_event(event: pb.WatchDeploymentResponse) -> None:
        if event.event.kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
            await env.executors[1].health.set(new_digest, health_pb2.HealthCheckResponse.NOT_SERVING)

    failed, _ = await release(env, stub, "2.0.0", on_event)
    assert failed.state == FAILED
    assert delta(start, counts()) == {"release failed": 1, "rollback health_not_serving": 1}

    # A version whose smoke examples fail on an executor never serves: a failed release, cause smoke_test_failed.
    start = counts()
    env.executors[0].fail_load[digest_of(SKILL, "3.0.0")] = ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.SMOKE_TEST_FAILED, "smoke example 0 printed the wrong thing")
    failed, _ = await release(env, stub, "3.0.0", **bake(0))
    assert failed.state == FAILED
    assert delta(start, counts()) == {"release failed": 1, "rollback smoke_test_failed": 1}
