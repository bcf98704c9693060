from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from google.protobuf import struct_pb2

from services.cli.main import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    RELEASE_FAILED_EXIT,
    main,
    printable,
    render_output,
)
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.server import ServiceHost, create_server
from tests.conftest import Starter
from tests.gateway.support import ECHO_SKILL, Chain, start_chain


def test_server_text_cannot_drive_the_terminal() -> None:
    assert printable("a\x1b[31mred\x00\nnext") == "a\\x1b[31mred\\x00\nnext"


def test_missing_input_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["invoke", "com.example.x", "--input-file", "/nonexistent/input", "--gateway", "127.0.0.1:9"])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot read --input-file" in err and "Traceback" not in err


def test_timeouts_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["status", "--timeout", "-1"])
    assert caught.value.code == 2
    assert "more than 0 seconds" in capsys.readouterr().err


def test_unreachable_gateway_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--gateway", "127.0.0.1:9", "--timeout", "2"])
    assert code == EXIT_UNREACHABLE == 3
    assert "Is `clawhub up` running?" in capsys.readouterr().err
    # health too: unreachable is not "not SERVING" (1)
    assert main(["health", "127.0.0.1:9", "--timeout", "2"]) == EXIT_UNREACHABLE


def test_too_deep_json_input_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    deep = "[" * 200 + "]" * 200
    assert main(["invoke", "com.example.x", "--input", deep, "--gateway", "127.0.0.1:9"]) == EXIT_USAGE
    assert "nested too deeply" in capsys.readouterr().err


# Exit codes: a usage error (2) is never taken for an unreachable gateway (3), and `--help` lists them all.

@pytest.mark.parametrize("argv", [
    ["yank", "com.example.x"],                        # no @VERSION
    ["resolve", "com.example.x@"],                    # empty version
    ["deploy", "@1.0.0"],                             # empty name
    ["deploy", "com.example.x@1.0.0", "--env", "=v"],
    ["deploy", "com.example.x@1.0.0", "--env", "A=1", "--env", "A=2"],
    ["deploy", "com.example.x@1.0.0", "--env", "CLAWHUB_TEST_SURELY_UNSET_VARIABLE"],
    ["tag", "com.example.x", "stable"],               # no VERSION
    ["tag", "com.example.x", "stable", "1.0.0", "--delete"],
    ["invoke", "com.example.x", "--input", "{not json"],
    ["health", "127.0.0.1:9", "grpc.health.v1.Health", "--all"],
])
def test_usage_errors_exit_2_before_anything_is_sent(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWHUB_TEST_SURELY_UNSET_VARIABLE", raising=False)
    # The gateway address is unreachable: were anything sent, the exit code would be 3.
    extra = [] if argv[0] == "health" else ["--gateway", "127.0.0.1:9"]
    assert main([*argv, *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot reach" not in err


@pytest.mark.parametrize("argv", [["up", "--executors", "0"], ["up", "--gateway-port", "70000"],
                                  ["status", "--timeout", "soon"], ["no-such-command"]])
def test_argparse_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    codes = out[out.index("exit codes:"):]
    for code, meaning in ((0, "success"), (EXIT_FAILED, "failed"), (EXIT_USAGE, "usage error"),
                          (EXIT_UNREACHABLE, "could not be reached"), (130, "interrupted"),
                          (EXIT_BROKEN_PIPE, "went away")):
        assert re.search(rf"^  {code} +.*{meaning}", codes, re.MULTILINE), (code, codes)
    assert RELEASE_FAILED_EXIT == EXIT_FAILED and len({EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE}) == 3


# Answers from a server: whatever comes back, the CLI prints something sensible and never a traceback.


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path)
    yield chain
    await chain.channel.close()


async def invoke(capsys: pytest.CaptureFixture[str], chain: Chain, *argv: str) -> tuple[int, str, str]:
    """`clawhub invoke` off the event loop (the servers run on it): (exit code, stdout, stderr)."""
    code = await asyncio.to_thread(main, ["invoke", ECHO_SKILL, "--gateway", chain.address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_output_that_is_not_json_is_printed_raw(chain: Chain, capsys: pytest.CaptureFixture[str]) -> None:
    for printed in ("NaN", "1e999", "-Infinity"):
        code, out, err = await invoke(capsys, chain, f"--raw={printed}")
        assert (code, out) == (0, printed), err
        assert "Traceback" not in err


async def test_invoke_without_input(chain: Chain, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await invoke(capsys, chain)
    assert (code, out) == (0, ""), err


async def test_a_request_over_the_gateways_limit_is_explained(chain: Chain, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (5 * 1024 * 1024))
    code, _, err = await invoke(capsys, chain, "--input-file", str(big))
    assert code == 1
    assert "refused the request as too large" in err and "CLAWHUB_GATEWAY_MAX_INPUT" in err


def test_a_json_output_no_json_printer_can_write_is_still_printed() -> None:
    """An older gateway sends NaN as `output` (a Value holding a NaN double)."""
    value = struct_pb2.Value()
    value.list_value.values.add().number_value = float("nan")
    value.list_value.values.add().string_value = "ok"
    assert render_output(value, pretty=False) == '[NaN, "ok"]'
    assert json.loads(render_output(struct_pb2.Value(number_value=2.0), pretty=True)) == 2


class _NaNGateway(gateway_grpc.GatewayServiceServicer):
    async def InvokeSkill(self, request: gateway_pb.InvokeSkillRequest,
                          context: object) -> gateway_pb.InvokeSkillResponse:
        return gateway_pb.InvokeSkillResponse(output=struct_pb2.Value(number_value=float("nan")), version="1.0.0")


async def test_an_older_gateways_nan_output_does_not_crash_the_cli(start_service: Starter,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    async def build() -> ServiceHost:
        return create_server("gateway", ["clawhub.gateway.v1.GatewayService"], host="127.0.0.1", port=0,
                             register=lambda s: gateway_grpc.add_GatewayServiceServicer_to_server(_NaNGateway(), s))

    host = await start_service(build())
    code = await asyncio.to_thread(main, ["invoke", "com.example.x", "--gateway", f"127.0.0.1:{host.port}"])
    out, err = capsys.readouterr()
    assert (code, out.strip()) == (0, "NaN"), err


async def test_an_unexpected_failure_is_one_line(start_service: Starter, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (here: rendering raising what it never should) ends the command with one line and exit 1."""
    async def build() -> ServiceHost:
        return create_server("gateway", ["clawhub.gateway.v1.GatewayService"], host="127.0.0.1", port=0,
                             register=lambda s: gateway_grpc.add_GatewayServiceServicer_to_server(_NaNGateway(), s))

    def broken(output: struct_pb2.Value, pretty: bool) -> str:
        raise KeyError("kind\nsecond line")

    monkeypatch.setattr("services.cli.main.render_output", broken)
    host = await start_service(build())
    code = await asyncio.to_thread(main, ["invoke", "com.example.x", "--gateway", f"127.0.0.1:{host.port}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "KeyError" in err and "Traceback" not in err


async def test_a_reader_that_goes_away_ends_the_command_quietly(start_service: Starter, tmp_path: Path) -> None:
    """`clawhub status | head`: the pipe closes before the CLI has written everything. Like any Unix tool it
    stops without a word (no "failed unexpectedly: BrokenPipeError", no "Exception ignored" at exit)."""
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", shutdown_grace_seconds=0.5)))
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, dispatcher_address="127.0.0.1:1", registry_address=f"127.0.0.1:{registry.port}",
        deployer_address="127.0.0.1:1", grace_seconds=0.2)))
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write fails with EPIPE
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "status", "--gateway", f"127.0.0.1:{gateway.port}",
            stdout=write_end, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    finally:
        os.close(write_end)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert stderr.decode() == ""
    assert process.returncode == EXIT_BROKEN_PIPE
