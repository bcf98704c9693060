"""Deployer settings from the environment, with the documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.deployer.settings import Settings
from services.runtime.settings import SettingsError


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")



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


RELEASE_VARS = (
    "CLAWHUB_DEPLOYER_BAKE", "CLAWHUB_DEPLOYER_CANARY_WEIGHTS", "CLAWHUB_DEPLOYER_CANARY_STEP",
    "CLAWHUB_DEPLOYER_MIN_SUCCESS_RATE", "CLAWHUB_DEPLOYER_MAX_P99_LATENCY", "CLAWHUB_DEPLOYER_MIN_REQUESTS",
    "CLAWHUB_DEPLOYER_BREAKER_FAILURES", "CLAWHUB_DEPLOYER_BREAKER_WINDOW", "CLAWHUB_DEPLOYER_BREAKER_RESET",
)


def test_release_and_breaker_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RELEASE_VARS:
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    release, breaker = settings.release, settings.breaker
    assert (release.bake_seconds, release.weights, release.step_seconds) == (10.0, (5, 25, 50, 100), 10.0)
    t = release.thresholds
    assert (t.min_success_rate, t.max_p99_seconds, t.min_requests) == (0.99, 1.0, 20)
    assert (breaker.failures, breaker.window_seconds, breaker.reset_seconds) == (3, 600.0, 300.0)

    for name, value in zip(RELEASE_VARS, ("0.5", "10, 100", "2", "0.9", "0.25", "50", "0", "60", "30"), strict=True):
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    release, breaker = settings.release, settings.breaker
    assert (release.bake_seconds, release.weights, release.step_seconds) == (0.5, (10, 100), 2.0)
    t = release.thresholds
    assert (t.min_success_rate, t.max_p99_seconds, t.min_requests) == (0.9, 0.25, 50)
    assert (breaker.failures, breaker.window_seconds, breaker.reset_seconds) == (0, 60.0, 30.0)


@pytest.mark.parametrize(("name", "value"), [
    ("CLAWHUB_DEPLOYER_CANARY_WEIGHTS", "50,25,100"),
    ("CLAWHUB_DEPLOYER_CANARY_WEIGHTS", "5,50"),
    ("CLAWHUB_DEPLOYER_CANARY_WEIGHTS", "a,100"),
    ("CLAWHUB_DEPLOYER_MIN_SUCCESS_RATE", "1.5"),
    ("CLAWHUB_DEPLOYER_BAKE", "-1"),
    ("CLAWHUB_DEPLOYER_MIN_REQUESTS", "0"),
    ("CLAWHUB_DEPLOYER_BREAKER_FAILURES", "-1"),
])
def test_bad_release_settings_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        Settings.from_env()


def test_database_and_election_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLAWHUB_DATABASE_URL", "CLAWHUB_DEPLOYER_DATABASE_URL", "CLAWHUB_DEPLOYER_ID",
                 "CLAWHUB_DEPLOYER_ADVERTISE_ADDRESS", "CLAWHUB_DEPLOYER_ELECTION_INTERVAL",
                 "CLAWHUB_DEPLOYER_LEASE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert (settings.database_url, settings.deployer_id, settings.advertise_address) == ("", "", "")
    assert (settings.election_interval, settings.lease_timeout) == (1.0, 5.0)

    monkeypatch.setenv("CLAWHUB_DATABASE_URL", "postgresql://clawhub@db/shared")
    assert Settings.from_env().database_url == "postgresql://clawhub@db/shared"
    monkeypatch.setenv("CLAWHUB_DEPLOYER_DATABASE_URL", "postgres://deployer:pw@db/deployer")
    monkeypatch.setenv("CLAWHUB_DEPLOYER_ID", "deployer-0")
    monkeypatch.setenv("CLAWHUB_DEPLOYER_ADVERTISE_ADDRESS", "10.1.2.3:50053")
    monkeypatch.setenv("CLAWHUB_DEPLOYER_ELECTION_INTERVAL", "0.5")
    monkeypatch.setenv("CLAWHUB_DEPLOYER_LEASE_TIMEOUT", "3")
    settings = Settings.from_env()
    assert settings.database_url == "postgres://deployer:pw@db/deployer"  # the deployer's own wins
    assert "deployer:pw" not in repr(settings)  # as the registry's: a logged or printed settings hides it
    assert (settings.deployer_id, settings.advertise_address) == ("deployer-0", "10.1.2.3:50053")
    assert (settings.election_interval, settings.lease_timeout) == (0.5, 3.0)

    monkeypatch.setenv("CLAWHUB_DEPLOYER_DATABASE_URL", "mysql://db/deployer")
    with pytest.raises(SettingsError, match="CLAWHUB_DEPLOYER_DATABASE_URL.*not a PostgreSQL URL"):
        Settings.from_env()
    monkeypatch.delenv("CLAWHUB_DEPLOYER_DATABASE_URL")
    monkeypatch.setenv("CLAWHUB_DEPLOYER_LEASE_TIMEOUT", "0.1")
    with pytest.raises(SettingsError, match="CLAWHUB_DEPLOYER_LEASE_TIMEOUT"):
        Settings.from_env()


def test_none_means_no_static_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registration only: `none` leaves no static executor (an empty value would be unset, the local default)."""
    monkeypatch.setenv("CLAWHUB_EXECUTOR_ADDRESSES", "none")
    assert Settings.from_env().executor_addresses == ()
    monkeypatch.setenv("CLAWHUB_EXECUTOR_ADDRESSES", "")
    assert Settings.from_env().executor_addresses == ("127.0.0.1:50055",)
