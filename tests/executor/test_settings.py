"""Executor settings from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.executor.settings import Settings
from services.runtime.settings import SettingsError


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")



def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLAWHUB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")
    s = Settings.from_env()
    assert (s.host, s.port, s.registry_address) == ("127.0.0.1", 50055, "127.0.0.1:50052")
    assert s.threads == (os.cpu_count() or 1)
    assert (s.queue, s.default_timeout, s.max_timeout) == (10_000, 5.0, 60.0)
    assert (s.default_memory, s.max_memory) == (64 << 20, 512 << 20)
    assert (s.max_output, s.max_stderr, s.max_input, s.cache_bytes) == (4 << 20, 64 << 10, 4 << 20, 256 << 20)
    assert s.grace_seconds == 5.0
    assert s.data_dir == Path(".clawhub") / "executor"
    monkeypatch.setenv("CLAWHUB_DATA_DIR", "/srv/clawhub")
    assert Settings.from_env().data_dir == Path("/srv/clawhub/executor")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CLAWHUB_EXECUTOR_HOST": "0.0.0.0", "CLAWHUB_EXECUTOR_PORT": "6000",
        "CLAWHUB_REGISTRY_ADDRESS": "registry:50052", "CLAWHUB_EXECUTOR_THREADS": "3",
        "CLAWHUB_EXECUTOR_QUEUE": "0", "CLAWHUB_EXECUTOR_DEFAULT_TIMEOUT": "0.5",
        "CLAWHUB_EXECUTOR_DEFAULT_MEMORY": "16MiB", "CLAWHUB_EXECUTOR_MAX_MEMORY": "1GiB",
        "CLAWHUB_EXECUTOR_MAX_OUTPUT": "1MiB", "CLAWHUB_EXECUTOR_MAX_STDERR": "4KiB",
        "CLAWHUB_EXECUTOR_MAX_INPUT": "2MiB", "CLAWHUB_EXECUTOR_CACHE_BYTES": "32MiB",
        "CLAWHUB_SHUTDOWN_GRACE": "1", "CLAWHUB_EXECUTOR_DATA_DIR": "/var/cache/executor",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings.from_env()
    assert (s.host, s.port, s.registry_address, s.threads, s.queue) == (
        "0.0.0.0", 6000, "registry:50052", 3, 0)
    assert (s.default_timeout, s.default_memory, s.max_memory) == (0.5, 16 << 20, 1 << 30)
    assert (s.max_output, s.max_stderr, s.max_input, s.cache_bytes, s.grace_seconds) == (
        1 << 20, 4 << 10, 2 << 20, 32 << 20, 1.0)
    assert s.data_dir == Path("/var/cache/executor")


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_EXECUTOR_THREADS", "0")
    with pytest.raises(SettingsError, match="CLAWHUB_EXECUTOR_THREADS"):
        Settings.from_env()
    monkeypatch.setenv("CLAWHUB_EXECUTOR_THREADS", "2")
    monkeypatch.setenv("CLAWHUB_EXECUTOR_MAX_MEMORY", "lots")
    with pytest.raises(SettingsError, match="CLAWHUB_EXECUTOR_MAX_MEMORY"):
        Settings.from_env()
