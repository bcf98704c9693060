"""Deploy-time env values at rest (issue 11): sealed in the database, a key file with rotation, private files,
and never in a log line or in a response a client can get."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2, routing_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from cryptography.fernet import Fernet

from services.deployer.model import DeploymentRecord, Transition
from services.deployer.secrets import KEY_FILE, REDACTED, REDACTOR, SecretsKeyError, key_id
from services.deployer.statemachine import ACTIVE, DEPLOYING, PENDING
from services.deployer.store import MIGRATIONS, SqliteDeploymentStore, StoredRoute
from services.runtime.errors import Reason, ServiceError
from tests.deployer.conftest import Env
from tests.deployer.fakes import SKILL, digest_of
from tests.deployer.stores import StoreBackend
from tests.deployer.test_capabilities import CAPABILITIES, deploy
from tests.deployer.test_deployer import FAILED, first_table, watch_to_end

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def granted(env: Env) -> Env:
    for version in ("1.0.0", "2.0.0"):
        env.registry.add(SKILL, version, capabilities=CAPABILITIES)
    return env


def distinctive() -> str:
    return f"sk-live-{secrets.token_hex(12)}"


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def files_holding(directory: Path, value: str) -> list[str]:
    """The files under `directory` whose raw bytes contain `value` (plain, or as its UTF-16 or hex form)."""
    needles = [value.encode(), value.encode("utf-16-le"), value.encode().hex().encode()]
    return [p.name for p in files_under(directory) if any(n in p.read_bytes() for n in needles)]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def record(deployment_id: str, env: dict[str, str], version: str = "1.0.0") -> DeploymentRecord:
    return DeploymentRecord(
        id=deployment_id, skill=SKILL, version=version, digest=digest_of(SKILL, version),
        limits=skill_pb2.Limits(memory_bytes=1 << 20), state=PENDING,
        history=[Transition(PENDING, PENDING, 1, "created")], previous_id="", previous_version="",
        create_ns=1, update_ns=1, env=env, capabilities=[f"env:{k}" for k in env])


def route_with(env: dict[str, str]) -> routing_pb2.Route:
    return routing_pb2.Route(skill=SKILL, targets=[routing_pb2.RouteTarget(
        version="1.0.0", digest=digest_of(SKILL, "1.0.0"), weight=100, env=env)])


async def test_env_values_are_in_no_file_no_response_and_no_log_line(
        granted: Env, caplog: pytest.LogCaptureFixture, umask_022: None) -> None:
    caplog.set_level(logging.DEBUG)
    secret = distinctive()
    deployer = await granted.deployer()
    stub = granted.deployer_stub(deployer)
    first, messages = await deploy(granted, stub, "1.0.0", {"GREETING": "Hello", "API_TOKEN": secret})
    assert first.state == ACTIVE
    # A version whose smoke example prints the secret: the executor's refusal quotes the output.
    for executor in granted.executors:
        executor.fail_load[digest_of(SKILL, "2.0.0")] = ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION, Reason.SMOKE_TEST_FAILED,
            f"smoke example 0 printed b'token={secret}' instead of b'ok'")
    failed, failed_messages = await deploy(granted, stub, "2.0.0", {})  # API_TOKEN kept from 1.0.0
    assert failed.state == FAILED
    assert any(REDACTED in m for m in failed_messages), failed_messages

    # The internal route feed (to dispatchers, and on to executors) is where the value travels.
    assert dict((await first_table(stub)).routes[0].targets[0].env)["API_TOKEN"] == secret

    # No response of the public service carries it: not as a field, not inside a reason or a message.
    responses: list[bytes] = [m.encode() for m in messages + failed_messages]
    for deployment in (first, failed):
        responses.append((await stub.GetDeployment(pb.GetDeploymentRequest(id=deployment.id))).SerializeToString())
        responses += [e.SerializeToString() for e in await watch_to_end(stub, deployment.id)]
    responses.append((await stub.ListDeployments(pb.ListDeploymentsRequest())).SerializeToString())
    again = await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="3.0.0"), timeout=5)
    responses.append(again.SerializeToString())
    responses += [e.SerializeToString() for e in await watch_to_end(stub, again.deployment.id)]
    responses.append((await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=5)).SerializeToString())
    assert not [r for r in responses if secret.encode() in r]
    assert any(REDACTED.encode() in r for r in responses)

    # Nor does any file of the data directory, WAL included, while it runs and after it stopped; all private.
    data_dir = granted.data_dir
    assert {p.name for p in files_under(data_dir)} >= {"deployer.sqlite3", "deployer.sqlite3-wal", KEY_FILE}
    assert files_holding(data_dir, secret) == []
    assert mode(data_dir) == 0o700
    assert {p.name: mode(p) for p in files_under(data_dir)} == {p.name: 0o600 for p in files_under(data_dir)}
    await deployer.stop(grace=0.2)
    assert files_holding(data_dir, secret) == []

    # Nor any log line (the failed preload's reason is logged with its transition).
    lines = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert not [line for line in lines if secret in line]
    assert any(REDACTED in line for line in lines)


async def test_a_restart_with_the_same_key_serves_the_values(granted: Env) -> None:
    secret = distinctive()
    deployer = await granted.deployer()
    stub = granted.deployer_stub(deployer)
    await deploy(granted, stub, "1.0.0", {"GREETING": "Hello", "API_TOKEN": secret})
    await deployer.stop(grace=0.2)
    stub = granted.deployer_stub(await granted.deployer())
    assert dict((await first_table(stub)).routes[0].targets[0].env) == {"GREETING": "Hello", "API_TOKEN": secret}
    # A redeploy that leaves API_TOKEN out keeps it: the value was read back from the sealed row.
    second, _ = await deploy(granted, stub, "2.0.0", {"GREETING": "Hi"})
    assert list(second.inherited_env) == ["API_TOKEN"]
    assert dict((await first_table(stub)).routes[0].targets[0].env)["API_TOKEN"] == secret


async def test_files_are_private_whatever_the_umask_and_existing_ones_are_tightened(
        tmp_path: Path, umask_022: None) -> None:
    data_dir = tmp_path / "deployer"
    data_dir.mkdir(mode=0o755)
    db = data_dir / "deployer.sqlite3"
    sqlite3.connect(db).close()
    db.chmod(0o644)
    assert (mode(data_dir), mode(db)) == (0o755, 0o644)
    store = await SqliteDeploymentStore.open(db)
    try:
        await store.create_deployment(record("d1", {"API_TOKEN": distinctive()}))
        names = {p.name: mode(p) for p in files_under(data_dir)}
        assert set(names) >= {"deployer.sqlite3", "deployer.sqlite3-wal", "deployer.sqlite3-shm", KEY_FILE}
        assert names == dict.fromkeys(names, 0o600)
        assert mode(data_dir) == 0o700
    finally:
        await store.close()


async def test_values_are_sealed_with_the_key_file_and_read_back(store_backend: StoreBackend) -> None:
    secret = distinctive()
    store = await store_backend.open()
    try:
        await store.create_deployment(record("d1", {"API_TOKEN": secret}))
        await store.save_route(1, SKILL, StoredRoute("d1", route_with({"API_TOKEN": secret})))
    finally:
        await store.close()
    key_file = store_backend.key_file
    keys = [line for line in key_file.read_text().splitlines() if line and not line.startswith("#")]
    assert len(keys) == 1 and Fernet(keys[0].encode())
    (env, kid), = await store_backend.rows("SELECT env, env_key FROM deployments")
    (blob, route_kid), = await store_backend.rows("SELECT route, route_key FROM routes")
    assert kid == route_kid == key_id(keys[0].encode())
    assert secret not in env and secret.encode() not in blob

    store = await store_backend.open()
    try:
        found = await store.get_deployment("d1")
        assert found is not None and found.env == {"API_TOKEN": secret}
        assert dict((await store.load_routes()).routes[SKILL].route.targets[0].env) == {"API_TOKEN": secret}
    finally:
        await store.close()


async def sealed_database(tmp_path: Path, secret: str) -> Path:
    backend = StoreBackend("sqlite", tmp_path / "d")
    await sealed_store(backend, secret)
    return backend.sqlite_path


async def sealed_store(backend: StoreBackend, secret: str) -> None:
    store = await backend.open()
    try:
        await store.create_deployment(record("d1", {"API_TOKEN": secret}))
    finally:
        await store.close()


async def refusal(backend: StoreBackend, key_file: Path | None = None) -> str:
    with pytest.raises(SecretsKeyError) as caught:
        store = await backend.open(key_file)
        await store.close()
    message = str(caught.value)
    assert "\n" not in message
    return message


async def test_a_wrong_missing_or_unsafe_key_file_is_one_clear_line(store_backend: StoreBackend,
                                                                    tmp_path: Path) -> None:
    secret = distinctive()
    await sealed_store(store_backend, secret)
    key_file = store_backend.key_file
    good = key_file.read_bytes()
    old_id = key_id(next(line for line in good.splitlines() if line and not line.startswith(b"#")))

    key_file.write_bytes(Fernet.generate_key() + b"\n")
    message = await refusal(store_backend)
    assert str(key_file) in message and old_id in message and "does not hold key" in message

    key_file.unlink()
    message = await refusal(store_backend)
    assert str(key_file) in message and "missing" in message
    assert not key_file.exists()  # not replaced by a fresh key while sealed rows need the old one

    key_file.write_bytes(good)
    key_file.chmod(0o644)
    message = await refusal(store_backend)
    assert str(key_file) in message and "0644" in message and "chmod 600" in message

    key_file.chmod(0o600)
    key_file.write_bytes(good + b"not-a-key-" + secret.encode() + b"\n")
    message = await refusal(store_backend)
    assert str(key_file) in message and "line 4" in message and secret not in message

    # Another key file named by the setting: the same checks, against that file.
    elsewhere = tmp_path / "elsewhere.key"
    message = await refusal(store_backend, elsewhere)
    assert str(elsewhere) in message and "missing" in message


def test_the_deployer_process_refuses_a_wrong_key_in_one_line(tmp_path: Path) -> None:
    secret = distinctive()
    path = asyncio.run(sealed_database(tmp_path, secret))
    other = tmp_path / "other.key"
    other.write_bytes(Fernet.generate_key() + b"\n")
    other.chmod(0o600)
    environment = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off",
                   "CLAWHUB_DEPLOYER_DATA_DIR": str(path.parent), "CLAWHUB_DEPLOYER_PORT": "0",
                   "CLAWHUB_DEPLOYER_SECRETS_KEY_FILE": str(other)}
    environment.pop("CLAWHUB_SUPERVISOR_FD", None)
    done = subprocess.run([sys.executable, "-m", "services.deployer"], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(other) in lines[0] and "does not hold key" in lines[0] and secret not in done.stderr


async def test_rotation_reseals_every_row_under_the_newest_key(store_backend: StoreBackend) -> None:
    secret = distinctive()
    await sealed_store(store_backend, secret)
    store = await store_backend.open()
    try:
        await store.save_route(1, SKILL, StoredRoute("d1", route_with({"API_TOKEN": secret})))
    finally:
        await store.close()
    key_file = store_backend.key_file
    old = next(line for line in key_file.read_bytes().splitlines() if line and not line.startswith(b"#"))
    new = Fernet.generate_key()
    key_file.write_bytes(b"# rotated\n" + new + b"\n" + old + b"\n")

    store = await store_backend.open()
    await store.close()
    kids = {r[0] for r in await store_backend.rows(
        "SELECT env_key FROM deployments UNION ALL SELECT route_key FROM routes")}
    assert kids == {key_id(new)}

    # The old key can go now.
    key_file.write_bytes(new + b"\n")
    store = await store_backend.open()
    try:
        found = await store.get_deployment("d1")
        assert found is not None and found.env == {"API_TOKEN": secret}
        assert dict((await store.load_routes()).routes[SKILL].route.targets[0].env) == {"API_TOKEN": secret}
    finally:
        await store.close()
    assert files_holding(store_backend.directory, secret) == []


async def test_an_old_plain_database_is_sealed_and_scrubbed_on_upgrade(tmp_path: Path, umask_022: None) -> None:
    secret = distinctive()
    path = tmp_path / "d" / "deployer.sqlite3"
    path.parent.mkdir(mode=0o755)
    event = pb.WatchDeploymentResponse(
        deployment=pb.Deployment(id="d1", skill=SKILL, state=release_pb2.RELEASE_STATE_FAILED),
        message=f"LoadSkill failed: smoke example 0 printed b'{secret}' instead of b'ok'", sequence=1,
        event=pb.DeploymentEvent(kind=pb.DEPLOYMENT_EVENT_KIND_PRELOAD_FAILED, reason=f"printed {secret}"))
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        for script in MIGRATIONS[:5]:
            db.executescript(script)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (5)")
        db.execute("INSERT INTO deployments (id, skill, version, digest, limits, state, create_ns, update_ns, env, "
                   "verdict_reason) VALUES ('d1', ?, '1.0.0', ?, x'', ?, 1, 1, ?, ?)",
                   (SKILL, digest_of(SKILL, "1.0.0"), int(ACTIVE), f'{{"API_TOKEN": "{secret}"}}',
                    f"breach: output {secret}"))
        db.execute("INSERT INTO transitions VALUES ('d1', 0, ?, ?, 1, ?)",
                   (int(DEPLOYING), int(ACTIVE), f"preload failed: printed {secret}"))
        db.execute("INSERT INTO deployment_events VALUES ('d1', 1, ?)", (event.SerializeToString(),))
        db.execute("INSERT INTO routes VALUES (?, 'd1', ?)",
                   (SKILL, route_with({"API_TOKEN": secret}).SerializeToString()))
        db.commit()
    finally:
        db.close()
    assert files_holding(path.parent, secret)

    store = await SqliteDeploymentStore.open(path)
    try:
        found = await store.get_deployment("d1")
        assert found is not None and found.env == {"API_TOKEN": secret}
        assert REDACTED in found.history[0].reason and secret not in found.history[0].reason
        assert secret not in found.verdict_reason
        logged = await store.list_events("d1")
        assert secret.encode() not in logged[0].SerializeToString() and REDACTED in logged[0].message
        assert dict((await store.load_routes()).routes[SKILL].route.targets[0].env) == {"API_TOKEN": secret}
        assert files_holding(path.parent, secret) == []
        assert mode(path.parent) == 0o700 and mode(path) == 0o600
    finally:
        await store.close()
    assert files_holding(path.parent, secret) == []


def test_redaction_covers_the_bytes_repr_of_a_value_and_leaves_short_values_alone() -> None:
    REDACTOR.add(["pässwörd-123", "abc"])
    assert REDACTOR.redact("x pässwörd-123 y") == f"x {REDACTED} y"
    shown = repr("pässwörd-123".encode())
    assert REDACTOR.redact(f"printed {shown}") == f"printed b'{REDACTED}'"
    assert REDACTOR.redact("abc") == "abc"
