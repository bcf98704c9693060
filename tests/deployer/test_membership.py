"""Executors joining and leaving at run time (services/deployer/membership.py): registration with a lease, DNS
names, preloading before publication. A real deployer and dispatcher against fake executors over real gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.deployer.v1 import deployer_internal_pb2 as internal_pb
from clawhub.dispatcher.v1 import dataplane_pb2 as dataplane_pb
from clawhub.dispatcher.v1 import dataplane_pb2_grpc as dataplane_grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.executor.v1 import executor_service_pb2_grpc as executor_grpc
from google.protobuf import duration_pb2

from services.deployer.membership import address_problem, split_addresses
from services.deployer.plan import Defaults
from services.deployer.server import build_server as build_deployer
from services.deployer.settings import Settings as DeployerSettings
from services.deployer.store import DeploymentStore
from services.runtime.errors import Reason, bad_request
from services.runtime.server import ServiceHost, create_server
from services.runtime.settings import SettingsError
from tests.deployer.conftest import Env
from tests.deployer.fakes import SKILL, FakeExecutor, digest_of, eventually
from tests.deployer.stores import StoreBackend
from tests.deployer.test_deployer import assert_status, deploy


class Observer:
    """Follows WatchRoutes as a dispatcher would (without being counted for acknowledgements) and keeps every
    executor set the deployer published, in order."""

    def __init__(self, stub: object) -> None:
        self.sets: list[tuple[str, ...]] = []
        self.changed = asyncio.Event()
        self._call = stub.WatchRoutes(internal_pb.WatchRoutesRequest())  # type: ignore[attr-defined]
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for response in self._call:
            if response.HasField("executors"):
                self.sets.append(tuple(response.executors.addresses))
                self.changed.set()

    @property
    def current(self) -> tuple[str, ...] | None:
        return self.sets[-1] if self.sets else None

    async def until(self, predicate, timeout: float = 5.0) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while self.current is None or not predicate(self.current):
                self.changed.clear()
                await self.changed.wait()
        assert self.current is not None
        return self.current

    def close(self) -> None:
        self._call.cancel()
        self._task.cancel()


@pytest.fixture
async def observers() -> AsyncIterator[list[Observer]]:
    made: list[Observer] = []
    yield made
    for observer in made:
        observer.close()


async def start_deployer(env: Env, *, addresses: tuple[str, ...] | None = None, resolver=None,  # type: ignore[no-untyped-def]
                         dns_interval: float = 5.0) -> ServiceHost:
    settings = DeployerSettings(
        host="127.0.0.1", port=0, data_dir=env.data_dir, registry_address=env.registry_address,
        executor_addresses=addresses if addresses is not None else tuple(e.address for e in env.executors),
        ack_timeout=5.0, load_timeout=5.0, registry_timeout=5.0, grace=0.2, release=Defaults(bake_seconds=0.0),
        progress_interval=0.05, dns_interval=dns_interval)
    kwargs = {"resolver": resolver} if resolver is not None else {}
    return await env.fakes.start_service(build_deployer(settings, **kwargs))


async def fake_executor(env: Env, host: str = "127.0.0.1", port: int = 0) -> tuple[FakeExecutor, ServiceHost]:
    fake = FakeExecutor()

    async def build() -> ServiceHost:
        return create_server("executor", ["clawhub.executor.v1.ExecutorService"], host=host, port=port,
                             grace_seconds=0.2,
                             register=lambda s: executor_grpc.add_ExecutorServiceServicer_to_server(fake, s))

    started = await env.fakes.start_service(build())
    fake.address = f"{host}:{started.port}"
    return fake, started


def lease(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


async def test_a_registered_executor_is_preloaded_before_it_is_published(env: Env, observers: list[Observer],
                                                                         ) -> None:
    deployer = await start_deployer(env)
    stub = env.deployer_stub(deployer)
    deployed, _ = await deploy(env, stub, "1.0.0")
    observer = Observer(stub)
    observers.append(observer)
    static = tuple(e.address for e in env.executors)
    assert await observer.until(lambda s: True) == static

    joining, _ = await fake_executor(env)
    joining.load_gate = asyncio.Event()
    await stub.RegisterExecutor(internal_pb.RegisterExecutorRequest(address=joining.address), timeout=5)
    await eventually(lambda: _true(bool(joining.load_calls)))
    # Its preload is held: however long that takes, it is not published.
    await asyncio.sleep(1.5)
    assert all(joining.address not in s for s in observer.sets), observer.sets
    joining.load_gate.set()
    published = await observer.until(lambda s: joining.address in s)
    assert published == (*static, joining.address)
    assert digest_of(SKILL, "1.0.0") in joining.loaded
    # The route's version, with what a deployment grants: the same request releases send.
    request = joining.load_requests[-1]
    assert (request.skill, request.version, request.digest) == (SKILL, "1.0.0", deployed.digest)

    # A real dispatcher follows the set and sends calls to it.
    dispatcher = await env.dispatcher(deployer)
    data_plane = dataplane_grpc.DataPlaneServiceStub(env._channel(dispatcher))
    call = data_plane.WatchDataPlane(dataplane_pb.WatchDataPlaneRequest(client_id="membership-test"))
    try:
        async with asyncio.timeout(5):
            async for state in call:
                if joining.address in [e.address for e in state.endpoints if e.serving]:
                    break
    finally:
        call.cancel()
    dispatch = env.dispatcher_stub(dispatcher)
    for executor in env.executors:
        executor.mode = "unavailable"
    response = await dispatch.Dispatch(dispatcher_pb.DispatchRequest(skill=SKILL, input=b"hi"), timeout=5)
    assert response.output == b"echo:hi"
    assert [e.request.digest for e in joining.executions] == [deployed.digest]


async def _true(value: bool) -> bool:
    return value


async def test_an_executor_that_stops_renewing_is_dropped_after_its_lease(env: Env, observers: list[Observer],
                                                                         ) -> None:
    deployer = await start_deployer(env)
    stub = env.deployer_stub(deployer)
    await deploy(env, stub, "1.0.0")
    observer = Observer(stub)
    observers.append(observer)
    joining, _ = await fake_executor(env)
    await stub.RegisterExecutor(internal_pb.RegisterExecutorRequest(address=joining.address, lease=lease(1.5)),
                                timeout=5)
    await observer.until(lambda s: joining.address in s)
    started = time.monotonic()
    await observer.until(lambda s: joining.address not in s, timeout=5)
    # Not before its lease ran out (and not much after).
    assert 1.0 < time.monotonic() - started < 4.0

    # Renewing keeps it; deregistering drops it at once.
    again, _ = await fake_executor(env)
    for _ in range(4):
        await stub.RegisterExecutor(internal_pb.RegisterExecutorRequest(address=again.address, lease=lease(1.0)),
                                    timeout=5)
        await asyncio.sleep(0.4)
    assert again.address in await observer.until(lambda s: again.address in s)
    await stub.DeregisterExecutor(internal_pb.DeregisterExecutorRequest(address=again.address), timeout=5)
    await observer.until(lambda s: again.address not in s, timeout=0.9)


async def test_a_release_that_starts_while_an_executor_joins_is_loaded_before_it_joins(
        env: Env, observers: list[Observer]) -> None:
    deployer = await start_deployer(env)
    stub = env.deployer_stub(deployer)
    await deploy(env, stub, "1.0.0")
    observer = Observer(stub)
    observers.append(observer)
    joining, _ = await fake_executor(env)
    joining.load_gate = asyncio.Event()
    await stub.RegisterExecutor(internal_pb.RegisterExecutorRequest(address=joining.address), timeout=5)
    await eventually(lambda: _true(bool(joining.load_calls)))
    # 2.0.0 goes out to the members while the joining executor still loads 1.0.0.
    final, _ = await deploy(env, stub, "2.0.0")
    assert final.digest == digest_of(SKILL, "2.0.0")
    assert digest_of(SKILL, "2.0.0") not in joining.load_calls
    joining.load_gate.set()
    await observer.until(lambda s: joining.address in s)
    assert digest_of(SKILL, "2.0.0") in joining.loaded


async def test_a_dns_name_adds_and_removes_executors(env: Env, observers: list[Observer]) -> None:
    # Two executors on one port at two loopback addresses, as a headless Service's pods are.
    first, host = await fake_executor(env, "127.0.0.2")
    second, _ = await fake_executor(env, "127.0.0.3", host.port)
    answers: dict[str, list[str]] = {"executors.test": ["127.0.0.2"]}
    lookups: list[str] = []

    async def resolver(name: str, port: int) -> list[str]:
        lookups.append(name)
        if name not in answers:
            raise OSError("temporary failure in name resolution")
        return answers[name]

    static = env.executors[0].address
    deployer = await start_deployer(env, addresses=(static, f"dns:///executors.test:{host.port}"), resolver=resolver,
                                    dns_interval=0.1)
    stub = env.deployer_stub(deployer)
    await deploy(env, stub, "1.0.0")
    observer = Observer(stub)
    observers.append(observer)
    assert await observer.until(lambda s: first.address in s) == (static, first.address)
    assert digest_of(SKILL, "1.0.0") in first.loaded
    answers["executors.test"] = ["127.0.0.3", "127.0.0.2"]
    assert await observer.until(lambda s: second.address in s) == (static, first.address, second.address)
    assert digest_of(SKILL, "1.0.0") in second.loaded
    answers["executors.test"] = ["127.0.0.3"]
    assert await observer.until(lambda s: first.address not in s) == (static, second.address)
    # A lookup that fails keeps what the name last resolved to.
    del answers["executors.test"]
    count = len(lookups)
    await eventually(lambda: _true(len(lookups) > count + 2))
    assert observer.current == (static, second.address)
    # Releases preload on the members found by DNS.
    final, _ = await deploy(env, stub, "2.0.0")
    assert digest_of(SKILL, "2.0.0") in second.loaded and digest_of(SKILL, "2.0.0") not in first.loaded


async def test_registrations_are_checked(env: Env) -> None:
    deployer = await start_deployer(env)
    stub = env.deployer_stub(deployer)
    for request, field in [(internal_pb.RegisterExecutorRequest(), "address"),
                           (internal_pb.RegisterExecutorRequest(address="executor"), "address"),
                           (internal_pb.RegisterExecutorRequest(address="a b:1"), "address"),
                           (internal_pb.RegisterExecutorRequest(address="10.0.0.1:50055", lease=lease(0.5)), "lease"),
                           (internal_pb.RegisterExecutorRequest(address="10.0.0.1:50055", lease=lease(301)), "lease")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RegisterExecutor(request, timeout=5)
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
        violations = bad_request(caught.value)
        assert violations is not None and [v.field for v in violations.field_violations] == [field]
    response = await stub.RegisterExecutor(internal_pb.RegisterExecutorRequest(address="[::1]:50055"), timeout=5)
    assert response.lease.ToNanoseconds() == 10 * 10**9


def test_addresses_split_into_static_and_dns_names() -> None:
    assert split_addresses(("10.0.0.1:1", "dns:///executor.clawhub.svc:50055", "dns://8.8.8.8/x:2", "dns:y:3")) == (
        ("10.0.0.1:1",), (("executor.clawhub.svc", 50055), ("x", 2), ("y", 3)))
    with pytest.raises(SettingsError, match="dns:///NAME:PORT"):
        split_addresses(("dns:///executor",))
    assert address_problem("executor-0.executor:50055") is None
    assert address_problem("[fe80::1]:1") is None
    assert address_problem("executor:0") is not None


async def test_leases_are_stored(store_backend: StoreBackend) -> None:
    store: DeploymentStore = await store_backend.open()
    try:
        assert await store.executor_leases() == {}
        await store.renew_executor_lease("10.0.0.1:50055", 100)
        await store.renew_executor_lease("10.0.0.2:50055", 200)
        await store.renew_executor_lease("10.0.0.1:50055", 300)
        assert await store.executor_leases() == {"10.0.0.1:50055": 300, "10.0.0.2:50055": 200}
        # A cleanup that raced a renewal leaves the renewed lease alone.
        await store.drop_executor_lease("10.0.0.1:50055", expired_by_ns=250)
        await store.drop_executor_lease("10.0.0.2:50055", expired_by_ns=250)
        assert await store.executor_leases() == {"10.0.0.1:50055": 300}
        await store.drop_executor_lease("10.0.0.1:50055")
        assert await store.executor_leases() == {}
    finally:
        await store.close()


async def test_a_registration_at_a_standby_counts_and_outlives_a_failover(env: Env, observers: list[Observer],
                                                                          postgres_url: str, tmp_path: Path) -> None:
    from tests.deployer.test_leader import leads

    def replica(name: str):  # type: ignore[no-untyped-def]
        return env.deployer(database_url=postgres_url, deployer_id=name, data_dir=tmp_path / name,
                            key_file=tmp_path / "secrets.key")

    leader = await replica("first")
    standby = await replica("second")
    leader_stub, standby_stub = env.deployer_stub(leader), env.deployer_stub(standby)
    assert await leads(leader_stub) and not await leads(standby_stub)
    await deploy(env, leader_stub, "1.0.0")
    observer = Observer(leader_stub)
    observers.append(observer)
    joining, _ = await fake_executor(env)
    # The standby takes the registration (the lease is in the shared store); the leader preloads and publishes.
    await standby_stub.RegisterExecutor(internal_pb.RegisterExecutorRequest(address=joining.address), timeout=5)
    await observer.until(lambda s: joining.address in s)
    assert digest_of(SKILL, "1.0.0") in joining.loaded

    await leader.stop(grace=0.2)
    await eventually(lambda: leads(standby_stub), timeout=10)
    after = Observer(standby_stub)
    observers.append(after)
    assert await after.until(lambda s: True) == (*[e.address for e in env.executors], joining.address)


async def test_with_no_static_executor_the_published_set_is_the_registered_ones(env: Env,
                                                                               observers: list[Observer]) -> None:
    """`CLAWHUB_EXECUTOR_ADDRESSES=none` (registration only): nothing is published until an executor
    registers, and then exactly it (no single-host default left in the set)."""
    deployer = await start_deployer(env, addresses=())
    stub = env.deployer_stub(deployer)
    observer = Observer(stub)
    observers.append(observer)
    joining, _ = await fake_executor(env)
    await stub.RegisterExecutor(internal_pb.RegisterExecutorRequest(address=joining.address), timeout=5)
    assert await observer.until(lambda s: joining.address in s) == (joining.address,)
