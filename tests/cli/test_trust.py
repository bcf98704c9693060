"""`clawhub keygen`, `publisher`, `namespace` and `publish --sign` against a real gateway and registry: the
bearer tokens cross the gateway, and the signature lands in the registry."""

from __future__ import annotations

import asyncio
import shutil
import stat
from pathlib import Path

import grpc
import pytest
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.cli.main import main
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime import signing
from tests.conftest import Starter

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-for-cli-tests-0123456789"


async def clawhub(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI off the event loop (the servers run on it); returns (exit code, stdout, stderr)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys" / "acme.key"
    assert main(["keygen", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    public = signing.load_public_key(Path(f"{out}.pub"))
    assert signing.key_id(public) in printed and f"{out}.pub" in printed
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert signing.raw_public_key(signing.load_private_key(out)) == public
    before = out.read_bytes()
    assert main(["keygen", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


async def test_sign_and_publish_through_the_gateway(start_service: Starter, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", admin_token=ADMIN, shutdown_grace_seconds=0.5)))
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=f"127.0.0.1:{registry.port}", grace_seconds=0.5)))
    at = ("--gateway", f"127.0.0.1:{gateway.port}")
    skill = tmp_path / "skill"
    shutil.copytree(ROOT / "examples" / "skills" / "uppercase", skill)
    toml = skill / "skill.toml"
    toml.write_text(toml.read_text().replace("com.example.uppercase", "com.acme.uppercase"))
    key = tmp_path / "acme.key"

    code, out, _ = await clawhub(capsys, "keygen", "--out", str(key))
    assert code == 0
    key_id = signing.key_id(signing.load_public_key(key))
    # Admin commands without the admin token: the server's reason, a non-zero exit.
    monkeypatch.delenv("CLAWHUB_ADMIN_TOKEN", raising=False)
    code, _, err = await clawhub(capsys, "publisher", "create", "acme", *at)
    assert code == 1 and "ADMIN_REQUIRED" in err and "export CLAWHUB_ADMIN_TOKEN" in err
    monkeypatch.setenv("CLAWHUB_ADMIN_TOKEN", ADMIN)
    code, out, _ = await clawhub(capsys, "publisher", "create", "acme", *at)
    assert code == 0
    token = out.strip()
    assert token.startswith("clawhub_")
    code, out, _ = await clawhub(capsys, "namespace", "create", "com.acme", "--owner", "acme",
                                 "--require-signatures", *at)
    assert code == 0 and "require signatures: yes" in out
    # The owner adds the key with its own token (no admin token in the environment now).
    monkeypatch.delenv("CLAWHUB_ADMIN_TOKEN")
    code, out, _ = await clawhub(capsys, "namespace", "add-key", "com.acme", f"{key}.pub", "--token", token, *at)
    assert code == 0 and key_id in out

    code, _, err = await clawhub(capsys, "publish", str(skill), "--token", token, *at)
    assert code == 1 and "SIGNATURE_REQUIRED" in err and "--sign" in err
    code, _, err = await clawhub(capsys, "publish", str(skill), "--sign", str(key), *at)
    assert code == 1 and "NAMESPACE_NOT_OWNED" in err
    code, _, err = await clawhub(capsys, "publish", str(skill), "--sign", str(tmp_path / "missing.key"),
                                 "--token", token, *at)
    assert code == 1 and "cannot read the signing key" in err
    code, out, err = await clawhub(capsys, "publish", str(skill), "--sign", str(key), "--token", token, *at)
    assert code == 0, err
    assert f"signed by {key_id}, publisher acme" in out
    assert token not in out + err

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        version = (await registry_grpc.RegistryServiceStub(channel).GetSkillVersion(
            registry_pb.GetSkillVersionRequest(name="com.acme.uppercase", version="1.0.0"), timeout=5)).skill_version
    assert version.signature.key_id == key_id and version.publisher == "acme"
    assert f"signature by {key_id} verified" in version.history[-1].reason

    code, out, _ = await clawhub(capsys, "namespace", "show", "com.acme.uppercase", "--skill", *at)
    assert code == 0 and "namespace com.acme" in out and "owner:              acme" in out and key_id in out
    code, out, _ = await clawhub(capsys, "namespace", "list", *at)
    assert code == 0 and "com.acme" in out and "required" in out
    code, out, err = await clawhub(capsys, "namespace", "require-signatures", "com.acme", "--off", *at)
    assert code == 1 and "NAMESPACE_NOT_OWNED" in err
