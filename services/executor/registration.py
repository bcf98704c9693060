"""An executor that registers itself with the deployer (`CLAWHUB_EXECUTOR_REGISTER_WITH`) and keeps its lease.

The deployer preloads every deployed version on a registered executor, then publishes it to dispatchers, which
pass it on to gateways (docs/routing.md, "Executors joining and leaving"). The lease is renewed about five times
per lease (every 2 s for the default 10 s), so one or two lost renewals cost nothing; an executor that stops
renewing (killed, cut off) is dropped when its lease runs out. A graceful shutdown deregisters first, so calls
stop coming before the executor drains.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

import grpc
from clawhub.deployer.v1 import deployer_internal_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_internal_pb2_grpc as deployer_grpc
from google.protobuf import duration_pb2

from services.runtime.errors import describe_error
from services.runtime.server import host_port
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.executor")

# Hosts that mean "every interface": not an address anyone can call.
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
DEREGISTER_TIMEOUT = 2.0


def advertise_address(configured: str, host: str, port: int) -> str:
    """Where the platform reaches this executor: `configured` (CLAWHUB_EXECUTOR_ADVERTISE_ADDRESS), else the host
    it listens on with the port it bound; a wildcard host is replaced by this machine's address (what its
    hostname resolves to, as in a Kubernetes pod), else its hostname."""
    if configured:
        return configured
    if host in _WILDCARDS:
        name = socket.gethostname()
        try:
            host = socket.gethostbyname(name)
        except OSError:
            host = name
    return host_port(host, port)


class Registration(BackgroundLoop):
    """Renews the lease every `lease / 5` seconds until stopped; `deregister` ends it."""

    task_name = "executor-registration"

    def __init__(self, channel: grpc.aio.Channel, address: str, *, lease: float) -> None:
        super().__init__()
        self._stub = cast("deployer_grpc.DeployerInternalServiceAsyncStub",
                          deployer_grpc.DeployerInternalServiceStub(channel))
        self.address = address
        self._lease = lease
        self._interval = lease / 5
        self.registered = asyncio.Event()

    async def register(self) -> None:
        """One renewal; raises grpc.aio.AioRpcError."""
        lease = duration_pb2.Duration()
        lease.FromNanoseconds(int(self._lease * 1e9))
        await self._stub.RegisterExecutor(deployer_pb.RegisterExecutorRequest(address=self.address, lease=lease),
                                          timeout=self._interval)

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self.register()
            except grpc.aio.AioRpcError as err:
                if not failing:
                    log.warning("registering %s with the deployer failed (%s); retrying every %.1fs", self.address,
                                describe_error(err), self._interval)
                failing = True
            else:
                if not self.registered.is_set() or failing:
                    log.info("registered %s with the deployer (lease %gs)", self.address, self._lease)
                failing = False
                self.registered.set()
            await asyncio.sleep(self._interval)

    async def deregister(self) -> None:
        """Stop renewing and end the lease (best effort: an unreachable deployer drops it when it runs out)."""
        await self.stop()
        try:
            await self._stub.DeregisterExecutor(deployer_pb.DeregisterExecutorRequest(address=self.address),
                                                timeout=DEREGISTER_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            log.warning("deregistering %s failed (%s); the deployer drops it when its lease runs out", self.address,
                        describe_error(err))
        else:
            log.info("deregistered %s from the deployer", self.address)
