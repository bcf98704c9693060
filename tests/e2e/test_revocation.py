"""Revoking a signing key on a running suite (issue 9): after `clawhub namespace remove-key`, what the key
signed stops running within the executors' re-check bound (not only after a restart), and `clawhub status`
shows the serving version's problem, saying why; adding the key back restores both."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.cli.main import main
from services.runtime import signing
from services.runtime.errors import error_info
from tests.e2e.conftest import ROOT, Suite, start_up, stop_up, suite_env
from tests.e2e.test_suite import invoke

ADMIN = "admin-token-for-e2e-revocation-0123456789"
NAME = "com.acme.uppercase"
RECHECK = 0.3


@pytest.fixture(scope="module")
def signed_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    running = start_up(tmp_path_factory.mktemp("clawhub-revocation"), executors=1, env=suite_env(
        CLAWHUB_REGISTRY_ADMIN_TOKEN=ADMIN, CLAWHUB_EXECUTOR_TRUST_RECHECK=str(RECHECK)))
    yield running
    assert stop_up(running) == 0, "".join(running.log[-40:])


def _refused_reason(channel: grpc.Channel) -> str:
    try:
        invoke(channel, NAME, "hi")
    except grpc.RpcError as err:
        info = error_info(err)
        return info.reason if info is not None else err.code().name
    return ""


def _until_reason(channel: grpc.Channel, reason: str, timeout: float) -> float:
    """Seconds until an invocation answers with `reason` ("" = success); fails after `timeout`."""
    started = time.monotonic()
    while (seen := _refused_reason(channel)) != reason:
        assert time.monotonic() - started < timeout, f"still {seen or 'OK'} after {timeout} s"
        time.sleep(RECHECK / 3)
    return time.monotonic() - started


def test_a_removed_key_stops_what_it_signed_and_status_says_so(signed_suite: Suite, tmp_path: Path) -> None:
    suite = signed_suite
    skill = tmp_path / "skill"
    shutil.copytree(ROOT / "examples" / "skills" / "uppercase", skill)
    toml = skill / "skill.toml"
    toml.write_text(toml.read_text().replace("com.example.uppercase", NAME))
    key = tmp_path / "acme.key"
    admin = ("--admin-token", ADMIN)
    assert main(["keygen", "--out", str(key)]) == 0
    key_id = signing.key_id(signing.load_public_key(key))
    created = suite.cli("publisher", "create", "acme", *admin)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert suite.cli("namespace", "create", "com.acme", "--owner", "acme", *admin).returncode == 0
    assert suite.cli("namespace", "add-key", "com.acme", f"{key}.pub", "--token", token).returncode == 0
    published = suite.cli("publish", str(skill), "--sign", str(key), "--token", token)
    assert published.returncode == 0, published.stderr
    deployed = suite.cli("deploy", f"{NAME}@1.0.0")
    assert deployed.returncode == 0, deployed.stderr
    with suite.channel() as channel:
        assert invoke(channel, NAME, "hi").output.string_value == "HI"

        removed = suite.cli("namespace", "remove-key", "com.acme", key_id, "--token", token)
        assert removed.returncode == 0, removed.stderr
        # Within the re-check bound (a few rounds of slack for a loaded machine), on the running executor.
        _until_reason(channel, "SIGNER_NOT_TRUSTED", timeout=RECHECK * 30)
        status = suite.cli("status")
        assert status.returncode == 0, status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith(NAME))
        assert "1.0.0 PROBLEM" in row, status.stdout
        assert f"{NAME}: 1.0.0: signed by {key_id}, a key namespace com.acme no longer trusts, so executors refuse" \
            in status.stdout
        assert any("no longer runnable" in line and NAME in line for line in suite.log)

        # Trusting the key again restores it.
        assert suite.cli("namespace", "add-key", "com.acme", f"{key}.pub", "--token", token).returncode == 0
        _until_reason(channel, "", timeout=RECHECK * 30)
        status = suite.cli("status")
        assert "PROBLEM" not in status.stdout and "no longer trusts" not in status.stdout, status.stdout
