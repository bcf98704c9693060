"""Settings of the deployer, read from `CLAWHUB_*` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.deployer.breaker import BreakerSettings
from services.deployer.plan import Defaults, Thresholds, weights_problem
from services.deployer.secrets import KEY_FILE
from services.runtime.auth import AuthSettings
from services.runtime.identity import PlatformIdentity, identity_from_env
from services.runtime.metrics import MetricsSettings
from services.runtime.postgres import database_url
from services.runtime.ratelimit.policy import RateLimitSettings
from services.runtime.settings import (
    SettingsError,
    data_dir,
    env_executor_addresses,
    env_float,
    env_int,
    env_list,
    env_str,
)
from services.runtime.tls import TlsSettings


def _default_data_dir() -> Path:
    return data_dir() / "deployer"


@dataclass(frozen=True)
class Settings:
    """Everything the deployer reads from its environment; the defaults are the documented ones."""

    host: str = "127.0.0.1"
    """Interface to listen on (`CLAWHUB_DEPLOYER_HOST`, default 127.0.0.1)."""
    port: int = 50053
    """Port to listen on; 0 picks a free one (`CLAWHUB_DEPLOYER_PORT`, default 50053)."""
    data_dir: Path = field(default_factory=_default_data_dir)
    """Where `deployer.sqlite3` lives (`CLAWHUB_DEPLOYER_DATA_DIR`, default `$CLAWHUB_DATA_DIR/deployer`)."""
    secrets_key_file: Path | None = None
    """The key file that encrypts deploy-time env values at rest (`CLAWHUB_DEPLOYER_SECRETS_KEY_FILE`, default
    `secrets.key` in the data directory; created with mode 0600 on first start; see docs/security.md). Replicas on
    one PostgreSQL database must all have the same key file (mount one Secret on each): a replica whose file
    lacks the key the others seal with refuses to start."""
    registry_address: str = "127.0.0.1:50052"
    """The registry, asked whether a version is Ready (`CLAWHUB_REGISTRY_ADDRESS`, default 127.0.0.1:50052)."""
    executor_addresses: tuple[str, ...] = ("127.0.0.1:50055",)
    """Executors that preload every deployed version (`CLAWHUB_EXECUTOR_ADDRESSES`, comma-separated,
    default 127.0.0.1:50055; `none`: executors only register); a `dns:///NAME:PORT` entry stands for every
    address NAME resolves to, looked up again every `dns_interval` seconds (services/deployer/membership.py)."""
    dns_interval: float = 5.0
    """Seconds between two lookups of the `dns:///` executor entries (`CLAWHUB_EXECUTOR_DNS_INTERVAL`,
    default 5)."""
    ack_timeout: float = 10.0
    """Seconds to wait for every connected dispatcher to acknowledge a route generation before the deploy
    counts as failed and rolls back (`CLAWHUB_DEPLOY_ACK_TIMEOUT`, default 10)."""
    load_timeout: float = 60.0
    """Seconds one executor may take to fetch and compile a module on LoadSkill
    (`CLAWHUB_DEPLOY_LOAD_TIMEOUT`, default 60)."""
    registry_timeout: float = 10.0
    """Seconds a registry lookup may take (`CLAWHUB_DEPLOYER_REGISTRY_TIMEOUT`, default 10)."""
    grace: float = 5.0
    """Seconds in-flight calls get to finish on shutdown (`CLAWHUB_SHUTDOWN_GRACE`, default 5)."""
    release: Defaults = field(default_factory=Defaults)
    """Defaults of a release a CreateDeployment request leaves unset: `CLAWHUB_DEPLOYER_BAKE` (seconds of the
    blue-green bake window, default 10; 0 skips it), `CLAWHUB_DEPLOYER_CANARY_WEIGHTS` (default 5,25,50,100),
    `CLAWHUB_DEPLOYER_CANARY_STEP` (seconds per canary step, default 10), `CLAWHUB_DEPLOYER_MIN_SUCCESS_RATE`
    (default 0.99), `CLAWHUB_DEPLOYER_MAX_P99_LATENCY` (seconds, default 1), `CLAWHUB_DEPLOYER_MIN_REQUESTS`
    (default 20)."""
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    """The deployment circuit breaker: `CLAWHUB_DEPLOYER_BREAKER_FAILURES` failed deployments of a skill
    (default 3; 0 turns it off) within `CLAWHUB_DEPLOYER_BREAKER_WINDOW` seconds (default 600) refuse its
    next deployments until `CLAWHUB_DEPLOYER_BREAKER_RESET` seconds (default 300) after the last failure."""
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
    """Its Prometheus metrics endpoint (`CLAWHUB_DEPLOYER_METRICS_PORT`, `CLAWHUB_METRICS_HOST`;
    docs/metrics.md); default off."""
    progress_interval: float = 0.25
    """Seconds between two analysis progress events of a running release (not configurable by env)."""
    database_url: str = field(default="", repr=False)  # it may hold a password
    """PostgreSQL for the deployer's state, shared by its replicas (`CLAWHUB_DEPLOYER_DATABASE_URL`, else
    `CLAWHUB_DATABASE_URL`); empty: sqlite in the data directory, one deployer (the default)."""
    deployer_id: str = ""
    """This replica's name in the leader election and in NOT_LEADER refusals (`CLAWHUB_DEPLOYER_ID`, default
    HOSTNAME-PID)."""
    advertise_address: str = ""
    """host:port at which dispatchers and clients reach this replica when it leads: what a standby's NOT_LEADER
    refusal names (`CLAWHUB_DEPLOYER_ADVERTISE_ADDRESS`, default the listening host (this machine's name when
    it listens on every interface) and port). In Kubernetes, the pod's IP (`status.podIP`) and port."""
    election_interval: float = 1.0
    """Seconds between a standby's attempts to take the lead and between the leader's heartbeats
    (`CLAWHUB_DEPLOYER_ELECTION_INTERVAL`, default 1)."""
    lease_timeout: float = 5.0
    """Seconds after which a silent leader counts as gone: PostgreSQL ends its session (and frees the lead),
    and a leader whose heartbeat went unanswered for half of it steps down (`CLAWHUB_DEPLOYER_LEASE_TIMEOUT`,
    default 5)."""

    @property
    def key_file(self) -> Path:
        """Where the secrets keys are: `secrets_key_file`, or `secrets.key` in the data directory."""
        return self.secrets_key_file or self.data_dir / KEY_FILE

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls()
        return cls(
            host=env_str("CLAWHUB_DEPLOYER_HOST", defaults.host),
            port=env_int("CLAWHUB_DEPLOYER_PORT", defaults.port, minimum=0),
            data_dir=Path(env_str("CLAWHUB_DEPLOYER_DATA_DIR", str(defaults.data_dir))).expanduser(),
            secrets_key_file=_optional_path("CLAWHUB_DEPLOYER_SECRETS_KEY_FILE"),
            registry_address=env_str("CLAWHUB_REGISTRY_ADDRESS", defaults.registry_address),
            executor_addresses=env_executor_addresses(defaults.executor_addresses),
            dns_interval=env_float("CLAWHUB_EXECUTOR_DNS_INTERVAL", defaults.dns_interval, minimum=0.1),
            ack_timeout=env_float("CLAWHUB_DEPLOY_ACK_TIMEOUT", defaults.ack_timeout, minimum=0.0),
            load_timeout=env_float("CLAWHUB_DEPLOY_LOAD_TIMEOUT", defaults.load_timeout, minimum=0.1),
            registry_timeout=env_float("CLAWHUB_DEPLOYER_REGISTRY_TIMEOUT", defaults.registry_timeout, minimum=0.1),
            grace=env_float("CLAWHUB_SHUTDOWN_GRACE", defaults.grace, minimum=0.0),
            identity=identity_from_env("deployer"),
            auth=AuthSettings.from_env(),
            tls=TlsSettings.from_env(),
            rate_limits=RateLimitSettings.from_env(),
            metrics=MetricsSettings.from_env("deployer"),
            database_url=database_url("deployer"),
            deployer_id=env_str("CLAWHUB_DEPLOYER_ID", defaults.deployer_id),
            advertise_address=env_str("CLAWHUB_DEPLOYER_ADVERTISE_ADDRESS", defaults.advertise_address),
            election_interval=env_float("CLAWHUB_DEPLOYER_ELECTION_INTERVAL", defaults.election_interval,
                                        minimum=0.05),
            lease_timeout=env_float("CLAWHUB_DEPLOYER_LEASE_TIMEOUT", defaults.lease_timeout, minimum=1.0),
            release=_release_defaults(defaults.release),
            breaker=BreakerSettings(
                failures=env_int("CLAWHUB_DEPLOYER_BREAKER_FAILURES", defaults.breaker.failures, minimum=0),
                window_seconds=env_float("CLAWHUB_DEPLOYER_BREAKER_WINDOW", defaults.breaker.window_seconds,
                                         minimum=0.0),
                reset_seconds=env_float("CLAWHUB_DEPLOYER_BREAKER_RESET", defaults.breaker.reset_seconds,
                                        minimum=0.0)),
        )


def _optional_path(variable: str) -> Path | None:
    raw = env_str(variable, "")
    return Path(raw).expanduser() if raw else None


def _release_defaults(base: Defaults) -> Defaults:
    raw = env_list("CLAWHUB_DEPLOYER_CANARY_WEIGHTS", ",".join(str(w) for w in base.weights))
    try:
        weights = tuple(int(w) for w in raw)
    except ValueError:
        raise SettingsError(f"CLAWHUB_DEPLOYER_CANARY_WEIGHTS={','.join(raw)!r} is not a list of integers") from None
    problem = weights_problem(weights) or ("" if weights else "no weights")
    if problem:
        raise SettingsError(f"CLAWHUB_DEPLOYER_CANARY_WEIGHTS: {problem}")
    rate = env_float("CLAWHUB_DEPLOYER_MIN_SUCCESS_RATE", base.thresholds.min_success_rate, minimum=0.0)
    if not 0 < rate <= 1:
        raise SettingsError(f"CLAWHUB_DEPLOYER_MIN_SUCCESS_RATE={rate} must be in (0, 1]")
    return Defaults(
        bake_seconds=env_float("CLAWHUB_DEPLOYER_BAKE", base.bake_seconds, minimum=0.0),
        weights=weights,
        step_seconds=env_float("CLAWHUB_DEPLOYER_CANARY_STEP", base.step_seconds, minimum=0.0),
        thresholds=Thresholds(
            min_success_rate=rate,
            max_p99_seconds=env_float("CLAWHUB_DEPLOYER_MAX_P99_LATENCY", base.thresholds.max_p99_seconds,
                                      minimum=0.001),
            min_requests=env_int("CLAWHUB_DEPLOYER_MIN_REQUESTS", base.thresholds.min_requests, minimum=1)))
