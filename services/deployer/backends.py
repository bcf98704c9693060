"""The deployer's view of the registry and the executors, behind protocols; gRPC implementations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

import grpc
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as executor_pb
from clawhub.executor.v1 import executor_service_pb2_grpc as executor_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.deployer.model import DeploymentRecord
from services.runtime.channels import channel, current_outgoing
from services.runtime.errors import upstream_error


class VersionSource(Protocol):
    """Where versions and their release state come from (the registry)."""

    async def get_skill_version(self, name: str, version: str, *, timeout: float,
                                ) -> registry_pb.SkillVersion:
        """The version; raises the registry's status (grpc.aio.AioRpcError) or a ServiceError."""
        ...

    async def resolve_dependencies(self, name: str, version: str, *, timeout: float,
                                   ) -> list[skill_pb2.ResolvedDependency]:
        """The version's dependencies resolved now (the version itself left out); raises a ServiceError."""
        ...

    async def close(self) -> None: ...


class ExecutorFleet(Protocol):
    """The executors every deployed version is preloaded on."""

    @property
    def addresses(self) -> tuple[str, ...]: ...

    def set_addresses(self, addresses: tuple[str, ...]) -> None:
        """The executors releases preload on from now on (services/deployer/membership.py keeps it current);
        `load` and the others also work on an address outside it (an executor being preloaded to join)."""
        ...

    async def forget(self, address: str) -> None:
        """Close what was opened to an executor that left."""
        ...

    async def load(self, address: str, record: DeploymentRecord) -> bool:
        """Fetch and compile the record's module (and its file bundle) on one executor, which re-checks it
        against the capabilities and runs the smoke examples; True when it was already loaded."""
        ...

    async def unload(self, address: str, digest: str) -> bool:
        """Drop `digest` from one executor's memory; True when it was loaded."""
        ...

    def watch_health(self, address: str, digest: str) -> AsyncIterator[int]:
        """The executor's per-digest health (`HealthCheckResponse.ServingStatus`) now and at every change,
        until the stream breaks (raises grpc.aio.AioRpcError)."""
        ...

    async def overall_health(self, address: str) -> int:
        """The executor's overall health status; raises grpc.aio.AioRpcError when it cannot tell."""
        ...

    async def close(self) -> None: ...


class GrpcRegistry:
    def __init__(self, address: str) -> None:
        self._address = address
        self._channel = channel(address)
        self._stub = cast("registry_grpc.RegistryServiceAsyncStub", registry_grpc.RegistryServiceStub(self._channel))

    async def get_skill_version(self, name: str, version: str, *, timeout: float,
                                ) -> registry_pb.SkillVersion:
        try:
            response: registry_pb.GetSkillVersionResponse = await self._stub.GetSkillVersion(
                registry_pb.GetSkillVersionRequest(name=name, version=version), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err, "registry", self._address) from None
        return response.skill_version

    async def resolve_dependencies(self, name: str, version: str, *, timeout: float,
                                   ) -> list[skill_pb2.ResolvedDependency]:
        try:
            response: registry_pb.ResolveDependenciesResponse = await self._stub.ResolveDependencies(
                registry_pb.ResolveDependenciesRequest(name=name, version=version), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err, "registry", self._address) from None
        return list(response.dependencies)

    async def close(self) -> None:
        await self._channel.close()


class GrpcExecutorFleet:
    def __init__(self, addresses: tuple[str, ...], *, load_timeout: float, unload_timeout: float = 5.0,
                 ) -> None:
        self._addresses = addresses
        self._load_timeout = load_timeout
        self._unload_timeout = unload_timeout
        # Channels opened later (executors that join) carry the token and TLS of the build.
        self._security = current_outgoing()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, executor_grpc.ExecutorServiceAsyncStub] = {}
        # grpc_health ships no type stubs.
        self._health: dict[str, Any] = {}
        for address in addresses:
            self._open(address)

    def _open(self, address: str) -> None:
        if address in self._channels:
            return
        # Opened on first use: executors join at run time (services/deployer/membership.py).
        ch = self._channels[address] = channel(address, security=self._security)
        self._stubs[address] = cast("executor_grpc.ExecutorServiceAsyncStub", executor_grpc.ExecutorServiceStub(ch))
        self._health[address] = health_pb2_grpc.HealthStub(ch)

    def _stub(self, address: str) -> executor_grpc.ExecutorServiceAsyncStub:
        self._open(address)
        return self._stubs[address]

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    def set_addresses(self, addresses: tuple[str, ...]) -> None:
        self._addresses = addresses

    async def forget(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        self._stubs.pop(address, None)
        self._health.pop(address, None)
        if ch is not None:
            await ch.close()

    async def load(self, address: str, record: DeploymentRecord) -> bool:
        response: executor_pb.LoadSkillResponse = await self._stub(address).LoadSkill(
            executor_pb.LoadSkillRequest(digest=record.digest, bundle_digest=record.bundle_digest,
                                         capabilities=record.capabilities, examples=record.examples,
                                         env=record.env, args=record.args, limits=record.limits,
                                         skill=record.skill, version=record.version,
                                         dependencies=record.dependencies),
            timeout=self._load_timeout)
        return response.already_loaded

    async def unload(self, address: str, digest: str) -> bool:
        response: executor_pb.UnloadSkillResponse = await self._stub(address).UnloadSkill(
            executor_pb.UnloadSkillRequest(digest=digest), timeout=self._unload_timeout)
        return response.was_loaded

    async def watch_health(self, address: str, digest: str) -> AsyncIterator[int]:
        # No deadline: the watch lasts as long as the release's analysis, which cancels it.
        self._open(address)
        call = self._health[address].Watch(health_pb2.HealthCheckRequest(service=digest))
        try:
            async for response in call:
                yield int(response.status)
        finally:
            call.cancel()

    async def overall_health(self, address: str) -> int:
        self._open(address)
        response = await self._health[address].Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=self._unload_timeout)
        return int(response.status)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
