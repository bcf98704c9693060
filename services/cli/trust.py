"""`clawhub keygen`, `publisher` and `namespace`, and the credentials and signatures of the other commands.

Tokens come from flags or the environment (`--token` / `CLAWHUB_TOKEN` for a publisher, `--admin-token` /
`CLAWHUB_ADMIN_TOKEN` for the operator) and travel as `authorization: Bearer` metadata on registry calls
only; the CLI never prints one, except the new token `publisher create` exists to show.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from clawhub.registry.v1 import registry_service_pb2 as registry_pb

from services.runtime import signing

T = TypeVar("T")

DEFAULT_KEY = Path("~/.clawhub/signing.key")
# Commands that act as the operator: they send the admin token.
_ADMIN_ACTIONS = {("publisher", "create"), ("namespace", "create")}
# Namespace changes the owner may make too: the admin token when given, else the publisher's.
_OWNER_OR_ADMIN_ACTIONS = {("namespace", "add-key"), ("namespace", "remove-key"),
                           ("namespace", "require-signatures")}


class _Authorized:
    """A stub whose every call carries `authorization: Bearer <token>`."""

    def __init__(self, stub: Any, token: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs["metadata"] = (*(kwargs.get("metadata") or ()), *self._metadata)
            return method(*args, **kwargs)

        return call


def authorized(stub: T, token: str) -> T:
    """`stub` sending `token` with every call (itself when there is no token)."""
    return cast(T, _Authorized(stub, token)) if token else stub


def credential(args: argparse.Namespace) -> str:
    """The token a command sends: the admin's for admin commands, else the publisher's."""
    action = (args.command, getattr(args, "action", None))
    admin = getattr(args, "admin_token", "") or ""
    token = getattr(args, "token", "") or ""
    if action in _ADMIN_ACTIONS:
        return str(admin)
    if action in _OWNER_OR_ADMIN_ACTIONS:
        return str(admin or token)
    return str(token)


def _command(args: argparse.Namespace) -> str:
    action = getattr(args, "action", None)
    return f"clawhub {args.command}" + (f" {action}" if action else "")


def _source(args: argparse.Namespace, attribute: str, flag: str, variable: str) -> str:
    """Where the token a command sent came from: its flag or the environment variable that is its default."""
    value = getattr(args, attribute, "")
    return f"${variable}" if value and value == os.environ.get(variable) else flag


def credential_hint(reason: str, args: argparse.Namespace) -> str:
    """What to do about a refusal for want of the right token, said for the command being run (the registry's
    message cannot know it): its flag and environment variable. Empty when there is nothing to add."""
    command = _command(args)
    has_admin = hasattr(args, "admin_token")
    has_token = hasattr(args, "token")
    admin_sent = has_admin and bool(args.admin_token)
    if reason in ("ADMIN_REQUIRED", "ADMIN_TOKEN_NOT_CONFIGURED") and has_admin:
        if reason == "ADMIN_REQUIRED" and admin_sent:
            where = _source(args, "admin_token", "--admin-token", "CLAWHUB_ADMIN_TOKEN")
            return f"the admin token sent (from {where}) is not the registry's"
        once = ", once it is set" if reason == "ADMIN_TOKEN_NOT_CONFIGURED" else ""
        return f"with clawhub{once}: add --admin-token TOKEN to `{command}`, or export CLAWHUB_ADMIN_TOKEN=TOKEN"
    if reason == "NAMESPACE_NOT_OWNED" and has_token:
        also = " (or the admin's: --admin-token, or CLAWHUB_ADMIN_TOKEN)" if has_admin else ""
        return f"with clawhub: add --token TOKEN to `{command}`, or export CLAWHUB_TOKEN=TOKEN{also}"
    if reason == "INVALID_TOKEN":
        # `clawhub admin` sends its admin token itself, not through credential().
        sent = credential(args) or (args.admin_token if has_admin else "")
        if admin_sent and sent == args.admin_token:
            where = _source(args, "admin_token", "--admin-token", "CLAWHUB_ADMIN_TOKEN")
        elif has_token and sent and sent == args.token:
            where = _source(args, "token", "--token", "CLAWHUB_TOKEN")
        else:
            return ""
        return f"the token sent came from {where}"
    return ""


def add_token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=os.environ.get("CLAWHUB_TOKEN", ""),
                        help="publisher token, needed for names in a namespace (default: $CLAWHUB_TOKEN)")


def _add_admin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-token", default=os.environ.get("CLAWHUB_ADMIN_TOKEN", ""),
                        help="the registry's admin token (default: $CLAWHUB_ADMIN_TOKEN)")


def sign_publish(metadata: registry_pb.PublishSkillMetadata, key_file: str) -> str:
    """Sign the publish metadata in place with the key in `key_file`; returns the key id. Raises
    signing.SigningError for a key that cannot be used."""
    key = signing.load_private_key(Path(key_file).expanduser())
    subject = signing.Subject(
        name=metadata.manifest.name, version=metadata.manifest.version, digest="sha256:" + metadata.sha256,
        bundle_digest="sha256:" + metadata.bundle_sha256 if metadata.bundle_sha256 else "",
        manifest=signing.manifest_bytes(metadata.manifest))
    key_id = signing.key_id(signing.raw_public_key(key))
    metadata.signature.CopyFrom(registry_pb.Signature(key_id=key_id, signature=signing.sign(key, subject)))
    return key_id


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.out).expanduser()
    key = signing.generate()
    try:
        public = signing.write_keypair(path, key)
    except (signing.SigningError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"key id:      {signing.key_id(signing.raw_public_key(key))}")
    print(f"private key: {path}  (keep it secret; sign with: clawhub publish DIR --sign {path})")
    print(f"public key:  {public}  (trust it with: clawhub namespace add-key NAMESPACE {public})")
    return 0


def _time(stamp: Any) -> str:
    return datetime.fromtimestamp(stamp.ToNanoseconds() / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _show(namespace: registry_pb.Namespace) -> None:
    print(f"namespace {namespace.name}")
    print(f"  owner:              {namespace.owner}")
    print(f"  require signatures: {'yes' if namespace.require_signatures else 'no'}")
    if not namespace.keys:
        print("  keys:               none")
    for i, key in enumerate(namespace.keys):
        print(f"  {'keys:' if i == 0 else '':<19} {key.key_id}  (added {_time(key.create_time)})")


def _public_keys(files: list[str] | None) -> list[bytes] | int:
    keys = []
    for name in files or ():
        try:
            keys.append(signing.load_public_key(Path(name).expanduser()))
        except signing.SigningError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return keys


def cmd_publisher(client: Any, args: argparse.Namespace) -> int:
    response = client.registry.CreatePublisher(registry_pb.CreatePublisherRequest(name=args.name),
                                               timeout=args.timeout)
    print(f"created publisher {response.publisher.name}; its token (shown only now, store it safely):",
          file=sys.stderr)
    print(response.token)
    return 0


def cmd_namespace(client: Any, args: argparse.Namespace) -> int:
    registry = client.registry
    if args.action == "list":
        request = registry_pb.ListNamespacesRequest(page_size=200)
        rows = [("NAMESPACE", "OWNER", "SIGNATURES", "KEYS")]
        while True:
            response = registry.ListNamespaces(request, timeout=args.timeout)
            rows += [(n.name, n.owner, "required" if n.require_signatures else "optional", str(len(n.keys)))
                     for n in response.namespaces]
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        if len(rows) == 1:
            print("no namespaces; names are open to any publisher")
            return 0
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        return 0
    if args.action == "show":
        get = (registry_pb.GetNamespaceRequest(skill=args.name) if args.skill
               else registry_pb.GetNamespaceRequest(name=args.name))
        _show(registry.GetNamespace(get, timeout=args.timeout).namespace)
        return 0
    if args.action == "create":
        keys = _public_keys(args.key)
        if isinstance(keys, int):
            return keys
        namespace = registry.CreateNamespace(registry_pb.CreateNamespaceRequest(
            name=args.name, owner=args.owner, require_signatures=args.require_signatures, public_keys=keys),
            timeout=args.timeout).namespace
    else:
        update = registry_pb.UpdateNamespaceRequest(name=args.name)
        if args.action == "add-key":
            keys = _public_keys([args.public_key])
            if isinstance(keys, int):
                return keys
            update.add_public_keys.extend(keys)
        elif args.action == "remove-key":
            update.remove_key_ids.append(args.key_id)
        else:
            update.require_signatures = not args.off
        namespace = registry.UpdateNamespace(update, timeout=args.timeout).namespace
    _show(namespace)
    return 0


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "publisher": cmd_publisher, "namespace": cmd_namespace}


def add_commands(sub: Any, default_gateway: str, seconds: Callable[[str], float]) -> None:
    """Add keygen, publisher and namespace to the CLI's subcommands."""
    p = sub.add_parser("keygen", help="make an Ed25519 signing key pair",
                       description="Make an Ed25519 key pair to sign skills with: the private key (PEM, mode "
                                   "0600) at --out and the public key at --out.pub. Never overwrites a file.")
    p.add_argument("--out", default=str(DEFAULT_KEY), help="private key path (default: %(default)s)")

    def leaf(actions: Any, name: str, help_text: str, *, admin: bool = False, owner: bool = False,
             ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--gateway", default=os.environ.get("CLAWHUB_GATEWAY", default_gateway),
                            help="gateway address (default: $CLAWHUB_GATEWAY or %(default)s)")
        parser.add_argument("--timeout", type=seconds, default=30.0,
                            help="deadline in seconds for the call (default: %(default)s)")
        if admin or owner:
            _add_admin_flag(parser)
        if owner:
            add_token_flag(parser)
        return parser

    publisher = sub.add_parser("publisher", help="manage publishers (admin)",
                               description="Publishers own namespaces and publish with a bearer token.")
    actions = publisher.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(actions, "create", "create a publisher and print its token (admin token needed)", admin=True)
    p.add_argument("name", help="publisher name: lowercase letters, digits and hyphens, starting with a letter")

    namespace = sub.add_parser(
        "namespace", help="manage namespaces: name prefixes a publisher owns",
        description="A namespace such as com.acme is owned by one publisher: only its token (or the admin's) "
                    "publishes, yanks or tags skills under it. It can require every version to be signed by "
                    "one of its keys.")
    actions = namespace.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(actions, "create", "claim a prefix for a publisher (admin token needed)", admin=True)
    p.add_argument("name", help="prefix, such as com.acme")
    p.add_argument("--owner", required=True, help="the publisher that will own it")
    p.add_argument("--require-signatures", action="store_true", help="refuse unsigned publishes under it")
    p.add_argument("--key", action="append", metavar="PUBLIC_KEY_FILE",
                   help="public key (from clawhub keygen) to trust; repeat for several")
    p = leaf(actions, "show", "show a namespace: owner, keys, signature requirement")
    p.add_argument("name", help="prefix, or a skill name with --skill")
    p.add_argument("--skill", action="store_true", help="show the namespace that governs this skill name")
    leaf(actions, "list", "list namespaces")
    p = leaf(actions, "add-key", "trust a public key to sign skills of a namespace (owner or admin)", owner=True)
    p.add_argument("name", help="prefix")
    p.add_argument("public_key", metavar="PUBLIC_KEY_FILE", help="public key file (or the private key file)")
    p = leaf(actions, "remove-key", "stop trusting a key: versions it signed no longer load (owner or admin)",
             owner=True)
    p.add_argument("name", help="prefix")
    p.add_argument("key_id", metavar="KEY_ID", help="key id, such as ed25519:0123456789abcdef")
    p = leaf(actions, "require-signatures", "require signatures in a namespace, or stop with --off (owner or admin)",
             owner=True)
    p.add_argument("name", help="prefix")
    p.add_argument("--off", action="store_true", help="stop requiring signatures")
