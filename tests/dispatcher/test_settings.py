"""Dispatcher settings from the environment, with the documented defaults."""

from __future__ import annotations

import os
import socket

import pytest

from services.dispatcher.settings import Settings
from services.runtime.settings import SettingsError


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")



def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLAWHUB_DISPATCHER_HOST", "CLAWHUB_DISPATCHER_PORT", "CLAWHUB_DEPLOYER_ADDRESS",
                 "CLAWHUB_EXECUTOR_ADDRESSES", "CLAWHUB_DISPATCHER_ID", "CLAWHUB_DISPATCH_RETRIES",
                 "CLAWHUB_DISPATCH_TIMEOUT", "CLAWHUB_SHUTDOWN_GRACE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert (settings.host, settings.port) == ("127.0.0.1", 50054)
    assert settings.deployer_address == "127.0.0.1:50053"
    assert settings.executor_addresses == ("127.0.0.1:50055",)
    assert settings.dispatcher_id == f"{socket.gethostname()}-{os.getpid()}"
    assert (settings.retries, settings.dispatch_timeout, settings.grace) == (2, 30.0, 5.0)


def test_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_DISPATCHER_ID", "edge-1")
    monkeypatch.setenv("CLAWHUB_DISPATCH_RETRIES", "0")
    monkeypatch.setenv("CLAWHUB_EXECUTOR_ADDRESSES", "a:1,b:2")
    settings = Settings.from_env()
    assert (settings.dispatcher_id, settings.retries, settings.executor_addresses) == ("edge-1", 0, ("a:1", "b:2"))
    monkeypatch.setenv("CLAWHUB_DISPATCH_RETRIES", "-1")
    with pytest.raises(SettingsError, match="CLAWHUB_DISPATCH_RETRIES"):
        Settings.from_env()


def test_stats_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWHUB_DISPATCHER_STATS_INTERVAL", raising=False)
    assert Settings.from_env().stats_interval == 0.1
    monkeypatch.setenv("CLAWHUB_DISPATCHER_STATS_INTERVAL", "0.5")
    assert Settings.from_env().stats_interval == 0.5
    monkeypatch.setenv("CLAWHUB_DISPATCHER_STATS_INTERVAL", "0")
    with pytest.raises(SettingsError, match="CLAWHUB_DISPATCHER_STATS_INTERVAL"):
        Settings.from_env()


def test_none_means_no_static_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_EXECUTOR_ADDRESSES", "none")
    assert Settings.from_env().executor_addresses == ()
