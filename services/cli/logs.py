"""`clawhub logs SKILL`: what a skill wrote to stderr in its recent calls, from every executor, and with
`--follow` each new line as calls end (as `kubectl logs -f` or `wrangler tail` do; docs/logs.md).

One line per line the skill wrote, readable at 80 columns:

    14:03:07.412 1.0.0 3f2a9c1e [trace 4bf92f35] resizing 1920x1080 to 640x360

the call's end time (local), the version that ran, the first 8 characters of the request id and, when the
call was traced, of the trace id (enough to grep for; `--wide` prints the date, the executor and the whole
ids). A line the executor cut short is followed by `[more not kept]`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from clawhub.common.v1 import observability_pb2
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb

from services.runtime.names import version_problem

HELP = "print what a skill wrote to stderr in its recent calls; --follow for new lines as they come"
DESCRIPTION = (
    "Print what a skill wrote to stderr in its recent calls (each executor keeps the last lines of each "
    "version), oldest first, one line each: TIME VERSION REQUEST [trace ID] TEXT. With --follow, keep "
    "printing new lines as calls end, until Ctrl-C. Needs the logs.read permission (operator or admin).")
MAX_TAIL = 1000
SHORT_ID = 8
MORE = " [more not kept]"


def _tail_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of lines") from None
    if not 0 <= value <= MAX_TAIL:
        raise argparse.ArgumentTypeError(f"{value}: from 0 to {MAX_TAIL} lines")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("name", metavar="SKILL", help="skill name, such as com.example.uppercase")
    p.add_argument("--version", metavar="V", help="only this version's lines (default: every version's)")
    p.add_argument("--tail", metavar="N", type=_tail_count, default=100,
                   help="kept lines to print first, from each executor (default: %(default)s; 0 with --follow "
                        f"prints only new lines; at most {MAX_TAIL})")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new lines as calls end, until Ctrl-C (no --timeout then)")
    p.add_argument("--wide", action="store_true",
                   help="print the date, the executor and the whole request and trace ids")


def format_line(line: observability_pb2.SkillLogLine, *, wide: bool = False) -> str:
    """One skill log line as `clawhub logs` prints it (control characters escaped by the caller)."""
    when = line.time.ToDatetime(tzinfo=datetime.UTC).astimezone()
    request = line.request_id or "-"
    parts = []
    if wide:
        parts += [when.isoformat(timespec="milliseconds"), line.executor or "-", line.version or "-", request]
        if line.trace_id:
            parts.append(f"[trace {line.trace_id}]")
    else:
        parts += [when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}", line.version or "-",
                  request[:SHORT_ID]]
        if line.trace_id:
            parts.append(f"[trace {line.trace_id[:SHORT_ID]}]")
    parts.append(line.text + (MORE if line.truncated else ""))
    return " ".join(parts)


def cmd_logs(client: Any, args: argparse.Namespace) -> int:
    from services.cli.main import printable, usage_error

    if args.version and (problem := version_problem(args.version)):
        raise usage_error(f"error: --version: {problem}")
    if args.tail == 0 and not args.follow:
        return 0
    request = gateway_pb.TailSkillLogsRequest(skill=args.name, version=args.version or "",
                                              tail=max(args.tail, 1), follow=args.follow)
    # Following has no end: no deadline then.
    call = client.invoker.TailSkillLogs(request, timeout=None if args.follow else args.timeout)
    printed = 0
    # With --follow, an empty response says the kept lines are all sent: new ones follow.
    following = False
    what = f"{args.name}{'@' + args.version if args.version else ''}"
    try:
        for response in call:
            if not response.lines:
                if args.follow and not following:
                    following = True
                    print(f"following {what} (Ctrl-C stops)", file=sys.stderr, flush=True)
                continue
            if args.tail == 0 and not following:
                continue
            for line in response.lines:
                print(printable(format_line(line, wide=args.wide)).replace("\n", "\\n"))
                printed += 1
            sys.stdout.flush()
    except KeyboardInterrupt:
        call.cancel()
        raise
    if not printed and not args.follow:
        print(f"no lines kept for {what}: its calls wrote nothing to stderr since the executors started, or it "
              "was not called", file=sys.stderr)
    return 0
