"""Registry settings, read from `CLAWHUB_REGISTRY_*` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.settings import SettingsError, data_dir, env_float, env_int, env_size, env_str

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
    """The operator's token for admin calls (creating publishers and namespaces):
    `CLAWHUB_REGISTRY_ADMIN_TOKEN`, default empty, which refuses every admin call."""

    require_namespace: bool = False
    """Whether every skill name must be in a namespace (else names under none are open to anyone):
    `CLAWHUB_REGISTRY_REQUIRE_NAMESPACE`, default false."""

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
            admin_token=env_str("CLAWHUB_REGISTRY_ADMIN_TOKEN", ""),
            require_namespace=_env_bool("CLAWHUB_REGISTRY_REQUIRE_NAMESPACE", False),
        )


def _env_bool(name: str, default: bool) -> bool:
    raw = env_str(name, "true" if default else "false").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (true or false)")
