from __future__ import annotations

import pytest

from services.runtime.names import digest_problem, semver_key, skill_name_problem, version_problem
from services.runtime.settings import SettingsError, env_int, env_size, parse_size


@pytest.mark.parametrize("name", ["com.acme.image-process", "io.x.y", "a1.b2"])
def test_valid_names(name: str) -> None:
    assert skill_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "acme", "Com.Acme.x", "com..acme", "com.-acme", "com.acme-", "com.a_b",
                                  "com.acme/x", "x" * 300])
def test_invalid_names(name: str) -> None:
    assert skill_name_problem(name)


@pytest.mark.parametrize("version", ["0.0.0", "1.2.3", "1.0.0-rc.1", "1.0.0+build.5", "10.20.30-alpha.beta"])
def test_valid_versions(version: str) -> None:
    assert version_problem(version) is None


@pytest.mark.parametrize("version", ["", "1", "1.2", "01.2.3", "1.2.3-", "1.2.3-01", "v1.2.3", "1.2.3.4"])
def test_invalid_versions(version: str) -> None:
    assert version_problem(version)


def test_semver_precedence_follows_the_spec() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
               "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0"]
    assert sorted(reversed(ordered), key=semver_key) == ordered


def test_digest_validation() -> None:
    assert digest_problem("sha256:" + "a" * 64) is None
    for bad in ("", "sha256:" + "A" * 64, "md5:" + "a" * 32, "sha256:" + "a" * 63):
        assert digest_problem(bad)


def test_sizes() -> None:
    assert parse_size("64MiB") == 64 * 1024 * 1024
    assert parse_size("512k") == 512 * 1024
    assert parse_size("1048576") == 1048576
    with pytest.raises(ValueError):
        parse_size("lots")


def test_env_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_X", "ten")
    with pytest.raises(SettingsError, match="CLAWHUB_X"):
        env_int("CLAWHUB_X", 1)
    monkeypatch.setenv("CLAWHUB_Y", "12 parsecs")
    with pytest.raises(SettingsError, match="CLAWHUB_Y"):
        env_size("CLAWHUB_Y", "1MiB")
