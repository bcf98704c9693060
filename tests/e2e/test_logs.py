"""`clawhub logs` against the real suite (`clawhub up`, two executors): after an invoke, the skill's stderr is
printed with its time, version and request id; `--follow` prints the lines of later calls until Ctrl-C, which
ends it quietly with 130."""

from __future__ import annotations

import re
import signal
import subprocess
import threading

import pytest

from tests.e2e.conftest import BIN, ROOT, Suite
from tests.gateway.test_skill_logs import SKILL, stderr_skill

LINE = re.compile(r"(\d\d:\d\d:\d\d\.\d{3}) 1\.0\.0 ([0-9a-f-]{8})( \[trace [0-9a-f]{8}\])? (.*)")


@pytest.fixture(scope="module")
def deployed(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Suite:
    directory = stderr_skill(tmp_path_factory.mktemp("stderr-skill"))
    published = suite.cli("publish", str(directory))
    assert published.returncode == 0, published.stderr
    deployed = suite.cli("deploy", f"{SKILL}@1.0.0")
    assert deployed.returncode == 0, deployed.stderr + "".join(suite.log[-30:])
    return suite


def test_logs_prints_what_an_invoke_wrote_to_stderr(deployed: Suite) -> None:
    invoked = deployed.cli("invoke", SKILL, "--raw", "hello from e2e\nsecond line\n")
    assert invoked.returncode == 0, invoked.stderr
    assert invoked.stdout.strip() == '{"ok":true}'
    result = deployed.cli("logs", SKILL)
    assert result.returncode == 0, result.stderr
    lines = [LINE.fullmatch(line) for line in result.stdout.splitlines()]
    assert all(lines), result.stdout
    assert [m[4] for m in lines if m] == ["hello from e2e", "second line"]
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    wide = deployed.cli("logs", SKILL, "--wide", "--version", "1.0.0")
    assert wide.returncode == 0, wide.stderr
    first = wide.stdout.splitlines()[0].split(" ")
    # Date and time, the executor by name (never by address), the version, the whole request id.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", first[0])
    assert first[1] in ("executor-1", "executor-2") and first[2] == "1.0.0" and len(first[3]) == 36


def test_logs_of_a_version_without_lines(deployed: Suite) -> None:
    empty = deployed.cli("logs", SKILL, "--version", "9.9.9")
    assert empty.returncode == 0 and empty.stdout == ""
    assert f"no lines kept for {SKILL}@9.9.9" in empty.stderr


def test_follow_prints_later_calls_until_ctrl_c(deployed: Suite) -> None:
    process = subprocess.Popen([str(BIN / "clawhub"), "logs", SKILL, "--follow", "--tail", "0",
                                "--gateway", deployed.gateway], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    timer = threading.Timer(40, process.kill)
    timer.start()
    try:
        assert process.stderr.readline().startswith(f"following {SKILL}")
        invoked = deployed.cli("invoke", SKILL, "--raw", "while following\n")
        assert invoked.returncode == 0, invoked.stderr
        match = LINE.fullmatch(process.stdout.readline().rstrip("\n"))
        assert match and match[4] == "while following"
        process.send_signal(signal.SIGINT)
        code = process.wait(20)
        rest = process.stderr.read()
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert code == 130 and rest == "", rest

