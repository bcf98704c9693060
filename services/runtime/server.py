"""Bootstrap shared by every service: a grpc.aio server with health, reflection, structured errors and a
graceful shutdown (NOT_SERVING first, then drain, then close backends)."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.runtime import logs, tracing
from services.runtime.channels import CONTROL_MESSAGE_BYTES, SERVER_OPTIONS, size_options
from services.runtime.errors import ErrorInterceptor, fuse
from services.runtime.identity import PlatformAuthInterceptor, PlatformIdentity
from services.runtime.lifeline import follow_supervisor
from services.runtime.metrics import MetricsSettings, RpcMetrics, serve_metrics
from services.runtime.mux import MuxServer
from services.runtime.policy import INTERNAL_CALLERS
from services.runtime.ratelimit.interceptor import PrincipalIdentity, rate_limit_interceptor
from services.runtime.ratelimit.policy import RateLimitSettings
from services.runtime.reflection import enable_reflection
from services.runtime.settings import SettingsError, env_choice
from services.runtime.tls import ServerTls
from services.runtime.workers import shares_port, supervise, worker_count, worker_index

log = logging.getLogger("clawhub")

Closer = Callable[[], Awaitable[None]]


class StartupError(Exception):
    """A service cannot start for a reason its operator can fix (a port taken, a data directory held).

    `run` prints its message as one line on stderr and exits 1, without a traceback, so `clawhub up` and
    process supervisors show the reason itself."""


class PortInUse(StartupError, OSError):
    """The port a service is configured for is held by another process."""


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC and every client read it: an IPv6 literal is bracketed (`::1` → `[::1]:50051`);
    without brackets its colons would be taken for the port separator."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


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
    # Run once the health says NOT_SERVING, before the drain: end the streams that never end by themselves
    # (`clawhub logs --follow`), which would otherwise hold the drain for the whole grace period.
    end_streams: list[Closer] = field(default_factory=list)
    # Where Prometheus scrapes this service (services/runtime/metrics.py); empty when its metrics port is off.
    metrics_url: str = ""
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
        for end in self.end_streams:
            try:
                await end()
            except Exception:  # noqa: BLE001 - the drain still ends them at its grace
                log.exception("error while ending the streams of %s", self.name)
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
    max_receive_bytes: int = CONTROL_MESSAGE_BYTES,
    max_send_bytes: int = CONTROL_MESSAGE_BYTES,
    public: bool = False,
    internal_addresses: Iterable[str] = (),
    share_port: bool = False,
    port_variable: str | None = None,
    identity: PlatformIdentity | None = None,
    check_callers: bool = True,
    tls: ServerTls | None = None,
    rate_limits: RateLimitSettings | None = None,
    metrics: MetricsSettings | None = None,
    muxed: Sequence[MuxServer] = (),
) -> ServiceHost:
    """Build a server serving `register`'s services plus health and reflection, bound to host:port.

    `max_receive_bytes` / `max_send_bytes` bound every message (gRPC refuses a larger one before buffering
    it; see services/runtime/channels.py). `public` marks the port callers outside the platform reach: its
    statuses never name internal addresses (IP literals with a port, `localhost:PORT`, and the exact
    `internal_addresses` the service is configured with; see errors.redact_addresses). The port is bound
    exclusively unless `share_port` (a deliberate multi-worker mode): gRPC's default SO_REUSEPORT would let
    a second suite start on a port the first holds and silently split its traffic. A taken port raises
    PortInUse naming host:port and `port_variable` (default `CLAWHUB_<NAME>_PORT`). An IPv6 literal `host`
    may come with or without brackets.

    `identity` (internal auth on) with `check_callers` (every internal service; not the public gateway): every
    call but health checks and reflection must carry the token of a platform service that the policy table
    (services/runtime/policy.py) allows for its method (services/runtime/identity.py). `tls`: the port serves
    TLS (mTLS when it names a client CA) instead of plaintext.

    `rate_limits` (None or `CLAWHUB_RATE_LIMITS=off`: none): token buckets checked after authentication, keyed
    by the principal or calling service it established (services/runtime/ratelimit/; docs/ratelimits.md).

    `metrics` with a port (`CLAWHUB_<NAME>_METRICS_PORT`): every RPC is counted and timed, and the process's
    Prometheus registry is served on that port (services/runtime/metrics.py; docs/metrics.md).

    `muxed`: the servers of stream methods (registered by `register`) whose messages are calls of a unary method
    (services/runtime/mux.py): each call runs through this server's interceptors as that method's calls do, and
    their streams end before the drain.
    """
    names = tuple(service_names)
    # A worker of a service whose workers share its port (services/runtime/workers.py).
    share_port = share_port or shares_port(name)
    if port and not share_port:
        # Checked before gRPC binds (which would also log a line of its own from C), and before there is a
        # server to clean up.
        _refuse_taken_port(name, host, port, port_variable or f"CLAWHUB_{name.upper()}_PORT")
    # After the interceptors that authenticate (platform identity here, users' credentials among `interceptors`),
    # so a call's bucket is its principal's.
    limiter = (rate_limit_interceptor(rate_limits, domain=f"{name}.clawhub",
                                      identify=PrincipalIdentity(trust_forwarded_peer=not public))
               if rate_limits is not None else None)
    # Outermost, and only when tracing is on (services/runtime/tracing.py): the span sees the final status.
    traced = tracing.server_interceptor(name)
    chain = [*([traced] if traced is not None else []),
             ErrorInterceptor(f"{name}.clawhub", public=public, internal_addresses=internal_addresses,
                              observe=RpcMetrics().observe if metrics is not None and metrics.enabled else None),
             *([PlatformAuthInterceptor(identity, INTERNAL_CALLERS)] if identity is not None and check_callers else []),
             *interceptors,
             *([limiter] if limiter is not None else [])]
    # Consecutive interceptors whose work is per method run as one (errors.fuse): a coroutine less per call each.
    chain = fuse(chain)
    server = grpc.aio.server(
        interceptors=chain,
        options=(*SERVER_OPTIONS, *size_options(max_receive_bytes, max_send_bytes),
                 ("grpc.so_reuseport", 1 if share_port else 0)),
    )
    register(server)
    for mux in muxed:
        mux.bind(chain)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Describes only what this port serves, with the proto comments (services/runtime/reflection.py).
    enable_reflection(server, (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    address = host_port(host, port)
    try:
        bound = (server.add_secure_port(address, tls.credentials()) if tls is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise StartupError(f"{name}: cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise StartupError(f"{name}: cannot listen on {address}")
    service_host = ServiceHost(name=name, server=server, port=bound, health=health, service_names=names,
                               grace_seconds=grace_seconds)
    service_host.end_streams.extend(mux.drain for mux in muxed)
    if limiter is not None:
        service_host.closers.append(limiter.close)
    if metrics is not None and metrics.enabled:
        # Bound now, so a taken metrics port stops the service before it serves (like a taken gRPC port).
        endpoint = serve_metrics(metrics, name)
        service_host.metrics_url = endpoint.url
        service_host.closers.append(endpoint.close)
    return service_host


def _refuse_taken_port(name: str, host: str, port: int, variable: str) -> None:
    """Raise PortInUse when a listening socket holds host:port (on any of the addresses host resolves to)."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return  # gRPC reports a host it cannot resolve
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: a port left in TIME_WAIT by a stopped server is free to reuse.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"{name}: {host_port(host, port)} is already in use (another clawhub suite or another program "
                        f"holds it); stop it, or set {variable} to another port (0 picks a free one)") from None


def configure_logging(service: str = "") -> None:
    """Logs to stderr as text or JSON lines (`CLAWHUB_LOG_FORMAT`), with trace ids: services/runtime/logs.py.
    A bad setting raises SettingsError."""
    logs.configure(service)


def run(build: Callable[[], Awaitable[ServiceHost]], *, host: str, name: str = "") -> None:
    """Entry point of `python -m services.<name>`: build, start, serve until SIGTERM/SIGINT, stop."""
    # First: a service `clawhub up` started stops when `up` is gone, even while it is still building.
    lifeline = follow_supervisor()
    try:
        configure_logging(name)
    except SettingsError as exc:
        print(f"clawhub: {name + ': ' if name else ''}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    # From the OTEL_* variables; nothing at all when they configure no exporter. Before `build`: servers and
    # channels are traced as they are made.
    tracing.setup(name or "service")

    async def main() -> None:
        service = await build()
        if lifeline is not None:
            lifeline.shutdown_budget = service.grace_seconds + 10.0
        # Before the server starts: a SIGTERM just after the `listening` line must still stop it gracefully.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.start()
        # What was made to start (modules, descriptors, the SDKs' objects) lives as long as the process: kept out
        # of the collector's generations, a full collection no longer walks it (the gateway's took 23-34 ms with
        # every call in flight waiting; none above 5 ms after this, bench/hot_path.py).
        gc.freeze()
        if service.metrics_url:
            # Before the `listening` line, so `clawhub up` knows it once the service is ready.
            print(f"clawhub {service.name} metrics on {service.metrics_url}", flush=True)
        # The line `clawhub up` waits for; keep its shape stable.
        print(f"clawhub {service.name} listening on {host_port(host, service.port)}", flush=True)
        await stop.wait()
        log.info("%s: shutting down (grace %.1fs)", service.name, service.grace_seconds)
        await service.stop()
        log.info("%s: stopped", service.name)

    try:
        event_loop(name)(main())
    except KeyboardInterrupt:
        pass
    except StartupError as exc:
        print(f"clawhub: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except SettingsError as exc:
        # A setting read while building (the dispatcher reads the executors' size settings there).
        print(f"clawhub: {name + ': ' if name else ''}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def event_loop(name: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """How the service runs its event loop (`CLAWHUB_EVENT_LOOP`): `auto` (the default) and `uvloop` use uvloop
    (libuv; +3-10% of what a grpc.aio relay carries on this machine, measured in docs/routing.md), `asyncio`
    the standard loop. `auto` falls back to asyncio where uvloop is not installed (it does not build on Windows)."""
    try:
        kind = env_choice("CLAWHUB_EVENT_LOOP", "auto", ("auto", "uvloop", "asyncio"))
    except SettingsError as exc:
        print(f"clawhub: {name + ': ' if name else ''}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                print(f"clawhub: {name + ': ' if name else ''}CLAWHUB_EVENT_LOOP=uvloop but uvloop is not "
                      "installed (pip install uvloop)", file=sys.stderr, flush=True)
                raise SystemExit(1) from None
        else:
            return uvloop.run
    return asyncio.run


class _Settings(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


SettingsT = TypeVar("SettingsT", bound=_Settings)


def main(name: str, load: Callable[[], SettingsT], build: Callable[[SettingsT], Awaitable[ServiceHost]]) -> None:
    """`python -m services.<name>`: read the settings (a bad `CLAWHUB_*` value is one line on stderr and exit
    code 1, not a traceback), then `run`."""
    try:
        settings = load()
        workers = worker_count(name) if worker_index() is None else 1
    except SettingsError as exc:
        print(f"clawhub: {name}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if workers > 1:
        # This process only supervises the workers (services/runtime/workers.py).
        raise SystemExit(supervise(name, workers, host=settings.host, port=settings.port))
    run(lambda: build(settings), host=settings.host, name=name)
