"""The deployer against a fake registry and fake executors over real gRPC, with real dispatchers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb

from services.runtime.errors import Reason, ServiceError, bad_request, error_info
from tests.deployer.conftest import Env
from tests.deployer.fakes import SKILL, digest_of, eventually

READY = release_pb2.RELEASE_STATE_READY
DEPLOYING = release_pb2.RELEASE_STATE_DEPLOYING
ACTIVE = release_pb2.RELEASE_STATE_ACTIVE
ROLLING_BACK = release_pb2.RELEASE_STATE_ROLLING_BACK
FAILED = release_pb2.RELEASE_STATE_FAILED


def steps(deployment: pb.Deployment) -> list[tuple[int, int]]:
    return [(t.from_state, t.to_state) for t in deployment.history]


async def watch_to_end(stub, deployment_id: str, timeout: float = 10.0) -> list[pb.WatchDeploymentResponse]:
    async with asyncio.timeout(timeout):
        return [event async for event in stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id))]


async def deploy(env: Env, stub, version: str, **kwargs) -> tuple[pb.Deployment, list[str]]:
    """Create a deployment and watch it to its end; the final deployment and every event message.

    The executors hold LoadSkill until the watch is subscribed, so no progress event can be missed.
    """
    gates = [asyncio.Event() for _ in env.executors]
    for executor, gate in zip(env.executors, gates, strict=True):
        executor.load_gate = gate
    try:
        created = await stub.CreateDeployment(
            pb.CreateDeploymentRequest(skill=SKILL, version=version, **kwargs), timeout=5)
        call = stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.deployment.id))
        async with asyncio.timeout(10):
            events = [await call.read()]
            for gate in gates:
                gate.set()
            events += await read_rest(call)
    finally:
        for executor, gate in zip(env.executors, gates, strict=True):
            gate.set()
            executor.load_gate = None
    return events[-1].deployment, [e.message for e in events]


async def read_rest(call) -> list:
    """The rest of a stream already read with `read()` (the two reading styles cannot be mixed)."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def first_table(stub):
    """The route table a watcher gets first (the current one), read without being counted as a dispatcher."""
    call = stub.WatchRoutes(internal_pb.WatchRoutesRequest())
    try:
        async with asyncio.timeout(5):
            response = await call.read()
        return response.route_table
    finally:
        call.cancel()


def assert_status(err: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: Reason, domain: str = "") -> None:
    assert err.code() == code, (err.code(), err.details())
    info = error_info(err)
    assert info is not None and info.reason == reason, info
    if domain:
        assert info.domain == domain


async def test_deploy_goes_active_and_a_real_dispatcher_routes_to_it(env: Env) -> None:
    deployer = await env.deployer()
    dispatcher = await env.dispatcher(deployer)
    stub, dispatch = env.deployer_stub(deployer), env.dispatcher_stub(dispatcher)

    gate = asyncio.Event()
    for executor in env.executors:
        executor.load_gate = gate
    created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"))).deployment
    assert created.state == DEPLOYING
    assert steps(created) == [(READY, DEPLOYING)]
    call = stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id))
    events = [await call.read()]
    gate.set()
    events += await read_rest(call)
    first = events[-1].deployment
    assert first.state == ACTIVE and first.serving
    assert steps(first) == [(READY, DEPLOYING), (DEPLOYING, ACTIVE)]
    assert first.digest == digest_of(SKILL, "1.0.0") and first.previous_version == ""
    messages = [e.message for e in events]
    for executor in env.executors:
        assert f"preloaded on {executor.address}" in messages
        assert first.digest in executor.loaded
    assert "route generation 1 pushed" in messages

    async def dispatcher_generation() -> int:
        return (await dispatch.GetRouteTable(dispatcher_pb.GetRouteTableRequest())).route_table.generation

    await eventually(lambda: _equals(dispatcher_generation(), 1))
    response = await dispatch.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=b"hi"), timeout=5)
    assert response.output == b"echo:hi"
    assert (response.version, response.digest) == ("1.0.0", first.digest)
    ran_on = next(e for e in env.executors if e.address == response.executor)
    assert ran_on.executions[-1].request.digest == first.digest
    assert ran_on.executions[-1].request.limits.memory_bytes == 1 << 20

    # The dispatcher is connected now: the next generation must be acknowledged by it.
    second, messages = await deploy(env, stub, "2.0.0")
    assert second.state == ACTIVE and second.serving and second.previous_version == "1.0.0"
    assert "route generation 2 pushed" in messages
    assert "acknowledged by 1/1 dispatchers" in messages
    assert "acknowledged by 1/1 dispatchers" in second.history[-1].reason
    assert await dispatcher_generation() == 2
    response = await dispatch.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=b"x"), timeout=5)
    assert (response.version, response.digest) == ("2.0.0", digest_of(SKILL, "2.0.0"))

    replaced = (await stub.GetDeployment(pb.GetDeploymentRequest(id=first.id))).deployment
    assert replaced.state == ACTIVE and not replaced.serving


async def _equals(value, expected) -> bool:
    return await value == expected


async def test_version_not_ready_is_refused(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="2.1.0"))
    assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_NOT_READY, "deployer.clawhub")
    assert error_info(caught.value).metadata["state"] == "Verifying"


async def test_unknown_version_not_found_passes_through(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="9.9.9"))
    assert_status(caught.value, grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND, "registry.clawhub")


async def test_bad_names_are_invalid_arguments(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    for request, reason, field_name in [
        (pb.CreateDeploymentRequest(skill="Not A Name", version="1.0.0"), Reason.INVALID_NAME, "skill"),
        (pb.CreateDeploymentRequest(skill=SKILL, version="1.0"), Reason.INVALID_VERSION, "version"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateDeployment(request)
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, reason)
        assert [v.field for v in bad_request(caught.value).field_violations] == [field_name]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rollback(pb.RollbackRequest(skill="bad"))
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_NAME)


async def test_registry_down_is_unavailable_with_a_reason(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer(registry_address="127.0.0.1:1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"), timeout=5)
    assert_status(caught.value, grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE)


async def test_preload_failure_fails_the_deployment_and_the_previous_version_keeps_serving(env: Env) -> None:
    deployer = await env.deployer()
    stub = env.deployer_stub(deployer)
    first, _ = await deploy(env, stub, "1.0.0")
    assert first.state == ACTIVE
    broken, healthy = env.executors
    new_digest = digest_of(SKILL, "2.0.0")
    broken.fail_load[new_digest] = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MODULE_INVALID,
                                                "the module does not compile")

    failed, _ = await deploy(env, stub, "2.0.0")
    assert failed.state == FAILED and not failed.serving
    assert steps(failed) == [(READY, DEPLOYING), (DEPLOYING, ROLLING_BACK), (ROLLING_BACK, FAILED)]
    reason = failed.history[-1].reason
    assert f"LoadSkill on {broken.address} failed: INVALID_ARGUMENT MODULE_INVALID" in reason
    assert "previous version 1.0.0 still serving" in reason
    # The healthy executor loaded the failed version; it is dropped again since no route uses it.
    assert new_digest in healthy.unloaded and new_digest not in healthy.loaded

    still = (await stub.GetDeployment(pb.GetDeploymentRequest(id=first.id))).deployment
    assert still.state == ACTIVE and still.serving
    table = await first_table(stub)
    assert table.generation == 1
    assert [t.digest for t in table.routes[0].targets] == [first.digest]


async def test_first_deploy_failure_has_no_previous_version(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    env.executors[0].fail_load[digest_of(SKILL, "1.0.0")] = ServiceError(
        grpc.StatusCode.NOT_FOUND, Reason.BLOB_NOT_FOUND, "no blob")
    failed, _ = await deploy(env, stub, "1.0.0")
    assert failed.state == FAILED
    assert steps(failed) == [(READY, DEPLOYING), (DEPLOYING, ROLLING_BACK), (ROLLING_BACK, FAILED)]
    assert "no version of the skill was serving" in failed.history[-1].reason
    assert (await first_table(stub)).routes == []


async def test_unacknowledged_generation_rolls_back_to_the_previous_routes(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer(ack_timeout=0.3))
    # Play a dispatcher by hand: read the stream, acknowledge only what the test says.
    tables: asyncio.Queue = asyncio.Queue()
    call = stub.WatchRoutes(internal_pb.WatchRoutesRequest(dispatcher_id="manual"))

    async def read() -> None:
        async for response in call:
            await tables.put(response.route_table)

    reader = asyncio.create_task(read())
    try:
        assert (await asyncio.wait_for(tables.get(), 5)).generation == 0
        created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0")))
        table = await asyncio.wait_for(tables.get(), 5)
        assert table.generation == 1
        await stub.AcknowledgeRoutes(internal_pb.AcknowledgeRoutesRequest(dispatcher_id="manual", generation=1))
        first = (await watch_to_end(stub, created.deployment.id))[-1].deployment
        assert first.state == ACTIVE and "acknowledged by 1/1 dispatchers" in first.history[-1].reason

        failed, messages = await deploy(env, stub, "2.0.0")  # never acknowledged
        assert failed.state == FAILED
        assert steps(failed)[-2:] == [(DEPLOYING, ROLLING_BACK), (ROLLING_BACK, FAILED)]
        assert "route generation 2 not acknowledged within 0.3s by manual" in failed.history[-1].reason
        assert "previous version 1.0.0 restored at route generation 3" in failed.history[-1].reason
        assert "route generation 3 pushed (restoring 1.0.0)" in messages
        pushed = [await asyncio.wait_for(tables.get(), 5) for _ in range(2)]
        assert [t.generation for t in pushed] == [2, 3]
        assert pushed[0].routes[0].targets[0].version == "2.0.0"
        assert pushed[1].routes[0].targets[0].version == "1.0.0"
        serving = (await stub.GetDeployment(pb.GetDeploymentRequest(id=first.id))).deployment
        assert serving.serving
    finally:
        call.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_rollback_returns_to_the_previous_version(env: Env) -> None:
    deployer = await env.deployer()
    dispatcher = await env.dispatcher(deployer)
    stub, dispatch = env.deployer_stub(deployer), env.dispatcher_stub(dispatcher)
    first, _ = await deploy(env, stub, "1.0.0")
    second, _ = await deploy(env, stub, "2.0.0")

    rolled = await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    assert rolled.deployment.id == first.id
    assert rolled.deployment.serving and rolled.deployment.state == ACTIVE
    assert rolled.generation == 3

    reverted = (await stub.GetDeployment(pb.GetDeploymentRequest(id=second.id))).deployment
    assert reverted.state == ACTIVE and not reverted.serving
    assert steps(reverted)[-2:] == [(ACTIVE, ROLLING_BACK), (ROLLING_BACK, ACTIVE)]
    assert reverted.history[-2].reason == "manual rollback to 1.0.0"
    assert "1.0.0" in reverted.history[-1].reason and "generation 3" in reverted.history[-1].reason

    async def routed_version() -> str:
        response = await dispatch.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=b"v"), timeout=5)
        return response.version

    await eventually(lambda: _equals(routed_version(), "1.0.0"))

    # 1.0.0 was the first deployment: there is nothing before it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_PREVIOUS_VERSION)

    # A new deploy after the rollback replaces 1.0.0, and rolling it back goes to 1.0.0 again.
    third, _ = await deploy(env, stub, "3.0.0")
    assert third.previous_version == "1.0.0"
    again = await stub.Rollback(pb.RollbackRequest(skill=SKILL, request_id="r-1"), timeout=10)
    assert again.deployment.id == first.id and again.generation == 5
    replay = await stub.Rollback(pb.RollbackRequest(skill=SKILL, request_id="r-1"), timeout=10)
    assert (replay.deployment.id, replay.generation) == (first.id, 5)


async def test_rollback_without_a_previous_version(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rollback(pb.RollbackRequest(skill=SKILL))
    assert_status(caught.value, grpc.StatusCode.NOT_FOUND, Reason.SKILL_NOT_DEPLOYED)
    await deploy(env, stub, "1.0.0")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rollback(pb.RollbackRequest(skill=SKILL))
    assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_PREVIOUS_VERSION)
    assert error_info(caught.value).metadata["version"] == "1.0.0"


async def test_one_operation_per_skill_at_a_time_and_request_ids_are_idempotent(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    first, _ = await deploy(env, stub, "1.0.0")
    gate = env.executors[0].load_gate = asyncio.Event()
    created = (await stub.CreateDeployment(
        pb.CreateDeploymentRequest(skill=SKILL, version="2.0.0", request_id="req-2"))).deployment
    again = (await stub.CreateDeployment(
        pb.CreateDeploymentRequest(skill=SKILL, version="2.0.0", request_id="req-2"))).deployment
    assert again.id == created.id

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="3.0.0"))
    assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPLOYMENT_IN_PROGRESS)
    assert error_info(caught.value).metadata["deployment_id"] == created.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rollback(pb.RollbackRequest(skill=SKILL))
    assert_status(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.DEPLOYMENT_IN_PROGRESS)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="3.0.0", request_id="req-2"))
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)

    gate.set()
    done = (await watch_to_end(stub, created.id))[-1].deployment
    assert done.state == ACTIVE and done.serving
    replay = (await stub.CreateDeployment(
        pb.CreateDeploymentRequest(skill=SKILL, version="2.0.0", request_id="req-2"))).deployment
    assert replay.id == created.id and replay.state == ACTIVE
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL))
    assert [d.version for d in listed.deployments] == ["2.0.0", "1.0.0"]
    assert first.id == listed.deployments[1].id


async def test_watch_deployment_streams_every_step_to_the_end(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    gate = env.executors[0].load_gate = asyncio.Event()
    created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"))).deployment
    call = stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id))
    events = [await call.read()]
    gate.set()
    events += await read_rest(call)
    assert events[0].deployment.state == DEPLOYING and events[0].message == "currently Deploying"
    assert events[-1].deployment.state == ACTIVE
    messages = [e.message for e in events]
    assert f"preloaded on {env.executors[0].address}" in messages
    assert "acknowledged by 0/0 dispatchers" in messages
    assert messages[-1].startswith("Deploying → Active: ")

    # Watching a settled deployment yields it, then replays what a live watcher saw, and ends.
    after = await watch_to_end(stub, created.id)
    assert after[0].deployment.state == ACTIVE and not after[0].HasField("event")
    assert after[1:] == events[1:]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch_to_end(stub, "0123456789abcdef")
    assert_status(caught.value, grpc.StatusCode.NOT_FOUND, Reason.DEPLOYMENT_NOT_FOUND)


async def _true(value) -> bool:
    return bool(value)


async def test_restart_keeps_route_table_and_generation(env: Env, start_service) -> None:
    deployer = await env.deployer()
    dispatcher = await env.dispatcher(deployer)
    stub, dispatch = env.deployer_stub(deployer), env.dispatcher_stub(dispatcher)
    first, _ = await deploy(env, stub, "1.0.0")
    second, _ = await deploy(env, stub, "2.0.0")
    before = await first_table(stub)
    assert before.generation == 2

    await deployer.stop(grace=0.2)
    # The dispatcher keeps routing with the table it has while the deployer is away.
    response = await dispatch.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=b"a"), timeout=5)
    assert response.version == "2.0.0"

    restarted = await env.deployer(port=deployer.port)
    stub = env.deployer_stub(restarted)
    assert await first_table(stub) == before
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest())
    assert [(d.version, d.serving) for d in listed.deployments] == [("2.0.0", True), ("1.0.0", False)]

    # The generation carries on from the persisted one, and the reconnected dispatcher follows it.
    rolled = await stub.Rollback(pb.RollbackRequest(skill=SKILL), timeout=10)
    assert rolled.generation == 3 and rolled.deployment.id == first.id

    async def dispatcher_generation() -> int:
        return (await dispatch.GetRouteTable(dispatcher_pb.GetRouteTableRequest())).route_table.generation

    await eventually(lambda: _equals(dispatcher_generation(), 3))
    response = await dispatch.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=b"b"), timeout=5)
    assert response.version == "1.0.0"


async def test_restart_settles_a_deployment_left_in_flight(env: Env) -> None:
    deployer = await env.deployer()
    stub = env.deployer_stub(deployer)
    env.executors[0].load_gate = asyncio.Event()
    created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="1.0.0"))).deployment
    await eventually(lambda: _true(env.executors[0].load_calls))
    await deployer.stop(grace=0.2)

    stub = env.deployer_stub(await env.deployer())
    settled = (await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))).deployment
    assert settled.state == FAILED and not settled.serving
    assert steps(settled) == [(READY, DEPLOYING), (DEPLOYING, ROLLING_BACK), (ROLLING_BACK, FAILED)]
    assert settled.history[-1].reason.startswith("deployer restarted mid-deploy")
    # The skill is free to deploy again.
    env.executors[0].load_gate.set()
    again, _ = await deploy(env, stub, "1.0.0")
    assert again.state == ACTIVE


async def test_list_and_get_deployments(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    ids = [(await deploy(env, stub, v))[0].id for v in ("1.0.0", "2.0.0", "3.0.0")]

    page = await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL, page_size=2))
    assert [d.id for d in page.deployments] == ids[:0:-1]
    assert page.next_page_token
    rest = await stub.ListDeployments(pb.ListDeploymentsRequest(skill=SKILL, page_size=2,
                                                                page_token=page.next_page_token))
    assert [d.id for d in rest.deployments] == ids[:1] and rest.next_page_token == ""
    everything = await stub.ListDeployments(pb.ListDeploymentsRequest())
    assert [d.id for d in everything.deployments] == ids[::-1]
    assert [d.serving for d in everything.deployments] == [True, False, False]
    other = await stub.ListDeployments(pb.ListDeploymentsRequest(skill="com.acme.other"))
    assert list(other.deployments) == []

    for token, skill in [("garbage!", SKILL), (page.next_page_token, "com.acme.other")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListDeployments(pb.ListDeploymentsRequest(skill=skill, page_token=token))
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_PAGE_TOKEN)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListDeployments(pb.ListDeploymentsRequest(page_size=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    got = (await stub.GetDeployment(pb.GetDeploymentRequest(id=ids[0]))).deployment
    assert got.version == "1.0.0" and got.create_time.seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDeployment(pb.GetDeploymentRequest(id="0123456789abcdef"))
    assert_status(caught.value, grpc.StatusCode.NOT_FOUND, Reason.DEPLOYMENT_NOT_FOUND)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDeployment(pb.GetDeploymentRequest(id=""))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_acknowledge_requires_a_dispatcher_id(env: Env) -> None:
    stub = env.deployer_stub(await env.deployer())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AcknowledgeRoutes(internal_pb.AcknowledgeRoutesRequest(generation=1))
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)


async def test_restart_restores_the_previous_route_of_a_deployment_killed_after_its_push(env: Env) -> None:
    deployer = await env.deployer(ack_timeout=30)
    stub = env.deployer_stub(deployer)
    first, _ = await deploy(env, stub, "1.0.0")  # no dispatcher yet: nothing to wait for
    # A dispatcher that never acknowledges keeps the next deployment waiting after its push.
    call = stub.WatchRoutes(internal_pb.WatchRoutesRequest(dispatcher_id="silent"))
    assert (await call.read()).route_table.generation == 1
    created = (await stub.CreateDeployment(pb.CreateDeploymentRequest(skill=SKILL, version="2.0.0"))).deployment
    assert (await call.read()).route_table.generation == 2
    await deployer.stop(grace=0.2)
    call.cancel()

    stub = env.deployer_stub(await env.deployer())
    settled = (await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))).deployment
    assert settled.state == FAILED and not settled.serving
    assert settled.history[-1].reason.startswith(
        "deployer restarted mid-deploy; previous version 1.0.0 restored at route generation 3")
    table = await first_table(stub)
    assert table.generation == 3 and table.routes[0].targets[0].version == "1.0.0"
    assert (await stub.GetDeployment(pb.GetDeploymentRequest(id=first.id))).deployment.serving
