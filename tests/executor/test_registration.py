"""An executor that registers with the deployer (CLAWHUB_EXECUTOR_REGISTER_WITH) joins a running platform and
takes traffic through the gateway within seconds; killed, it is dropped when its lease runs out
(services/executor/registration.py, services/deployer/membership.py). Every service is real; the joining
executor is a process of its own, so it can be SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.dispatcher.v1 import dataplane_pb2 as dataplane_pb
from clawhub.dispatcher.v1 import dataplane_pb2_grpc as dataplane_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.deployer.plan import Defaults
from services.deployer.server import build_server as build_deployer
from services.deployer.settings import Settings as DeployerSettings
from services.dispatcher.server import build_server as build_dispatcher
from services.dispatcher.settings import Settings as DispatcherSettings
from services.executor.registration import advertise_address
from services.executor.server import build_server as build_executor
from services.executor.settings import Settings as ExecutorSettings
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from tests.conftest import Starter
from tests.e2e.topology import free_port
from tests.gateway.support import ECHO, ECHO_SKILL, publish_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def processes() -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started  # type: ignore[misc]
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def start_executor_process(tmp_path: Path, *, registry: str, deployer: str, port: int,
                           ) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWHUB_")}
    env.update({"PYTHONUNBUFFERED": "1", "CLAWHUB_INTERNAL_AUTH": "off", "CLAWHUB_RATE_LIMITS": "off",
                "CLAWHUB_EXECUTOR_HOST": "127.0.0.1", "CLAWHUB_EXECUTOR_PORT": str(port),
                "CLAWHUB_EXECUTOR_DATA_DIR": str(tmp_path / "joining"), "CLAWHUB_REGISTRY_ADDRESS": registry,
                "CLAWHUB_EXECUTOR_REGISTER_WITH": deployer, "CLAWHUB_EXECUTOR_LEASE": "2",
                "CLAWHUB_EXECUTOR_THREADS": "2"})
    log = tmp_path / "joining.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "services.executor"], env=env, cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return process, log


async def endpoints(dispatcher: str) -> AsyncIterator[list[str]]:
    """The executor addresses the dispatcher publishes to gateways, at every change."""
    async with grpc.aio.insecure_channel(dispatcher) as ch:
        call = dataplane_grpc.DataPlaneServiceStub(ch).WatchDataPlane(
            dataplane_pb.WatchDataPlaneRequest(client_id="registration-test"))
        try:
            async for state in call:
                yield [e.address for e in state.endpoints]
        finally:
            call.cancel()


async def test_an_executor_started_later_takes_traffic_and_is_dropped_when_killed(
        start_service: Starter, tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", shutdown_grace_seconds=0.5)))
    registry_address = f"127.0.0.1:{registry.port}"
    async with grpc.aio.insecure_channel(registry_address) as ch:
        version = await publish_dir(registry_grpc.RegistryServiceStub(ch), ECHO)
    first = await start_service(build_executor(ExecutorSettings(
        host="127.0.0.1", port=0, registry_address=registry_address, threads=2, queue=16,
        data_dir=tmp_path / "first", grace_seconds=0.2)))
    first_address = f"127.0.0.1:{first.port}"
    deployer = await start_service(build_deployer(DeployerSettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "deployer", registry_address=registry_address,
        executor_addresses=(first_address,), grace=0.2, release=Defaults(bake_seconds=0.0))))
    deployer_address = f"127.0.0.1:{deployer.port}"
    dispatcher = await start_service(build_dispatcher(DispatcherSettings(
        host="127.0.0.1", port=0, deployer_address=deployer_address, executor_addresses=(first_address,),
        dispatcher_id="registration-test", grace=0.2)))
    dispatcher_address = f"127.0.0.1:{dispatcher.port}"
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address=dispatcher_address, registry_address=registry_address,
        deployer_address=deployer_address, grace_seconds=0.2)))

    async with grpc.aio.insecure_channel(deployer_address) as ch:
        stub = deployer_grpc.DeployerServiceStub(ch)
        created = await stub.CreateDeployment(deployer_pb.CreateDeploymentRequest(
            skill=version.name, version=version.version), timeout=10)
        async with asyncio.timeout(30):
            async for event in stub.WatchDeployment(deployer_pb.WatchDeploymentRequest(id=created.deployment.id)):
                final = event.deployment
        assert final.state == release_pb2.RELEASE_STATE_ACTIVE, final

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        gateway_stub = gateway_grpc.GatewayServiceStub(ch)

        async def invoke(timeout: float = 5.0) -> str:
            response = await gateway_stub.InvokeSkill(gateway_pb.InvokeSkillRequest(
                name=ECHO_SKILL, raw_input=b'"hi"'), timeout=timeout)
            return str(response.output.string_value)

        assert await invoke() == "hi"
        # Only the executor that joins can serve from now on.
        await first.stop(grace=0.2)

        port = free_port()
        joining = f"127.0.0.1:{port}"
        started = time.monotonic()
        process, log = start_executor_process(tmp_path, registry=registry_address, deployer=deployer_address,
                                              port=port)
        processes.append(process)
        served = None
        async with asyncio.timeout(30):
            while served is None:
                assert process.poll() is None, log.read_text()
                try:
                    served = await invoke(timeout=2.0)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
        joined_after = time.monotonic() - started
        assert served == "hi"
        # Python's start-up included (a couple of seconds on a loaded machine).
        assert joined_after < 15, joined_after
        text = log.read_text()
        assert f"registered {joining} with the deployer" in text, text

        # SIGKILL: no deregistration. The deployer drops it once its 2 s lease runs out, and the dispatcher
        # stops publishing it (not merely as not serving: gone from the set).
        watch = endpoints(dispatcher_address)
        assert joining in await anext(watch)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed = time.monotonic()
        async with asyncio.timeout(10):
            async for addresses in watch:
                if joining not in addresses:
                    break
        await watch.aclose()
        gone_after = time.monotonic() - killed
        assert 1.0 < gone_after < 6.0, gone_after
        print(f"joined and served after {joined_after:.1f}s (process start included); dropped {gone_after:.1f}s "
              "after SIGKILL (lease 2s)")


def test_the_advertised_address_defaults_to_where_the_executor_listens() -> None:
    assert advertise_address("executor-0.executor:50055", "0.0.0.0", 1) == "executor-0.executor:50055"
    assert advertise_address("", "127.0.0.1", 50056) == "127.0.0.1:50056"
    assert advertise_address("", "::1", 50056) == "[::1]:50056"
    host = advertise_address("", "0.0.0.0", 50056)
    assert host.endswith(":50056") and not host.startswith("0.0.0.0")
