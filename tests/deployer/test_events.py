"""Each deployment keeps its event log: a watcher that joins late, after the end or after a deployer restart is
shown every event that already happened, then the live ones, each once. Real deployer (and the real CLI),
fake registry and executors, over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from clawhub.deployer.v1 import deployer_service_pb2 as pb

from services.cli.main import main
from services.deployer import releases
from services.deployer.plan import Defaults
from services.deployer.store import SqliteDeploymentStore
from tests.deployer.conftest import Env
from tests.deployer.fakes import SKILL, eventually
from tests.deployer.test_deployer import ACTIVE, first_table, watch_to_end
from tests.deployer.test_release import K, bake, kinds, release

LOGGED = {K.DEPLOYMENT_EVENT_KIND_PRELOADED, K.DEPLOYMENT_EVENT_KIND_ROUTE_PUSHED, K.DEPLOYMENT_EVENT_KIND_ACKED,
          K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED, K.DEPLOYMENT_EVENT_KIND_NOT_ANALYSED,
          K.DEPLOYMENT_EVENT_KIND_STATE_CHANGED}


def without_progress(events: list[pb.WatchDeploymentResponse]) -> list[pb.WatchDeploymentResponse]:
    return [e for e in events if e.event.kind != K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS]


async def active(stub, deployment_id: str) -> bool:
    deployment = (await stub.GetDeployment(pb.GetDeploymentRequest(id=deployment_id))).deployment
    return deployment.state == ACTIVE


async def test_a_watcher_that_joins_after_the_end_is_shown_every_event(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer(release=Defaults(bake_seconds=0.2)))
    done, live = await release(env, stub, "1.0.0")  # followed from before the first event
    assert done.state == ACTIVE
    numbers = [e.sequence for e in live[1:]]
    assert numbers == list(range(1, len(numbers) + 1)), "live events are numbered 1, 2, 3… in order"

    replay = await watch_to_end(stub, done.id)
    # The current state first, then exactly what the live watcher got, progress samples aside.
    assert replay[0].deployment.state == ACTIVE and not replay[0].HasField("event") and replay[0].sequence == 0
    assert replay[1:] == without_progress(live[1:])
    assert LOGGED <= set(kinds(replay))
    assert K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS in kinds(live)
    assert replay[-1].deployment.state == ACTIVE


async def test_a_watcher_that_joins_mid_release_gets_each_event_once(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer(release=Defaults(bake_seconds=0.5)))
    late: list[asyncio.Task[list[pb.WatchDeploymentResponse]]] = []

    async def on_event(event: pb.WatchDeploymentResponse) -> None:
        if event.event.kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
            late.append(asyncio.ensure_future(watch_to_end(stub, event.deployment.id)))

    done, early = await release(env, stub, "1.0.0", on_event)
    joined = await late[0]
    numbers = [e.sequence for e in joined[1:]]
    assert numbers == sorted(set(numbers)), "no event twice, none out of order"
    # Everything that is logged, as the early watcher saw it; then live progress samples too.
    assert without_progress(joined[1:]) == without_progress(early[1:])
    assert K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS in kinds(joined)
    assert joined[-1].deployment.state == ACTIVE == done.state


async def test_events_sent_while_a_watcher_reads_the_log_reach_it_once(env: Env,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher subscribes, then reads the log: what happens in between is in both, and is sent once."""
    stub = env.deployer_stub(await env.deployer(release=Defaults(bake_seconds=1.0)))
    gate = asyncio.Event()
    for executor in env.executors:
        executor.load_gate = gate
    created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"))).deployment
    reading, go = asyncio.Event(), asyncio.Event()
    read_log = SqliteDeploymentStore.list_events

    async def slow_read(self, deployment_id: str) -> list[pb.WatchDeploymentResponse]:
        reading.set()
        await go.wait()
        return await read_log(self, deployment_id)

    monkeypatch.setattr(SqliteDeploymentStore, "list_events", slow_read)
    watching = asyncio.ensure_future(watch_to_end(stub, created.id))
    await reading.wait()  # subscribed, not yet read

    async def baking() -> bool:
        deployment = (await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))).deployment
        return deployment.verdict == pb.ANALYSIS_VERDICT_RUNNING and deployment.traffic_weight == 100

    gate.set()
    await eventually(baking)  # preloads and the route push: published to the watcher's queue and logged
    go.set()
    events = await watching
    numbers = [e.sequence for e in events[1:] if e.event.kind != K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1
    assert [e.message for e in events].count(f"preloaded on {env.executors[0].address}") == 1
    assert events[-1].deployment.state == ACTIVE


async def test_the_log_survives_a_restart_and_goes_on_after_it(env: Env) -> None:
    deployer = await env.deployer()
    stub = env.deployer_stub(deployer)
    await release(env, stub, "1.0.0", **bake(0))
    second, _ = await release(env, stub, "2.0.0", **bake(0))
    before = await watch_to_end(stub, second.id)

    await deployer.stop(grace=0.2)
    stub = env.deployer_stub(await env.deployer(port=deployer.port))
    after = await watch_to_end(stub, second.id)
    assert after[1:] == before[1:]

    # A manual rollback of it, by the restarted deployer, adds to the same log with the next numbers.
    await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    rolled = await watch_to_end(stub, second.id)
    assert rolled[1:len(before)] == before[1:]
    numbers = [e.sequence for e in rolled[1:]]
    assert numbers == list(range(1, len(numbers) + 1))
    added = [e.message for e in rolled[len(before):]]
    assert added[0] == "Active → RollingBack: manual rollback to 1.0.0"
    assert added[-1].startswith("RollingBack → Active: rolled back: 1.0.0")
    assert rolled[-1].deployment.rolled_back.version == "1.0.0"


async def test_the_log_is_bounded_but_keeps_every_state_change(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(releases, "MAX_LOGGED_EVENTS", 3)
    stub = env.deployer_stub(await env.deployer())
    done, live = await release(env, stub, "1.0.0", **bake(0))
    replay = await watch_to_end(stub, done.id)
    assert len(live) > 5
    assert replay[1:] == live[1:4] + [live[-1]]
    assert replay[-1].event.kind == K.DEPLOYMENT_EVENT_KIND_STATE_CHANGED and replay[-1].deployment.state == ACTIVE


async def test_clawhub_watch_of_a_finished_release_prints_its_events(env: Env,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    env.registry.versions[(SKILL, "1.0.0")].manifest.examples.add(input=b"a", expected_output=b"echo:a")
    deployer = await env.deployer(release=Defaults(bake_seconds=0.1))
    stub = env.deployer_stub(deployer)
    created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"))).deployment
    await eventually(lambda: active(stub, created.id))

    # The CLI talks to the deployer directly here (the gateway would only forward the calls).
    code = await asyncio.to_thread(main, ["watch", created.id, "--plain", "--gateway", f"127.0.0.1:{deployer.port}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"{SKILL}@1.0.0 is active"
    for executor in env.executors:
        assert f"preloaded on {executor.address}" in err
        assert f"1 smoke example(s) passed on {executor.address}" in err
    for line in ("route generation 1 pushed: 100% of traffic to 1.0.0",
                 "route generation 1 acknowledged by 0/0 dispatchers", "baking 1.0.0 for 100ms",
                 "not analysed: no traffic (blue-green, bake 0.1s)",
                 "route generation 2 pushed: 100% of traffic to 1.0.0", "DEPLOYING → ACTIVE: preloaded on 2"):
        assert line in err, err
    # Each once, in the order they happened.
    lines = [line for line in err.splitlines() if line.startswith("  [")]
    assert len(lines) == len(set(lines))
    assert "preloaded" in lines[0] and "DEPLOYING → ACTIVE" in lines[-1]


async def test_clawhub_deploy_prints_every_event_of_a_fast_release(env: Env,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    deployer = await env.deployer()
    code = await asyncio.to_thread(main, ["deploy", f"{SKILL}@1.0.0", "--plain", "--bake", "0s",
                                          "--gateway", f"127.0.0.1:{deployer.port}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"{SKILL}@1.0.0 is active"
    assert "not analysed: no bake window (blue-green, bake 0s)" in err
    assert err.count("preloaded on 127.0.0.1:") == len(env.executors) and "DEPLOYING → ACTIVE" in err


async def test_a_manual_rollback_is_recorded_on_the_deployment_it_took_traffic_from(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    deployer = await env.deployer()
    stub = env.deployer_stub(deployer)
    first, _ = await release(env, stub, "1.0.0", **bake(0))
    second, _ = await release(env, stub, "2.0.0", **bake(0))
    assert not second.HasField("rolled_back")
    rolled = await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    reverted = (await stub.GetDeployment(pb.GetDeploymentRequest(id=second.id))).deployment
    assert reverted.state == ACTIVE and not reverted.serving
    assert (reverted.rolled_back.deployment_id, reverted.rolled_back.version, reverted.rolled_back.generation) == (
        first.id, "1.0.0", rolled.generation)
    assert reverted.rolled_back.time.seconds > 0
    assert not (await stub.GetDeployment(pb.GetDeploymentRequest(id=first.id))).deployment.HasField("rolled_back")

    # A deployer stopped after the rollback's route was persisted, before the rollback was recorded: the
    # restarted deployer settles it and records it then (generation unknown).
    third, _ = await release(env, stub, "3.0.0", **bake(0))
    stuck = asyncio.Event()

    async def never(self, record) -> None:
        await stuck.wait()

    monkeypatch.setattr(SqliteDeploymentStore, "save_rolled_back", never)
    pending = asyncio.ensure_future(stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10))
    await eventually(lambda: serving_version(stub, "1.0.0"))
    await deployer.stop(grace=0.2)
    await asyncio.gather(pending, return_exceptions=True)
    monkeypatch.undo()
    stub = env.deployer_stub(await env.deployer(port=deployer.port))
    settled = (await stub.GetDeployment(pb.GetDeploymentRequest(id=third.id))).deployment
    assert settled.state == ACTIVE and not settled.serving
    assert settled.history[-1].reason == f"deployer restarted mid-rollback; route kept: deployment {first.id} serves"
    assert (settled.rolled_back.deployment_id, settled.rolled_back.version) == (first.id, "1.0.0")
    assert settled.rolled_back.generation == 0
    listed = (await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL))).deployments
    assert [(d.version, d.HasField("rolled_back"), d.serving) for d in listed] == [
        ("3.0.0", True, False), ("2.0.0", True, False), ("1.0.0", False, True)]


async def serving_version(stub, version: str) -> bool:
    table = await first_table(stub)
    return [t.version for r in table.routes for t in r.targets] == [version]


async def test_watching_an_unknown_deployment_is_not_found(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch_to_end(stub, "0123456789abcdef")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
