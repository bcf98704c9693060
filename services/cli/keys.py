"""`clawhub keys` (create, list, revoke API keys) and `clawhub audit` (who changed what, from the registry's and
the deployer's audit logs, merged by time). Both need the admin role: the key `clawhub up` created is one."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from clawhub.common.v1 import audit_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.registry.v1 import access_pb2 as pb

from services.runtime.policy import ROLES


def _time(stamp: Any) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _role(value: int) -> str:
    return pb.Role.Name(value).removeprefix("ROLE_").lower()  # type: ignore[arg-type]


def cmd_keys(client: Any, args: argparse.Namespace) -> int:
    if args.action == "token":
        if not client.token:
            print(f"error: no credential for {args.gateway}: no --token, no $CLAWHUB_TOKEN, and the credentials file "
                  "has no key for this gateway (`clawhub up` records one)", file=__import__("sys").stderr)
            return 1
        print(client.token)
        return 0
    if args.action == "create":
        response = client.access.CreateApiKey(
            pb.CreateApiKeyRequest(name=args.name, role=pb.Role.Value("ROLE_" + args.role.upper()),
                                   scopes=args.scope or []), timeout=args.timeout)
        key = response.api_key
        scopes = ", ".join(key.scopes) or "every name"
        print(response.secret)
        print(f"created key chk_{key.id} ({key.name}): role {_role(key.role)}, scopes: {scopes}. The key is shown "
              "this once; send it as `authorization: Bearer <key>` (the CLI: --token or $CLAWHUB_TOKEN)",
              file=__import__("sys").stderr)
        return 0
    if args.action == "list":
        request = pb.ListApiKeysRequest(page_size=1000)
        rows = []
        while True:
            page = client.access.ListApiKeys(request, timeout=args.timeout)
            rows.extend(page.api_keys)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        print(f"{'ID':<20} {'NAME':<20} {'ROLE':<10} {'SCOPES':<24} {'CREATED':<21} {'REVOKED':<21} BY")
        for key in rows:
            print(f"{'chk_' + key.id:<20} {key.name:<20} {_role(key.role):<10} {','.join(key.scopes) or '*':<24} "
                  f"{_time(key.create_time):<21} {_time(key.revoke_time):<21} {key.created_by}")
        return 0
    response = client.access.RevokeApiKey(pb.RevokeApiKeyRequest(id=args.id), timeout=args.timeout)
    print(f"revoked chk_{response.api_key.id} ({response.api_key.name}); gateways refuse it within 1 s")
    return 0


def _events(call: Callable[..., Any], request: Any, timeout: float, limit: int) -> Iterator[audit_pb2.AuditEvent]:
    seen = 0
    while seen < limit:
        request.page_size = min(1000, limit - seen)
        page = call(request, timeout=timeout)
        yield from page.events
        seen += len(page.events)
        if not page.next_page_token or not page.events:
            return
        request.page_token = page.next_page_token


def cmd_audit(client: Any, args: argparse.Namespace) -> int:
    events = list(_events(client.access.ListAuditEvents, pb.ListAuditEventsRequest(), args.timeout, args.limit))
    events += list(_events(client.deployer.ListAuditEvents, deployer_pb.ListAuditEventsRequest(), args.timeout,
                           args.limit))
    events.sort(key=lambda e: (e.time.seconds, e.time.nanos), reverse=True)
    print(f"{'TIME':<21} {'SERVICE':<9} {'PRINCIPAL':<32} {'METHOD':<22} {'TARGET':<36} {'OUTCOME':<28} REQUEST")
    for event in reversed(events[:args.limit]):
        method = event.method.rpartition("/")[2]
        print(f"{_time(event.time):<21} {event.service:<9} {event.principal:<32} {method:<22} {event.target:<36} "
              f"{event.outcome:<28} {event.request_id}")
    return 0


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {"keys": cmd_keys, "audit": cmd_audit}


def add_commands(sub: Any, default_gateway: str, seconds: Callable[[str], float],
                 tls_ca: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `keys` (create, list, revoke) and `audit` to the CLI's subcommands."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway", default=os.environ.get("CLAWHUB_GATEWAY", default_gateway),
                       help="gateway address (default: $CLAWHUB_GATEWAY or %(default)s)")
        p.add_argument("--timeout", type=seconds, default=30.0, help="deadline in seconds (default: %(default)s)")
        p.add_argument("--token", default=os.environ.get("CLAWHUB_TOKEN", ""),
                       help="an admin credential (default: $CLAWHUB_TOKEN, else the key `clawhub up` created)")
        tls_ca(p)

    keys = sub.add_parser("keys", help="create, list and revoke API keys (admin)",
                          description="API keys of users and service accounts. A key has one role (viewer, "
                                      "invoker, publisher, operator, admin) and optional scopes: name prefixes "
                                      "on dot boundaries (com.acme. covers com.acme.*).")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("create", help="create a key and print it (shown once)")
    p.add_argument("name", help="who or what uses it: lowercase letters, digits and hyphens")
    p.add_argument("--role", required=True, choices=list(ROLES), help="what it may do")
    p.add_argument("--scope", action="append", metavar="PREFIX",
                   help="limit it to names under this prefix, such as com.acme. (repeat for several; default: "
                        "every name)")
    common(p)
    p = actions.add_parser("list", help="list keys (never their secrets)")
    common(p)
    p = actions.add_parser("token", help="print the credential the CLI sends to the gateway (for grpcurl and "
                                         "other clients: -H \"authorization: Bearer $(clawhub keys token)\")")
    common(p)
    p = actions.add_parser("revoke", help="revoke a key: every gateway refuses it within 1 s")
    p.add_argument("id", help="the key's id (chk_<id> or the 12 hex characters), as `clawhub keys list` shows")
    common(p)
    p = sub.add_parser("audit", help="who changed what: the registry's and the deployer's audit logs (admin)",
                       description="Every mutating call (publish, yank, tag, publishers, namespaces, keys, deploy, "
                                   "rollback) with who, when, the request id and the outcome, oldest first.")
    p.add_argument("--limit", type=int, default=100, help="newest events to show (default: %(default)s)")
    common(p)
