"""Bootstrap shared by every service: a grpc.aio server with health, reflection, structured errors and a
graceful shutdown (NOT_SERVING first, then drain, then close backends)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.runtime.channels import SERVER_OPTIONS
from services.runtime.errors import ErrorInterceptor

log = logging.getLogger("clawhub")

Closer = Callable[[], Awaitable[None]]


@dataclass
class ServiceHost:
    """A started-or-startable service: the grpc server plus what must happen around it."""

    name: str
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]
    grace_seconds: float = 5.0
    # Run after the server started (background tasks such as watch loops).
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run after the server drained, in order (close databases, channels, pools).
    closers: list[Closer] = field(default_factory=list)
    _stopped: bool = False

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)
        for hook in self.on_start:
            await hook()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (so balancers move away), then drain in-flight calls, then close backends."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_seconds if grace is None else grace)
        for close in self.closers:
            try:
                await close()
            except Exception:  # noqa: BLE001 - keep closing the rest
                log.exception("error while closing %s", self.name)


def create_server(
    name: str,
    service_names: Iterable[str],
    *,
    host: str,
    port: int,
    grace_seconds: float = 5.0,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    register: Callable[[grpc.aio.Server], None],
) -> ServiceHost:
    """Build a server serving `register`'s services plus health and reflection, bound to host:port."""
    names = tuple(service_names)
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(f"{name}.clawhub"), *interceptors],
        options=SERVER_OPTIONS,
    )
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"{name}: cannot listen on {host}:{port}")
    return ServiceHost(name=name, server=server, port=bound, health=health, service_names=names,
                       grace_seconds=grace_seconds)


def configure_logging() -> None:
    level = getattr(logging, os.environ.get("CLAWHUB_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosqlite logs every statement with its parameters at DEBUG, and those include deploy-time env values
    # (secrets): never below INFO, whatever CLAWHUB_LOG_LEVEL says.
    logging.getLogger("aiosqlite").setLevel(max(level, logging.INFO))


def run(build: Callable[[], Awaitable[ServiceHost]], *, host: str) -> None:
    """Entry point of `python -m services.<name>`: build, start, serve until SIGTERM/SIGINT, stop."""
    configure_logging()

    async def main() -> None:
        service = await build()
        await service.start()
        # The line `clawhub up` waits for; keep its shape stable.
        print(f"clawhub {service.name} listening on {host}:{service.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s: shutting down (grace %.1fs)", service.name, service.grace_seconds)
        await service.stop()
        log.info("%s: stopped", service.name)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
