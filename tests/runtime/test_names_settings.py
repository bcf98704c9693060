from __future__ import annotations

from pathlib import Path

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


# Issue 9: `$` matches before a final "\n", so `re.match` with a pattern ending in `$` accepted a trailing
# newline. Every validator of the code base uses full-match semantics now; each is checked here.

@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\t", "\x00"], ids=repr)
def test_no_validator_accepts_trailing_whitespace(suffix: str) -> None:
    from services.deployer.servicer import _check_id
    from services.registry.ranges import range_problem
    from services.registry.servicer import TAG_RE
    from services.registry.trust import PUBLISHER_NAME_RE, namespace_problem
    from services.runtime.errors import ServiceError
    from services.runtime.names import DIGEST_RE, SHA256_HEX_RE, is_prerelease, key_id_problem, semver_key
    from services.runtime.wasm import capability_problems, env_names

    hexdigest = "a" * 64
    assert skill_name_problem("com.acme.echo" + suffix)
    assert version_problem("1.0.0" + suffix) and version_problem("1.0.0-rc.1" + suffix)
    assert digest_problem(f"sha256:{hexdigest}" + suffix)
    assert not DIGEST_RE.fullmatch(f"sha256:{hexdigest}" + suffix)
    assert not SHA256_HEX_RE.fullmatch(hexdigest + suffix)
    assert namespace_problem("com.acme" + suffix)
    assert key_id_problem("ed25519:0123456789abcdef" + suffix) and key_id_problem("ed25519:0123456789abcdef") is None
    assert not TAG_RE.fullmatch("stable" + suffix)
    assert not PUBLISHER_NAME_RE.fullmatch("acme" + suffix)
    with pytest.raises(ValueError):
        semver_key("1.0.0" + suffix)
    assert not is_prerelease("1.0.0-rc.1" + suffix)
    assert capability_problems(["env:GREETING" + suffix]) and env_names(["env:GREETING" + suffix]) == []
    with pytest.raises(ServiceError):
        _check_id("d-0123456789" + suffix)
    _check_id("d-0123456789")
    # A range may be surrounded by spaces (they are stripped), but no part of it may end in a stray character.
    assert range_problem(" ^1.2.3\n") is None
    assert range_problem("^1.2.3\x00")


@pytest.mark.parametrize("service", ["gateway", "registry", "deployer", "dispatcher", "executor"])
def test_a_bad_setting_stops_a_service_with_one_line_not_a_traceback(service: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, f"CLAWHUB_{service.upper()}_PORT": "fifty", "CLAWHUB_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 1
    assert done.stderr.strip() == f"clawhub: {service}: CLAWHUB_{service.upper()}_PORT='fifty' is not an integer"


# Issue 9 review: `\d` (and `\s`, `\w`) in a `str` pattern match the digits (spaces, letters) of every script,
# and int() reads those digits: `1.0.1` + an Arabic-Indic zero passed as a version sorting as 1.0.10. Every
# validator is ASCII-only; each is checked here with digits of other scripts in every position.

@pytest.mark.parametrize("digit", ["\u0660", "\u0661", "\u06f1", "\u0967", "\uff11", "\U0001d7cf"], ids=ascii)
def test_no_validator_accepts_a_digit_of_another_script(digit: str) -> None:
    from services.deployer.servicer import _check_id
    from services.registry.ranges import range_problem
    from services.registry.servicer import TAG_RE
    from services.registry.trust import PUBLISHER_NAME_RE, namespace_problem
    from services.runtime.errors import ServiceError
    from services.runtime.names import DIGEST_RE, SHA256_HEX_RE, is_prerelease, key_id_problem

    for version in ("1.0.1" + digit, f"1.0.{digit}", f"{digit}.0.0", f"1.{digit}.0", f"1.0.0-rc.{digit}",
                    f"1.0.0-rc.1{digit}", f"1.0.0+b{digit}"):
        assert version_problem(version), version
        with pytest.raises(ValueError):
            semver_key(version)
        assert not is_prerelease(version)
    for name in (f"com.acme.echo{digit}", f"com.acme{digit}.echo", f"com{digit}.acme"):
        assert skill_name_problem(name) and namespace_problem(name)
    for text in (f"^1.0.{digit}", f"~{digit}.2", f">=1.0.0 <{digit}.0.0", f"1.0.0 - {digit}.0.0", f"{digit}.x",
                 f"1.0.0 || {digit}", f"=1.0.0-rc.{digit}"):
        assert range_problem(text), text
    hexdigest = "a" * 63
    assert digest_problem(f"sha256:{hexdigest}{digit}") and not DIGEST_RE.fullmatch(f"sha256:{hexdigest}{digit}")
    assert not SHA256_HEX_RE.fullmatch(hexdigest + digit)
    assert key_id_problem(f"ed25519:0123456789abcde{digit}")
    assert not TAG_RE.fullmatch(f"stable{digit}") and not PUBLISHER_NAME_RE.fullmatch(f"acme{digit}")
    with pytest.raises(ServiceError):
        _check_id(f"d-012345678{digit}")


@pytest.mark.parametrize("space", ["\u00a0", "\u2003", "\u3000", "\u1680", "\x85"], ids=ascii)
def test_no_range_accepts_a_space_of_another_script(space: str) -> None:
    from services.registry.ranges import range_problem

    for text in (f"^1.2.3{space}", f"{space}^1.2.3", f">=1.0.0{space}<2.0.0", f"1.0.0{space}-{space}2.0.0",
                 f"1.x{space}||{space}2.x", f">={space}1.0.0"):
        assert range_problem(text), repr(text)
    assert range_problem(">=1.0.0 <2.0.0") is None and range_problem("1.0.0 - 2.0.0") is None


def test_made_up_request_ids_look_like_uuid4_hex_and_do_not_repeat_across_a_fork() -> None:
    import os
    import re

    from services.runtime.names import new_request_id

    made = [new_request_id() for _ in range(1000)]
    assert len(set(made)) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", m) for m in made)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    from_child = os.read(read, 64).decode()
    os.close(read)
    assert from_child[:16] != made[0][:16] and from_child not in made
