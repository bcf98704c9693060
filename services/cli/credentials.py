"""The CLI's credentials file, like a kubeconfig: which API key to send to which gateway.

`$XDG_CONFIG_HOME/clawhub/credentials` (default `~/.config/clawhub/credentials`), mode 0600 in a 0700
directory: a JSON object `{"gateways": {"HOST:PORT": {"token": "chk_…", "data_dir": "…"}}}`. `clawhub up` creates
an admin key on the suite's first start (`<data-dir>/secrets/admin.key`, 0600; the registry adopts it as key
`admin`) and records it here under the gateway's address, so the CLI on the same machine sends it by itself
(`authorization: Bearer`). An explicit credential wins: a command's `--token` / `--admin-token`, or
`$CLAWHUB_TOKEN`.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from services.runtime.auth import new_api_key, write_private_json
from services.runtime.identity import read_token_file

ADMIN_KEY_FILE = "admin.key"
BOOTSTRAP_VARIABLE = "CLAWHUB_REGISTRY_BOOTSTRAP_KEY_FILE"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".config") / "clawhub"


def credentials_path() -> Path:
    return config_dir() / "credentials"


def _read() -> dict[str, dict[str, dict[str, str]]]:
    try:
        data = json.loads(credentials_path().read_text())
    except (OSError, ValueError):
        return {"gateways": {}}
    gateways = data.get("gateways") if isinstance(data, dict) else None
    return {"gateways": gateways if isinstance(gateways, dict) else {}}


def _aliases(gateway: str) -> list[str]:
    """The address as given, and as a client on this machine reaches a suite bound to every interface."""
    host, _, port = gateway.rpartition(":")
    names = [gateway]
    if host in ("0.0.0.0", "[::]", "::", "localhost"):
        names.append(f"127.0.0.1:{port}")
    return names


def lookup(gateway: str) -> str:
    """The key recorded for `gateway` (empty when none)."""
    gateways = _read()["gateways"]
    for name in _aliases(gateway):
        entry = gateways.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("token"), str):
            return str(entry["token"])
    return ""


def remember(gateway: str, token: str, data_dir: Path) -> Path:
    """Record `token` for `gateway` (0600); returns the file's path. Several `clawhub up` starting at once (one
    per data dir) each add their entry: the read-modify-write holds an exclusive lock on a lock file beside it,
    so none loses another's."""
    path = credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read()
        for name in _aliases(gateway):
            data["gateways"][name] = {"token": token, "data_dir": str(data_dir.resolve())}
        write_private_json(path, data)
    finally:
        os.close(lock)  # releases the lock
    return path


def bootstrap_admin_key(secrets: Path) -> dict[str, str]:
    """Create `secrets/admin.key` (0600) with a new admin API key on the first start; the registry's environment
    that makes the registry adopt it (BOOTSTRAP_VARIABLE)."""
    path = secrets / ADMIN_KEY_FILE
    if not path.exists():
        secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (new_api_key()[1] + "\n").encode())
        finally:
            os.close(fd)
    return {BOOTSTRAP_VARIABLE: str(path)}


def remember_admin_key(gateway: str, secrets: Path, data_dir: Path) -> Path:
    """Record the suite's admin key (from `secrets/admin.key`) for `gateway` in the credentials file."""
    return remember(gateway, read_token_file(secrets / ADMIN_KEY_FILE, BOOTSTRAP_VARIABLE), data_dir)
