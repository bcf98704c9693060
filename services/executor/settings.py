"""Executor settings, from `CLAWHUB_*` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from services.executor.outbound import HttpSettings
from services.runtime.channels import env_payload_size
from services.runtime.identity import PlatformIdentity, identity_from_env
from services.runtime.metrics import MetricsSettings
from services.runtime.ratelimit.policy import RateLimitSettings
from services.runtime.settings import SettingsError, data_dir, env_float, env_int, env_size, env_str
from services.runtime.tls import TlsSettings

MiB = 1024 * 1024


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _default_data_dir() -> Path:
    return data_dir() / "executor"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """CLAWHUB_EXECUTOR_HOST: interface to listen on."""
    port: int = 50055
    """CLAWHUB_EXECUTOR_PORT: port to listen on (0 picks a free one)."""
    registry_address: str = "127.0.0.1:50052"
    """CLAWHUB_REGISTRY_ADDRESS: where module blobs are downloaded from."""
    threads: int = field(default_factory=_cpu_count)
    """CLAWHUB_EXECUTOR_THREADS: calls running at once (wasm releases the GIL); default: the CPU count."""
    queue: int = 10_000
    """CLAWHUB_EXECUTOR_QUEUE: calls allowed to wait for a thread beyond the running ones (a bound for memory
    safety: waiting costs no thread); more are shed with RESOURCE_EXHAUSTED / EXECUTOR_OVERLOADED, as is a
    waiting call whose deadline cannot be met (docs/executor-scheduling.md)."""
    inline: float = 0.001
    """CLAWHUB_EXECUTOR_INLINE: seconds (at most 0.01). A call of a module that can neither see nor change anything
    outside its fresh instance (memory-v1, no imports at all) runs on the event loop with no thread handoff, as
    long as its module's calls take less CPU time than this (three over it send the module to the worker pool for
    good); one still running after 10 ms is stopped there and run again on the pool with its full limits
    (docs/executor-scheduling.md). 0 turns it off."""
    default_timeout: float = 5.0
    """CLAWHUB_EXECUTOR_DEFAULT_TIMEOUT: wall-clock budget in seconds of a call whose limits set none."""
    max_timeout: float = 60.0
    """CLAWHUB_EXECUTOR_MAX_TIMEOUT: largest wall-clock budget in seconds a call may ask for."""
    default_memory: int = 64 * MiB
    """CLAWHUB_EXECUTOR_DEFAULT_MEMORY: linear memory limit of a call whose limits set none."""
    max_memory: int = 512 * MiB
    """CLAWHUB_EXECUTOR_MAX_MEMORY: largest memory limit a call may ask for (larger requests are capped)."""
    max_output: int = 4 * MiB
    """CLAWHUB_EXECUTOR_MAX_OUTPUT: default and largest stdout of a call; more is OUTPUT_LIMIT_EXCEEDED."""
    max_stderr: int = 64 * 1024
    """CLAWHUB_EXECUTOR_MAX_STDERR: default and largest stderr kept per call; the rest is dropped."""
    max_input: int = 4 * MiB
    """CLAWHUB_EXECUTOR_MAX_INPUT: default and largest input of a call; more is INPUT_TOO_LARGE."""
    cache_bytes: int = 256 * MiB
    """CLAWHUB_EXECUTOR_CACHE_BYTES: hot cache of compiled modules, bounded by module bytes (LRU)."""
    fetch_timeout: float = 30.0
    """CLAWHUB_EXECUTOR_FETCH_TIMEOUT: deadline in seconds for downloading one module from the registry."""
    trust_recheck_seconds: float = 5.0
    """CLAWHUB_EXECUTOR_TRUST_RECHECK: seconds between re-checks with the registry of the skill versions in use
    (a signing key removed from a namespace stops what it signed within this bound)."""
    grace_seconds: float = 5.0
    """CLAWHUB_SHUTDOWN_GRACE: seconds to drain in-flight calls on SIGTERM."""
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
    """Its Prometheus metrics endpoint (`CLAWHUB_EXECUTOR_METRICS_PORT`, `CLAWHUB_METRICS_HOST`;
    docs/metrics.md); default off."""
    data_dir: Path = field(default_factory=_default_data_dir)
    """CLAWHUB_EXECUTOR_DATA_DIR: private disk cache: precompiled modules (warm tier) and unpacked file
    bundles; default `$CLAWHUB_DATA_DIR/executor`."""
    kv_redis_url: str = ""
    """CLAWHUB_KV_REDIS_URL: Redis for the `kv` capability's store (shared by every executor using it); empty:
    a sqlite file in the data dir (`kv.sqlite3`, shared by the executors of one host)."""
    kv_redis_prefix: str = "clawhub:kv:"
    """CLAWHUB_KV_REDIS_PREFIX: prefix of every key the store writes in Redis."""
    kv_max_key_bytes: int = 256
    """CLAWHUB_KV_MAX_KEY_BYTES: largest key a skill may use (KV_KEY_TOO_LARGE)."""
    kv_max_value_bytes: int = 64 * 1024
    """CLAWHUB_KV_MAX_VALUE_BYTES: largest value a skill may store (KV_VALUE_TOO_LARGE)."""
    kv_max_keys: int = 1000
    """CLAWHUB_KV_MAX_KEYS: keys a skill may keep at once (KV_TOO_MANY_KEYS)."""
    kv_max_total_bytes: int = 1 * MiB
    """CLAWHUB_KV_MAX_BYTES: bytes of keys and values a skill may keep in all (KV_STORE_FULL)."""
    http: HttpSettings = field(default_factory=HttpSettings)
    """Skills' outbound HTTP (`CLAWHUB_HTTP_*`; docs/skills/http.md)."""
    register_with: str = ""
    """CLAWHUB_EXECUTOR_REGISTER_WITH: the deployer to register with and keep a lease at (services/executor/
    registration.py); empty (the default): none, the executor is listed in CLAWHUB_EXECUTOR_ADDRESSES instead."""
    advertise_address: str = ""
    """CLAWHUB_EXECUTOR_ADVERTISE_ADDRESS: host:port the platform reaches this executor at, as registered; default
    the listening host (this machine's address when it is 0.0.0.0 or ::) and the bound port."""
    lease: float = 10.0
    """CLAWHUB_EXECUTOR_LEASE: seconds a registration lasts without renewal (renewed every fifth of it); an
    executor that stops renewing is dropped after this long."""

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        return cls(
            host=env_str("CLAWHUB_EXECUTOR_HOST", d.host),
            port=env_int("CLAWHUB_EXECUTOR_PORT", d.port, minimum=0),
            registry_address=env_str("CLAWHUB_REGISTRY_ADDRESS", d.registry_address),
            threads=env_int("CLAWHUB_EXECUTOR_THREADS", d.threads, minimum=1),
            queue=env_int("CLAWHUB_EXECUTOR_QUEUE", d.queue, minimum=0),
            inline=min(env_float("CLAWHUB_EXECUTOR_INLINE", d.inline, minimum=0), 0.01),
            default_timeout=env_float("CLAWHUB_EXECUTOR_DEFAULT_TIMEOUT", d.default_timeout, minimum=0.001),
            max_timeout=env_float("CLAWHUB_EXECUTOR_MAX_TIMEOUT", d.max_timeout, minimum=0.001),
            default_memory=env_size("CLAWHUB_EXECUTOR_DEFAULT_MEMORY", str(d.default_memory)),
            max_memory=env_size("CLAWHUB_EXECUTOR_MAX_MEMORY", str(d.max_memory)),
            max_output=env_payload_size("CLAWHUB_EXECUTOR_MAX_OUTPUT", str(d.max_output)),
            max_stderr=env_payload_size("CLAWHUB_EXECUTOR_MAX_STDERR", str(d.max_stderr)),
            max_input=env_payload_size("CLAWHUB_EXECUTOR_MAX_INPUT", str(d.max_input)),
            cache_bytes=env_size("CLAWHUB_EXECUTOR_CACHE_BYTES", str(d.cache_bytes)),
            fetch_timeout=env_float("CLAWHUB_EXECUTOR_FETCH_TIMEOUT", d.fetch_timeout, minimum=0.001),
            trust_recheck_seconds=env_float("CLAWHUB_EXECUTOR_TRUST_RECHECK", d.trust_recheck_seconds,
                                            minimum=0.1),
            grace_seconds=env_float("CLAWHUB_SHUTDOWN_GRACE", d.grace_seconds, minimum=0),
            identity=identity_from_env("executor"),
            tls=TlsSettings.from_env(),
            rate_limits=RateLimitSettings.from_env(),
            metrics=MetricsSettings.from_env("executor"),
            data_dir=Path(env_str("CLAWHUB_EXECUTOR_DATA_DIR", str(d.data_dir))).expanduser(),
            kv_redis_url=env_str("CLAWHUB_KV_REDIS_URL", d.kv_redis_url),
            kv_redis_prefix=env_str("CLAWHUB_KV_REDIS_PREFIX", d.kv_redis_prefix),
            kv_max_key_bytes=env_int("CLAWHUB_KV_MAX_KEY_BYTES", d.kv_max_key_bytes, minimum=1),
            kv_max_value_bytes=env_size("CLAWHUB_KV_MAX_VALUE_BYTES", str(d.kv_max_value_bytes)),
            kv_max_keys=env_int("CLAWHUB_KV_MAX_KEYS", d.kv_max_keys, minimum=1),
            kv_max_total_bytes=env_size("CLAWHUB_KV_MAX_BYTES", str(d.kv_max_total_bytes)),
            http=HttpSettings.from_env(),
            register_with=env_str("CLAWHUB_EXECUTOR_REGISTER_WITH", d.register_with),
            advertise_address=env_str("CLAWHUB_EXECUTOR_ADVERTISE_ADDRESS", d.advertise_address),
            lease=_lease(env_float("CLAWHUB_EXECUTOR_LEASE", d.lease, minimum=1.0)),
        )


def _lease(seconds: float) -> float:
    # The deployer grants 1 s to 5 min (services/deployer/membership.py).
    if seconds > 300:
        raise SettingsError(f"CLAWHUB_EXECUTOR_LEASE={seconds:g}: at most 300 seconds")
    return seconds
