"""`clawhub top`: a live view of every skill (calls/s, p50/p99, errors by reason, version and deployment state)
and of every executor's worker pool, from GatewayService.GetSkillStats.

Made to be read over SSH at 3 a.m.: plain text, at most as wide as the terminal (80 columns when it cannot
tell), long names ellipsized in the middle (the namespace and the last part of a reverse-DNS name are what
tell skills apart), no colour. Three ways to run it:

- **live** (stdout is a terminal): the screen is cleared and redrawn every `--interval` seconds with plain
  ANSI (`ESC [H ESC [2J`), cut to the terminal's height; a gateway that cannot be reached is shown and asked
  again on the next refresh. Ctrl-C ends it (exit 130), leaving the last frame on screen;
- **`--once`**: one snapshot, no escape sequences, then exit (for scripts; every skill, no height limit);
- **not a terminal** (`clawhub top > file`): a snapshot every interval, one after another, no escape
  sequences, like `top -b`.

The numbers are the dispatcher's rolling window (60 s; services/dispatcher/skillstats.py): calls that ended
in it, their median and 99th-percentile latency from dispatcher to executor and back, and the share that
failed, with the most frequent ErrorInfo reason.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc
from clawhub.common.v1 import observability_pb2
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb

DEFAULT_INTERVAL = 1.0
# Faster than this would only load the gateway and dispatcher; slower is no longer a live view.
MIN_INTERVAL, MAX_INTERVAL = 0.1, 3600.0
DEFAULT_TIMEOUT = 5.0
FALLBACK_SIZE = (80, 24)
CLEAR = "\x1b[H\x1b[2J"
ELLIPSIS = "…"
# SKILL takes the room it needs, as long as TOP ERROR keeps MIN_ERROR_WIDTH; then both shrink, SKILL to no
# less than MIN_SKILL_WIDTH.
MIN_SKILL_WIDTH = 16
MIN_ERROR_WIDTH = 14
# Errors the live view outlives (shown, asked again next refresh): the gateway restarting or slow.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

SkillStats = observability_pb2.SkillStats
ExecutorLoad = observability_pb2.ExecutorLoad


def clean(text: str) -> str:
    """Server text without control characters (so nothing it says can move the cursor)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def ellipsize(text: str, width: int, *, middle: bool = False) -> str:
    """`text` cut to `width` columns with `…` where it was cut (in the middle with `middle`)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    if not middle:
        return text[:width - 1] + ELLIPSIS
    head = (width - 1) // 3  # the last labels of a reverse-DNS name tell skills apart: keep more of them
    return text[:head] + ELLIPSIS + text[len(text) - (width - 1 - head):]


def rate(value: float) -> str:
    if value <= 0:
        return "0"
    if value < 100:
        return f"{value:.1f}"
    if value < 100_000:
        return f"{value:.0f}"
    return f"{value / 1000:.0f}k"


def latency(ms: float, calls: int) -> str:
    if not calls:
        return "-"
    if ms < 1:
        return f"{ms * 1000:.0f}µs"
    if ms < 10:
        return f"{ms:.1f}ms"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s"


def error_rate(errors: int, calls: int) -> str:
    if not calls:
        return "-"
    if not errors:
        return "0%"
    return f"{100 * errors / calls:.1f}%"


def top_error(skill: SkillStats) -> str:
    """The most frequent failure reason, and how many other reasons there were (`+2`)."""
    if not skill.errors_by_reason:
        return ""
    reason, _ = max(skill.errors_by_reason.items(), key=lambda item: (item[1], item[0]))
    others = len(skill.errors_by_reason) - 1
    return clean(reason) + (f" +{others}" if others else "")


# Columns after SKILL: header, how a skill shows in it, right-aligned.
_COLUMNS: tuple[tuple[str, Callable[[SkillStats], str], bool], ...] = (
    ("VERSION", lambda s: clean(s.active_version) or "-", False),
    ("STATE", lambda s: clean(s.deployment_state) or "-", False),
    ("CALLS/S", lambda s: rate(s.calls_per_second), True),
    ("P50", lambda s: latency(s.p50_ms, s.calls), True),
    ("P99", lambda s: latency(s.p99_ms, s.calls), True),
    ("ERR%", lambda s: error_rate(s.errors, s.calls), True),
)
MAX_VERSION_WIDTH = 10


def skill_table(skills: Sequence[SkillStats], width: int) -> list[str]:
    """The header and one row per skill, no line wider than `width`."""
    cells = [[fn(s) for _, fn, _ in _COLUMNS] for s in skills]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, (header, _, _) in enumerate(_COLUMNS)]
    widths[0] = min(widths[0], MAX_VERSION_WIDTH)
    errors = [top_error(s) for s in skills]
    names = [clean(s.skill) for s in skills]
    fixed = sum(widths) + len(widths)  # each column and the space before it
    room = max(width - fixed, 0)
    longest_name = max([len("SKILL"), *map(len, names)])
    longest_error = max([0, *map(len, errors)])
    if longest_error:
        skill_width = min(longest_name, max(MIN_SKILL_WIDTH, room - 1 - min(longest_error, MIN_ERROR_WIDTH)))
        error_width = max(room - skill_width - 1, 0)
    else:
        skill_width, error_width = min(longest_name, room), 0
    skill_width = max(skill_width, 1)

    def line(name: str, values: Sequence[str], error: str, *, header: bool = False) -> str:
        parts = [ellipsize(name, skill_width, middle=not header).ljust(skill_width)]
        for value, size, (_, _, right) in zip(values, widths, _COLUMNS, strict=True):
            value = ellipsize(value, size)
            parts.append(value.rjust(size) if right else value.ljust(size))
        text = " ".join(parts)
        if error_width >= 4 and error:
            text += " " + ellipsize(error, error_width)
        return text.rstrip()[:width]

    rows = [line("SKILL", [header for header, _, _ in _COLUMNS], "TOP ERROR" if longest_error else "", header=True)]
    rows += [line(name, row, error) for name, row, error in zip(names, cells, errors, strict=True)]
    return rows


def executor_line(load: ExecutorLoad, width: int) -> str:
    name = clean(load.executor)
    if not load.reachable:
        text = f"{name}  unreachable"
    else:
        text = (f"{name}  threads {load.busy_threads}/{load.threads} busy  "
                f"queue {load.queued}/{load.queue_capacity}")
    return ellipsize(text, width)


def render(response: gateway_pb.GetSkillStatsResponse, *, width: int, gateway: str, clock: str = "",
           height: int | None = None, problem: str = "") -> list[str]:
    """The lines of one snapshot, none wider than `width`; with `height`, at most that many (the skills
    that do not fit are counted on the last line)."""
    window = next((s.window_seconds for s in response.skills if s.window_seconds), 0)
    title = f"clawhub top  {gateway}" + (f"  last {window}s" if window else "") + (f"  {clock}" if clock else "")
    lines = [ellipsize(title, width)]
    if problem:
        lines.append(ellipsize(problem, width))
    lines += [executor_line(load, width) for load in response.executors] or [ellipsize("no executors", width)]
    lines.append("")
    if not response.skills:
        lines.append(ellipsize("no skills deployed and no calls in the window", width))
        return lines[:height] if height else lines
    table = skill_table(response.skills, width)
    if height is not None and len(lines) + len(table) > height:
        keep = max(height - len(lines) - 1, 1)
        hidden = len(table) - keep
        table = [*table[:keep], ellipsize(f"… {hidden} more skill(s): widen the window or use --once", width)]
    return (lines + table)[:height] if height else lines + table


def cmd_top(client: Any, args: argparse.Namespace) -> int:
    out: TextIO = sys.stdout
    live = out.isatty() and not args.once
    request = gateway_pb.GetSkillStatsRequest(skill=args.skill or "")
    while True:
        problem = ""
        try:
            response = client.invoker.GetSkillStats(request, timeout=args.timeout)
        except grpc.RpcError as err:
            if not live or err.code() not in TRANSIENT:
                raise  # described by the CLI's error handling (exit 3 when the gateway is unreachable)
            response = gateway_pb.GetSkillStatsResponse()
            details = " ".join(clean(err.details() or "").split())
            problem = f"no answer ({err.code().name}: {details}); trying again every {args.interval:g}s"
        columns, rows = shutil.get_terminal_size(FALLBACK_SIZE)
        lines = render(response, width=max(columns, 20), gateway=args.gateway, clock=time.strftime("%H:%M:%S"),
                       height=rows - 1 if live else None, problem=problem)
        if live:
            out.write(CLEAR + "\n".join(lines) + "\n")
        elif args.once:
            out.write("\n".join(lines) + "\n")
        else:
            out.write("\n".join(lines) + "\n\n")
        out.flush()
        if args.once:
            return 0
        time.sleep(args.interval)


def interval_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(f"the interval is from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds")
    return value


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {"top": cmd_top}

TOP_HELP = """\
columns:
  SKILL      skill name (ellipsized in the middle to fit the terminal)
  VERSION    the version serving now (the candidate during a release)
  STATE      state of the skill's latest deployment (ACTIVE, DEPLOYING, ROLLING_BACK, FAILED)
  CALLS/S    calls that ended per second over the window (60 s)
  P50, P99   median and 99th-percentile latency of those calls, dispatcher to executor and back
  ERR%       share of those calls that failed
  TOP ERROR  the most frequent failure reason (its ErrorInfo reason), and +N other reasons
Above the skills, one line per executor: worker threads busy, calls queued for a thread.
The width is the terminal's ($COLUMNS, else 80 when it cannot tell). Needs the deployments.read permission
(any role)."""


def add_commands(sub: Any, default_gateway: str, seconds: Callable[[str], float],
                 tls_ca: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `top` to the CLI's subcommands."""
    p = sub.add_parser("top", help="live view of every skill's traffic, latency and errors, and executor load",
                       description="A live view of every skill: calls per second, p50/p99 latency, error rate "
                                   "and the top error reason, the version serving and its deployment state, and "
                                   "each executor's worker pool. Redrawn every --interval seconds on a terminal "
                                   "until Ctrl-C (exit 130); --once prints one snapshot without escape sequences "
                                   "and exits (for scripts).",
                       epilog=TOP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("skill", nargs="?", help="only this skill (default: every skill with a route or recent calls)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (no escape sequences)")
    p.add_argument("--interval", type=interval_seconds, default=DEFAULT_INTERVAL,
                   help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--gateway", default=os.environ.get("CLAWHUB_GATEWAY", default_gateway),
                   help="gateway address (default: $CLAWHUB_GATEWAY or %(default)s)")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT,
                   help="deadline in seconds of each refresh's call (default: %(default)s)")
    tls_ca(p)
