"""README.md's console examples, run as a user runs them, so the README cannot drift from the product.

Every ```console block of README.md (conventions: tests/e2e/readme_console.py) is run in order against one real
suite (`clawhub up` on a fresh data directory and free ports, one executor, as `./dev up` starts it):

- `$ ./dev up` is not run again: its output is compared with what the test's own `clawhub up` printed.
- Every other command runs with bash, from the repository root, on a pseudo-terminal 80 columns wide (so
  `clawhub deploy` shows its live display, as in a terminal), with `CLAWHUB_GATEWAY` set to the suite's gateway
  and the README's default addresses (`127.0.0.1:50051`, …) in the command replaced by the suite's.
- The output, as the screen shows it at the end, must match the README's modulo digests, ids, measured times,
  timestamps, ports and the data directory; a mismatch fails with a unified diff naming the README line.

The suite runs with the product's defaults, the 10 s bake window included: the two blue-green deploys of the
walkthrough take about 10 s each; the whole test takes 40-55 s with the start and stop of the suite. (A shorter
bake would print `bake 2s` where the README says `bake 10s`.)
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import readme_console as rc
from tests.e2e.conftest import BIN, ROOT, Suite, start_up, stop_up, suite_env

README = ROOT / "README.md"
# The addresses `./dev up` uses, as the README shows them.
DEFAULT_PORTS = {"gateway": 50051, "registry": 50052, "deployer": 50053, "dispatcher": 50054, "executor": 50055}
README_DATA_DIR = "/home/you/clawhub/.clawhub"
UP_COMMANDS = {"./dev up", "clawhub up"}
# Skipping is for what a test cannot do; a README that skips more than this has stopped being checked.
MAX_SKIPPED = 2


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def _setup_uppercase_1_1_0(suite: Suite, workdir: Path) -> None:
    """The README's canary deploys `com.example.uppercase@1.1.0`, "built from changed code": the example with
    its version bumped and a smaller read chunk (same behaviour, another module)."""
    skill = workdir / "uppercase-1.1.0"
    shutil.copytree(ROOT / "examples" / "skills" / "uppercase", skill)
    manifest = skill / "skill.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', 'version = "1.1.0"'))
    module = skill / "uppercase.wat"
    source = module.read_text()
    changed = source.replace("(global $chunk i32 (i32.const 65536))", "(global $chunk i32 (i32.const 32768))")
    assert changed != source, "the uppercase example changed: update _setup_uppercase_1_1_0"
    module.write_text(changed)
    published = suite.cli("publish", str(skill))
    assert published.returncode == 0, published.stderr


SETUPS: dict[str, Callable[[Suite, Path], None]] = {"uppercase-1.1.0": _setup_uppercase_1_1_0}


@pytest.fixture(scope="module")
def readme_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    env = suite_env()
    # The README shows the deployer's defaults: no test-only bake window.
    env.pop("CLAWHUB_DEPLOYER_BAKE", None)
    running = start_up(tmp_path_factory.mktemp("readme-data"), executors=1, env=env)
    yield running
    stop_up(running)


def _command_env(suite: Suite) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("CLAWHUB_") and key not in ("COLUMNS", "LINES")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CLAWHUB_GATEWAY"] = suite.gateway
    env.setdefault("TERM", "xterm")
    return env


def _service(label: str) -> str:
    return re.sub(r"[-_]?\d+$", "", label)


@pytest.mark.timeout(180)
def test_readme_console_examples(readme_suite: Suite, tmp_path: Path) -> None:
    suite = readme_suite
    blocks = rc.parse(README.read_text())
    # This run's ports shown as the README's defaults, and the README's addresses in commands made this run's.
    ports = {_port(address): str(DEFAULT_PORTS[_service(label)]) for label, address in suite.addresses.items()
             if _service(label) in DEFAULT_PORTS}
    addresses = {f"127.0.0.1:{DEFAULT_PORTS[_service(label)]}": address for label, address in suite.addresses.items()
                 if _service(label) in DEFAULT_PORTS}
    paths = {str(suite.data_dir.resolve()): README_DATA_DIR, str(suite.data_dir): README_DATA_DIR}

    def norm(lines: list[str]) -> list[str]:
        return [rc.normalise(line, ports=ports, paths=paths) for line in lines]

    env = _command_env(suite)
    failures: list[str] = []
    started = time.monotonic()
    for block in blocks:
        if block.skip:
            continue
        for name in block.setups:
            assert name in SETUPS, f"README.md:{block.line}: no readme-test setup named {name!r}"
            SETUPS[name](suite, tmp_path)
        for index, command in enumerate(block.commands):
            expected = norm(command.expected)
            if command.text.strip() in UP_COMMANDS:
                # The suite this test started stands for it: what `up` printed (its stderr) so far.
                # Less the line telling the clients where a gateway off the default address is: this suite's
                # gateway is on a free port, the README's on the default one, where `up` prints no such line.
                actual = [line.rstrip("\n") for line in list(suite.log)
                          if not line.startswith("  export CLAWHUB_GATEWAY=")]
                if not rc.matches(expected, norm(actual)):
                    failures.append(rc.difference(command, actual, expected, norm(actual)))
                continue
            text = command.text
            for shown, real in addresses.items():
                text = text.replace(shown, real)
            live = block.live is not None and index == len(block.commands) - 1

            def on_screen(lines: list[str], expected: list[str] = expected) -> bool:
                return rc.matches(expected, norm(lines))

            run = rc.run_in_terminal(text, cwd=str(ROOT), env=env, timeout=60, until=on_screen if live else None)
            if live and run.seen:
                continue
            if live or not rc.matches(expected, norm(run.output)):
                failures.append(rc.difference(command, run.output, expected, norm(run.output))
                                + ("\n(a live block: the screen never matched while the command ran)" if live else ""))
    elapsed = time.monotonic() - started
    assert not failures, (f"{len(failures)} README example(s) differ from the product ({elapsed:.0f} s):\n\n"
                          + "\n\n".join(failures) + "\n\n--- the suite's last log lines:\n" + "".join(suite.log[-40:]))


# The comparison itself: it must be able to fail.

def test_readme_blocks_parse_and_few_are_skipped() -> None:
    blocks = rc.parse(README.read_text())
    assert len(blocks) >= 4
    skipped = [block for block in blocks if block.skip]
    assert len(skipped) <= MAX_SKIPPED, [f"README.md:{block.line}: {block.skip}" for block in skipped]
    for block in blocks:
        assert block.commands, f"README.md:{block.line}: a console block without `$ command`"
        assert all(name in SETUPS for name in block.setups), block.setups
    commands = [command.text for block in blocks if not block.skip for command in block.commands]
    for needed in ("clawhub publish", "clawhub deploy", "clawhub invoke", "clawhub status", "grpcurl"):
        assert any(text.startswith(needed) for text in commands), needed


SAMPLE = """\
Intro text.

<!-- readme-test: skip (needs a second machine) -->
```console
$ ssh elsewhere
hi
```

```console
$ clawhub status
SKILL  STATE
a      ACTIVE

$ grpcurl -plaintext -d '{}' \\
    127.0.0.1:50051 x.Y/Z
{"a": 1, "b": 2}
...
```

<!-- readme-test: setup uppercase-1.1.0 (a changed module) -->
<!-- readme-test: live (while it runs) -->
```console
$ clawhub deploy x
```
"""


def test_parse_reads_commands_outputs_and_markers() -> None:
    skipped, normal, live = rc.parse(SAMPLE)
    assert skipped.skip == "needs a second machine" and skipped.line == 4
    assert normal.skip is None and [c.text for c in normal.commands] == [
        "clawhub status", "grpcurl -plaintext -d '{}' \\\n    127.0.0.1:50051 x.Y/Z"]
    status, grpcurl = normal.commands
    assert status.expected == ["SKILL  STATE", "a      ACTIVE"] and status.line == 10 and status.expected_line == 11
    assert grpcurl.expected == ['{"a": 1, "b": 2}', "..."] and grpcurl.expected_line == 16
    assert live.live == "while it runs" and live.setups == ["uppercase-1.1.0"] and live.commands[0].expected == []


def _same(expected: str, actual: str, **kwargs: object) -> bool:
    e = [rc.normalise(line, **kwargs) for line in expected.splitlines()]  # type: ignore[arg-type]
    a = [rc.normalise(line, **kwargs) for line in actual.splitlines()]  # type: ignore[arg-type]
    return rc.matches(e, a)


def test_comparison_forgives_what_changes_between_runs() -> None:
    ports = {"41234": "50055", "41200": "50051"}
    assert _same("published: x@1.0.0  sha256:f9391b4dd8bf81a076586a663af3ca33afcf575df64d0a4f3705bbe1022bf7d7",
                 "published: x@1.0.0  sha256:6138bb8c8854ea0f52a0daf462c9f32ccaee401075eee03a918088da64f4a4f0")
    assert _same("publishing x (534 bytes, sha256:f9391b4dd8bf…) to 127.0.0.1:50051",
                 "publishing x (534 bytes, sha256:93808212d6c7…) to 127.0.0.1:41200", ports=ports)
    assert _same("deploying x (deployment 65da6cfc2ca1d667, blue-green, bake 10s)",
                 "deploying x (deployment 5c13ed950a167606, blue-green, bake 10s)")
    assert _same("    0.0s  preloaded on 127.0.0.1:50055", "   10.1s  preloaded on 127.0.0.1:41234", ports=ports)
    assert _same("⠼ DEPLOYING · 4.2s · canary 5% (step 1/4) · 0 calls, 100.0% ok, p99 8ms · step 5.9s left",
                 "⠧ DEPLOYING · 0.2s · canary 5% (step 1/4) · 0 calls, 100.0% ok, p99 0ms · step 10s left")
    assert _same("  data dir    /home/you/clawhub/.clawhub", "  data dir    /tmp/x/readme-data0",
                 paths={"/tmp/x/readme-data0": "/home/you/clawhub/.clawhub"})
    assert _same("a\n...\nz", "a\nz") and _same("a\n...\nz", "a\nb\nc\nz")
    assert _same('  "usage": {...}', '  "usage": {"wallTime": "0.001s"}')


def test_comparison_fails_on_real_differences() -> None:
    # A changed word or state name.
    assert not _same("com.example.uppercase  1.0.0   1.0.0    1.0.0 ACTIVE     NOT_ANALYSED",
                     "com.example.uppercase  1.0.0   1.0.0    1.0.0 ACTIVE     PASSED")
    assert not _same("  [  0.0s] ACTIVE       done", "  [  0.0s] DEPLOYING    done")
    # JSON key order and spacing.
    assert not _same('{"words":4,"bytes":23,"lines":0}', '{"bytes":23,"lines":0,"words":4}')
    assert not _same('{"words": 4}', '{"words":4}')
    # A setting shown in the output, numbers of calls, versions, a missing or extra line.
    assert not _same("deploying x (blue-green, bake 10s)", "deploying x (blue-green, bake 2s)")
    assert not _same("· 212 calls, 100.0% ok", "· 0 calls, 100.0% ok")
    assert not _same("1.0.0", "1.1.0")
    assert not _same("a\nb", "a") and not _same("a\nb", "a\nb\nc")
    # The port of another service is not this one's.
    assert not _same("preloaded on 127.0.0.1:50055", "preloaded on 127.0.0.1:41200",
                     ports={"41234": "50055", "41200": "50051"})
    # `…` is literal (the product prints it); only `...` is a wildcard.
    assert not _same("step 1/4 · step…", "step 1/4 · step 9.2s left")


def test_a_mismatch_names_the_readme_line_with_a_diff() -> None:
    command = rc.Command(line=40, text="clawhub status", expected=["HEAD", "a ACTIVE", "b ACTIVE"], expected_line=41)
    actual = ["HEAD", "a ACTIVE", "b FAILED"]
    report = rc.difference(command, actual, command.expected, actual)
    assert report.startswith("README.md:43: the output of `$ clawhub status` (README.md:40)")
    assert "-b ACTIVE\n+b FAILED" in report


def test_screen_shows_what_a_terminal_shows() -> None:
    screen = rc.Screen()
    screen.feed("deploying\r\n    0.0s  preloaded\r\n⠋ DEPLOYING · 0.0s")
    screen.feed("\r\x1b[K⠙ DEPLOYING · 0.1s · baking")
    assert screen.shown() == ["deploying", "    0.0s  preloaded", "⠙ DEPLOYING · 0.1s · baking"]
    screen.feed("\r\x1b[K    0.2s  ACTIVE\r\n\r\x1b[K\x1b[1mdone\x1b[0m\r\n")
    assert screen.shown() == ["deploying", "    0.0s  preloaded", "    0.2s  ACTIVE", "done"]


def test_terminal_runs_a_command_on_a_tty_80_columns_wide(tmp_path: Path) -> None:
    run = rc.run_in_terminal('test -t 1 && test -t 2 && echo "tty $(stty size)"; echo err >&2', cwd=str(tmp_path),
                             env={"PATH": os.environ["PATH"]})
    assert run.output == [f"tty {rc.ROWS} {rc.COLUMNS}", "err"] and run.code == 0
