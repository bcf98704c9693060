"""`clawhub logs` (services/cli/logs.py): its line format, its flags, and a run against the in-process chain."""

from __future__ import annotations

import asyncio
import datetime
import re
from pathlib import Path

import pytest
from clawhub.common.v1 import observability_pb2
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb

from services.cli.logs import format_line
from services.cli.main import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, main
from tests.conftest import Starter
from tests.gateway.support import start_chain
from tests.gateway.test_skill_logs import SKILL, TRACE_ID, TRACEPARENT, stderr_skill


def sample(**fields: object) -> observability_pb2.SkillLogLine:
    line = observability_pb2.SkillLogLine(skill=SKILL, version="1.0.0", digest="sha256:" + "a" * 64,
                                          request_id="3f2a9c1e-55b0-4c43-9d6e-0c3b1f6f2a11", executor="executor-2",
                                          text="resizing 1920x1080 to 640x360", **fields)  # type: ignore[arg-type]
    line.time.FromDatetime(datetime.datetime(2026, 12, 3, 14, 3, 7, 412000, tzinfo=datetime.UTC))
    return line


def test_a_line_fits_80_columns_and_wide_says_everything() -> None:
    short = format_line(sample(trace_id=TRACE_ID))
    assert re.fullmatch(r"\d\d:\d\d:07\.412 1\.0\.0 3f2a9c1e \[trace 4bf92f35\] resizing 1920x1080 to 640x360", short)
    assert len(short) <= 80
    assert format_line(sample()).endswith(" 1.0.0 3f2a9c1e resizing 1920x1080 to 640x360")
    assert format_line(sample(truncated=True)).endswith("640x360 [more not kept]")
    wide = format_line(sample(trace_id=TRACE_ID), wide=True).split(" ")
    assert wide[0].startswith("2026-12-0") and wide[0][-6] in "+-"
    assert wide[1:6] == ["executor-2", "1.0.0", "3f2a9c1e-55b0-4c43-9d6e-0c3b1f6f2a11", "[trace", f"{TRACE_ID}]"]


@pytest.mark.parametrize("argv", [["--version", "1.x"], ["--tail", "-1"], ["--tail", "1001"], ["--tail", "many"]])
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["logs", SKILL, *argv, "--gateway", "127.0.0.1:9"])
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    assert code == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


def test_an_unreachable_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logs", SKILL, "--gateway", "127.0.0.1:9", "--timeout", "2"]) == EXIT_UNREACHABLE
    assert "Is `clawhub up` running?" in capsys.readouterr().err


async def test_logs_against_the_chain(start_service: Starter, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    chain = await start_chain(start_service, tmp_path, skill_dir=stderr_skill(tmp_path / "skill"))
    try:
        await chain.stub.InvokeSkill(gateway_pb.InvokeSkillRequest(
            name=SKILL, raw_input=b"one\x1b[31m\ntwo\n", request_id="cli-request"), timeout=10,
            metadata=(("traceparent", TRACEPARENT),))
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["logs", SKILL, "--gateway", chain.address, "--tail", "1"])
        assert code == 0
        out = capsys.readouterr().out.splitlines()
        # The newest line only; escape sequences from the skill never reach the terminal.
        assert len(out) == 1 and out[0].endswith(" 1.0.0 cli-requ [trace 4bf92f35] two")
        code = await asyncio.to_thread(main, ["logs", SKILL, "--gateway", chain.address])
        assert code == 0
        out = capsys.readouterr().out.splitlines()
        assert [line.split(" ", 5)[-1] for line in out] == ["one\\x1b[31m", "two"]
        code = await asyncio.to_thread(main, ["logs", "Not A Name", "--gateway", chain.address])
        assert code == EXIT_FAILED
        assert "INVALID_NAME" in capsys.readouterr().err
    finally:
        await chain.channel.close()
