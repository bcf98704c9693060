"""`http:` capabilities: which hosts a skill may reach with outbound HTTP (docs/skills/http.md).

Shared by the registry (publish refuses a malformed `http:` capability, through services/runtime/wasm.py's
`capability_problem`) and the executor (services/executor/outbound.py matches every request and redirect
against them). Standard library only: the registry imports it without the executor's client.

Forms, after the `http:` prefix (the operator's `CLAWHUB_HTTP_ALLOW` uses the same forms without it):

- `api.example.com`: exactly that host, on the scheme's default port (80 for http, 443 for https);
- `api.example.com:8443`: exactly that host on that port (either scheme);
- `*.example.com` (optionally `:PORT`): any subdomain of example.com at any depth, not example.com itself;
- `203.0.113.7`, `[2001:db8::1]` (optionally `:PORT`): an IP literal (still subject to the private-address
  rule at request time).

Host names are compared case-insensitively, without a trailing dot, in their ASCII (punycode) form.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HTTP_CAPABILITY_PREFIX = "http:"
DEFAULT_PORTS = {"http": 80, "https": 443}
# One DNS label: letters, digits and inner hyphens, 1 to 63 characters (RFC 1123). Underscores are left out:
# they are not valid in host names, and a host that needs one is not an HTTP API host.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_HOST_CHARS = 253
HOST_FORMS = ("`HOST` (exactly that host, default ports), `HOST:PORT` (that host on that port) or `*.DOMAIN` "
              "(any subdomain of DOMAIN, not DOMAIN itself), optionally with `:PORT`; HOST is a DNS name or "
              "an IP literal (`[…]` for IPv6)")


@dataclass(frozen=True)
class HostPattern:
    """One parsed host pattern: `host` is the exact host (lower case, ASCII) or, when `wildcard`, the domain
    whose subdomains match; `port` None means the scheme's default port."""

    host: str
    wildcard: bool = False
    port: int | None = None

    def matches(self, host: str, port: int, scheme: str) -> bool:
        """Whether a request to `scheme://host:port` is within this pattern (`host` already normalized by
        `normalize_host`)."""
        if (port != self.port) if self.port is not None else (port != DEFAULT_PORTS.get(scheme)):
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        host = f"*.{self.host}" if self.wildcard else (f"[{self.host}]" if ":" in self.host else self.host)
        return host if self.port is None else f"{host}:{self.port}"


class PatternError(ValueError):
    """A host pattern that cannot be used; the message says why and what is accepted."""


def normalize_host(host: str) -> str:
    """`host` as patterns are compared: lower case, no trailing dot, no IPv6 brackets, ASCII (IDNA) form;
    an IP literal in its canonical text. Raises PatternError when it is not a host name or IP literal."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise PatternError(f"{host!r} is not an IPv6 address") from None
    if ":" in text:
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise PatternError(f"{host!r} is not a host name") from None
    text = text.lower().removesuffix(".")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise PatternError(f"{host!r} is not a valid internationalized host name") from None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if not text or len(text) > MAX_HOST_CHARS:
        raise PatternError(f"{host!r} is not a host name (1 to {MAX_HOST_CHARS} characters)")
    bad = next((label for label in text.split(".") if not _LABEL.fullmatch(label)), None)
    if bad is not None:
        raise PatternError(f"{host!r} is not a host name: label {bad!r} is not 1 to 63 letters, digits or "
                           "inner hyphens")
    if text.rsplit(".", 1)[-1].isdigit():
        # `1.2.3` or `010.0.0.1`: resolvers read these as IPv4 addresses in odd notations; never a name.
        raise PatternError(f"{host!r} is neither a host name nor an IPv4 address in dotted-quad form")
    return text


def parse_pattern(text: str) -> HostPattern:
    """One host pattern (`api.example.com`, `api.example.com:8443`, `*.example.com`, `[::1]:8080`).
    Raises PatternError saying what is wrong and what is accepted."""
    raw = text.strip()
    if not raw:
        raise PatternError(f"an empty host; a host pattern is {HOST_FORMS}")
    if any(c in raw for c in "/?#@ \t") or "://" in raw:
        raise PatternError(f"{text!r} is not a host: write the host only, without scheme, path or "
                           f"credentials (`api.example.com`, not `https://api.example.com/v1`); a host pattern "
                           f"is {HOST_FORMS}")
    host, port = raw, None
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise PatternError(f"{text!r} opens `[` without closing it; a host pattern is {HOST_FORMS}")
        host, rest = raw[:close + 1], raw[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise PatternError(f"{text!r} has {rest!r} after the IPv6 address; a host pattern is {HOST_FORMS}")
            port = _parse_port(text, rest[1:])
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        port = _parse_port(text, port_text)
    elif raw.count(":") > 1:
        raise PatternError(f"{text!r}: write an IPv6 address in brackets (`[2001:db8::1]:443`); a host pattern "
                           f"is {HOST_FORMS}")
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise PatternError(f"{text!r}: `*` is only accepted as the whole first label (`*.example.com`); a host "
                           f"pattern is {HOST_FORMS}")
    try:
        normal = normalize_host(host)
    except PatternError as exc:
        raise PatternError(f"{exc}; a host pattern is {HOST_FORMS}") from None
    if wildcard:
        if is_ip_literal(normal):
            raise PatternError(f"{text!r}: a wildcard needs a domain name, not an IP address")
        if "." not in normal:
            raise PatternError(f"{text!r} is too broad: a wildcard needs a domain of at least two labels "
                               "(`*.example.com`, not `*.com`)")
    return HostPattern(normal, wildcard, port)


def _parse_port(text: str, port_text: str) -> int:
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise PatternError(f"{text!r} has port {port_text!r}; a port is a number from 1 to 65535")
    return int(port_text)


def is_ip_literal(host: str) -> bool:
    """Whether `host` is an IP address (v4 or v6) rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def http_capability_problem(capability: str) -> str | None:
    """Why an `http:` capability is malformed, naming it and the accepted forms; None when it is fine."""
    shown = repr(capability[:120]) + ("…" if len(capability) > 120 else "")
    try:
        parse_pattern(capability[len(HTTP_CAPABILITY_PREFIX):])
    except PatternError as exc:
        return f"{shown} is not a valid `http:` capability: {exc}"
    return None


def http_patterns(capabilities: Iterable[str]) -> tuple[HostPattern, ...]:
    """The host patterns of the `http:` capabilities among `capabilities` (malformed ones are left out:
    publish refuses them, so a deployed skill has none)."""
    patterns = []
    for capability in capabilities:
        if capability.startswith(HTTP_CAPABILITY_PREFIX):
            try:
                patterns.append(parse_pattern(capability[len(HTTP_CAPABILITY_PREFIX):]))
            except PatternError:
                continue
    return tuple(patterns)


def parse_allow_list(items: Sequence[str], *, source: str) -> tuple[HostPattern, ...]:
    """The operator's host patterns (`CLAWHUB_HTTP_ALLOW`, `http:` prefixes tolerated); a bad one is a
    ValueError naming `source` and the pattern."""
    patterns = []
    for item in items:
        try:
            patterns.append(parse_pattern(item.removeprefix(HTTP_CAPABILITY_PREFIX)))
        except PatternError as exc:
            raise ValueError(f"{source}: {exc}") from None
    return tuple(patterns)
