"""Settings of the deployer, read from `CLAWHUB_*` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.settings import data_dir, env_float, env_int, env_list, env_str


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
    registry_address: str = "127.0.0.1:50052"
    """The registry, asked whether a version is Ready (`CLAWHUB_REGISTRY_ADDRESS`, default 127.0.0.1:50052)."""
    executor_addresses: tuple[str, ...] = ("127.0.0.1:50055",)
    """Executors that preload every deployed version (`CLAWHUB_EXECUTOR_ADDRESSES`, comma-separated,
    default 127.0.0.1:50055)."""
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

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls()
        return cls(
            host=env_str("CLAWHUB_DEPLOYER_HOST", defaults.host),
            port=env_int("CLAWHUB_DEPLOYER_PORT", defaults.port, minimum=0),
            data_dir=Path(env_str("CLAWHUB_DEPLOYER_DATA_DIR", str(defaults.data_dir))).expanduser(),
            registry_address=env_str("CLAWHUB_REGISTRY_ADDRESS", defaults.registry_address),
            executor_addresses=env_list("CLAWHUB_EXECUTOR_ADDRESSES", ",".join(defaults.executor_addresses)),
            ack_timeout=env_float("CLAWHUB_DEPLOY_ACK_TIMEOUT", defaults.ack_timeout, minimum=0.0),
            load_timeout=env_float("CLAWHUB_DEPLOY_LOAD_TIMEOUT", defaults.load_timeout, minimum=0.1),
            registry_timeout=env_float("CLAWHUB_DEPLOYER_REGISTRY_TIMEOUT", defaults.registry_timeout, minimum=0.1),
            grace=env_float("CLAWHUB_SHUTDOWN_GRACE", defaults.grace, minimum=0.0),
        )
