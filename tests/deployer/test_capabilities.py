"""Deploy-time environment values, args, file bundles and capabilities: validated, persisted, routed."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import grpc
import pytest
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb

from services.deployer.store import MIGRATIONS, SqliteDeploymentStore
from services.runtime.errors import Reason, bad_request, error_info
from services.runtime.server import configure_logging
from tests.deployer.conftest import Env
from tests.deployer.fakes import SKILL, digest_of, eventually
from tests.deployer.test_deployer import ACTIVE, assert_status, first_table, watch_to_end

CAPABILITIES = ("env:GREETING", "env:API_TOKEN", "files")
BUNDLE = "sha256:" + "b" * 64
SECRET = "tok-9f8e7d6c5b4a"


async def deploy(environment: Env, stub, version: str, env: dict[str, str], request_id: str = "",
                 allow_unset_env: bool = False) -> tuple[pb.Deployment, list[str]]:
    """Deploy with env values and watch the deployment to its end (`deploy` of test_deployer takes no env)."""
    created = await stub.CreateDeployment(pb.CreateDeploymentRequest(
        skill=SKILL, version=version, env=env, request_id=request_id, allow_unset_env=allow_unset_env), timeout=5)
    events = await watch_to_end(stub, created.deployment.id)
    return events[-1].deployment, [e.message for e in events]


@pytest.fixture
def granted(env: Env) -> Env:
    for version in ("1.0.0", "2.0.0"):
        env.registry.add(SKILL, version, capabilities=CAPABILITIES, args=("--loud", version), bundle_digest=BUNDLE,
                         input_schema=schema_of(version))
    return env


def schema_of(version: str) -> str:
    """1.0.0 declares no input_schema, 2.0.0 one."""
    return "" if version == "1.0.0" else '{"type": "string", "maxLength": 5}'


async def test_env_args_bundle_and_capabilities_reach_the_route_the_executors_and_the_dispatch(
        granted: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="clawhub")
    deployer = await granted.deployer()
    dispatcher = await granted.dispatcher(deployer)
    stub, dispatch = granted.deployer_stub(deployer), granted.dispatcher_stub(dispatcher)
    env = {"GREETING": "Hello", "API_TOKEN": SECRET}
    deployment, messages = await deploy(granted, stub, "1.0.0", env)
    assert deployment.state == ACTIVE
    # The history names the variables, never their values.
    assert "with env API_TOKEN, GREETING" in deployment.history[0].reason
    assert SECRET.encode() not in deployment.SerializeToString()
    assert not any(SECRET in m for m in messages)

    target = (await first_table(stub)).routes[0].targets[0]
    assert dict(target.env) == env
    assert list(target.args) == ["--loud", "1.0.0"]
    assert target.bundle_digest == BUNDLE
    assert list(target.capabilities) == list(CAPABILITIES)
    # The schema travels with the target, for the gateway: set, and empty for "no schema".
    assert target.HasField("input_schema") and target.input_schema == ""
    for executor in granted.executors:
        load = executor.load_requests[-1]
        assert (load.digest, load.bundle_digest, list(load.capabilities)) == (
            digest_of(SKILL, "1.0.0"), BUNDLE, list(CAPABILITIES))

    async def routed() -> bool:
        table = (await dispatch.GetRouteTable(dispatcher_pb.GetRouteTableRequest())).route_table
        return bool(table.routes)

    await eventually(routed)
    response = await dispatch.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=b"hi"), timeout=5)
    ran_on = next(e for e in granted.executors if e.address == response.executor)
    request = ran_on.executions[-1].request
    assert dict(request.env) == env and list(request.args) == ["--loud", "1.0.0"]
    assert request.bundle_digest == BUNDLE and list(request.capabilities) == list(CAPABILITIES)
    assert caplog.records and not any(SECRET in r.getMessage() for r in caplog.records)


def test_sql_parameters_are_never_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("aiosqlite")
    before = logger.level
    monkeypatch.setenv("CLAWHUB_LOG_LEVEL", "DEBUG")
    try:
        configure_logging()
        assert logger.getEffectiveLevel() == logging.INFO
    finally:
        logger.setLevel(before)


async def test_a_declared_name_left_without_a_value_is_refused_unless_allowed(granted: Env) -> None:
    stub = granted.deployer_stub(await granted.deployer())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await deploy(granted, stub, "1.0.0", env={"GREETING": "Hi"})
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.ENV_NOT_SET, "deployer.clawhub")
    assert [v.field for v in bad_request(caught.value).field_violations] == ["env[API_TOKEN]"]
    details = caught.value.details() or ""
    # It says how to set it, and how to deploy without it.
    assert f"`clawhub deploy {SKILL}@1.0.0 --env API_TOKEN=value`" in details and "--allow-unset-env" in details
    assert error_info(caught.value).metadata["unset"] == "API_TOKEN"
    assert (await stub.ListDeployments(pb.ListDeploymentsRequest())).deployments == []

    # Explicitly allowed: it goes through, and the deployment says what it left unset.
    deployment, _ = await deploy(granted, stub, "1.0.0", env={"GREETING": "Hi"}, allow_unset_env=True)
    assert deployment.state == ACTIVE and list(deployment.unset_env) == ["API_TOKEN"]
    assert "env API_TOKEN left unset (allowed)" in deployment.history[0].reason
    assert dict((await first_table(stub)).routes[0].targets[0].env) == {"GREETING": "Hi"}

    # The next deploy cannot keep a value the serving deployment does not have either.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await deploy(granted, stub, "2.0.0", env={"GREETING": "Hi"})
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.ENV_NOT_SET)
    assert "nor does 1.0.0, serving now" in (caught.value.details() or "")


async def test_a_new_deploy_keeps_the_values_the_serving_deployment_has(granted: Env) -> None:
    """A new version need not be given its secrets again: names left out keep the serving deployment's values
    (a rollback still goes back to each deployment's own)."""
    deployer = await granted.deployer()
    stub = granted.deployer_stub(deployer)
    first, _ = await deploy(granted, stub, "1.0.0", env={"GREETING": "one", "API_TOKEN": SECRET})
    second, messages = await deploy(granted, stub, "2.0.0", env={"GREETING": "two"}, request_id="req-2")
    assert second.state == ACTIVE and list(second.inherited_env) == ["API_TOKEN"] and not second.unset_env
    assert "with env GREETING (env API_TOKEN kept from 1.0.0)" in second.history[0].reason
    assert SECRET.encode() not in second.SerializeToString() and not any(SECRET in m for m in messages)
    assert dict((await first_table(stub)).routes[0].targets[0].env) == {"GREETING": "two", "API_TOKEN": SECRET}
    # A retry of the same request (without the kept value) is the same deployment, also after a restart.
    await deployer.stop(grace=0.2)
    stub = granted.deployer_stub(await granted.deployer(port=deployer.port))
    again = await stub.CreateDeployment(pb.CreateDeploymentRequest(
        skill=SKILL, version="2.0.0", env={"GREETING": "two"}, request_id="req-2"), timeout=5)
    assert again.deployment.id == second.id and list(again.deployment.inherited_env) == ["API_TOKEN"]
    await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    assert dict((await first_table(stub)).routes[0].targets[0].env) == {"GREETING": "one", "API_TOKEN": SECRET}
    assert list((await stub.GetDeployment(pb.GetDeploymentRequest(id=first.id))).deployment.inherited_env) == []


async def test_undeclared_or_bad_env_is_refused_naming_each_key(granted: Env) -> None:
    stub = granted.deployer_stub(await granted.deployer())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(
            skill=SKILL, version="1.0.0", env={"GREETING": "ok", "HOME": "/root", "AWS_SECRET": SECRET}))
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT, "deployer.clawhub")
    fields = {v.field: v.description for v in bad_request(caught.value).field_violations}
    assert set(fields) == {"env[HOME]", "env[AWS_SECRET]"}
    assert "env:HOME" in fields["env[HOME]"] and "GREETING" in fields["env[HOME]"]
    assert error_info(caught.value).metadata["field"] == "env[AWS_SECRET]"
    assert SECRET not in (caught.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0",
                                                               env={"GREETING": "a\0b"}))
    assert [v.field for v in bad_request(caught.value).field_violations] == ["env[GREETING]"]

    # A skill that declares no env:NAME gets none.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="3.0.0", env={"GREETING": "x"}))
    assert "declares no environment variables" in (caught.value.details() or "")
    # Nothing was deployed.
    assert (await stub.ListDeployments(pb.ListDeploymentsRequest())).deployments == []


async def test_a_retry_with_other_env_values_is_not_the_same_request(granted: Env) -> None:
    stub = granted.deployer_stub(await granted.deployer())
    first, _ = await deploy(granted, stub, "1.0.0", env={"GREETING": "a"}, request_id="req-1", allow_unset_env=True)
    again = await stub.CreateDeployment(pb.CreateDeploymentRequest(
        skill=SKILL, version="1.0.0", env={"GREETING": "a"}, request_id="req-1"))
    assert again.deployment.id == first.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(
            skill=SKILL, version="1.0.0", env={"GREETING": "b"}, request_id="req-1"))
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
    assert [v.field for v in bad_request(caught.value).field_violations] == ["request_id"]


async def test_env_is_persisted_and_rollback_restores_the_previous_deployments_env(granted: Env) -> None:
    deployer = await granted.deployer()
    stub = granted.deployer_stub(deployer)
    await deploy(granted, stub, "1.0.0", env={"GREETING": "one"}, allow_unset_env=True)
    await deploy(granted, stub, "2.0.0", env={"GREETING": "two"}, allow_unset_env=True)
    target = (await first_table(stub)).routes[0].targets[0]
    assert dict(target.env) == {"GREETING": "two"} and target.input_schema == schema_of("2.0.0")

    # Across a restart: the previous deployment's grants come back from the store.
    await deployer.stop(grace=0.2)
    stub = granted.deployer_stub(await granted.deployer(port=deployer.port))
    await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    target = (await first_table(stub)).routes[0].targets[0]
    assert target.version == "1.0.0" and dict(target.env) == {"GREETING": "one"}
    assert target.HasField("input_schema") and target.input_schema == ""
    assert list(target.args) == ["--loud", "1.0.0"] and target.bundle_digest == BUNDLE
    assert list(target.capabilities) == list(CAPABILITIES)


async def test_an_old_database_gains_the_new_columns(tmp_path: Path) -> None:
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
        assert record is not None
        assert (record.env, record.args, record.bundle_digest, record.capabilities) == ({}, [], "", [])
        # Made before targets carried the schema: its target leaves the field unset (the gateway asks the
        # registry for it).
        assert record.input_schema is None and not record.target().HasField("input_schema")
    finally:
        await store.close()


async def test_a_deployment_can_narrow_the_http_hosts_but_never_add_one(env: Env) -> None:
    """`http_allow` (`clawhub deploy --allow-http HOST`) keeps only the listed `http:` capabilities in the route
    the executors get; a host the manifest does not declare is refused, so a deployment can only take away."""
    env.registry.add(SKILL, "1.0.0", capabilities=("kv", "http:api.example.com", "http:*.cdn.example.com"))
    deployer = await env.deployer()
    dispatcher = await env.dispatcher(deployer)
    stub, dispatch = env.deployer_stub(deployer), env.dispatcher_stub(dispatcher)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0",
                                                               http_allow=["http:evil.example.net"]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "evil.example.net" in (caught.value.details() or "")
    created = await stub.CreateDeployment(pb.CreateDeploymentRequest(
        skill=SKILL, version="1.0.0", http_allow=["http:api.example.com"]), timeout=5)
    events = await watch_to_end(stub, created.deployment.id)
    assert events[-1].deployment.state == ACTIVE

    async def narrowed() -> bool:
        table = (await dispatch.GetRouteTable(dispatcher_pb.GetRouteTableRequest(), timeout=5)).route_table
        targets = [t for r in table.routes if r.skill == SKILL for t in r.targets]
        return bool(targets) and list(targets[0].capabilities) == ["kv", "http:api.example.com"]

    await eventually(narrowed)
