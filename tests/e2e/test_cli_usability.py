"""What a user of the installed `clawhub` sees: `up`'s banner on a terminal, and tags where a version is asked for."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.e2e import readme_console as rc
from tests.e2e.conftest import BIN, ROOT, Suite, suite_env

NAME = "com.example.usability"


def test_up_on_a_terminal_labels_every_address_and_says_where_a_moved_gateway_is(tmp_path: Path) -> None:
    env = {key: value for key, value in suite_env().items() if key != "CLAWHUB_GATEWAY"}
    run = rc.run_in_terminal(f"{BIN / 'clawhub'} up --data-dir {tmp_path / 'data'} --executors 2", cwd=str(ROOT),
                             env=env, timeout=60, until=lambda lines: "Press Ctrl-C to stop." in lines)
    assert run.seen, "\n".join(run.output)
    screen = [line for line in run.output if "| " not in line]  # the services' own log lines aside
    start = screen.index("clawhub is up. Services (to move a port: clawhub up --help):")
    rows = screen[start + 1:screen.index("", start)]
    labels = {row.split()[0]: row.split()[1:] for row in rows}
    assert set(labels) == {"registry", "executor-1", "executor-2", "deployer", "dispatcher", "gateway", "data"}
    gateway = labels["gateway"][0]
    assert labels["gateway"][1:] == "public: clients talk to this one".split()
    assert all(labels[label][1:] == ["internal"] for label in labels if label not in ("gateway", "data"))
    # Every port is a free one here, the gateway's too: the commands to try start by telling the clients.
    tries = screen[screen.index("Try it in another terminal:") + 1:]
    assert tries[0].startswith(f"  export CLAWHUB_GATEWAY={gateway}   # clients look at 127.0.0.1:50051"), screen
    assert tries[1] == "  clawhub publish examples/skills/uppercase"
    # The `LABEL ADDRESS` lines for scripts are not repeated on a terminal.
    assert not [line for line in screen if re.fullmatch(r"\S+ \d+\.\d+\.\d+\.\d+:\d+", line)], screen


def test_deploy_and_resolve_take_a_tag(suite: Suite, tmp_path: Path) -> None:
    skill = tmp_path / "skill"
    shutil.copytree(ROOT / "examples" / "skills" / "uppercase", skill)
    toml = skill / "skill.toml"
    toml.write_text(toml.read_text().replace("com.example.uppercase", NAME))
    assert suite.cli("publish", str(skill)).returncode == 0
    assert suite.cli("tag", NAME, "stable", "1.0.0").returncode == 0
    deployed = suite.cli("deploy", f"{NAME}@stable", "--plain")
    assert deployed.returncode == 0, deployed.stderr
    assert f"{NAME}@stable is 1.0.0" in deployed.stderr and f"{NAME}@1.0.0 is active" in deployed.stdout
    resolved = suite.cli("resolve", NAME)
    assert (resolved.returncode, resolved.stdout) == (0, f"{NAME}@1.0.0 has no dependencies\n"), resolved.stderr
    missing = suite.cli("deploy", f"{NAME}@beta", "--plain")
    assert missing.returncode == 1 and "no tag 'beta'" in missing.stderr
