"""Executors as the dispatcher sees them: a client protocol, its gRPC implementation, and the picker."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable
from typing import Protocol, cast

from clawhub.common.v1 import observability_pb2
from clawhub.executor.v1 import executor_service_pb2 as executor_pb
from clawhub.executor.v1 import executor_service_pb2_grpc as executor_grpc

from services.runtime.channels import InvocationLimits, channel


class LogStream(Protocol):
    """An open TailSkillLogs call to one executor: its responses, and a way to end it."""

    def __aiter__(self) -> AsyncIterator[executor_pb.TailSkillLogsResponse]: ...

    def cancel(self) -> bool: ...


class ExecutorClient(Protocol):
    """Runs one invocation on one executor."""

    @property
    def addresses(self) -> tuple[str, ...]: ...

    async def execute(self, address: str, request: executor_pb.ExecuteRequest, *, timeout: float,
                      metadata: tuple[tuple[str, str], ...] = ()) -> executor_pb.ExecuteResponse:
        """The executor's response; raises its status as grpc.aio.AioRpcError."""
        ...

    async def get_load(self, address: str, *, timeout: float) -> observability_pb2.ExecutorLoad:
        """The executor's worker-pool use (for `clawhub top`); raises grpc.aio.AioRpcError."""
        ...

    def tail_logs(self, address: str, request: executor_pb.TailSkillLogsRequest, *,
                  metadata: tuple[tuple[str, str], ...] = ()) -> LogStream:
        """The executor's TailSkillLogs stream (its errors come as grpc.aio.AioRpcError while reading)."""
        ...

    async def close(self) -> None: ...


class GrpcExecutorClient:
    """One channel per executor address."""

    def __init__(self, addresses: Iterable[str], sizes: InvocationLimits | None = None) -> None:
        self._addresses = tuple(addresses)
        sizes = sizes or InvocationLimits()
        self._channels = {address: channel(address, max_send_bytes=sizes.execute_request,
                                           max_receive_bytes=sizes.execute_response)
                          for address in self._addresses}
        self._stubs = {
            address: cast("executor_grpc.ExecutorServiceAsyncStub", executor_grpc.ExecutorServiceStub(ch))
            for address, ch in self._channels.items()}

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    async def execute(self, address: str, request: executor_pb.ExecuteRequest, *, timeout: float,
                      metadata: tuple[tuple[str, str], ...] = ()) -> executor_pb.ExecuteResponse:
        response: executor_pb.ExecuteResponse = await self._stubs[address].Execute(
            request, timeout=timeout, metadata=metadata or None)
        return response

    async def get_load(self, address: str, *, timeout: float) -> observability_pb2.ExecutorLoad:
        response = await self._stubs[address].GetLoad(executor_pb.GetLoadRequest(), timeout=timeout)
        load: observability_pb2.ExecutorLoad = response.load
        return load

    def tail_logs(self, address: str, request: executor_pb.TailSkillLogsRequest, *,
                  metadata: tuple[tuple[str, str], ...] = ()) -> LogStream:
        call: LogStream = self._stubs[address].TailSkillLogs(request, metadata=metadata or None)
        return call

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


class ExecutorPicker:
    """Power of two choices on outstanding calls: sample two executors, take the less busy one.

    Cheap, needs no global view, and avoids herding onto the single least-loaded executor.
    """

    def __init__(self, addresses: Iterable[str], rng: random.Random | None = None) -> None:
        self._outstanding = {address: 0 for address in addresses}
        self._rng = rng or random.Random()

    def outstanding(self, address: str) -> int:
        return self._outstanding.get(address, 0)

    def pick(self, exclude: Iterable[str] = ()) -> str | None:
        """An executor not in `exclude` (or any, when every one is excluded); None with no executors."""
        excluded = set(exclude)
        candidates = [a for a in self._outstanding if a not in excluded] or list(self._outstanding)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return second if self._outstanding[second] < self._outstanding[first] else first

    def begin(self, address: str) -> None:
        self._outstanding[address] = self._outstanding.get(address, 0) + 1

    def end(self, address: str) -> None:
        self._outstanding[address] = max(0, self._outstanding.get(address, 0) - 1)
