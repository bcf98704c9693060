"""Small but real gRPC servers standing in for the registry, the executors and the deployer.

They run on 127.0.0.1:0 behind the shared runtime's bootstrap (so their errors carry the same structured
details as the real services); only their logic is canned.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from clawhub.common.v1 import observability_pb2, release_pb2, routing_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_grpc
from clawhub.executor.v1 import executor_service_pb2 as executor_pb
from clawhub.executor.v1 import executor_service_pb2_grpc as executor_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.protobuf import duration_pb2

from services.runtime.errors import Reason, ServiceError
from services.runtime.server import ServiceHost, create_server

Starter = Callable[[Awaitable[ServiceHost]], Awaitable[ServiceHost]]

SKILL = "com.acme.echo"


def digest_of(name: str, version: str) -> str:
    return "sha256:" + hashlib.sha256(f"{name}@{version}".encode()).hexdigest()


class FakeRegistry(registry_grpc.RegistryServiceServicer):
    """GetSkillVersion over a dict; everything else UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], registry_pb.SkillVersion] = {}

    def add(self, name: str, version: str, state: int = release_pb2.RELEASE_STATE_READY,
            memory_bytes: int = 1 << 20, *, capabilities: tuple[str, ...] = (), args: tuple[str, ...] = (),
            bundle_digest: str = "", input_schema: str = "") -> registry_pb.SkillVersion:
        skill_version = registry_pb.SkillVersion(
            name=name, version=version, digest=digest_of(name, version), state=state, bundle_digest=bundle_digest,
            manifest=skill_pb2.Manifest(name=name, version=version, capabilities=capabilities, args=args,
                                        limits=skill_pb2.Limits(memory_bytes=memory_bytes),
                                        input_schema=input_schema))
        self.versions[(name, version)] = skill_version
        return skill_version

    async def GetSkillVersion(self, request: registry_pb.GetSkillVersionRequest, context: Any,
                              ) -> registry_pb.GetSkillVersionResponse:
        found = self.versions.get((request.name, request.version))
        if found is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND,
                               f"no version {request.name}@{request.version}",
                               metadata={"name": request.name, "version": request.version})
        return registry_pb.GetSkillVersionResponse(skill_version=found)


@dataclass
class Execution:
    request: executor_pb.ExecuteRequest
    time_remaining: float | None
    metadata: dict[str, str]


class FakeExecutor(executor_grpc.ExecutorServiceServicer):
    """Loads by recording digests; Execute echoes `echo:<input>`, or fails as `mode` says."""

    def __init__(self) -> None:
        self.address = ""
        self.loaded: set[str] = set()
        self.load_calls: list[str] = []
        self.load_requests: list[executor_pb.LoadSkillRequest] = []
        self.unloaded: list[str] = []
        self.fail_load: dict[str, ServiceError] = {}
        # When set, LoadSkill waits for it: a deployment stays in flight until the test lets it go.
        self.load_gate: asyncio.Event | None = None
        self.mode = "echo"
        # Per-digest behaviour, over `mode`: "echo", "trap", "unavailable", "bad_input", or "fail_odd"
        # (traps on inputs whose last byte is odd: a version that fails on some inputs).
        self.modes: dict[str, str] = {}
        # Per-digest delay (seconds) before answering: a slow version.
        self.delays: dict[str, float] = {}
        self.executions: list[Execution] = []
        # Set by Fakes.executor: the fake's health servicer, to flip a digest NOT_SERVING.
        self.health: Any = None
        # Set by Fakes.executor: its server, to stop it (an executor that went down).
        self.host: Any = None

    async def LoadSkill(self, request: executor_pb.LoadSkillRequest, context: Any) -> executor_pb.LoadSkillResponse:
        self.load_calls.append(request.digest)
        self.load_requests.append(request)
        if self.load_gate is not None:
            await self.load_gate.wait()
        if request.digest in self.fail_load:
            raise self.fail_load[request.digest]
        already = request.digest in self.loaded
        self.loaded.add(request.digest)
        return executor_pb.LoadSkillResponse(digest=request.digest, already_loaded=already)

    async def UnloadSkill(self, request: executor_pb.UnloadSkillRequest, context: Any,
                          ) -> executor_pb.UnloadSkillResponse:
        self.unloaded.append(request.digest)
        was_loaded = request.digest in self.loaded
        self.loaded.discard(request.digest)
        return executor_pb.UnloadSkillResponse(was_loaded=was_loaded)

    async def Execute(self, request: executor_pb.ExecuteRequest, context: Any) -> executor_pb.ExecuteResponse:
        self.executions.append(Execution(request, context.time_remaining(),
                                         dict(context.invocation_metadata() or ())))
        mode = self.modes.get(request.digest, self.mode)
        delay = self.delays.get(request.digest, 0.0)
        if delay:
            await asyncio.sleep(delay)
        if mode == "fail_odd":
            mode = "trap" if request.input and request.input[-1] % 2 else "echo"
        if mode == "bad_input":
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT, "the input is not JSON",
                               metadata={"field": "input"})
        if mode == "unavailable":
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN, "the executor is shutting down")
        if mode == "trap":
            raise ServiceError(grpc.StatusCode.ABORTED, Reason.SKILL_TRAPPED,
                               "the skill trapped: wasm `unreachable` executed",
                               metadata={"digest": request.digest})
        return executor_pb.ExecuteResponse(
            output=b"echo:" + request.input,
            usage=skill_pb2.Usage(wall_time=duration_pb2.Duration(nanos=1500), peak_memory_bytes=65536))


    async def GetLoad(self, request: executor_pb.GetLoadRequest, context: Any) -> executor_pb.GetLoadResponse:
        return executor_pb.GetLoadResponse(load=observability_pb2.ExecutorLoad(reachable=True, threads=2,
                                                                               queue_capacity=64))


class FakeDeployer(deployer_grpc.DeployerInternalServiceServicer):
    """The deployer's internal service as dispatchers see it: WatchRoutes serves `table` and every later one;
    AcknowledgeRoutes records (dispatcher id, generation); ReportStats records the reports."""

    def __init__(self, table: routing_pb2.RouteTable | None = None) -> None:
        self.table = table or routing_pb2.RouteTable()
        self.acks: list[tuple[str, int]] = []
        self.stats: list[deployer_pb.ReportStatsRequest] = []
        self.watchers: list[str] = []
        self._changed = asyncio.Event()
        # When set to an unset event, new WatchRoutes streams send nothing until it is set (a slow deployer).
        self.hold: asyncio.Event | None = None

    def set_table(self, table: routing_pb2.RouteTable) -> None:
        self.table = table
        self._changed.set()
        self._changed = asyncio.Event()

    async def WatchRoutes(self, request: deployer_pb.WatchRoutesRequest, context: Any,
                          ) -> AsyncIterator[deployer_pb.WatchRoutesResponse]:
        self.watchers.append(request.dispatcher_id)
        if self.hold is not None:
            await self.hold.wait()
        while True:
            changed = self._changed
            yield deployer_pb.WatchRoutesResponse(route_table=self.table)
            await changed.wait()

    async def AcknowledgeRoutes(self, request: deployer_pb.AcknowledgeRoutesRequest, context: Any,
                                ) -> deployer_pb.AcknowledgeRoutesResponse:
        self.acks.append((request.dispatcher_id, request.generation))
        return deployer_pb.AcknowledgeRoutesResponse()

    async def ReportStats(self, request: deployer_pb.ReportStatsRequest, context: Any,
                          ) -> deployer_pb.ReportStatsResponse:
        self.stats.append(request)
        return deployer_pb.ReportStatsResponse()


@dataclass
class Fakes:
    """Starts fakes through the `start_service` fixture and remembers their addresses."""

    start_service: Starter
    hosts: list[ServiceHost] = field(default_factory=list)

    async def _start(self, name: str, service: str, register: Callable[[grpc.aio.Server], None],
                     port: int = 0) -> ServiceHost:
        async def build() -> ServiceHost:
            return create_server(name, [service], host="127.0.0.1", port=port, grace_seconds=0.2,
                                 register=register)

        host = await self.start_service(build())
        self.hosts.append(host)
        return host

    async def registry(self) -> tuple[FakeRegistry, str]:
        fake = FakeRegistry()
        host = await self._start("registry", "clawhub.registry.v1.RegistryService",
                                 lambda s: registry_grpc.add_RegistryServiceServicer_to_server(fake, s))
        return fake, f"127.0.0.1:{host.port}"

    async def executor(self) -> FakeExecutor:
        fake = FakeExecutor()
        host = await self._start("executor", "clawhub.executor.v1.ExecutorService",
                                 lambda s: executor_grpc.add_ExecutorServiceServicer_to_server(fake, s))
        fake.address = f"127.0.0.1:{host.port}"
        fake.health = host.health
        fake.host = host
        return fake

    async def deployer(self, fake: FakeDeployer, port: int = 0) -> ServiceHost:
        return await self._start("deployer", "clawhub.deployer.v1.DeployerService",
                                 lambda s: deployer_grpc.add_DeployerInternalServiceServicer_to_server(fake, s), port)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll `check` until it is true; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(interval)
