"""`clawhub admin`: operator commands that need the registry's admin token (`verify-blobs`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.cli import trust

# A scrub reads every stored byte: give it time (the deadline can be set with --timeout).
VERIFY_TIMEOUT = 3600.0
# Without a terminal (CI logs), one progress line per this many seconds.
PLAIN_PROGRESS_SECONDS = 5.0
_CONDITIONS = {registry_pb.BLOB_CONDITION_CORRUPT: "CORRUPT", registry_pb.BLOB_CONDITION_QUARANTINED: "QUARANTINED",
               registry_pb.BLOB_CONDITION_MISSING: "MISSING"}


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def cmd_verify_blobs(client: Any, args: argparse.Namespace) -> int:
    # The admin token when given, else the CLI's credential (an admin key: the one `clawhub up` created).
    registry = trust.authorized(registry_grpc.RegistryServiceStub(client.channel), args.admin_token or client.token)
    tty = sys.stderr.isatty()
    last_line = 0.0
    counts: dict[int, int] = {}
    final: registry_pb.VerifyBlobsResponse | None = None
    for progress in registry.VerifyBlobs(registry_pb.VerifyBlobsRequest(), timeout=args.timeout):
        line = (f"checked {progress.blobs_checked:,}/{progress.blobs_total:,} blobs "
                f"({_mb(progress.bytes_checked)})")
        if tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - last_line >= PLAIN_PROGRESS_SECONDS and not progress.done:
            print(line, file=sys.stderr, flush=True)
            last_line = time.monotonic()
        if tty and progress.problems:
            print(file=sys.stderr)
        for problem in progress.problems:
            counts[problem.condition] = counts.get(problem.condition, 0) + 1
            print(f"{_CONDITIONS.get(problem.condition, '?'):<12} {problem.description}")
        final = progress
    if tty:
        print(file=sys.stderr)
    if final is None or not final.done:
        print("error: the registry ended the scrub before it was complete", file=sys.stderr)
        return 1
    summary = (f"verified {final.blobs_checked:,} blob(s), {_mb(final.bytes_checked)}: "
               f"{counts.get(registry_pb.BLOB_CONDITION_CORRUPT, 0)} corrupt (quarantined now), "
               f"{counts.get(registry_pb.BLOB_CONDITION_QUARANTINED, 0)} still quarantined, "
               f"{counts.get(registry_pb.BLOB_CONDITION_MISSING, 0)} missing")
    print(summary)
    if counts:
        print("repair: publish the affected versions again with the same bytes (`clawhub publish DIR`)",
              file=sys.stderr)
        return 1
    return 0


def cmd_admin(client: Any, args: argparse.Namespace) -> int:
    return cmd_verify_blobs(client, args)  # the only action so far


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {"admin": cmd_admin}


def add_commands(sub: Any, default_gateway: str, seconds: Callable[[str], float]) -> None:
    """Add `admin` (and its actions) to the CLI's subcommands."""
    admin = sub.add_parser("admin", help="operator commands on the registry (admin token needed)",
                           description="Operator commands on the registry; they send the admin token "
                                       "(--admin-token or $CLAWHUB_ADMIN_TOKEN).")
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify-blobs", help="hash every stored blob; quarantine and report corrupt or missing ones",
        description="Hash every blob the registry stores, move each corrupt one to quarantine (kept as "
                    "evidence) and list, per Ready version, the blobs it needs that are corrupt, quarantined or "
                    "missing. Progress goes to stderr, problems and a summary to stdout. Exit 0 when every blob "
                    "is intact, 1 when something is corrupt or missing. Repair: publish the same bytes again.")
    p.add_argument("--gateway", default=os.environ.get("CLAWHUB_GATEWAY", default_gateway),
                   help="gateway address (default: $CLAWHUB_GATEWAY or %(default)s)")
    p.add_argument("--timeout", type=seconds, default=VERIFY_TIMEOUT,
                   help="deadline in seconds for the whole scrub (default: %(default)s)")
    p.add_argument("--admin-token", default=os.environ.get("CLAWHUB_ADMIN_TOKEN", ""),
                   help="the registry's admin token (default: $CLAWHUB_ADMIN_TOKEN)")
