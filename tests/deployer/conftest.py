"""Fixtures of the deployer tests: fake registry and executors, real deployers and dispatchers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_internal_grpc
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc

from services.deployer.breaker import BreakerSettings
from services.deployer.plan import Defaults
from services.deployer.server import build_server as build_deployer
from services.deployer.settings import Settings as DeployerSettings
from services.dispatcher.server import build_server as build_dispatcher
from services.dispatcher.settings import Settings as DispatcherSettings
from services.runtime.server import ServiceHost
from tests.deployer.fakes import SKILL, FakeExecutor, FakeRegistry, Fakes, Starter
from tests.deployer.stores import BACKENDS, StoreBackend


class DeployerStub(deployer_grpc.DeployerServiceStub, deployer_internal_grpc.DeployerInternalServiceStub):
    """Both of the deployer's services over one channel: its public calls, and its internal route and stats
    feeds (DeployerInternalService), which the tests call as a dispatcher would."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        deployer_grpc.DeployerServiceStub.__init__(self, channel)
        deployer_internal_grpc.DeployerInternalServiceStub.__init__(self, channel)

@dataclass
class Env:
    """One test's platform: a fake registry, fake executors, and real deployers/dispatchers on demand."""

    fakes: Fakes
    data_dir: Path
    registry: FakeRegistry
    registry_address: str
    executors: list[FakeExecutor]
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def deployer(self, *, port: int = 0, ack_timeout: float = 5.0, registry_address: str | None = None,
                       release: Defaults | None = None, breaker: BreakerSettings | None = None,
                       clock: Callable[[], int] = time.time_ns, database_url: str = "", deployer_id: str = "",
                       data_dir: Path | None = None, key_file: Path | None = None, election_interval: float = 0.2,
                       lease_timeout: float = 2.0) -> ServiceHost:
        """A real deployer. Unless `release` says otherwise, releases have no bake window (the tests of
        analysis give theirs), and the breaker is off unless `breaker` is given. With `database_url`, a replica
        on PostgreSQL (services/deployer/leader.py), in `data_dir` with the shared `key_file`."""
        settings = DeployerSettings(
            database_url=database_url, deployer_id=deployer_id, secrets_key_file=key_file,
            election_interval=election_interval, lease_timeout=lease_timeout,
            host="127.0.0.1", port=port, data_dir=data_dir or self.data_dir,
            registry_address=registry_address or self.registry_address,
            executor_addresses=tuple(e.address for e in self.executors),
            ack_timeout=ack_timeout, load_timeout=5.0, registry_timeout=5.0, grace=0.2,
            release=release or Defaults(bake_seconds=0.0), breaker=breaker or BreakerSettings(failures=0),
            progress_interval=0.05)
        return await self.fakes.start_service(build_deployer(settings, clock=clock))

    async def dispatcher(self, deployer: ServiceHost, dispatcher_id: str = "dispatcher-1", *,
                         stats_interval: float = 0.02) -> ServiceHost:
        settings = DispatcherSettings(
            host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{deployer.port}",
            executor_addresses=tuple(e.address for e in self.executors), dispatcher_id=dispatcher_id,
            retries=2, dispatch_timeout=10.0, grace=0.2, stats_interval=stats_interval)
        return await self.fakes.start_service(build_dispatcher(settings))

    def _channel(self, host: ServiceHost) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        self.channels.append(ch)
        return ch

    def deployer_stub(self, host: ServiceHost) -> DeployerStub:
        return DeployerStub(self._channel(host))

    def dispatcher_stub(self, host: ServiceHost) -> dispatcher_grpc.DispatcherServiceStub:
        return dispatcher_grpc.DispatcherServiceStub(self._channel(host))


@pytest.fixture
async def env(start_service: Starter, tmp_path: Path) -> AsyncIterator[Env]:
    fakes = Fakes(start_service)
    registry, registry_address = await fakes.registry()
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        registry.add(SKILL, version)
    registry.add(SKILL, "2.1.0", state=release_pb2.RELEASE_STATE_VERIFYING)
    executors = [await fakes.executor(), await fakes.executor()]
    environment = Env(fakes, tmp_path / "deployer", registry, registry_address, executors)
    yield environment
    for ch in environment.channels:
        await ch.close()
    for executor in executors:
        if executor.load_gate is not None:
            executor.load_gate.set()


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    """The test runs once on sqlite and once on PostgreSQL (skipped with the reason where none is configured)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    return StoreBackend(request.param, tmp_path / "d", url)
