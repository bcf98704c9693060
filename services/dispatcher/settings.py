"""Settings of the dispatcher, read from `CLAWHUB_*` environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from services.runtime.identity import PlatformIdentity, identity_from_env
from services.runtime.metrics import MetricsSettings
from services.runtime.ratelimit.policy import RateLimitSettings
from services.runtime.settings import env_choice, env_executor_addresses, env_float, env_int, env_str
from services.runtime.tls import TlsSettings


def default_dispatcher_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    """Everything the dispatcher reads from its environment; the defaults are the documented ones."""

    host: str = "127.0.0.1"
    """Interface to listen on (`CLAWHUB_DISPATCHER_HOST`, default 127.0.0.1)."""
    port: int = 50054
    """Port to listen on; 0 picks a free one (`CLAWHUB_DISPATCHER_PORT`, default 50054)."""
    deployer_address: str = "127.0.0.1:50053"
    """The deployer, whose WatchRoutes stream feeds the route table (`CLAWHUB_DEPLOYER_ADDRESS`,
    default 127.0.0.1:50053)."""
    executor_addresses: tuple[str, ...] = ("127.0.0.1:50055",)
    """Executors to send invocations to (`CLAWHUB_EXECUTOR_ADDRESSES`, comma-separated,
    default 127.0.0.1:50055; `none`: only those the deployer publishes)."""
    executor_calls: str = "stream"
    """How Dispatch calls executors (`CLAWHUB_EXECUTOR_CALLS`): `stream` (default: over one ExecuteStream per
    executor, services/runtime/mux.py) or `unary` (an Execute RPC per call)."""
    dispatcher_id: str = field(default_factory=default_dispatcher_id)
    """Stable id given to the deployer for acknowledgements (`CLAWHUB_DISPATCHER_ID`, default
    `<hostname>-<pid>`)."""
    retries: int = 2
    """Further attempts on another executor after an UNAVAILABLE one (`CLAWHUB_DISPATCH_RETRIES`,
    default 2)."""
    dispatch_timeout: float = 30.0
    """Seconds an invocation may take when the caller set no deadline (`CLAWHUB_DISPATCH_TIMEOUT`,
    default 30)."""
    grace: float = 5.0
    """Seconds in-flight calls get to finish on shutdown (`CLAWHUB_SHUTDOWN_GRACE`, default 5)."""
    identity: PlatformIdentity | None = None
    """Its platform token and the platform's identities (`CLAWHUB_SERVICE_TOKEN_FILE`,
    `CLAWHUB_PLATFORM_IDENTITIES_FILE`; docs/security.md). None: internal auth off (`CLAWHUB_INTERNAL_AUTH=off`;
    the default here, so that tests can build servers directly; from_env requires one or the other)."""
    tls: TlsSettings = field(default_factory=TlsSettings)
    """TLS of its port and of its calls (`CLAWHUB_TLS_*`; services/runtime/tls.py); default plaintext."""
    rate_limits: RateLimitSettings | None = None
    """Token-bucket rate limits (`CLAWHUB_RATE_*`; docs/ratelimits.md). None: none (what tests that build
    servers directly get); from_env: on unless `CLAWHUB_RATE_LIMITS=off`."""
    metrics: MetricsSettings = MetricsSettings()
    """Its Prometheus metrics endpoint (`CLAWHUB_DISPATCHER_METRICS_PORT`, `CLAWHUB_METRICS_HOST`;
    docs/metrics.md); default off."""
    stats_interval: float = 0.1
    """Seconds between two per-version stats reports to the deployer while there is traffic; the first one
    after a quiet spell goes at once (`CLAWHUB_DISPATCHER_STATS_INTERVAL`, default 0.1). A release's
    automatic rollback can be no faster than this."""

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls(dispatcher_id="")
        return cls(
            host=env_str("CLAWHUB_DISPATCHER_HOST", defaults.host),
            port=env_int("CLAWHUB_DISPATCHER_PORT", defaults.port, minimum=0),
            deployer_address=env_str("CLAWHUB_DEPLOYER_ADDRESS", defaults.deployer_address),
            executor_calls=env_choice("CLAWHUB_EXECUTOR_CALLS", defaults.executor_calls, ("stream", "unary")),
            executor_addresses=env_executor_addresses(defaults.executor_addresses),
            dispatcher_id=env_str("CLAWHUB_DISPATCHER_ID", default_dispatcher_id()),
            retries=env_int("CLAWHUB_DISPATCH_RETRIES", defaults.retries, minimum=0),
            dispatch_timeout=env_float("CLAWHUB_DISPATCH_TIMEOUT", defaults.dispatch_timeout, minimum=0.001),
            grace=env_float("CLAWHUB_SHUTDOWN_GRACE", defaults.grace, minimum=0.0),
            identity=identity_from_env("dispatcher"),
            tls=TlsSettings.from_env(),
            rate_limits=RateLimitSettings.from_env(),
            metrics=MetricsSettings.from_env("dispatcher"),
            stats_interval=env_float("CLAWHUB_DISPATCHER_STATS_INTERVAL", defaults.stats_interval, minimum=0.01),
        )
