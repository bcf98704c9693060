"""Outbound HTTP for skills: the client behind the sandbox's HTTP host function (docs/skills/http.md).

A skill reaches only the hosts its `http:` capabilities name (services/runtime/httpcap.py), further narrowed
by the operator's `CLAWHUB_HTTP_ALLOW`. `OutboundHttp.request` is synchronous: the sandbox calls it on the
executor's worker thread that runs the skill, while the guest is paused in the host function, so the guest
is not running and wasmtime's epoch deadline cannot fire; the client therefore enforces the call's deadline
itself, on every network operation (resolution, connect, TLS handshake, each send and each receive).

SSRF rules, the reason this is not a plain `urllib`/`http.client` call:

- the name is resolved once per request (through an injectable resolver), every resolved address is
  checked, and the connection goes to a checked address: a second resolution (DNS rebinding) cannot move
  the request elsewhere. The request keeps the name in its Host header, and TLS sends the name as SNI and
  verifies the certificate against it;
- private, loopback, link-local, multicast, unspecified and other non-global addresses (IPv4 and IPv6,
  including IPv4 addresses embedded in IPv6: mapped, compatible, 6to4, NAT64) are refused unless the
  operator sets `CLAWHUB_HTTP_ALLOW_PRIVATE=1`; one such address among a name's addresses refuses the name;
- redirects are followed (at most `max_redirects`) only to hosts the same rules allow, each hop re-resolved
  and re-checked; credentials (`Authorization`, `Cookie`, `Proxy-Authorization`) are dropped when a
  redirect leaves the origin;
- the skill cannot set `Host` to anything but the URL's host (no virtual-host confusion on a shared
  address), nor use `CONNECT` (a tunnel through an allowed proxy to anywhere).

Connections are pooled per (scheme, host, port, address): the key includes the host name, so a TLS
connection verified for one name never serves another name on the same address. A pooled connection that
the server closed while idle is detected before reuse (or, if it closes as the request goes out, the request
is retried once on a fresh connection).

Every refusal is an `HttpRefused` carrying an `ErrorInfo` reason (`Reason.HTTP_*`) and the gRPC status the
call would fail with (`HttpRefused.code`).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import grpc

from services.runtime.errors import Reason
from services.runtime.httpcap import (
    DEFAULT_PORTS,
    HTTP_CAPABILITY_PREFIX,
    HostPattern,
    PatternError,
    http_capability_problem,
    http_patterns,
    normalize_host,
    parse_allow_list,
    parse_pattern,
)
from services.runtime.httpcap import (
    is_ip_literal as _is_ip,
)
from services.runtime.settings import SettingsError, env_float, env_int, env_list, env_size, env_str

__all__ = [
    "HTTP_CAPABILITY_PREFIX", "HostPattern", "HttpRefused", "HttpResponse", "HttpSettings", "HttpUsage",
    "OutboundHttp", "Resolver", "address_problem", "http_capability_problem", "http_patterns",
    "parse_pattern", "system_resolver",
]

KiB = 1024
MiB = 1024 * KiB

# Resolves a host name (never an IP literal) for a port to its addresses, in the order to try them.
Resolver = Callable[[str, int], Sequence[str]]

# Threads that resolve names (getaddrinfo has no timeout), and lookups that may wait for them at once.
DNS_THREADS = 4
MAX_LOOKUPS = 32
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Request headers the client owns: framing and connection management are its business, not the skill's.
DROPPED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "te",
                             "upgrade", "proxy-connection"})
# Dropped on a redirect that leaves the origin (scheme, host, port), as browsers and curl do.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
MAX_REQUEST_HEADER_BYTES = 64 * KiB
# Response headers the skill may be handed (http.client itself stops at 100 lines of 64 KiB each).
MAX_RESPONSE_HEADER_BYTES = 64 * KiB
MAX_URL_CHARS = 8 * KiB
# Methods that may be sent again when a pooled connection turns out dead after the request went out.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
READ_CHUNK = 64 * KiB


@dataclass(frozen=True)
class HttpSettings:
    """Limits and policy of outbound HTTP, from `CLAWHUB_HTTP_*` environment variables."""

    allow: tuple[HostPattern, ...] = ()
    """CLAWHUB_HTTP_ALLOW: comma-separated host patterns (`api.example.com`, `api.example.com:8443`,
    `*.example.com`); when set, a skill reaches only hosts that both its capabilities and one of these allow.
    Empty: no narrowing."""
    allow_private: bool = False
    """CLAWHUB_HTTP_ALLOW_PRIVATE=1: allow private, loopback, link-local… addresses (tests, local setups)."""
    max_request_bytes: int = 1 * MiB
    """CLAWHUB_HTTP_MAX_REQUEST_BYTES: largest request body; more is HTTP_REQUEST_TOO_LARGE."""
    max_response_bytes: int = 4 * MiB
    """CLAWHUB_HTTP_MAX_RESPONSE_BYTES: largest response body; reading stops there: HTTP_RESPONSE_TOO_LARGE."""
    max_requests: int = 16
    """CLAWHUB_HTTP_MAX_REQUESTS: requests one skill call may make (each redirect hop counts);
    more is HTTP_TOO_MANY_REQUESTS."""
    max_redirects: int = 5
    """CLAWHUB_HTTP_MAX_REDIRECTS: redirects followed per request; more is HTTP_TOO_MANY_REDIRECTS."""
    timeout: float = 10.0
    """CLAWHUB_HTTP_TIMEOUT: seconds one request (with its redirects) may take, within the call's deadline;
    beyond either is HTTP_TIMEOUT."""
    pool_per_host: int = 4
    """CLAWHUB_HTTP_POOL_PER_HOST: idle connections kept per (scheme, host, port, address)."""
    pool_total: int = 64
    """CLAWHUB_HTTP_POOL_TOTAL: idle connections kept in all."""
    pool_idle_seconds: float = 30.0
    """CLAWHUB_HTTP_POOL_IDLE: seconds an idle connection is kept for reuse."""
    ca_file: str = ""
    """CLAWHUB_HTTP_CA_FILE: PEM file of extra trusted certificate authorities (a corporate CA); empty: the
    system's trust store only."""

    @classmethod
    def from_env(cls) -> HttpSettings:
        d = cls()
        private = env_str("CLAWHUB_HTTP_ALLOW_PRIVATE", "0").lower()
        if private not in {"0", "1", "false", "true", "no", "yes", "off", "on"}:
            raise SettingsError(f"CLAWHUB_HTTP_ALLOW_PRIVATE={private!r} is not 1 or 0")
        try:
            allow = parse_allow_list(env_list("CLAWHUB_HTTP_ALLOW"), source="CLAWHUB_HTTP_ALLOW")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return cls(
            allow=allow,
            allow_private=private in {"1", "true", "yes", "on"},
            max_request_bytes=env_size("CLAWHUB_HTTP_MAX_REQUEST_BYTES", str(d.max_request_bytes)),
            max_response_bytes=env_size("CLAWHUB_HTTP_MAX_RESPONSE_BYTES", str(d.max_response_bytes)),
            max_requests=env_int("CLAWHUB_HTTP_MAX_REQUESTS", d.max_requests, minimum=0),
            max_redirects=env_int("CLAWHUB_HTTP_MAX_REDIRECTS", d.max_redirects, minimum=0),
            timeout=env_float("CLAWHUB_HTTP_TIMEOUT", d.timeout, minimum=0.001),
            pool_per_host=env_int("CLAWHUB_HTTP_POOL_PER_HOST", d.pool_per_host, minimum=0),
            pool_total=env_int("CLAWHUB_HTTP_POOL_TOTAL", d.pool_total, minimum=0),
            pool_idle_seconds=env_float("CLAWHUB_HTTP_POOL_IDLE", d.pool_idle_seconds, minimum=0),
            ca_file=env_str("CLAWHUB_HTTP_CA_FILE", d.ca_file),
        )


@dataclass
class HttpUsage:
    """What one skill call did over HTTP; the caller makes one per call and passes it to every request.
    Bytes are HTTP bytes (request line, headers, bodies) before TLS, as sent and as received."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class HttpResponse:
    """A response the skill gets: `headers` in the order received (a name may repeat: `Set-Cookie`), `url`
    the one that answered (after redirects)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    url: str = ""


# The status a call fails with when a refusal ends it. Pairs written (reason, code) so that they read as
# such (docs/errors.md lists them).
_CODES: dict[str, grpc.StatusCode] = dict([
    (Reason.HTTP_HOST_NOT_ALLOWED, grpc.StatusCode.PERMISSION_DENIED),
    (Reason.HTTP_SCHEME_NOT_ALLOWED, grpc.StatusCode.PERMISSION_DENIED),
    (Reason.HTTP_PRIVATE_ADDRESS, grpc.StatusCode.PERMISSION_DENIED),
    (Reason.HTTP_REDIRECT_NOT_ALLOWED, grpc.StatusCode.PERMISSION_DENIED),
    (Reason.HTTP_INVALID_REQUEST, grpc.StatusCode.FAILED_PRECONDITION),
    (Reason.HTTP_DNS_FAILED, grpc.StatusCode.UNAVAILABLE),
    (Reason.HTTP_CONNECTION_FAILED, grpc.StatusCode.UNAVAILABLE),
    (Reason.HTTP_TLS_FAILED, grpc.StatusCode.UNAVAILABLE),
    (Reason.HTTP_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Reason.HTTP_REQUEST_TOO_LARGE, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Reason.HTTP_RESPONSE_TOO_LARGE, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Reason.HTTP_TOO_MANY_REQUESTS, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Reason.HTTP_TOO_MANY_REDIRECTS, grpc.StatusCode.RESOURCE_EXHAUSTED),
])


class HttpRefused(Exception):
    """A request the client did not make or could not complete: `reason` (a `Reason.HTTP_*`), a message
    that names the host or limit, and `code`, the gRPC status a call that fails because of it gets."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.reason, grpc.StatusCode.UNAVAILABLE)

    def __repr__(self) -> str:
        return f"HttpRefused({self.reason!s}, {self.message!r})"


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, if it is one of the forms that reach it: mapped
    (::ffff:a.b.c.d), compatible (::a.b.c.d, deprecated), 6to4 (2002:…), NAT64 (64:ff9b::a.b.c.d)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    value = int(address)
    if value >> 32 == 0 and value > 1:  # ::a.b.c.d (:: and ::1 are themselves).
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if address in _NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def address_problem(text: str) -> str | None:
    """What makes an address unfit for a skill to reach (`loopback`, `private`, `link-local`…); None when
    it is a global unicast address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_v4(address)
        if inner is not None:
            problem = address_problem(str(inner))
            if problem is not None:
                return f"{problem} (IPv4 {inner} inside IPv6)"
            if address.ipv4_mapped is not None:
                return None  # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket, and that one is fit
    for kind, test in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                       ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                       ("private", address.is_private), ("reserved", address.is_reserved)):
        if test:
            return kind
    if not address.is_global:
        return "not globally routable"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host` from the system resolver (getaddrinfo), in its order, without duplicates."""
    seen: dict[str, None] = {}
    for _family, _type, _proto, _name, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                       proto=socket.IPPROTO_TCP):
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


@dataclass(frozen=True)
class _Key:
    scheme: str
    host: str
    port: int
    address: str


class _DeadlineSocket:
    """A connected socket whose every send and receive is bounded by `deadline` (time.monotonic), which the
    client moves per request, and counted into `usage`. http.client reads responses through `makefile`,
    whose buffered reader may call recv several times per read: each call gets only the time left."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = 0.0
        self.usage: HttpUsage | None = None
        # Like socket.makefile's references: http.client closes the connection's socket while a response it
        # handed over (`will_close`) still reads the body; the real close waits for the reader.
        self._readers = 0
        self._closing = False

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        self.sock.settimeout(left)

    def sendall(self, data: Any) -> None:
        self._arm()
        self.sock.sendall(data)
        if self.usage is not None:
            self.usage.bytes_sent += len(data)

    def recv_into(self, buffer: Any) -> int:
        self._arm()
        n = self.sock.recv_into(buffer)
        if self.usage is not None:
            self.usage.bytes_received += n
        return n

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        self._closing = True
        if self._readers == 0:
            self.sock.close()

    def release(self) -> None:
        """A reader from `makefile` was closed."""
        self._readers -= 1
        if self._closing and self._readers == 0:
            self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.release()
        super().close()


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 connection to one checked address, made by the client (not by http.client, which would
    resolve the name again)."""

    def __init__(self, key: _Key, sock: _DeadlineSocket) -> None:
        super().__init__(key.address, key.port)
        self.key = key
        self.sock: Any = sock
        self.idle_since = 0.0
        self.reused = False
        self.sent = False  # the whole request went out (so a dead connection may have processed it)

    def connect(self) -> None:
        # http.client reconnects by itself when sock is None; a closed pooled connection must never do that.
        raise http.client.NotConnected("outbound connections are made by OutboundHttp only")

    @property
    def deadline_socket(self) -> _DeadlineSocket | None:
        return self.sock if isinstance(self.sock, _DeadlineSocket) else None


class _Pool:
    """Idle connections by key, newest last; bounded per key and in all, expired after `idle_seconds`."""

    def __init__(self, per_key: int, total: int, idle_seconds: float) -> None:
        self._idle: dict[_Key, deque[_Connection]] = {}
        self._count = 0
        self._per_key, self._total, self._idle_seconds = per_key, total, idle_seconds
        self._lock = threading.Lock()

    def take(self, key: _Key) -> _Connection | None:
        """A live idle connection for `key`, or None; stale ones met on the way are closed."""
        now = time.monotonic()
        while True:
            with self._lock:
                queue = self._idle.get(key)
                if not queue:
                    return None
                conn = queue.pop()
                self._count -= 1
                if not queue:
                    del self._idle[key]
            if now - conn.idle_since <= self._idle_seconds and _still_open(conn):
                conn.reused = True
                return conn
            conn.close()

    def give(self, conn: _Connection) -> None:
        if self._per_key == 0 or self._total == 0:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        evicted: list[_Connection] = []
        with self._lock:
            queue = self._idle.setdefault(conn.key, deque())
            queue.append(conn)
            self._count += 1
            if len(queue) > self._per_key:
                evicted.append(queue.popleft())
                self._count -= 1
            while self._count > self._total:
                oldest = min(self._idle, key=lambda k: self._idle[k][0].idle_since)
                evicted.append(self._idle[oldest].popleft())
                self._count -= 1
                if not self._idle[oldest]:
                    del self._idle[oldest]
        for old in evicted:
            old.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for q in self._idle.values() for c in q]
            self._idle.clear()
            self._count = 0
        for conn in conns:
            conn.close()

    def idle(self) -> int:
        with self._lock:
            return self._count


def _still_open(conn: _Connection) -> bool:
    """Whether an idle keep-alive connection can take a request: nothing is waiting to be read on it (an idle
    connection that is readable was closed by the server, or sent something unasked)."""
    wrapped = conn.deadline_socket
    if wrapped is None:
        return False
    sock = wrapped.sock
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        if isinstance(sock, ssl.SSLSocket):
            # TLS 1.3 session tickets can arrive after the last response: read past them without blocking.
            sock.setblocking(False)
            try:
                sock.recv(1)  # data or end of stream: either way not a connection to send a request on
                return False
            except ssl.SSLWantReadError:
                return True
            finally:
                sock.setblocking(True)
        return False
    except (OSError, ValueError):
        return False


class OutboundHttp:
    """The executor's outbound HTTP client; one per executor, shared by its worker threads."""

    def __init__(self, settings: HttpSettings | None = None, *, resolver: Resolver | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """`resolver` and `ssl_context` are for tests (a fake DNS, a self-signed CA) and embedding; the
        defaults are the system resolver and trust store (plus `settings.ca_file`)."""
        self.settings = settings if settings is not None else HttpSettings.from_env()
        self._resolver = resolver if resolver is not None else system_resolver
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
            if self.settings.ca_file:
                ssl_context.load_verify_locations(cafile=self.settings.ca_file)
        self._ssl = ssl_context
        self._pool = _Pool(self.settings.pool_per_host, self.settings.pool_total, self.settings.pool_idle_seconds)
        # getaddrinfo has no timeout: it runs here so that a hung resolver costs a pool thread, not the
        # call's deadline. A few threads: resolutions are short, and a hung one is bounded by the system's.
        self._dns = ThreadPoolExecutor(max_workers=DNS_THREADS, thread_name_prefix="clawhub-http-dns")
        # Lookups submitted and not finished (queued or running), bounded by MAX_LOOKUPS.
        self._lookups = 0
        self._lookups_lock = threading.Lock()
        self._patterns: dict[tuple[str, ...], tuple[HostPattern, ...]] = {}

    def close(self) -> None:
        """Close the idle connections and stop the resolver threads (the executor's shutdown)."""
        self._pool.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    def idle_connections(self) -> int:
        return self._pool.idle()

    def request(self, allowed: Sequence[str], method: str, url: str,
                headers: Iterable[tuple[str, str]] = (), body: bytes = b"", *, deadline: float | None = None,
                counters: HttpUsage | None = None, follow_redirects: bool = True) -> HttpResponse:
        """Make one HTTP request for a skill whose capabilities are `allowed` (its whole capability list, or
        just its `http:` ones; other capabilities are ignored), before `deadline` (time.monotonic; the
        call's), counting into `counters` (the call's usage; also where the per-call request limit is
        kept). Follows redirects to allowed hosts unless `follow_redirects` is false (then a 3xx is
        returned as is). Raises HttpRefused."""
        usage = counters if counters is not None else HttpUsage()
        patterns = self._skill_patterns(allowed)
        method = self._check_method(method)
        pairs = self._check_headers(headers)
        body = bytes(body)
        if len(body) > self.settings.max_request_bytes:
            raise HttpRefused(Reason.HTTP_REQUEST_TOO_LARGE,
                              f"the request body is {len(body)} bytes, over the limit of "
                              f"{self.settings.max_request_bytes} bytes")
        started = time.monotonic()
        own_end = started + self.settings.timeout
        end = own_end if deadline is None else min(deadline, own_end)
        why_end = (f"the request timeout of {self.settings.timeout:g} s" if deadline is None or own_end <= deadline
                   else "the call's deadline")
        current = url
        for hop in range(self.settings.max_redirects + 2):
            target = self._target(current, patterns, redirected=hop > 0, origin=url)
            if hop == 0:
                pairs = _check_host_header(pairs, target)
            if usage.requests >= self.settings.max_requests:
                raise HttpRefused(Reason.HTTP_TOO_MANY_REQUESTS,
                                  f"a call may make at most {self.settings.max_requests} HTTP requests "
                                  f"(redirects included); refused {method} {_show_url(current)}")
            addresses = self._resolve(target, end, why_end)
            response = self._exchange(target, addresses, method, pairs, body, end, why_end, usage)
            location = dict((k.lower(), v) for k, v in response.headers).get("location")
            if not follow_redirects or response.status not in REDIRECT_STATUSES or location is None:
                return response
            if hop >= self.settings.max_redirects:
                raise HttpRefused(Reason.HTTP_TOO_MANY_REDIRECTS,
                                  f"{_show_url(url)} redirected more than {self.settings.max_redirects} times "
                                  f"(last to {_show_url(urljoin(current, location))})")
            following = urljoin(current, location.strip())
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = ("HEAD" if method == "HEAD" else "GET"), b""
                pairs = [(k, v) for k, v in pairs if k.lower() not in {"content-type", "content-encoding"}]
            if _origin(following) != _origin(current):
                pairs = [(k, v) for k, v in pairs if k.lower() not in CREDENTIAL_HEADERS]
            current = following
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    # Checks before any network use.

    def _skill_patterns(self, allowed: Sequence[str]) -> tuple[HostPattern, ...]:
        key = tuple(allowed)
        patterns = self._patterns.get(key)
        if patterns is None:
            patterns = http_patterns(key)
            if len(self._patterns) < 4096:
                self._patterns[key] = patterns
        return patterns

    @staticmethod
    def _check_method(method: str) -> str:
        if not isinstance(method, str) or not _TOKEN.fullmatch(method) or len(method) > 32:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST, f"{method!r} is not an HTTP method")
        method = method.upper()
        if method == "CONNECT":
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST, "CONNECT (a tunnel) is not allowed")
        return method

    @staticmethod
    def _check_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        size = 0
        for name, value in headers:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise HttpRefused(Reason.HTTP_INVALID_REQUEST, f"header name {name!r} is not an HTTP token")
            if not isinstance(value, str) or _BAD_VALUE.search(value):
                raise HttpRefused(Reason.HTTP_INVALID_REQUEST,
                                  f"the value of header {name!r} contains a line break or NUL")
            size += len(name) + len(value) + 4
            if size > MAX_REQUEST_HEADER_BYTES:
                raise HttpRefused(Reason.HTTP_REQUEST_TOO_LARGE,
                                  f"the request headers are over {MAX_REQUEST_HEADER_BYTES} bytes")
            if name.lower() not in DROPPED_HEADERS:
                pairs.append((name, value.strip()))
        return pairs

    def _target(self, url: str, patterns: tuple[HostPattern, ...], *, redirected: bool,
                origin: str) -> _Target:
        """The parsed, allowed target of `url`; refusals say whether it came from a redirect."""
        where = f" (redirected from {_show_url(origin)})" if redirected else ""
        if len(url) > MAX_URL_CHARS:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST,
                              f"{_show_url(url)}{where} is {len(url)} characters long, over {MAX_URL_CHARS}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST, f"{_show_url(url)} is not a URL: {exc}{where}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise HttpRefused(Reason.HTTP_SCHEME_NOT_ALLOWED,
                              f"{_show_url(url)}{where}: only http and https URLs are allowed"
                              + (f", not {scheme}" if scheme else ""))
        if parts.username is not None or parts.password is not None:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST,
                              f"{_show_url(url)}{where} has credentials in the URL; send them in a header")
        if not parts.hostname:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST, f"{_show_url(url)}{where} has no host")
        try:
            host = normalize_host(parts.hostname)
        except PatternError as exc:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST, f"{_show_url(url)}{where}: {exc}") from None
        port = port if port is not None else DEFAULT_PORTS[scheme]
        if port == 0:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST, f"{_show_url(url)}{where} has port 0")
        shown = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        if not any(p.matches(host, port, scheme) for p in patterns):
            reason = Reason.HTTP_REDIRECT_NOT_ALLOWED if redirected else Reason.HTTP_HOST_NOT_ALLOWED
            declared = ", ".join(f"http:{p}" for p in patterns) or "none"
            raise HttpRefused(reason, f"{scheme}://{shown}{where} is not allowed: no `http:` capability of the "
                                      f"skill covers it (declared: {declared})")
        if self.settings.allow and not any(p.matches(host, port, scheme) for p in self.settings.allow):
            reason = Reason.HTTP_REDIRECT_NOT_ALLOWED if redirected else Reason.HTTP_HOST_NOT_ALLOWED
            raise HttpRefused(reason, f"{scheme}://{shown}{where} is not allowed by this executor's operator "
                                      f"(CLAWHUB_HTTP_ALLOW)")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if any(ord(c) <= 32 or ord(c) == 127 for c in path) or not path.isascii():
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST,
                              f"{_show_url(url)}{where}: the path has spaces, control or non-ASCII characters; "
                              "percent-encode them")
        default = port == DEFAULT_PORTS[scheme]
        host_header = (f"[{host}]" if ":" in host else host) + ("" if default else f":{port}")
        return _Target(scheme, host, port, path, host_header, f"{scheme}://{host_header}{path}")

    # Network.

    def _lookup_done(self, _: object) -> None:
        with self._lookups_lock:
            self._lookups -= 1

    def _resolve(self, target: _Target, end: float, why_end: str) -> list[str]:
        """The checked addresses to try for `target`: resolved once; one unfit address refuses the host."""
        if _is_ip(target.host):
            addresses = [target.host]
        else:
            left = end - time.monotonic()
            if left <= 0:
                raise _timeout(target, why_end, "before resolving its name") from None
            with self._lookups_lock:
                if self._lookups >= MAX_LOOKUPS:
                    # Slow names (a hostile skill's) must not hold every other skill's lookups behind them.
                    raise HttpRefused(Reason.HTTP_DNS_FAILED, f"cannot resolve {target.host} now: {MAX_LOOKUPS} "
                                                              "name lookups are already waiting; try again later")
                self._lookups += 1
            future = self._dns.submit(self._resolver, target.host, target.port)
            future.add_done_callback(self._lookup_done)  # also when cancelled
            try:
                addresses = list(future.result(timeout=left))
            except FutureTimeout:
                future.cancel()  # still queued: it never runs (a running one ends by itself)
                raise _timeout(target, why_end, "resolving its name") from None
            except FutureCancelled:
                # close() cancels queued lookups: the executor is shutting down.
                raise HttpRefused(Reason.HTTP_DNS_FAILED, f"cannot resolve {target.host}: the executor is "
                                                          "shutting down") from None
            except (OSError, UnicodeError) as exc:
                raise HttpRefused(Reason.HTTP_DNS_FAILED,
                                  f"cannot resolve {target.host}: {exc.strerror or exc}"
                                  if isinstance(exc, OSError) else f"cannot resolve {target.host}: {exc}") from None
            if not addresses:
                raise HttpRefused(Reason.HTTP_DNS_FAILED, f"{target.host} has no address")
        if not self.settings.allow_private:
            for address in addresses:
                problem = address_problem(address)
                if problem is not None:
                    via = "" if address == target.host else f" resolves to {address}, which"
                    raise HttpRefused(Reason.HTTP_PRIVATE_ADDRESS,
                                      f"{target.host}{via} is a {problem} address; skills may reach only "
                                      "public addresses (the operator can allow others with "
                                      "CLAWHUB_HTTP_ALLOW_PRIVATE=1)")
        return addresses

    def _exchange(self, target: _Target, addresses: list[str], method: str, headers: list[tuple[str, str]],
                  body: bytes, end: float, why_end: str, usage: HttpUsage) -> HttpResponse:
        """Send the request on a pooled or new connection to one of `addresses` and read the response."""
        usage.requests += 1
        for attempt in range(2):
            conn = self._connection(target, addresses, end, why_end)
            sock = conn.deadline_socket
            assert sock is not None
            sock.deadline, sock.usage = end, usage
            try:
                return self._send_and_read(conn, target, method, headers, body)
            except HttpRefused:
                conn.close()
                raise
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError) as exc:
                conn.close()
                # The server closed a pooled connection as the request went out: once more on a new one, unless
                # the server may have acted on a request that is not safe to repeat.
                if conn.reused and attempt == 0 and (not conn.sent or method in IDEMPOTENT_METHODS):
                    continue
                raise HttpRefused(Reason.HTTP_CONNECTION_FAILED,
                                  f"{target.url}: the server closed the connection ({_describe(exc)})") from None
            except TimeoutError:
                conn.close()
                raise _timeout(target, why_end, "waiting for the server") from None
            except ssl.SSLError as exc:
                conn.close()
                raise HttpRefused(Reason.HTTP_TLS_FAILED, f"{target.url}: TLS failed ({_describe(exc)})") from None
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                raise HttpRefused(Reason.HTTP_CONNECTION_FAILED,
                                  f"{target.url}: {_describe(exc)}") from None
            finally:
                sock.usage = None
        raise AssertionError("unreachable")  # pragma: no cover

    def _send_and_read(self, conn: _Connection, target: _Target, method: str,
                       headers: list[tuple[str, str]], body: bytes) -> HttpResponse:
        conn.putrequest(method, target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        for name, value in headers:
            conn.putheader(name, value)
        if body or method in {"POST", "PUT", "PATCH"}:
            conn.putheader("Content-Length", str(len(body)))
        conn.sent = False
        conn.endheaders(body or None)
        conn.sent = True
        response = conn.getresponse()
        try:
            return self._read(conn, response, target)
        except BaseException:
            # A response http.client handed over (`will_close`) is not closed with the connection.
            response.close()
            raise

    def _read(self, conn: _Connection, response: http.client.HTTPResponse, target: _Target) -> HttpResponse:
        """The response's body, up to the limit; the connection goes back to the pool when it can."""
        header_bytes = sum(len(k) + len(v) + 4 for k, v in response.getheaders())
        if header_bytes > MAX_RESPONSE_HEADER_BYTES:
            raise HttpRefused(Reason.HTTP_RESPONSE_TOO_LARGE,
                              f"{target.url} answered with {header_bytes} bytes of headers, over the limit of "
                              f"{MAX_RESPONSE_HEADER_BYTES} bytes")
        limit = self.settings.max_response_bytes
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise HttpRefused(Reason.HTTP_RESPONSE_TOO_LARGE,
                              f"{target.url} answered with a {int(declared)}-byte body, over the limit of "
                              f"{limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read(min(READ_CHUNK, limit - size + 1))
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise HttpRefused(Reason.HTTP_RESPONSE_TOO_LARGE,
                                  f"{target.url} sent more than the limit of {limit} bytes of response body "
                                  "(reading stopped there)")
            chunks.append(chunk)
        result = HttpResponse(response.status, [(k, v) for k, v in response.getheaders()], b"".join(chunks),
                              target.url)
        if conn.sock is not None and not response.will_close:
            self._pool.give(conn)
        else:
            conn.close()
        return result

    def _connection(self, target: _Target, addresses: list[str], end: float, why_end: str) -> _Connection:
        """A pooled connection to one of `addresses` for this target, or a new one to the first that
        accepts. Only the checked addresses are ever connected to."""
        for address in addresses:
            conn = self._pool.take(_Key(target.scheme, target.host, target.port, address))
            if conn is not None:
                return conn
        failures = []
        for address in addresses:
            left = end - time.monotonic()
            if left <= 0:
                raise _timeout(target, why_end, "connecting")
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            raw = socket.socket(family, socket.SOCK_STREAM)
            try:
                raw.settimeout(left)
                raw.connect((address, target.port))
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except TimeoutError:
                raw.close()
                raise _timeout(target, why_end, f"connecting to {address}") from None
            except OSError as exc:
                raw.close()
                failures.append(f"{address}: {_describe(exc)}")
                continue
            sock: socket.socket = raw
            if target.scheme == "https":
                try:
                    raw.settimeout(max(end - time.monotonic(), 0.001))
                    # SNI and certificate verification against the name, on the checked address.
                    sock = self._ssl.wrap_socket(raw, server_hostname=target.host)
                except TimeoutError:
                    raw.close()
                    raise _timeout(target, why_end, "in the TLS handshake") from None
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raw.close()
                    raise HttpRefused(Reason.HTTP_TLS_FAILED,
                                      f"{target.url}: TLS with {target.host} failed ({_describe(exc)})") from None
                except OSError as exc:
                    raw.close()
                    failures.append(f"{address}: {_describe(exc)}")
                    continue
            return _Connection(_Key(target.scheme, target.host, target.port, address), _DeadlineSocket(sock))
        raise HttpRefused(Reason.HTTP_CONNECTION_FAILED,
                          f"cannot connect to {target.host} port {target.port}: {'; '.join(failures)}")


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str
    host_header: str
    url: str = field(repr=False)


def _check_host_header(pairs: list[tuple[str, str]], target: _Target) -> list[tuple[str, str]]:
    """`pairs` without Host headers, which may only repeat the URL's host (the client sends its own)."""
    for name, value in pairs:
        if name.lower() == "host" and value.lower() not in {target.host_header.lower(), target.host.lower()}:
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST,
                              f"the Host header {value!r} is not the URL's host {target.host_header!r}")
    return [(k, v) for k, v in pairs if k.lower() != "host"]


def _timeout(target: _Target, why_end: str, doing: str) -> HttpRefused:
    return HttpRefused(Reason.HTTP_TIMEOUT, f"{target.url}: {why_end} passed {doing}")


def _origin(url: str) -> tuple[str, str, int | None]:
    try:
        parts = urlsplit(url)
        return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return ("", url, None)


def _show_url(url: str, limit: int = 200) -> str:
    """A URL for a message: on one line, cut after `limit` characters."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in url[:limit])
    return repr(text + ("…" if len(url) > limit else ""))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
