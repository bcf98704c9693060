"""Validation of the names the contracts carry: skill names, versions, digests, key ids.

Every pattern here is applied with `fullmatch`: `re.match` with a pattern ending in `$` accepts a final
"\n" (`$` matches before a trailing newline), which once let `1.0.0\n` be published as a second version
that sorted as `latest` while every listing showed `1.0.0`.

Every pattern is ASCII-only too. Digits are written `[0-9]`, never as the digit class, which in a `str`
pattern also matches the digits of other scripts (and `int()` reads them): `1.0.1` followed by an Arabic-Indic
zero (U+0660) once passed as a version, sorting as 1.0.10 and becoming `latest`. Each pattern is compiled with
`re.ASCII` as well, so a class added later stays ASCII."""

from __future__ import annotations

import itertools
import os
import re
import secrets
from functools import lru_cache

# Reverse-DNS: at least two dot-separated labels, lowercase letters, digits and inner hyphens.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
SKILL_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})+", re.ASCII)
# SemVer 2.0.0, from semver.org.
SEMVER_RE = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,
)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
# `ed25519:` and 16 hex digits (services/runtime/signing.py makes them).
KEY_ID_RE = re.compile(r"ed25519:[0-9a-f]{16}", re.ASCII)
MAX_NAME_LENGTH = 200


def skill_name_problem(name: str) -> str | None:
    """Why `name` is not a valid skill name, or None when it is."""
    if not name:
        return "a skill name is required, such as com.acme.image-process"
    if len(name) > MAX_NAME_LENGTH:
        return f"a skill name is at most {MAX_NAME_LENGTH} characters"
    if not SKILL_NAME_RE.fullmatch(name):
        return (f"{name[:80]!r} is not a reverse-DNS skill name: use lowercase dot-separated labels "
                "such as com.acme.image-process")
    return None


def version_problem(version: str) -> str | None:
    """Why `version` is not a strict SemVer 2.0 version, or None when it is."""
    if not version:
        return "a version is required, such as 1.2.3"
    if len(version) > 128 or not SEMVER_RE.fullmatch(version):
        return f"{version[:80]!r} is not a SemVer 2.0 version such as 1.2.3 or 2.0.0-rc.1"
    return None


def digest_problem(digest: str) -> str | None:
    """Why `digest` is not a `sha256:<64 hex>` content digest, or None when it is."""
    if not DIGEST_RE.fullmatch(digest):
        return f"{digest[:80]!r} is not a digest of the form sha256:<64 lowercase hex digits>"
    return None


def key_id_problem(key_id: str) -> str | None:
    """Why `key_id` is not a signing key id `ed25519:<16 lowercase hex digits>`, or None when it is."""
    if not KEY_ID_RE.fullmatch(key_id):
        return f"{key_id[:80]!r} is not a key id such as ed25519:0123456789abcdef"
    return None


@lru_cache(maxsize=65536)
def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Sort key implementing SemVer 2.0 precedence (build metadata ignored)."""
    match = SEMVER_RE.fullmatch(version)
    if not match:
        raise ValueError(f"not a semver version: {version!r}")
    major, minor, patch, pre = int(match[1]), int(match[2]), int(match[3]), match[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    # Numeric identifiers sort before alphanumeric ones, and numerically among themselves.
    parts = tuple((0, int(p)) if p.isascii() and p.isdigit() else (1, p) for p in pre.split("."))
    return (major, minor, patch, 0, parts)


def is_prerelease(version: str) -> bool:
    match = SEMVER_RE.fullmatch(version)
    return bool(match and match[4])


class _RequestIds:
    """Request ids made up for calls that bring none: 32 hex digits as `uuid4().hex`, a random 64-bit prefix per
    process (drawn again in a forked child) and a counter, so that making one costs no system call (uuid4 reads
    os.urandom on every call: 2% of a gateway's event loop at a few thousand calls a second). Unique within a
    process, and across processes as far as 64 random bits go; not a secret."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(secrets.randbits(32))

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = _RequestIds()
