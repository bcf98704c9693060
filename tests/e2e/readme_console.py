"""The README's console examples as data, a terminal to run them in, and the comparison of what they print.

Conventions in README.md (see tests/e2e/test_readme.py, which runs every block in order):

- A ```console block holds `$ COMMAND` lines, each followed by the output a user sees in their terminal. A
  command ending in `\\` goes on over the next lines. Blank lines before the next `$` only separate commands.
- A line that is just `...` stands for any number of lines (none included); `...` inside a line stands for
  any text within that line. `…` (one character) is literal: the product prints it.
- What changes from run to run is compared loosely (`normalise`): sha256 digests, deployment ids, measured
  times (`2.01s`, `p99 8ms`, `5.9s left`), timestamps, the spinner frame, the data directory and port
  numbers (a port is shown as the README's default port of the service that has it). Everything else must
  match exactly: words, state names, settings such as `bake 10s`, numbers of calls, JSON key order, spacing.
- An HTML comment just above a block changes how it is run:
  `<!-- readme-test: skip (REASON) -->` does not run it (only for what a test cannot do; say why);
  `<!-- readme-test: live (WHAT) -->` compares the screen *while* its last command runs: the block must match
  the terminal at some moment (event lines so far and the status line being redrawn), after which the command
  gets Ctrl-C;
  `<!-- readme-test: setup NAME (WHAT) -->` runs the test's setup step NAME first (something the README's
  prose describes rather than shows, such as publishing a version built from changed code).
"""

from __future__ import annotations

import difflib
import errno
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# The terminal the examples are shown in.
COLUMNS, ROWS = 80, 24

MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|live|setup)\b\s*(.*?)\s*-->\s*$")
ANY_LINES = "..."


@dataclass
class Command:
    line: int  # README line of its `$`
    text: str  # as a shell gets it (continuation lines included)
    expected: list[str] = field(default_factory=list)
    expected_line: int = 0  # README line of its first output line


@dataclass
class Block:
    line: int  # README line of the opening fence
    commands: list[Command]
    skip: str | None = None
    live: str | None = None
    setups: list[str] = field(default_factory=list)


def parse(text: str) -> list[Block]:
    """Every ```console block of a Markdown text, with the readme-test markers just above it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        block = Block(line=i + 1, commands=[])
        # Markers: the comment lines just above the fence (blank lines between them allowed).
        j = i - 1
        while j >= 0 and (not lines[j].strip() or MARKER.match(lines[j].strip())):
            marker = MARKER.match(lines[j].strip())
            if marker:
                kind, rest = marker.groups()
                if kind == "skip":
                    block.skip = rest.strip("() ") or "no reason given"
                elif kind == "live":
                    block.live = rest.strip("() ") or "live"
                else:
                    block.setups.insert(0, rest.split()[0] if rest else "")
            j -= 1
        i += 1
        command: Command | None = None
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            if line.startswith("$ "):
                command = Command(line=i + 1, text=line[2:])
                while command.text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command.text += "\n" + lines[i]
                command.expected_line = i + 2
                block.commands.append(command)
            elif command is None:
                if line.strip():
                    raise ValueError(f"README.md:{i + 1}: console block output before any `$ command`")
            else:
                command.expected.append(line)
            i += 1
        if i >= len(lines):
            raise ValueError(f"README.md:{block.line}: console block not closed")
        for command in block.commands:
            while command.expected and not command.expected[-1].strip():
                command.expected.pop()
        blocks.append(block)
        i += 1
    return blocks


# Normalising what changes from run to run.

_SPINNER = re.compile(r"[\u2800-\u28ff]")
_DIGEST = re.compile(r"sha256:[0-9a-f]{8,64}")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?")
# Deployment ids: 16 lower-case hex digits (with at least one letter and one digit, so no word or number).
# API keys and their ids (`chk_<12 hex>_<secret>`), and request ids (32 hex digits or a UUID).
_API_KEY = re.compile(r"\bchk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
_API_KEY_ID = re.compile(r"\bchk_[0-9a-f]{12}\b")
_REQUEST_ID = re.compile(r"\b(?:[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")
_ID = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{16}\b")
# Measured times: a decimal number of seconds or milliseconds (`  0.1s`, `2.01s`, `9.4 µs`), a p99 or a time
# left. Whole-number settings (`bake 10s`, `every 10s`, `timeout 2000ms`) are compared as they are.
_P99 = re.compile(r"\bp99 \d+(?:\.\d+)? ?(?:µs|ms|s)\b")
_MEASURED = re.compile(r" *(?:\b\d+\.\d+ ?(?:µs|ms|s)\b|\b\d+(?:\.\d+)?s(?= left\b))")
_PORT = re.compile(r"((?:\d{1,3}\.){3}\d{1,3}|localhost|\]):(\d{1,5})\b")


def normalise(line: str, *, ports: Mapping[str, str] | None = None, paths: Mapping[str, str] | None = None) -> str:
    """One output line with what differs from run to run replaced by placeholders. `ports` maps a port of
    this run to the one the README shows for it (others become `<port>`); `paths` maps paths of this run to
    the README's."""
    for actual, shown in (paths or {}).items():
        line = line.replace(actual, shown)
    line = _TIMESTAMP.sub("<time>", line)
    line = _DIGEST.sub("sha256:<digest>", line)
    line = _API_KEY.sub("chk_<key>", line)
    line = _API_KEY_ID.sub("chk_<key-id>", line)
    line = _REQUEST_ID.sub("<request-id>", line)
    line = _ID.sub("<id>", line)
    line = _P99.sub("p99 <t>", line)
    line = _MEASURED.sub("<t>", line)
    line = _SPINNER.sub("<spinner>", line)
    if ports is not None:
        line = _PORT.sub(lambda m: f"{m.group(1)}:{ports.get(m.group(2), m.group(2))}", line)
    return line.rstrip()


def _line_pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in expected.split(ANY_LINES)) + r"\Z")


def matches(expected: Sequence[str], actual: Sequence[str]) -> bool:
    """Whether the actual lines are the expected ones, `...` lines standing for any lines and `...` within a
    line for any text (both already normalised)."""
    patterns = [None if line.strip() == ANY_LINES else _line_pattern(line) for line in expected]
    memo: dict[tuple[int, int], bool] = {}

    def match(e: int, a: int) -> bool:
        if (e, a) in memo:
            return memo[e, a]
        if e == len(patterns):
            result = a == len(actual)
        elif patterns[e] is None:
            result = match(e + 1, a) or (a < len(actual) and match(e, a + 1))
        else:
            pattern = patterns[e]
            assert pattern is not None
            result = a < len(actual) and bool(pattern.match(actual[a])) and match(e + 1, a + 1)
        memo[e, a] = result
        return result

    return match(0, 0)


def first_mismatch(expected: Sequence[str], actual: Sequence[str]) -> int:
    """The index of the first expected line that no prefix of the actual lines can reach (for the report)."""
    for n in range(len(expected), -1, -1):
        prefix = list(expected[:n]) + [ANY_LINES]
        if matches(prefix, actual):
            return n
    return 0


def difference(command: Command, actual: Sequence[str], expected: Sequence[str], normalised: Sequence[str],
               *, readme: str = "README.md") -> str:
    """Why a command's output does not match its README example: the README line and a unified diff."""
    bad = first_mismatch(expected, normalised)
    where = command.expected_line + bad if bad < len(expected) else command.expected_line + len(expected)
    diff = "\n".join(difflib.unified_diff(list(expected), list(normalised), f"{readme}:{command.expected_line}",
                                          "actual (normalised)", lineterm=""))
    return (f"{readme}:{where}: the output of `$ {command.text}` ({readme}:{command.line}) differs from the README\n"
            f"{diff}\n--- actual output as printed:\n" + "\n".join(actual))


# A terminal: run a command on a pseudo-terminal 80 columns wide and keep what the screen shows.

_ESCAPE = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class Screen:
    """What a terminal shows, as logical lines (a long line is one line even where the terminal wraps it):
    text, carriage return, newline, and erase-line (`ESC [ K`); other escape sequences are dropped."""

    def __init__(self) -> None:
        self.lines: list[str] = [""]
        self.column = 0

    def feed(self, text: str) -> None:
        position = 0
        while position < len(text):
            escape = _ESCAPE.match(text, position)
            if escape:
                if escape.group(2) == "K":
                    self.lines[-1] = self.lines[-1][: self.column]
                position = escape.end()
                continue
            char = text[position]
            position += 1
            if char == "\r":
                self.column = 0
            elif char == "\n":
                self.lines.append("")
                self.column = 0
            elif char == "\b":
                self.column = max(0, self.column - 1)
            elif char >= " " or char == "\t":
                current = self.lines[-1]
                self.lines[-1] = current[: self.column] + char + current[self.column + 1:]
                self.column += 1

    def shown(self) -> list[str]:
        """The lines on screen, without the empty line the cursor may be on."""
        lines = [line.rstrip() for line in self.lines]
        while lines and not lines[-1]:
            lines.pop()
        return lines


@dataclass
class Run:
    output: list[str]  # the screen at the end
    code: int | None
    seen: bool = False  # a live block: the screen matched at some moment


def run_in_terminal(command: str, *, cwd: str, env: Mapping[str, str], timeout: float = 60,
                    until: Callable[[list[str]], bool] | None = None) -> Run:
    """Run `command` with bash on a pseudo-terminal (stdin, stdout and stderr), as in a terminal window.
    With `until`, the screen is checked after each piece of output; once it returns true the command gets
    Ctrl-C (SIGINT to its process group), as a user stopping it would."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    process = subprocess.Popen(["bash", "-c", command], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                               env=dict(env), start_new_session=True, close_fds=True)
    os.close(slave)
    screen = Screen()
    seen = False
    deadline = time.monotonic() + timeout
    decoder_buffer = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(process.pid, signal.SIGKILL)
                raise AssertionError(f"`$ {command}` did not finish in {timeout:.0f} s; the screen:\n"
                                     + "\n".join(screen.shown()))
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: every writer closed the terminal
                    raise
                data = b""
            if not data:
                break
            decoder_buffer += data
            try:
                text = decoder_buffer.decode()
                decoder_buffer = b""
            except UnicodeDecodeError:
                continue  # a character split between reads
            screen.feed(text)
            if until is not None and not seen and until(screen.shown()):
                seen = True
                os.killpg(process.pid, signal.SIGINT)
    finally:
        os.close(master)
        try:
            code: int | None = process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
    return Run(output=screen.shown(), code=code, seen=seen)
