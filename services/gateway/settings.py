"""Gateway settings, from `CLAWHUB_*` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.runtime.auth import AuthSettings
from services.runtime.channels import CONTROL_MESSAGE_BYTES, ENVELOPE_BYTES, env_payload_size
from services.runtime.identity import PlatformIdentity, identity_from_env
from services.runtime.metrics import MetricsSettings
from services.runtime.ratelimit.policy import RateLimitSettings
from services.runtime.settings import env_choice, env_float, env_int, env_size, env_str
from services.runtime.tls import TlsSettings


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """CLAWHUB_GATEWAY_HOST: interface to listen on."""
    port: int = 50051
    """CLAWHUB_GATEWAY_PORT: the public port (0 picks a free one)."""
    dispatcher_address: str = "127.0.0.1:50054"
    """CLAWHUB_DISPATCHER_ADDRESS: the dispatcher, whose data-plane stream gives the routes and executors calls
    are routed with (docs/routing.md)."""
    routing: str = "direct"
    """CLAWHUB_GATEWAY_ROUTING: `direct` (default: the gateway calls the chosen executor itself, with the routes
    the dispatcher streams) or `dispatcher` (every call goes through the dispatcher's Dispatch, one hop more)."""
    executor_calls: str = "stream"
    """CLAWHUB_EXECUTOR_CALLS: `stream` (default: the calls to each executor go over one ExecuteStream,
    services/runtime/mux.py) or `unary` (an Execute RPC per call: the way to compare, or to rule the stream out)."""
    gateway_id: str = ""
    """CLAWHUB_GATEWAY_ID: stable id given to the dispatcher for acknowledgements and reports (default
    `gateway-<hostname>-<pid>`)."""
    retries: int = 2
    """CLAWHUB_DISPATCH_RETRIES: further attempts on another executor after one that is unavailable or sheds
    the call (the same setting as the dispatcher's)."""
    stats_interval: float = 0.1
    """CLAWHUB_GATEWAY_STATS_INTERVAL: seconds between two reports of the gateway's calls to the dispatcher
    while there are calls (release analysis and `clawhub top` see calls this late at most)."""
    registry_address: str = "127.0.0.1:50052"
    """CLAWHUB_REGISTRY_ADDRESS: where RegistryService calls are forwarded."""
    deployer_address: str = "127.0.0.1:50053"
    """CLAWHUB_DEPLOYER_ADDRESS: where DeployerService calls are forwarded."""
    max_input_bytes: int = 4 * 1024 * 1024
    """CLAWHUB_GATEWAY_MAX_INPUT: largest accepted invocation input (as JSON text or raw bytes); it also bounds
    the public port's messages (see max_request_bytes)."""
    max_output_bytes: int = 4 * 1024 * 1024
    """CLAWHUB_EXECUTOR_MAX_OUTPUT: the executors' output cap, which bounds InvokeSkill responses."""
    invoke_timeout: float = 30.0
    """CLAWHUB_GATEWAY_INVOKE_TIMEOUT: deadline in seconds when the caller sets none."""
    forward_timeout: float = 300.0
    """CLAWHUB_GATEWAY_FORWARD_TIMEOUT: deadline for forwarded admin calls when the caller sets none."""
    identity: PlatformIdentity | None = None
    """Its platform token and the platform's identities (`CLAWHUB_SERVICE_TOKEN_FILE`,
    `CLAWHUB_PLATFORM_IDENTITIES_FILE`; docs/security.md). None: internal auth off (`CLAWHUB_INTERNAL_AUTH=off`;
    the default here, so that tests can build servers directly; from_env requires one or the other)."""
    auth: AuthSettings = field(default_factory=AuthSettings)
    """Users' credentials and roles (`CLAWHUB_USER_AUTH`, `CLAWHUB_ANONYMOUS_ROLES`, `CLAWHUB_JWT_*`;
    services/runtime/auth.py). Default here: off, so that tests can build servers directly; from_env: on."""
    tls: TlsSettings = field(default_factory=TlsSettings)
    """TLS of its port and of its calls (`CLAWHUB_TLS_*`; services/runtime/tls.py); default plaintext."""
    rate_limits: RateLimitSettings | None = None
    """Token-bucket rate limits (`CLAWHUB_RATE_*`; docs/ratelimits.md). None: none (what tests that build
    servers directly get); from_env: on unless `CLAWHUB_RATE_LIMITS=off`."""
    metrics: MetricsSettings = MetricsSettings()
    """Its Prometheus metrics endpoint (`CLAWHUB_GATEWAY_METRICS_PORT`, `CLAWHUB_METRICS_HOST`;
    docs/metrics.md); default off."""
    cache_max_bytes: int = 64 * 1024 * 1024
    """CLAWHUB_GATEWAY_CACHE_BYTES: size of the in-process result cache (L1; docs/cache.md); 0 turns it off."""
    cache_redis_url: str = ""
    """CLAWHUB_GATEWAY_CACHE_REDIS_URL: Redis of the shared result cache (L2), such as redis://host:6379/0;
    empty: L1 only."""
    cache_redis_prefix: str = "clawhub:cache:"
    """CLAWHUB_GATEWAY_CACHE_REDIS_PREFIX: prefix of the L2 keys (the cache never flushes the database)."""
    grace_seconds: float = 5.0
    """CLAWHUB_SHUTDOWN_GRACE: seconds to drain in-flight calls on SIGTERM."""

    @property
    def max_request_bytes(self) -> int:
        """Receive limit of the public port, per message.

        An InvokeSkill request is its input plus a small envelope; relayed registry and deployer requests are
        control messages. The limit applies to the encoded request: a JSON `input` whose protobuf encoding is
        larger than its text (arrays of small numbers, up to ~5.5x) is refused with RESOURCE_EXHAUSTED before
        its JSON size is checked, and goes as `raw_input` instead.
        """
        return max(self.max_input_bytes + ENVELOPE_BYTES, CONTROL_MESSAGE_BYTES)

    @property
    def max_response_bytes(self) -> int:
        """Send limit of the public port, per message: an InvokeSkill response carries at most
        CLAWHUB_EXECUTOR_MAX_OUTPUT of output (a JSON output that would encode larger goes as raw_output);
        relayed responses are control messages."""
        return max(self.max_output_bytes + ENVELOPE_BYTES, CONTROL_MESSAGE_BYTES)

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        return cls(
            host=env_str("CLAWHUB_GATEWAY_HOST", d.host),
            port=env_int("CLAWHUB_GATEWAY_PORT", d.port, minimum=0),
            dispatcher_address=env_str("CLAWHUB_DISPATCHER_ADDRESS", d.dispatcher_address),
            routing=env_choice("CLAWHUB_GATEWAY_ROUTING", d.routing, ("direct", "dispatcher")),
            executor_calls=env_choice("CLAWHUB_EXECUTOR_CALLS", d.executor_calls, ("stream", "unary")),
            gateway_id=env_str("CLAWHUB_GATEWAY_ID", d.gateway_id),
            retries=env_int("CLAWHUB_DISPATCH_RETRIES", d.retries, minimum=0),
            stats_interval=env_float("CLAWHUB_GATEWAY_STATS_INTERVAL", d.stats_interval, minimum=0.01),
            registry_address=env_str("CLAWHUB_REGISTRY_ADDRESS", d.registry_address),
            deployer_address=env_str("CLAWHUB_DEPLOYER_ADDRESS", d.deployer_address),
            max_input_bytes=env_payload_size("CLAWHUB_GATEWAY_MAX_INPUT", str(d.max_input_bytes)),
            max_output_bytes=env_payload_size("CLAWHUB_EXECUTOR_MAX_OUTPUT", str(d.max_output_bytes)),
            invoke_timeout=env_float("CLAWHUB_GATEWAY_INVOKE_TIMEOUT", d.invoke_timeout, minimum=0.001),
            forward_timeout=env_float("CLAWHUB_GATEWAY_FORWARD_TIMEOUT", d.forward_timeout, minimum=0.001),
            identity=identity_from_env("gateway", checks_callers=False),
            auth=AuthSettings.from_env(),
            tls=TlsSettings.from_env(),
            rate_limits=RateLimitSettings.from_env(),
            metrics=MetricsSettings.from_env("gateway"),
            cache_max_bytes=env_size("CLAWHUB_GATEWAY_CACHE_BYTES", str(d.cache_max_bytes)),
            cache_redis_url=env_str("CLAWHUB_GATEWAY_CACHE_REDIS_URL", d.cache_redis_url),
            cache_redis_prefix=env_str("CLAWHUB_GATEWAY_CACHE_REDIS_PREFIX", d.cache_redis_prefix),
            grace_seconds=env_float("CLAWHUB_SHUTDOWN_GRACE", d.grace_seconds, minimum=0),
        )
