"""Deployer settings from the environment, with the documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.deployer.settings import Settings
from services.runtime.settings import SettingsError


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CLAWHUB_DEPLOYER_HOST", "CLAWHUB_DEPLOYER_PORT", "CLAWHUB_DEPLOYER_DATA_DIR",
                 "CLAWHUB_REGISTRY_ADDRESS", "CLAWHUB_EXECUTOR_ADDRESSES", "CLAWHUB_DEPLOY_ACK_TIMEOUT",
                 "CLAWHUB_DEPLOY_LOAD_TIMEOUT", "CLAWHUB_DEPLOYER_REGISTRY_TIMEOUT", "CLAWHUB_SHUTDOWN_GRACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLAWHUB_DATA_DIR", str(tmp_path))
    settings = Settings.from_env()
    assert (settings.host, settings.port) == ("127.0.0.1", 50053)
    assert settings.data_dir == tmp_path / "deployer"
    assert settings.registry_address == "127.0.0.1:50052"
    assert settings.executor_addresses == ("127.0.0.1:50055",)
    assert (settings.ack_timeout, settings.load_timeout, settings.registry_timeout, settings.grace) == (
        10.0, 60.0, 10.0, 5.0)


def test_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLAWHUB_DEPLOYER_PORT", "0")
    monkeypatch.setenv("CLAWHUB_DEPLOYER_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("CLAWHUB_EXECUTOR_ADDRESSES", "a:1, b:2,")
    monkeypatch.setenv("CLAWHUB_DEPLOY_ACK_TIMEOUT", "0.5")
    settings = Settings.from_env()
    assert settings.port == 0 and settings.data_dir == tmp_path / "d"
    assert settings.executor_addresses == ("a:1", "b:2")
    assert settings.ack_timeout == 0.5
    monkeypatch.setenv("CLAWHUB_DEPLOY_ACK_TIMEOUT", "soon")
    with pytest.raises(SettingsError, match="CLAWHUB_DEPLOY_ACK_TIMEOUT"):
        Settings.from_env()
