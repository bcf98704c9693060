"""The manifest's cache TTL reaches the route target with a keyed hash of the env values (the gateway's result
cache keys on both, docs/cache.md): persisted, kept across a restart and a rollback, absent for old rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from clawhub.deployer.v1 import deployer_service_pb2 as pb

from services.deployer.store import MIGRATIONS, SqliteDeploymentStore
from tests.deployer.conftest import Env
from tests.deployer.fakes import SKILL, digest_of
from tests.deployer.test_capabilities import deploy
from tests.deployer.test_deployer import first_table

SECRET = "tok-cache-1234"


async def test_the_ttl_and_an_env_digest_travel_in_the_target(env: Env) -> None:
    cached = env.registry.add(SKILL, "1.0.0", capabilities=("env:API_TOKEN",))
    cached.manifest.cache_ttl.FromSeconds(60)
    env.registry.add(SKILL, "2.0.0", capabilities=("env:API_TOKEN",))  # declares no cache
    deployer = await env.deployer()
    stub = env.deployer_stub(deployer)
    await deploy(env, stub, "1.0.0", {"API_TOKEN": SECRET})
    target = (await first_table(stub)).routes[0].targets[0]
    assert target.HasField("cache_ttl") and target.cache_ttl.ToSeconds() == 60
    first_digest = target.env_digest
    assert first_digest.startswith("hmac-sha256:") and SECRET not in first_digest

    # Same version, other env value: another digest (so another cache key at the gateway).
    await deploy(env, stub, "1.0.0", {"API_TOKEN": SECRET + "-2"})
    target = (await first_table(stub)).routes[0].targets[0]
    assert target.env_digest.startswith("hmac-sha256:") and target.env_digest != first_digest
    second_digest = target.env_digest

    await deploy(env, stub, "2.0.0", {"API_TOKEN": SECRET})
    target = (await first_table(stub)).routes[0].targets[0]
    assert target.version == "2.0.0" and not target.HasField("cache_ttl")

    # Across a restart and a rollback, the previous deployment's TTL and digest come back from the store.
    await deployer.stop(grace=0.2)
    stub = env.deployer_stub(await env.deployer(port=deployer.port))
    await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    target = (await first_table(stub)).routes[0].targets[0]
    assert target.version == "1.0.0" and target.cache_ttl.ToSeconds() == 60
    assert target.env_digest == second_digest


async def test_rows_from_before_carry_no_ttl_and_no_digest(tmp_path: Path) -> None:
    path = tmp_path / "deployer.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute("INSERT INTO deployments (id, skill, version, digest, limits, state, create_ns, update_ns) "
                   "VALUES ('d1', ?, '1.0.0', ?, x'', 5, 1, 1)", (SKILL, digest_of(SKILL, "1.0.0")))
    store = await SqliteDeploymentStore.open(path)
    try:
        record = await store.get_deployment("d1")
        assert record is not None and record.cache_ttl_ms is None and record.env_digest == ""
        target = record.target()
        assert not target.HasField("cache_ttl") and target.env_digest == ""
    finally:
        await store.close()
