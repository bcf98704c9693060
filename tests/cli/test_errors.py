"""How the CLI renders a refusal (each fact once, no empty value) and the hints it adds for the command being run,
against a real registry behind a real gateway; plus `resolve NAME[@VERSION|@TAG]`."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.rpc import error_details_pb2, status_pb2

from services.cli.main import describe_rpc_error, main
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.errors import STATUS_DETAILS_KEY
from tests.conftest import Starter

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-for-cli-error-tests-0123456789"


async def clawhub(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI off the event loop (the servers run on it); returns (exit code, stdout, stderr)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@dataclass
class Registry:
    gateway: str

    @property
    def at(self) -> tuple[str, str]:
        return ("--gateway", self.gateway)


async def _start(start_service: Starter, tmp_path: Path, admin_token: str) -> Registry:
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", admin_token=admin_token,
        shutdown_grace_seconds=0.5)))
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=f"127.0.0.1:{registry.port}", grace_seconds=0.5)))
    return Registry(f"127.0.0.1:{gateway.port}")


@pytest.fixture
async def suite(start_service: Starter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Registry]:
    for variable in ("CLAWHUB_ADMIN_TOKEN", "CLAWHUB_TOKEN", "CLAWHUB_GATEWAY"):
        monkeypatch.delenv(variable, raising=False)
    yield await _start(start_service, tmp_path, ADMIN)


def _skill(tmp_path: Path, name: str = "com.acme.uppercase") -> Path:
    skill = tmp_path / name
    shutil.copytree(ROOT / "examples" / "skills" / "uppercase", skill)
    toml = skill / "skill.toml"
    toml.write_text(toml.read_text().replace("com.example.uppercase", name))
    return skill


# Each fact once.

async def test_a_field_error_says_its_description_once(suite: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await clawhub(capsys, "resolve", "Not A Name@1.0.0", *suite.at)
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith("error: field name: 'Not A Name' is not a reverse-DNS skill name"), err
    assert err.count("is not a reverse-DNS skill name") == 1, err
    assert lines[1:] == ["  status: INVALID_ARGUMENT  reason: INVALID_NAME  (registry.clawhub)"], err


async def test_metadata_the_message_states_is_not_repeated(suite: Registry, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert (await clawhub(capsys, "publish", str(_skill(tmp_path)), *suite.at))[0] == 0
    code, _, err = await clawhub(capsys, "resolve", "com.acme.uppercase@9.9.9", *suite.at)
    assert code == 1
    assert err.count("9.9.9") == 1 and err.count("com.acme.uppercase") == 1, err
    assert "  version:" not in err and "  name:" not in err


def _old_server_error(status: status_pb2.Status) -> grpc.RpcError:
    """A status as an older server sent it: the client-side error carries it in its trailing metadata."""

    class Error(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.FAILED_PRECONDITION

        def details(self) -> str:
            return status.message

        def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
            return ((STATUS_DETAILS_KEY, status.SerializeToString()),)

    return Error()


def test_no_line_shows_an_empty_value() -> None:
    # Servers no longer send empty metadata values; older ones did (`latest_version: ` under SKILL_NOT_DEPLOYED).
    status = status_pb2.Status(code=9, message="skill 'com.acme.x' is published but not deployed; it has no "
                                               "Ready version to deploy yet")
    status.details.add().Pack(error_details_pb2.ErrorInfo(
        reason="SKILL_NOT_DEPLOYED", domain="dispatcher.clawhub",
        metadata={"skill": "com.acme.x", "latest_version": "", "did_you_mean": " "}))
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="name", description="")]))
    text = str(describe_rpc_error(_old_server_error(status), "127.0.0.1:50051"))
    assert not [line for line in text.splitlines() if line.rstrip().endswith(":")], text
    assert "latest_version" not in text and "did_you_mean" not in text
    assert text.splitlines()[-1] == "  field name"


def test_a_violation_the_message_does_not_say_is_listed() -> None:
    status = status_pb2.Status(code=3, message="2 fields are wrong")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="INVALID_MANIFEST", domain="registry.clawhub",
                                                          metadata={"field": "a"}))
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="a", description="a is missing"),
        error_details_pb2.BadRequest.FieldViolation(field="b", description="b is too long")]))
    text = str(describe_rpc_error(_old_server_error(status), "127.0.0.1:50051"))
    assert text.splitlines() == ["error: 2 fields are wrong",
                                 "  status: FAILED_PRECONDITION  reason: INVALID_MANIFEST  (registry.clawhub)",
                                 "  field a: a is missing", "  field b: b is too long"]


# Token hints: the client's flag and variable, for the command being run.

async def test_admin_refusals_name_the_clients_flag_and_variable(suite: Registry,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await clawhub(capsys, "publisher", "create", "acme", *suite.at)
    assert code == 1 and "ADMIN_REQUIRED" in err
    assert "CLAWHUB_REGISTRY_ADMIN_TOKEN" not in err
    assert "add --admin-token TOKEN to `clawhub publisher create`, or export CLAWHUB_ADMIN_TOKEN=TOKEN" in err
    code, _, err = await clawhub(capsys, "admin", "verify-blobs", *suite.at)
    assert code == 1 and "to `clawhub admin verify-blobs`" in err
    code, _, err = await clawhub(capsys, "namespace", "create", "com.acme", "--owner", "acme",
                                 "--admin-token", "not-the-admin-token", *suite.at)
    assert code == 1 and "carries another token" in err and "the admin token sent (from --admin-token)" in err


async def test_an_unconfigured_admin_token_names_the_servers_variable_for_the_operator(
        start_service: Starter, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWHUB_ADMIN_TOKEN", raising=False)
    suite = await _start(start_service, tmp_path, admin_token="")
    code, _, err = await clawhub(capsys, "namespace", "create", "com.acme", "--owner", "acme", "--admin-token",
                                 "x", *suite.at)
    assert code == 1 and "ADMIN_TOKEN_NOT_CONFIGURED" in err
    assert "its operator starts it with CLAWHUB_REGISTRY_ADMIN_TOKEN" in err
    assert "once it is set: add --admin-token TOKEN to `clawhub namespace create`" in err


async def test_owner_token_hints_name_the_command_being_run(suite: Registry, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await clawhub(capsys, "publish", str(_skill(tmp_path)), *suite.at))[0] == 0
    monkeypatch.setenv("CLAWHUB_ADMIN_TOKEN", ADMIN)
    assert (await clawhub(capsys, "publisher", "create", "acme", *suite.at))[0] == 0
    assert (await clawhub(capsys, "namespace", "create", "com.acme", "--owner", "acme", *suite.at))[0] == 0
    monkeypatch.delenv("CLAWHUB_ADMIN_TOKEN")
    for argv, command in ((["yank", "com.acme.uppercase@1.0.0"], "clawhub yank"),
                          (["tag", "com.acme.uppercase", "stable", "1.0.0"], "clawhub tag")):
        code, _, err = await clawhub(capsys, *argv, *suite.at)
        assert code == 1 and "NAMESPACE_NOT_OWNED" in err, err
        assert f"add --token TOKEN to `{command}`, or export CLAWHUB_TOKEN=TOKEN" in err
        assert "clawhub publish --token" not in err
    code, _, err = await clawhub(capsys, "namespace", "require-signatures", "com.acme", *suite.at)
    assert code == 1 and "to `clawhub namespace require-signatures`" in err and "--admin-token" in err
    # A token no publisher holds: where it came from.
    monkeypatch.setenv("CLAWHUB_TOKEN", "clawhub_not-a-token")
    code, _, err = await clawhub(capsys, "yank", "com.acme.uppercase@1.0.0", *suite.at)
    assert code == 1 and "INVALID_TOKEN" in err and "the token sent came from $CLAWHUB_TOKEN" in err
    assert "clawhub_not-a-token" not in err


async def test_grpcurl_users_get_a_neutral_message(suite: Registry) -> None:
    """What a client that is not the CLI sees: how to send the credential, and no CLI command of the wrong kind."""
    async with grpc.aio.insecure_channel(suite.gateway) as channel:
        stub = registry_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreatePublisher(registry_pb.CreatePublisherRequest(name="acme"), timeout=5)
    message = caught.value.details() or ""
    assert "admin token" in message and "authorization: Bearer <token>" in message and "no token" in message
    assert "clawhub" not in message and "CLAWHUB_" not in message


# resolve NAME[@VERSION|@TAG]

async def test_resolve_takes_the_latest_by_default_and_tags(suite: Registry, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert (await clawhub(capsys, "publish", str(_skill(tmp_path, "com.example.upper")), *suite.at))[0] == 0
    code, out, err = await clawhub(capsys, "resolve", "com.example.upper", *suite.at)
    assert (code, out) == (0, "com.example.upper@1.0.0 has no dependencies\n"), err
    assert "com.example.upper@latest is 1.0.0" in err
    assert (await clawhub(capsys, "tag", "com.example.upper", "stable", "1.0.0", *suite.at))[0] == 0
    code, out, err = await clawhub(capsys, "resolve", "com.example.upper@stable", *suite.at)
    assert (code, out) == (0, "com.example.upper@1.0.0 has no dependencies\n"), err
    code, out, err = await clawhub(capsys, "resolve", "com.example.upper@1.0.0", *suite.at)
    assert (code, out, err) == (0, "com.example.upper@1.0.0 has no dependencies\n", "")
    code, _, err = await clawhub(capsys, "resolve", "com.example.upper@beta", *suite.at)
    assert code == 1 and "VERSION_NOT_FOUND" in err and "no tag 'beta'" in err
