"""`clawhub top` against the real suite: `--once` for scripts, and the live view on an 80-column terminal."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.e2e import readme_console as rc
from tests.e2e.conftest import BIN, ROOT, Suite

ECHO = ROOT / "examples" / "skills" / "echo-memory"
# Longer than an 80-column row leaves for it: shown ellipsized in the middle. Sorts early among the suite's
# skills, so the live view (cut to the terminal's height) shows it whatever other tests deployed.
NAME = "com.example.a-top-view.with-a-name-much-too-long.for-an-eighty-column-terminal"
VERSION = "1.0.0"
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def busy(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Suite:
    """A skill of its own, published, deployed and invoked a few times (one call fails)."""
    skill = tmp_path_factory.mktemp("top-skill")
    shutil.copy(ECHO / "echo.wat", skill / "echo.wat")
    toml = (ECHO / "skill.toml").read_text().replace('name = "com.example.echo-memory"', f'name = "{NAME}"')
    (skill / "skill.toml").write_text(toml)
    published = suite.cli("publish", str(skill))
    assert published.returncode == 0, published.stderr
    deployed = suite.cli("deploy", f"{NAME}@{VERSION}", "--plain")
    assert deployed.returncode == 0, deployed.stderr
    for text in ("one", "two", "three"):
        called = suite.cli("invoke", NAME, "--raw", text)
        assert called.returncode == 0, called.stderr
    return suite


def _env(suite: Suite) -> dict[str, str]:
    """The environment of a user's shell: no COLUMNS or LINES (the width is the terminal's, or 80)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("CLAWHUB_") and key not in ("COLUMNS", "LINES")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CLAWHUB_GATEWAY"] = suite.gateway
    env.setdefault("TERM", "xterm")
    return env


def _ours(line: str) -> bool:
    """Whether a line is the test skill's row: its name is ellipsized in the middle, so found by both ends."""
    head, cut, tail = (line.split() or [""])[0].partition("…")
    return bool(cut and head and tail and NAME.startswith(head) and NAME.endswith(tail))


def _row(lines: list[str]) -> str:
    rows = [line for line in lines if _ours(line)]
    assert len(rows) == 1, "\n".join(lines)
    return rows[0]


def test_once_prints_one_plain_snapshot_within_80_columns(busy: Suite) -> None:
    result = subprocess.run([str(BIN / "clawhub"), "top", "--once"], capture_output=True, text=True, timeout=30,
                            cwd=ROOT, env=_env(busy))
    assert result.returncode == 0, result.stderr
    assert not ANSI.search(result.stdout), repr(result.stdout)
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert lines[0].startswith(f"clawhub top  {busy.gateway}")
    # `clawhub up` ran two executors, each with its worker pool.
    assert [line.split()[0] for line in lines[1:3]] == ["executor-1", "executor-2"]
    assert all(re.fullmatch(r"executor-\d  threads \d+/\d+ busy  queue \d+/\d+", line) for line in lines[1:3])
    header = next(line for line in lines if line.startswith("SKILL"))
    assert header.split()[:7] == ["SKILL", "VERSION", "STATE", "CALLS/S", "P50", "P99", "ERR%"]
    fields = _row(lines).split()
    assert fields[1:3] == [VERSION, "ACTIVE"]
    # Three calls in the window, none failed; latencies measured.
    assert float(fields[3]) > 0 and fields[4] != "-" and fields[5] != "-" and fields[6] == "0%"


def test_once_for_one_skill_and_a_gateway_that_is_not_there(busy: Suite) -> None:
    env = _env(busy)
    only = subprocess.run([str(BIN / "clawhub"), "top", NAME, "--once"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, env={**env, "COLUMNS": "200"})
    assert only.returncode == 0, only.stderr
    rows = [line for line in only.stdout.splitlines() if line.startswith("com.")]
    assert [row.split()[0] for row in rows] == [NAME]  # wide enough: the whole name
    down = subprocess.run([str(BIN / "clawhub"), "top", "--once", "--gateway", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)
    assert down.returncode == 3 and "cannot reach the gateway" in down.stderr


def test_live_view_on_an_80_column_terminal_until_ctrl_c(busy: Suite) -> None:
    frames: list[int] = []

    def refreshed_twice(screen: list[str]) -> bool:
        titles = [i for i, line in enumerate(screen) if line.startswith("clawhub top  ")]
        frames[:] = titles
        # The second frame is complete once its skill row is there.
        return len(titles) >= 2 and any(_ours(line) for line in screen[titles[1]:])

    run = rc.run_in_terminal("exec clawhub top --interval 0.2", cwd=str(ROOT), env=_env(busy), timeout=30,
                             until=refreshed_twice)
    assert run.seen, "\n".join(run.output)
    # Ctrl-C: exit 130, quietly (no traceback, no message).
    assert run.code == 130, "\n".join(run.output)
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in run.output)
    assert all(len(line) <= rc.COLUMNS for line in run.output), "\n".join(run.output)
    second = run.output[frames[1]:]
    assert len([line for line in second if line]) <= rc.ROWS
    fields = _row(second).split()
    assert fields[1:3] == [VERSION, "ACTIVE"]
