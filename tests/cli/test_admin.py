"""`clawhub admin verify-blobs` against a real gateway and registry: it finds a corrupt blob, quarantines it,
exits 1; a `clawhub publish` of the same skill repairs it; then it exits 0."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from tests.cli.test_trust import clawhub
from tests.conftest import Starter

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-for-cli-admin-tests-0123456789"


async def test_verify_blobs_reports_quarantines_and_a_republish_repairs(
        start_service: Starter, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "registry"
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=data_dir, admin_token=ADMIN, shutdown_grace_seconds=0.5)))
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=f"127.0.0.1:{registry.port}", grace_seconds=0.5)))
    at = ("--gateway", f"127.0.0.1:{gateway.port}")
    skill = tmp_path / "skill"
    shutil.copytree(ROOT / "examples" / "skills" / "uppercase", skill)
    monkeypatch.delenv("CLAWHUB_ADMIN_TOKEN", raising=False)

    code, out, err = await clawhub(capsys, "publish", str(skill), *at)
    assert code == 0, err
    digest = next(word for word in out.split() if word.startswith("sha256:"))
    code, out, err = await clawhub(capsys, "admin", "verify-blobs", *at)
    assert code == 1 and "ADMIN_REQUIRED" in err
    monkeypatch.setenv("CLAWHUB_ADMIN_TOKEN", ADMIN)
    code, out, err = await clawhub(capsys, "admin", "verify-blobs", *at)
    assert code == 0, err
    assert "0 corrupt (quarantined now), 0 still quarantined, 0 missing" in out

    hexdigest = digest.removeprefix("sha256:")
    blob = data_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest
    corrupt = bytearray(blob.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    blob.write_bytes(bytes(corrupt))
    code, out, err = await clawhub(capsys, "admin", "verify-blobs", *at)
    assert code == 1
    assert "CORRUPT      com.example.uppercase@" in out and digest in out
    assert "1 corrupt (quarantined now), 0 still quarantined, 0 missing" in out
    assert "checked 1/1 blobs" in err and "publish the affected versions again" in err
    assert not blob.exists()
    assert [p.read_bytes() for p in (data_dir / "blobs" / "quarantine").iterdir()] == [bytes(corrupt)]
    code, out, err = await clawhub(capsys, "admin", "verify-blobs", "--admin-token", ADMIN, *at)
    assert code == 1 and "QUARANTINED  com.example.uppercase@" in out

    code, out, err = await clawhub(capsys, "publish", str(skill), *at)
    assert code == 0 and "repaired" in out, (out, err)
    code, out, err = await clawhub(capsys, "admin", "verify-blobs", *at)
    assert code == 0 and "0 corrupt (quarantined now), 0 still quarantined, 0 missing" in out
