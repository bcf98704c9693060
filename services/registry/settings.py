"""Registry settings, read from `CLAWHUB_REGISTRY_*` environment variables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.auth import AuthSettings
from services.runtime.identity import PlatformIdentity, identity_from_env, read_token_file
from services.runtime.metrics import MetricsSettings
from services.runtime.postgres import database_url
from services.runtime.ratelimit.policy import RateLimitSettings
from services.runtime.settings import SettingsError, data_dir, env_float, env_int, env_size, env_str
from services.runtime.tls import TlsSettings

DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024


def _default_data_dir() -> Path:
    return data_dir() / "registry"


@dataclass(frozen=True)
class Settings:
    """How the registry runs. Every field has an environment variable and a default."""

    host: str = "127.0.0.1"
    """Interface to listen on: `CLAWHUB_REGISTRY_HOST`, default 127.0.0.1."""

    port: int = 50052
    """Port to listen on (0 picks a free one): `CLAWHUB_REGISTRY_PORT`, default 50052."""

    data_dir: Path = field(default_factory=_default_data_dir)
    """Where the metadata database (`registry.sqlite3`) and the blobs (`blobs/`) live:
    `CLAWHUB_REGISTRY_DATA_DIR`, default `$CLAWHUB_DATA_DIR/registry` (`./.clawhub/registry`)."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    """Largest module a publish may upload, such as `64MiB` or `512KiB`: `CLAWHUB_REGISTRY_MAX_UPLOAD`,
    default 64MiB."""

    shutdown_grace_seconds: float = 5.0
    """How long in-flight calls may finish after SIGTERM: `CLAWHUB_SHUTDOWN_GRACE`, default 5 seconds."""

    admin_token: str = field(default="", repr=False)
    """The operator's token for admin calls (creating publishers and namespaces): read from the file
    `CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE` (mode 0600; what `clawhub up` passes), or `CLAWHUB_REGISTRY_ADMIN_TOKEN`
    (kept for compatibility: an environment variable is visible to more than the file); default empty, which
    refuses every admin call."""

    require_namespace: bool = False
    """Whether every skill name must be in a namespace (else names under none are open to anyone):
    `CLAWHUB_REGISTRY_REQUIRE_NAMESPACE`, default false."""

    max_uploads: int = 64
    """Publish streams in flight at once, from everyone: `CLAWHUB_REGISTRY_MAX_UPLOADS`, default 64. More are
    refused with RESOURCE_EXHAUSTED (TOO_MANY_UPLOADS) and a RetryInfo. While its bytes arrive, each holds up
    to 2 MiB of buffered bytes and one file descriptor."""

    max_uploads_per_caller: int = 32
    """Publish streams in flight at once from one caller (a publisher token; without one, the client address):
    `CLAWHUB_REGISTRY_MAX_UPLOADS_PER_CALLER`, default 32 (a client running many publishes in parallel; a
    stranger still leaves half of `max_uploads` to the others)."""

    upload_idle_timeout_seconds: float = 30.0
    """A publish stream that sends no message for this long is dropped with DEADLINE_EXCEEDED
    (UPLOAD_TIMEOUT): `CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT`, seconds, default 30."""

    upload_max_seconds: float = 600.0
    """The longest one upload may take to arrive, however steadily it trickles in:
    `CLAWHUB_REGISTRY_UPLOAD_MAX_DURATION`, seconds, default 600 (64 MiB at under 1 Mbit/s)."""

    max_downloads: int = 512
    """`DownloadBlob` streams in flight at once, from everyone: `CLAWHUB_REGISTRY_MAX_DOWNLOADS`, default 512.
    More are refused with RESOURCE_EXHAUSTED (TOO_MANY_DOWNLOADS) and a RetryInfo. A download holds no file
    descriptor between chunks; one whose client stops reading holds its slot and about 320 KB (the chunk being
    sent) until the client reads on, goes away or reaches its deadline: at most about 160 MB for all of them."""

    max_downloads_per_caller: int = 256
    """`DownloadBlob` streams in flight at once from one caller (a publisher token; without one, the client
    address, so all the executors of one host count as one): `CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER`,
    default 256 (far more than executors preloading many skills at once fetch; a stranger still leaves half of
    `max_downloads` to the others)."""

    identity: PlatformIdentity | None = None
    """Its platform token and the platform's identities (`CLAWHUB_SERVICE_TOKEN_FILE`,
    `CLAWHUB_PLATFORM_IDENTITIES_FILE`; docs/security.md). None: internal auth off (`CLAWHUB_INTERNAL_AUTH=off`;
    the default here, so that tests can build servers directly; from_env requires one or the other)."""
    bootstrap_key_file: Path | None = None
    """A file (mode 0600) holding an API key (`chk_…`) the registry adopts at start as key `admin`, role admin,
    unless it knows it already (a revoked one stays revoked): `CLAWHUB_REGISTRY_BOOTSTRAP_KEY_FILE`, default
    none. `clawhub up` creates one on the first start (`<data-dir>/secrets/admin.key`)."""
    auth: AuthSettings = field(default_factory=AuthSettings)
    """Users' credentials and roles (`CLAWHUB_USER_AUTH`, `CLAWHUB_ANONYMOUS_ROLES`, `CLAWHUB_JWT_*`;
    services/runtime/auth.py). Default here: off, so that tests can build servers directly; from_env: on."""
    tls: TlsSettings = field(default_factory=TlsSettings)
    """TLS of its port and of its calls (`CLAWHUB_TLS_*`; services/runtime/tls.py); default plaintext."""
    rate_limits: RateLimitSettings | None = None
    """Token-bucket rate limits (`CLAWHUB_RATE_*`; docs/ratelimits.md). None: none (what tests that build
    servers directly get); from_env: on unless `CLAWHUB_RATE_LIMITS=off`."""
    metrics: MetricsSettings = MetricsSettings()
    """Its Prometheus metrics endpoint (`CLAWHUB_REGISTRY_METRICS_PORT`, `CLAWHUB_METRICS_HOST`;
    docs/metrics.md); default off."""
    scrub_interval_seconds: float = 86400.0
    """How often the registry hashes every stored blob, quarantining and logging corrupt or missing ones
    (as `clawhub admin verify-blobs` does): `CLAWHUB_REGISTRY_SCRUB_INTERVAL`, seconds, default 86400 (daily,
    the first one a full interval after the start); 0 turns it off."""
    database_url: str = field(default="", repr=False)
    """PostgreSQL for the metadata and the blobs, shared by every registry replica (postgresql://USER[:PASSWORD]
    @HOST[:PORT]/DATABASE): `CLAWHUB_REGISTRY_DATABASE_URL`, else `CLAWHUB_DATABASE_URL`; default empty, which
    keeps both in `data_dir` (sqlite and files). With a database, `data_dir` holds only uploads being staged."""

    @classmethod
    def from_env(cls) -> Settings:
        max_upload = env_size("CLAWHUB_REGISTRY_MAX_UPLOAD", "64MiB")
        if max_upload <= 0:
            raise SettingsError(f"CLAWHUB_REGISTRY_MAX_UPLOAD must be positive (got {max_upload})")
        return cls(
            host=env_str("CLAWHUB_REGISTRY_HOST", "127.0.0.1"),
            port=env_int("CLAWHUB_REGISTRY_PORT", 50052, minimum=0),
            data_dir=Path(env_str("CLAWHUB_REGISTRY_DATA_DIR", str(_default_data_dir()))).expanduser(),
            max_upload_bytes=max_upload,
            shutdown_grace_seconds=env_float("CLAWHUB_SHUTDOWN_GRACE", 5.0, minimum=0.0),
            admin_token=_admin_token(),
            require_namespace=_env_bool("CLAWHUB_REGISTRY_REQUIRE_NAMESPACE", False),
            max_uploads=env_int("CLAWHUB_REGISTRY_MAX_UPLOADS", 64, minimum=1),
            max_uploads_per_caller=env_int("CLAWHUB_REGISTRY_MAX_UPLOADS_PER_CALLER", 32, minimum=1),
            upload_idle_timeout_seconds=_env_seconds("CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT", 30.0),
            upload_max_seconds=_env_seconds("CLAWHUB_REGISTRY_UPLOAD_MAX_DURATION", 600.0),
            max_downloads=env_int("CLAWHUB_REGISTRY_MAX_DOWNLOADS", 512, minimum=1),
            max_downloads_per_caller=env_int("CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER", 256, minimum=1),
            identity=identity_from_env("registry"),
            auth=AuthSettings.from_env(),
            bootstrap_key_file=(Path(env_str("CLAWHUB_REGISTRY_BOOTSTRAP_KEY_FILE", "")).expanduser()
                                if env_str("CLAWHUB_REGISTRY_BOOTSTRAP_KEY_FILE", "") else None),
            tls=TlsSettings.from_env(),
            rate_limits=RateLimitSettings.from_env(),
            metrics=MetricsSettings.from_env("registry"),
            scrub_interval_seconds=_env_seconds("CLAWHUB_REGISTRY_SCRUB_INTERVAL", 86400.0, zero_ok=True),
            database_url=database_url("registry"),
        )


def _admin_token() -> str:
    path = env_str("CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE", "")
    if path and env_str("CLAWHUB_REGISTRY_ADMIN_TOKEN", ""):
        raise SettingsError("CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE and CLAWHUB_REGISTRY_ADMIN_TOKEN are both set: "
                            "keep one (the file)")
    if path:
        return read_token_file(Path(path).expanduser(), "CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE")
    return env_str("CLAWHUB_REGISTRY_ADMIN_TOKEN", "")


def _env_bool(name: str, default: bool) -> bool:
    raw = env_str(name, "true" if default else "false").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (true or false)")


def _env_seconds(name: str, default: float, *, zero_ok: bool = False) -> float:
    value = env_float(name, default, minimum=0.0)
    if not math.isfinite(value) or (value == 0 and not zero_ok):
        raise SettingsError(f"{name}={value} must be a positive number of seconds"
                            + (" (or 0 to turn it off)" if zero_ok else ""))
    return value
