"""Deployer replicas on one PostgreSQL database (services/deployer/leader.py): one leads, the others refuse
writes with NOT_LEADER and serve reads; a standby takes over within seconds of the leader's end (a graceful
stop, a SIGKILL of its process, a lost lock connection) and completes the deploys left in flight; a deposed
leader cannot write a route generation; dispatchers follow the leader across the failover."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.deployer.v1 import deployer_service_pb2 as pb

from services.dispatcher.server import build_server as build_dispatcher
from services.dispatcher.settings import Settings as DispatcherSettings
from services.runtime import postgres
from services.runtime.errors import Reason, error_info
from services.runtime.leaderchannel import LeaderChannel
from services.runtime.server import ServiceHost
from tests.deployer.conftest import DeployerStub, Env
from tests.deployer.fakes import SKILL, eventually
from tests.deployer.test_deployer import ACTIVE, watch_to_end

ROOT = Path(__file__).resolve().parents[2]
DEPLOYING = release_pb2.RELEASE_STATE_DEPLOYING


async def replica(env: Env, url: str, tmp_path: Path, name: str, **kwargs) -> ServiceHost:
    return await env.deployer(database_url=url, deployer_id=name, data_dir=tmp_path / name,
                              key_file=tmp_path / "secrets.key", **kwargs)


def not_leader(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """The metadata of a NOT_LEADER refusal (fails on any other error)."""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    info = error_info(err)
    assert info is not None and info.reason == Reason.NOT_LEADER, err.details()
    return dict(info.metadata)


async def leads(stub: DeployerStub, *, starting: bool = False) -> bool:
    """Whether the replica serves the route feed (only the leader does); `starting`: False while it does not
    listen yet."""
    call = stub.WatchRoutes(internal_pb.WatchRoutesRequest())
    try:
        async with asyncio.timeout(2):
            await call.read()
        return True
    except grpc.aio.AioRpcError as err:
        if starting and err.code() == grpc.StatusCode.UNAVAILABLE and error_info(err) is None:
            return False
        not_leader(err)
        return False
    finally:
        call.cancel()


async def dispatcher_routes(caplog: pytest.LogCaptureFixture, after: int = 0) -> int:
    """Wait until a dispatcher applies a route table (more than `after` of them so far): only the leader serves
    them, so it is connected there. How many it applied."""
    def applied() -> int:
        return sum("routing with generation" in r.getMessage()
                   for r in caplog.records if r.name == "clawhub.dispatcher")

    await eventually(lambda: _async(applied() > after), timeout=10)
    return applied()


def gate(env: Env) -> asyncio.Event:
    """Hold every executor's LoadSkill until the returned event is set: a deploy stays in flight."""
    event = asyncio.Event()
    for executor in env.executors:
        executor.load_gate = event
    return event


async def test_one_replica_leads_the_other_refuses_writes_and_serves_reads(
        env: Env, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clawhub.dispatcher")
    a = await replica(env, postgres_url, tmp_path, "deployer-a")
    b = await replica(env, postgres_url, tmp_path, "deployer-b")
    stub_a, stub_b = env.deployer_stub(a), env.deployer_stub(b)
    assert await leads(stub_a) and not await leads(stub_b)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub_b.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"), timeout=5)
    metadata = not_leader(caught.value)
    assert metadata == {"deployer_id": "deployer-b", "leader_id": "deployer-a",
                        "leader_address": f"127.0.0.1:{a.port}"}
    assert "standby" in (caught.value.details() or "")
    for refused in (stub_b.Rollback(pb.RollbackRequest(skill=SKILL), timeout=5),
                    stub_b.AcknowledgeRoutes(internal_pb.AcknowledgeRoutesRequest(dispatcher_id="d", generation=1),
                                             timeout=5),
                    stub_b.ReportStats(internal_pb.ReportStatsRequest(dispatcher_id="d"), timeout=5)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await refused
        assert not_leader(caught.value)["leader_id"] == "deployer-a"

    # A dispatcher pointed at the standby is sent to the leader, and acknowledges there.
    await env.dispatcher(b)
    await dispatcher_routes(caplog)
    created = await stub_a.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"), timeout=5)
    # The standby streams the leader's release from the stored events, to its end.
    events = await watch_to_end(stub_b, created.deployment.id)
    assert events[-1].deployment.state == ACTIVE
    assert any("acknowledged by 1/1 dispatchers" in e.message for e in events), [e.message for e in events]

    async def served_as_serving() -> bool:
        found = await stub_b.GetDeployment(pb.GetDeploymentRequest(id=created.deployment.id), timeout=5)
        return found.deployment.state == ACTIVE and found.deployment.serving

    await eventually(served_as_serving)
    listed = await stub_b.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL), timeout=5)
    assert [d.id for d in listed.deployments] == [created.deployment.id]


class Balancer:
    """A TCP balancer in front of the replicas, as a Kubernetes Service is: each connection goes to the next
    backend in turn that accepts it (a dead one is skipped); bytes are relayed both ways."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self._next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(len(self.backends)):
            port = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                                 return_exceptions=True)
            return
        writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.mark.parametrize("address", ["standby", "balancer-to-standby-first", "balancer-to-leader-first"])
async def test_a_stopped_leader_hands_over_and_its_deploy_completes_on_the_successor(
        env: Env, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, address: str) -> None:
    """The dispatcher's deployer address is the standby's own, or a balancer in front of both replicas (whose
    first connection goes to the standby, or to the leader): either way it follows the leader, and its successor
    after it."""
    caplog.set_level(logging.INFO, logger="clawhub.dispatcher")
    a = await replica(env, postgres_url, tmp_path, "deployer-a")
    b = await replica(env, postgres_url, tmp_path, "deployer-b")
    stub_a, stub_b = env.deployer_stub(a), env.deployer_stub(b)
    balancer = Balancer([a.port, b.port] if address.endswith("leader-first") else [b.port, a.port])
    port = await balancer.start() if address.startswith("balancer") else b.port
    try:
        await env.fakes.start_service(build_dispatcher(DispatcherSettings(
            host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{port}",
            executor_addresses=tuple(e.address for e in env.executors), dispatcher_id="dispatcher-1",
            retries=2, dispatch_timeout=10.0, grace=0.2, stats_interval=0.02)))
        await handover(env, a, stub_a, stub_b, caplog)
    finally:
        await balancer.stop()


async def handover(env: Env, a: ServiceHost, stub_a: DeployerStub, stub_b: DeployerStub,
                   caplog: pytest.LogCaptureFixture) -> None:
    applied = await dispatcher_routes(caplog)
    release = gate(env)
    created = await stub_a.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"), timeout=5)
    await eventually(lambda: _async(bool(env.executors[0].load_calls)))

    started = time.monotonic()
    await a.stop(grace=0.5)
    await eventually(lambda: leads(stub_b), timeout=5)
    assert time.monotonic() - started < 3
    await dispatcher_routes(caplog, applied)  # back to the configured address, which leads now

    release.set()
    events = await watch_to_end(stub_b, created.deployment.id, timeout=15)
    assert events[-1].deployment.state == ACTIVE, [e.message for e in events]
    messages = [e.message for e in events]
    assert any("resumed by a new leading deployer" in m for m in messages), messages
    # The dispatcher followed the new leader: the release's last generation was acknowledged there.
    assert "acknowledged by 1/1 dispatchers" in messages[-1], messages


@pytest.fixture
def leader_process(env: Env, postgres_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Deployer A as a process of its own (to be killed with SIGKILL), leading on `postgres_url`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    environment = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off", "CLAWHUB_USER_AUTH": "off",
                   "CLAWHUB_RATE_LIMITS": "off", "CLAWHUB_DEPLOYER_HOST": "127.0.0.1",
                   "CLAWHUB_DEPLOYER_PORT": str(port), "CLAWHUB_DEPLOYER_DATA_DIR": str(tmp_path / "deployer-a"),
                   "CLAWHUB_DEPLOYER_SECRETS_KEY_FILE": str(tmp_path / "secrets.key"),
                   "CLAWHUB_DEPLOYER_DATABASE_URL": postgres_url, "CLAWHUB_DEPLOYER_ID": "deployer-a",
                   "CLAWHUB_REGISTRY_ADDRESS": env.registry_address,
                   "CLAWHUB_EXECUTOR_ADDRESSES": ",".join(e.address for e in env.executors),
                   "CLAWHUB_DEPLOYER_BAKE": "0", "CLAWHUB_DEPLOY_ACK_TIMEOUT": "5",
                   "CLAWHUB_DEPLOYER_ELECTION_INTERVAL": "0.2", "CLAWHUB_DEPLOYER_LEASE_TIMEOUT": "2"}
    environment.pop("CLAWHUB_SUPERVISOR_FD", None)
    process = subprocess.Popen([sys.executable, "-m", "services.deployer"], cwd=ROOT, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


async def test_a_killed_leader_is_replaced_within_seconds_and_its_deploy_completes(
        env: Env, postgres_url: str, tmp_path: Path, leader_process: tuple[subprocess.Popen[str], int],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clawhub.dispatcher")
    process, port = leader_process
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    env.channels.append(channel)
    stub_a = DeployerStub(channel)

    async def a_leads() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        return await leads(stub_a, starting=True)

    await eventually(a_leads, timeout=20, interval=0.1)
    b = await replica(env, postgres_url, tmp_path, "deployer-b")
    stub_b = env.deployer_stub(b)
    assert not await leads(stub_b)
    # The dispatcher is pointed at the standby: it follows the leader, then (A gone) comes back to B.
    await env.dispatcher(b)
    applied = await dispatcher_routes(caplog)

    release = gate(env)
    created = await stub_a.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"), timeout=5)
    assert created.deployment.state == DEPLOYING
    await eventually(lambda: _async(bool(env.executors[0].load_calls)))

    process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await eventually(lambda: leads(stub_b), timeout=10, interval=0.05)
    takeover = time.monotonic() - killed
    assert takeover < 3, f"the standby took {takeover:.1f}s to lead"
    await dispatcher_routes(caplog, applied)

    release.set()
    events = await watch_to_end(stub_b, created.deployment.id, timeout=15)
    messages = [e.message for e in events]
    assert events[-1].deployment.state == ACTIVE, messages
    assert "acknowledged by 1/1 dispatchers" in messages[-1], messages
    found = await stub_b.GetDeployment(pb.GetDeploymentRequest(id=created.deployment.id), timeout=5)
    assert found.deployment.serving


async def test_a_deposed_leader_cannot_write_a_route_generation(env: Env, postgres_url: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # A checks its lock only every 30 s: it will not notice that it lost it before it tries to write.
    a = await replica(env, postgres_url, tmp_path, "deployer-a", election_interval=30.0, lease_timeout=60.0)
    b = await replica(env, postgres_url, tmp_path, "deployer-b")
    stub_a, stub_b = env.deployer_stub(a), env.deployer_stub(b)
    assert await leads(stub_a) and not await leads(stub_b)

    admin = await postgres.connect(postgres_url, "deployer")
    try:
        first_term = await admin.fetchval("SELECT epoch FROM route_table")
        # A's lock connection breaks (as a network cut would end it): the lock is free, B takes it.
        ended = await admin.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'clawhub-deployer-leader:deployer-a'")
        assert ended == 1

        async def b_took_over() -> bool:
            return await admin.fetchval("SELECT leader_id FROM route_table") == "deployer-b"

        await eventually(b_took_over)
        second_term = await admin.fetchval("SELECT epoch FROM route_table")
        assert second_term > first_term
        generation = await admin.fetchval("SELECT generation FROM route_table")

        # A still believes it leads and accepts a deploy, but its first route push is fenced off.
        caplog.set_level(logging.WARNING, logger="clawhub.deployer")
        created = await stub_a.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"),
                                                timeout=5)
        await eventually(lambda: _async(any("fenced off the route table" in r.getMessage()
                                            for r in caplog.records)))
        # It stepped down: writes are refused there now, naming the leader.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub_a.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="2.0.0"), timeout=5)
        assert not_leader(caught.value)["deployer_id"] == "deployer-a"
        assert await admin.fetchval("SELECT epoch FROM route_table") == second_term

        # The deploy A accepted is taken up by the leader and completes; every generation since the takeover
        # was written in B's term.
        events = await watch_to_end(stub_b, created.deployment.id, timeout=15)
        assert events[-1].deployment.state == ACTIVE, [e.message for e in events]
        pushed = [e.event.generation for e in events if e.event.kind == pb.DEPLOYMENT_EVENT_KIND_ROUTE_PUSHED]
        assert pushed and all(g > generation for g in pushed)
        row = await admin.fetchrow("SELECT epoch, leader_id, generation FROM route_table")
        assert (row["epoch"], row["leader_id"]) == (second_term, "deployer-b") and row["generation"] == pushed[-1]
    finally:
        await admin.close()


async def _async(value: bool) -> bool:
    return value


async def test_a_leader_channel_sends_writes_to_the_leader_and_its_successor(env: Env, postgres_url: str,
                                                                             tmp_path: Path) -> None:
    """What the gateway relays deployer calls through (services/runtime/leaderchannel.py): pointed at a
    standby, a write refused with NOT_LEADER is sent to the leader at once; once the leader is gone, the
    channel goes back to its address."""
    a = await replica(env, postgres_url, tmp_path, "deployer-a")
    b = await replica(env, postgres_url, tmp_path, "deployer-b")
    following = LeaderChannel(grpc.aio.insecure_channel(f"127.0.0.1:{b.port}"), grpc.aio.insecure_channel)
    try:
        stub = DeployerStub(following)
        created = await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"), timeout=5)
        assert following.leader_address == f"127.0.0.1:{a.port}"
        assert (await watch_to_end(stub, created.deployment.id))[-1].deployment.state == ACTIVE

        await a.stop(grace=0.5)
        await eventually(lambda: leads(env.deployer_stub(b)), timeout=5)

        async def deployed() -> bool:
            try:
                await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="2.0.0",
                                                                       request_id="after-failover"), timeout=5)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                return False
            return True

        await eventually(deployed, timeout=5, interval=0.1)
        assert following.leader_address == ""  # back on its own address, which leads now
    finally:
        await following.close()


async def test_a_leader_whose_lock_connection_ends_steps_down_rather_than_lead_without_the_lock(
        env: Env, postgres_url: str, tmp_path: Path) -> None:
    """A PostgreSQL restart or a terminated session ends the leader's lock connection: on a new connection it
    no longer holds the lock, so it must stand down (and may win it again), never go on leading beside the
    replica that took the lock."""
    a = await replica(env, postgres_url, tmp_path, "deployer-a")
    b = await replica(env, postgres_url, tmp_path, "deployer-b")
    stub_a, stub_b = env.deployer_stub(a), env.deployer_stub(b)
    assert await leads(stub_a) and not await leads(stub_b)
    admin = await postgres.connect(postgres_url, "deployer")
    try:
        ended = await admin.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'clawhub-deployer-leader:deployer-a'")
        assert ended == 1

        async def one_leader() -> bool:
            return [await leads(stub_a), await leads(stub_b)].count(True) == 1

        await eventually(one_leader, timeout=10)
        # Several election rounds later there is still exactly one leader, and it is the one the table names.
        await asyncio.sleep(1.0)
        leaders = [name for name, stub in (("deployer-a", stub_a), ("deployer-b", stub_b)) if await leads(stub)]
        assert leaders == [await admin.fetchval("SELECT leader_id FROM route_table")], leaders
    finally:
        await admin.close()
