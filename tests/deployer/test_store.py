"""The deployer's store, on sqlite and on PostgreSQL: survives callers that go away mid-write, fences route
writes by leadership term, and (PostgreSQL) refuses a replica whose key file is not the others'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from clawhub.common.v1 import routing_pb2, skill_pb2
from cryptography.fernet import Fernet

from services.deployer.model import DeploymentRecord, Transition
from services.deployer.secrets import SecretsKeyError
from services.deployer.statemachine import ACTIVE, DEPLOYING, READY
from services.deployer.store import ConcurrentChange, Fenced, StoredRoute
from tests.deployer.stores import StoreBackend


def record(deployment_id: str, skill: str = "com.acme.x", state: int = DEPLOYING) -> DeploymentRecord:
    return DeploymentRecord(
        id=deployment_id, skill=skill, version="1.0.0", digest="sha256:" + "0" * 64,
        limits=skill_pb2.Limits(memory_bytes=1 << 20), state=state,  # type: ignore[arg-type]
        history=[Transition(READY, DEPLOYING, 1, "deploy requested")], previous_id="", previous_version="",
        create_ns=1, update_ns=1, env={"TOKEN": "value-of-the-token"}, capabilities=["env:TOKEN"])


async def test_a_write_cancelled_while_its_transaction_opens_leaves_the_store_working(
        store_backend: StoreBackend) -> None:
    """aiosqlite runs a queued BEGIN even when the awaiting task is cancelled; a transaction left open then made
    every later write fail ("cannot start a transaction within a transaction") until a restart. asyncpg must
    return a connection cancelled mid-transaction to its pool rolled back."""
    store = await store_backend.open()
    try:
        entry = StoredRoute("d1", routing_pb2.Route(skill="com.acme.x"))
        for i in range(60):
            task = asyncio.ensure_future(store.save_route(i + 1, "com.acme.x", entry))
            for _ in range(i % 6):  # cut off at different points: before, during and after BEGIN
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await store.save_route(100, "com.acme.x", entry)
        snapshot = await store.load_routes()
        assert snapshot.generation == 100 and "com.acme.x" in snapshot.routes
    finally:
        await store.close()


async def test_deployments_transitions_events_and_requests_round_trip(store_backend: StoreBackend) -> None:
    store = await store_backend.open()
    try:
        first, second = record("d1"), record("d2", skill="com.acme.y")
        await store.create_deployment(first, "req-1")
        await store.create_deployment(second)
        assert 0 < first.seq < second.seq
        assert await store.find_request("create", "req-1") == ("d1", 0)
        await store.save_request("rollback", "req-2", "d1", 7)
        await store.save_request("rollback", "req-2", "d2", 8)  # a replay overwrites
        assert await store.find_request("rollback", "req-2") == ("d2", 8)
        await store.add_transition("d1", Transition(DEPLOYING, ACTIVE, 5, "went active"))
        with pytest.raises(ConcurrentChange):
            await store.add_transition("d1", Transition(DEPLOYING, ACTIVE, 6, "again"))
        found = await store.get_deployment("d1")
        assert found is not None and found.state == ACTIVE and found.env == {"TOKEN": "value-of-the-token"}
        assert [t.reason for t in found.history] == ["deploy requested", "went active"]
        assert [r.id for r in await store.list_deployments("", None, 10)] == ["d2", "d1"]
        assert [r.id for r in await store.list_deployments("com.acme.x", None, 10)] == ["d1"]
        assert [r.id for r in await store.list_deployments("", second.seq, 10)] == ["d1"]
        assert [r.id for r in await store.in_flight()] == ["d2"]
        assert await store.deploy_outcomes("com.acme.x", 0) == [(5, True)]
        assert await store.get_deployment("nope") is None

        from clawhub.deployer.v1 import deployer_service_pb2 as pb
        for sequence in (1, 2, 3):
            added = await store.append_event("d1", pb.WatchDeploymentResponse(message=f"e{sequence}",
                                                                               sequence=sequence),
                                             keep=False, limit=2)
            assert added == (sequence <= 2)
        assert await store.append_event("d1", pb.WatchDeploymentResponse(message="kept", sequence=4),
                                        keep=True, limit=2)
        assert [e.message for e in await store.list_events("d1")] == ["e1", "e2", "kept"]
        assert await store.last_event_sequence("d1") == 4 and await store.last_event_sequence("d2") == 0

        await store.append_audit(10, "chk_1", "CreateDeployment", "com.acme.x", "req-1", "OK")
        await store.append_audit(11, "chk_1", "Rollback", "com.acme.x", "", "NOT_FOUND")
        audit = await store.list_audit(None, 10)
        assert [a[3] for a in audit] == ["Rollback", "CreateDeployment"]
        assert [a[3] for a in await store.list_audit(audit[0][0], 10)] == ["CreateDeployment"]
    finally:
        await store.close()
    # What was written is there after a reopen, the env values sealed on disk.
    store = await store_backend.open()
    try:
        found = await store.get_deployment("d1")
        assert found is not None and found.env == {"TOKEN": "value-of-the-token"}
    finally:
        await store.close()
    rows = await store_backend.rows("SELECT env FROM deployments")
    assert rows and all("value-of-the-token" not in str(r[0]) for r in rows)


async def test_a_route_write_of_an_ended_term_is_fenced(store_backend: StoreBackend) -> None:
    store = await store_backend.open()
    try:
        entry = StoredRoute("d1", routing_pb2.Route(skill="com.acme.x"))
        await store.save_route(1, "com.acme.x", entry)  # epoch 0: a sole deployer never begins a term
        first = await store.begin_term("deployer-a", "10.0.0.1:50053")
        await store.save_route(2, "com.acme.x", entry, epoch=first)
        second = await store.begin_term("deployer-b", "10.0.0.2:50053")
        assert second == first + 1
        leader = await store.leader()
        assert (leader.epoch, leader.deployer_id, leader.address, leader.generation) == (
            second, "deployer-b", "10.0.0.2:50053", 2)
        # The deposed leader's next generation is refused, and nothing of it is written.
        with pytest.raises(Fenced, match=f"term {first} is over"):
            await store.save_route(3, "com.acme.y", StoredRoute("d2", routing_pb2.Route(skill="com.acme.y")),
                                   epoch=first)
        snapshot = await store.load_routes()
        assert snapshot.generation == 2 and set(snapshot.routes) == {"com.acme.x"}
        # The leader of the current term writes on, only forward.
        await store.save_route(3, "com.acme.x", None, epoch=second)
        with pytest.raises(ConcurrentChange):
            await store.save_route(3, "com.acme.x", entry, epoch=second)
        assert (await store.load_routes()).generation == 3
    finally:
        await store.close()


async def test_postgres_replicas_must_share_the_key_file(postgres_url: str, tmp_path: Path) -> None:
    store_backend = StoreBackend("postgres", tmp_path / "d", postgres_url)
    first = await store_backend.open()
    await first.close()
    # A second replica with a key file of its own (a fresh data directory would create one) is refused
    # before it seals a row the first cannot open.
    other = store_backend.directory / "other.key"
    other.write_bytes(Fernet.generate_key() + b"\n")
    other.chmod(0o600)
    with pytest.raises(SecretsKeyError) as caught:
        store = await store_backend.open(other)
        await store.close()
    message = str(caught.value)
    assert "\n" not in message and str(other) in message and "same key file" in message
    # With the same file it opens.
    store = await store_backend.open(store_backend.key_file)
    await store.close()


async def test_an_unreachable_database_stops_the_deployer_with_one_line(tmp_path: Path) -> None:
    """As the registry: StartupError (one stderr line, exit 1) naming the URL without its password, not a
    traceback; the data directory is released."""
    from services.deployer.server import build_server
    from services.deployer.settings import Settings
    from services.runtime.server import StartupError

    settings = Settings(port=0, data_dir=tmp_path / "deployer", database_url="postgresql://clawhub:s3cret@127.0.0.1:1/x",
                        secrets_key_file=tmp_path / "secrets.key")
    for _ in range(2):  # the second attempt finds the data directory free again
        with pytest.raises(StartupError) as caught:
            await build_server(settings)
        assert "cannot connect to PostgreSQL at postgresql://clawhub:***@127.0.0.1:1/x" in str(caught.value)
        assert "s3cret" not in str(caught.value)

