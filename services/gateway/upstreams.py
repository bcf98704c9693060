"""The gateway's health for the services it relays follows the real upstream's health.

The gateway serves `clawhub.registry.v1.RegistryService` and `clawhub.deployer.v1.DeployerService` by
relaying them; without this, its `grpc.health.v1` would say SERVING for them while the registry or deployer
behind it is down. Each name's status is the upstream's own status for that name, checked every
`interval` seconds with a cheap unary `Check` (a `Watch` stream would hold the upstream's graceful drain for
its whole grace period); an unreachable upstream counts as NOT_SERVING. `clawhub.gateway.v1.GatewayService`
follows the dispatcher's health the same way, except while the gateway routes calls itself with the routes
the dispatcher sent (docs/routing.md): then it serves whether the dispatcher answers or not (`routes_held`).
The gateway's overall status is not touched: the gateway process itself is fine, and a liveness probe must
not restart it for a peer's outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

log = logging.getLogger("clawhub.gateway.upstreams")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class UpstreamHealth:
    """Mirror `service`'s health at the upstream behind `channel` into the gateway's `health`."""

    def __init__(self, health: HealthServicer, channel: grpc.aio.Channel, service: str, *, upstream: str,
                 address: str, interval: float = 1.0, upstream_service: str | None = None,
                 routes_held: Callable[[], bool] | None = None) -> None:
        self._health = health
        self._routes_held = routes_held
        self._stub = health_pb2_grpc.HealthStub(channel)
        self.service = service
        # The name asked of the upstream, when it is not the gateway's own name (the dispatcher behind invoke).
        self._upstream_service = service if upstream_service is None else upstream_service
        self._upstream = upstream
        self._address = address
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.serving: bool | None = None
        # With `routes_held`: whether the upstream itself answered SERVING at the last check.
        self.upstream_serving: bool | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"health-of-{self._upstream}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def check(self) -> None:
        """Check the upstream once and update the gateway's status for the name."""
        try:
            response = await self._stub.Check(health_pb2.HealthCheckRequest(service=self._upstream_service),
                                              timeout=max(self._interval, 1.0))
            serving = response.status == SERVING
            why = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.aio.AioRpcError as err:
            serving, why = False, err.code().name
        if not serving and self._routes_held is not None and self._routes_held():
            if self.upstream_serving is not False:
                log.warning("the %s at %s is not serving (%s); routing with the last routes it sent",
                            self._upstream, self._address, why)
            self.upstream_serving = False
            serving = True
        elif self._routes_held is not None:
            if serving and self.upstream_serving is False:
                log.info("the %s at %s is serving again", self._upstream, self._address)
            self.upstream_serving = serving
        if serving == self.serving:
            return
        if serving:
            if self.serving is not None:
                log.info("the %s at %s is serving again", self._upstream, self._address)
        else:
            log.warning("the %s at %s is not serving (%s); %s reports NOT_SERVING until it is back",
                        self._upstream, self._address, why, self.service)
        self.serving = serving
        await self._health.set(self.service, SERVING if serving else NOT_SERVING)

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must not end the mirroring
                log.exception("checking the health of the %s failed", self._upstream)
            await asyncio.sleep(self._interval)
