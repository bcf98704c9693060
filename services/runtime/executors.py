"""Executors as a router sees them (the gateway, and the dispatcher's own Dispatch): a client protocol, its
gRPC implementation, and the endpoint set calls are spread over.

The endpoint set changes at run time: the dispatcher publishes which executors exist and which of them are
healthy (DataPlaneService.WatchDataPlane), and a gateway applies each update with `Endpoints.update`. The
client opens a channel the first time an address is used and keeps it (a removed executor's channel idles:
an executor that comes back reuses it).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol, cast

import grpc
from clawhub.common.v1 import observability_pb2
from clawhub.executor.v1 import executor_service_pb2 as executor_pb
from clawhub.executor.v1 import executor_service_pb2_grpc as executor_grpc

from services.runtime.channels import InvocationLimits, channel, current_outgoing
from services.runtime.mux import MuxChannel
from services.runtime.resilience import OutlierDetector


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
        """The executor's worker-pool use (for `clawhub top`, and its health); raises grpc.aio.AioRpcError."""
        ...

    def tail_logs(self, address: str, request: executor_pb.TailSkillLogsRequest, *,
                  metadata: tuple[tuple[str, str], ...] = ()) -> LogStream:
        """The executor's TailSkillLogs stream (its errors come as grpc.aio.AioRpcError while reading)."""
        ...

    async def close(self) -> None: ...


EXECUTE = "/clawhub.executor.v1.ExecutorService/Execute"
EXECUTE_STREAM = "/clawhub.executor.v1.ExecutorService/ExecuteStream"


class GrpcExecutorClient:
    """One channel per executor address, opened on first use. With `stream` (`CLAWHUB_EXECUTOR_CALLS=stream`, the
    default), Execute calls go over one ExecuteStream per executor (services/runtime/mux.py) instead of an RPC
    each; an executor that does not serve it is called with Execute."""

    def __init__(self, addresses: Iterable[str] = (), sizes: InvocationLimits | None = None, *,
                 stream: bool = True) -> None:
        self._addresses = tuple(addresses)
        self._sizes = sizes or InvocationLimits()
        self._stream = stream
        self._muxes: dict[str, MuxChannel] = {}
        # Channels opened later (as the dispatcher reports executors) carry the token and TLS of the build.
        self._security = current_outgoing()
        from services.runtime import tracing

        self._traced = tracing.enabled()
        # A multiplexed call carries the trace context its RPC would (services/runtime/tracing.py).
        self._trace_context = tracing.outgoing_metadata
        self._failed_call = tracing.failed_call
        self._channels: dict[str, object] = {}
        self._stubs: dict[str, executor_grpc.ExecutorServiceAsyncStub] = {}
        for address in self._addresses:
            self._stub(address)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """The executors that exist now (a dispatcher's update); channels of new ones open at once."""
        self._addresses = tuple(addresses)
        for address in self._addresses:
            self._stub(address)

    def _stub(self, address: str) -> executor_grpc.ExecutorServiceAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            opened = channel(address, max_send_bytes=self._sizes.execute_request,
                             max_receive_bytes=self._sizes.execute_response, security=self._security,
                             traced=self._traced)
            self._channels[address] = opened
            stub = self._stubs[address] = cast("executor_grpc.ExecutorServiceAsyncStub",
                                               executor_grpc.ExecutorServiceStub(opened))
            if self._stream:
                self._muxes[address] = MuxChannel(
                    opened, EXECUTE_STREAM, executor_pb.ExecuteStreamRequest, executor_pb.ExecuteStreamResponse,
                    fallback=stub.Execute, response_deserializer=executor_pb.ExecuteResponse.FromString)
        return stub

    async def execute(self, address: str, request: executor_pb.ExecuteRequest, *, timeout: float,
                      metadata: tuple[tuple[str, str], ...] = ()) -> executor_pb.ExecuteResponse:
        stub = self._stub(address)
        mux = self._muxes.get(address)
        if mux is not None and not mux.unsupported:
            if not self._traced:
                response: executor_pb.ExecuteResponse = await mux.call(request, timeout=timeout, metadata=metadata)
                return response
            started = time.time_ns()
            try:
                response = await mux.call(request, timeout=timeout, metadata=self._trace_context(metadata))
            except grpc.aio.AioRpcError as err:
                self._failed_call(EXECUTE, started, err.code(), err.trailing_metadata())
                raise
            except asyncio.CancelledError:
                self._failed_call(EXECUTE, started, grpc.StatusCode.CANCELLED, (), True)
                raise
            return response
        response = await stub.Execute(request, timeout=timeout, metadata=metadata or None)
        return response

    async def get_load(self, address: str, *, timeout: float) -> observability_pb2.ExecutorLoad:
        response = await self._stub(address).GetLoad(executor_pb.GetLoadRequest(), timeout=timeout)
        load: observability_pb2.ExecutorLoad = response.load
        return load

    def tail_logs(self, address: str, request: executor_pb.TailSkillLogsRequest, *,
                  metadata: tuple[tuple[str, str], ...] = ()) -> LogStream:
        call: LogStream = self._stub(address).TailSkillLogs(request, metadata=metadata or None)
        return call

    async def close(self) -> None:
        for mux in self._muxes.values():
            await mux.close()
        for ch in self._channels.values():
            await ch.close()  # type: ignore[attr-defined]


class ExecutorPicker:
    """Power of two choices on outstanding calls among the serving executors: sample two, take the less busy.

    Cheap, needs no global view, and avoids herding onto the single least-loaded executor. Executors the
    dispatcher reports as not serving, and executors the outlier detector ejected (consecutive UNAVAILABLE
    answers; services/runtime/resilience.py), are skipped while any other is available (when none is, every one
    is tried: the health check may be what is wrong).
    """

    def __init__(self, addresses: Iterable[str] = (), rng: random.Random | None = None,
                 outliers: OutlierDetector | None = None) -> None:
        self._outstanding = {address: 0 for address in addresses}
        self._serving: list[str] = list(self._outstanding)
        self._rng = rng or random.Random()
        self.outliers = outliers or OutlierDetector()
        self.outliers.set_endpoints(self._outstanding)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self._outstanding)

    def update(self, endpoints: Iterable[tuple[str, bool]]) -> None:
        """The executors that exist now, each with whether it is serving; outstanding counts of the kept ones
        stay (calls in flight still end on them)."""
        known = dict(endpoints)
        self._outstanding = {address: self._outstanding.get(address, 0) for address in known}
        self._serving = [address for address, serving in known.items() if serving]
        self.outliers.set_endpoints(known)

    def outstanding(self, address: str) -> int:
        return self._outstanding.get(address, 0)

    def pick(self, exclude: Iterable[str] = ()) -> str | None:
        """A serving executor not in `exclude` (else any not excluded, else any); None with no executors."""
        excluded = set(exclude) if exclude else ()
        outliers = self.outliers
        candidates = [a for a in self._serving if a not in excluded and outliers.available(a, claim=False)]
        if not candidates:
            candidates = [a for a in self._outstanding if a not in excluded] or list(self._outstanding)
        if not candidates:
            return None
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            first, second = self._rng.sample(candidates, 2)
            outstanding = self._outstanding
            chosen = second if outstanding.get(second, 0) < outstanding.get(first, 0) else first
        outliers.available(chosen)  # a probing executor's one call is this one
        return chosen

    def begin(self, address: str) -> None:
        if address in self._outstanding:  # not one an update removed while the call waited
            self._outstanding[address] += 1

    def end(self, address: str) -> None:
        if address in self._outstanding:
            self._outstanding[address] = max(0, self._outstanding[address] - 1)
