"""Outbound HTTP for skills (services/executor/outbound.py) against real HTTP and HTTPS servers on 127.0.0.1.

The servers are http.server in threads; HTTPS uses a CA and a server certificate made here with
`cryptography`. Names such as `api.test` reach them through an injected resolver (the client's DNS), which
is also how the DNS-rebinding case is staged. Reaching 127.0.0.1 needs `allow_private` (what
`CLAWHUB_HTTP_ALLOW_PRIVATE=1` sets); the refusal without it is tested too.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.executor.outbound import (
    HttpRefused,
    HttpSettings,
    HttpUsage,
    OutboundHttp,
    address_problem,
)
from services.runtime.errors import Reason
from services.runtime.httpcap import PatternError, http_patterns, parse_allow_list, parse_pattern
from services.runtime.settings import SettingsError
from services.runtime.wasm import capability_problem

# A real server.

@dataclass
class Seen:
    """What a test server saw: one entry per TCP connection, one per request, the TLS SNI names."""

    connections: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    closed_early: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that reuse can be seen
    seen: Seen

    def setup(self) -> None:
        super().setup()
        self.seen.connections += 1

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        pass

    def _route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.requests.append({"method": self.command, "path": url.path, "host": self.headers.get("Host"),
                                   "headers": dict(self.headers.items()), "body": body})
        if url.path == "/echo":
            out = json.dumps({"method": self.command, "path": self.path, "body": body.decode(),
                              "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
            self._send(int(query.get("status", "200")), out, [("X-Reply", "yes"), ("Set-Cookie", "a=1"),
                                                              ("Set-Cookie", "b=2")])
        elif url.path == "/redirect":
            self._send(int(query.get("code", "302")), b"moved", [("Location", query["to"])])
        elif url.path == "/big":
            self._send(200, b"x" * int(query["n"]))
        elif url.path == "/endless":
            # Chunked, no Content-Length, never ends: the client must stop reading at its limit.
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 16384
            try:
                for _ in range(100_000):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                self.seen.closed_early.set()
            self.close_connection = True
        elif url.path == "/slow":
            time.sleep(float(query["delay"]))
            self._send(200, b"late")
        elif url.path == "/drip":
            # Headers at once, then a byte every 50 ms: each read is quick, the whole is not.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                self.seen.closed_early.set()
            self.close_connection = True
        elif url.path == "/fat-headers":
            self._send(200, b"", [(f"X-Fat-{i}", "f" * 1000) for i in range(90)])
        elif url.path == "/close-after":
            # A keep-alive response (no `Connection: close`), then the server closes the connection anyway:
            # what a server's idle timeout does to a pooled connection.
            self._send(200, b"bye")
            self.close_connection = True
        else:
            self._send(404, b"no such path")

    def _send(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _route


@dataclass
class Server:
    port: int
    seen: Seen
    tls: bool

    def url(self, host: str, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate for `api.test` and `*.svc.test` (not `other.test`)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("api.test")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.test"), x509.DNSName("*.svc.test")]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("pki")
    files = Pki(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return files


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (the point of several tests) is no error worth a traceback."""


def _serve(tls_context: ssl.SSLContext | None) -> Iterator[Server]:
    seen = Seen()
    handler = type("BoundHandler", (Handler,), {"seen": seen})
    httpd = QuietServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    if tls_context is not None:
        tls_context.sni_callback = lambda sock, name, ctx: seen.sni.append(name)
        httpd.socket = tls_context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(httpd.server_address[1], seen, tls_context is not None)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve(None)


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    yield from _serve(context)


# The client under test.

NAMES = {"api.test": ["127.0.0.1"], "other.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"],
         "a.svc.test": ["127.0.0.1"], "deep.a.svc.test": ["127.0.0.1"], "svc.test": ["127.0.0.1"]}
LOCAL = HttpSettings(allow_private=True, timeout=5.0)


class FakeDns:
    """The client's resolver: names from a table (a name not in it does not exist), each lookup counted."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = dict(NAMES if table is None else table)
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


_CLIENTS: list[OutboundHttp] = []


def client(settings: HttpSettings = LOCAL, *, dns: FakeDns | None = None,
           ca_file: Path | None = None) -> OutboundHttp:
    """A client for one test (closed after it by `_close_clients`)."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    made = OutboundHttp(settings, resolver=dns if dns is not None else FakeDns(), ssl_context=context)
    _CLIENTS.append(made)
    return made


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


@pytest.fixture
def http() -> Iterator[OutboundHttp]:
    yield client()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def refused(reason: Reason, call: object) -> HttpRefused:
    """Run `call` (a zero-argument callable), expecting HttpRefused with `reason`."""
    assert callable(call)
    with pytest.raises(HttpRefused) as caught:
        call()
    assert caught.value.reason == reason, caught.value.message
    return caught.value


# Allowed requests.

def test_an_allowed_host_gets_method_headers_body_and_status_through(server: Server, http: OutboundHttp) -> None:
    usage = HttpUsage()
    response = http.request([f"http:api.test:{server.port}"], "PUT", server.url("api.test", "/echo?status=201"),
                            [("X-Token", "abc"), ("Content-Type", "text/plain")], b"hello",
                            deadline=soon(), counters=usage)
    assert response.status == 201
    echoed = json.loads(response.body)
    assert echoed["method"] == "PUT" and echoed["path"] == "/echo?status=201" and echoed["body"] == "hello"
    assert echoed["headers"]["x-token"] == "abc" and echoed["headers"]["content-type"] == "text/plain"
    # The name, not the address it was resolved to, is the Host.
    assert echoed["headers"]["host"] == f"api.test:{server.port}"
    assert ("X-Reply", "yes") in response.headers
    assert [v for k, v in response.headers if k == "Set-Cookie"] == ["a=1", "b=2"]
    assert response.url == server.url("api.test", "/echo?status=201")
    assert usage.requests == 1
    assert usage.bytes_sent > len(b"hello") and usage.bytes_received > len(response.body)


def test_other_capabilities_in_the_list_are_ignored_and_head_has_no_body(server: Server,
                                                                          http: OutboundHttp) -> None:
    response = http.request(["files", "env:KEY", "kv", f"http:api.test:{server.port}"], "head",
                            server.url("api.test", "/echo"), deadline=soon())
    assert response.status == 200 and response.body == b""
    assert server.seen.requests[-1]["method"] == "HEAD"


def test_https_verifies_the_name_and_sends_it_as_sni_while_connecting_to_the_resolved_address(
        tls_server: Server, pki: Pki) -> None:
    dns = FakeDns()
    c = client(dns=dns, ca_file=pki.ca_file)
    try:
        response = c.request([f"http:api.test:{tls_server.port}"], "POST", tls_server.url("api.test", "/echo"),
                             [], b"{}", deadline=soon())
        assert response.status == 200 and json.loads(response.body)["body"] == "{}"
        assert tls_server.seen.sni == ["api.test"]
        assert dns.lookups == ["api.test"]
        # A wildcard certificate name works for a subdomain the capability's wildcard allows.
        response = c.request([f"http:*.svc.test:{tls_server.port}"], "GET",
                             tls_server.url("a.svc.test", "/echo"), deadline=soon())
        assert response.status == 200
    finally:
        c.close()


# Refusals before any network use.

def test_a_host_no_capability_covers_is_refused_without_a_lookup(server: Server) -> None:
    dns = FakeDns()
    c = client(dns=dns)
    error = refused(Reason.HTTP_HOST_NOT_ALLOWED, lambda: c.request(
        [f"http:api.test:{server.port}"], "GET", server.url("other.test", "/echo"), deadline=soon()))
    assert f"other.test:{server.port}" in error.message and f"http:api.test:{server.port}" in error.message
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    # Same host, another port; default port when the capability names none; no capability at all.
    refused(Reason.HTTP_HOST_NOT_ALLOWED, lambda: c.request(
        [f"http:api.test:{server.port + 1}"], "GET", server.url("api.test", "/echo"), deadline=soon()))
    refused(Reason.HTTP_HOST_NOT_ALLOWED, lambda: c.request(
        ["http:api.test"], "GET", server.url("api.test", "/echo"), deadline=soon()))
    refused(Reason.HTTP_HOST_NOT_ALLOWED, lambda: c.request(
        ["files"], "GET", server.url("api.test", "/echo"), deadline=soon()))
    assert dns.lookups == [] and server.seen.connections == 0


def test_the_operator_allow_list_narrows_what_capabilities_allow(server: Server) -> None:
    narrowed = replace(LOCAL, allow=parse_allow_list([f"other.test:{server.port}"], source="test"))
    c = client(narrowed)
    caps = [f"http:api.test:{server.port}", f"http:other.test:{server.port}"]
    error = refused(Reason.HTTP_HOST_NOT_ALLOWED,
                    lambda: c.request(caps, "GET", server.url("api.test", "/echo"), deadline=soon()))
    assert "CLAWHUB_HTTP_ALLOW" in error.message
    assert c.request(caps, "GET", server.url("other.test", "/echo"), deadline=soon()).status == 200
    # Narrowing never widens: the operator's list alone grants nothing.
    refused(Reason.HTTP_HOST_NOT_ALLOWED,
            lambda: c.request([], "GET", server.url("other.test", "/echo"), deadline=soon()))


@pytest.mark.parametrize("url", ["ftp://api.test/file", "file:///etc/passwd", "gopher://api.test:70/",
                                 "//api.test/echo"])
def test_schemes_other_than_http_and_https_are_refused(http: OutboundHttp, url: str) -> None:
    refused(Reason.HTTP_SCHEME_NOT_ALLOWED, lambda: http.request(["http:api.test"], "GET", url, deadline=soon()))


@pytest.mark.parametrize(("method", "url", "headers"), [
    ("GET", "http://user:pw@api.test/", []),
    ("GET", "http://api.test/a b", []),
    ("GET", "http:///nohost", []),
    ("CONNECT", "http://api.test/", []),
    ("GET\r\n", "http://api.test/", []),
    ("GET", "http://api.test/", [("X-A", "1\r\nX-Injected: 2")]),
    ("GET", "http://api.test/", [("Bad Name", "1")]),
    ("GET", "http://api.test/", [("Host", "internal.example")]),
    ("GET", "http://api.test/" + "a" * 9000, []),
])
def test_malformed_requests_are_refused(http: OutboundHttp, method: str, url: str,
                                        headers: list[tuple[str, str]]) -> None:
    refused(Reason.HTTP_INVALID_REQUEST,
            lambda: http.request(["http:api.test"], method, url, headers, deadline=soon()))


def test_a_request_body_over_the_limit_is_refused_before_connecting(server: Server) -> None:
    c = client(replace(LOCAL, max_request_bytes=10))
    caps = [f"http:api.test:{server.port}"]
    assert c.request(caps, "POST", server.url("api.test", "/echo"), [], b"x" * 10, deadline=soon()).status == 200
    before = server.seen.connections, len(server.seen.requests)
    error = refused(Reason.HTTP_REQUEST_TOO_LARGE, lambda: c.request(
        caps, "POST", server.url("api.test", "/echo"), [], b"x" * 11, deadline=soon()))
    assert "11 bytes" in error.message and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (server.seen.connections, len(server.seen.requests)) == before


# Private addresses and resolution.

def test_a_private_address_is_refused_without_the_setting_and_reached_with_it(server: Server) -> None:
    strict = client(replace(LOCAL, allow_private=False))
    caps = [f"http:api.test:{server.port}", f"http:127.0.0.1:{server.port}"]
    error = refused(Reason.HTTP_PRIVATE_ADDRESS, lambda: strict.request(
        caps, "GET", server.url("api.test", "/echo"), deadline=soon()))
    assert "127.0.0.1" in error.message and "loopback" in error.message
    assert "CLAWHUB_HTTP_ALLOW_PRIVATE" in error.message
    refused(Reason.HTTP_PRIVATE_ADDRESS, lambda: strict.request(
        caps, "GET", server.url("127.0.0.1", "/echo"), deadline=soon()))
    assert server.seen.connections == 0
    relaxed = client(replace(LOCAL, allow_private=True))
    assert relaxed.request(caps, "GET", server.url("127.0.0.1", "/echo"), deadline=soon()).status == 200


def test_a_public_looking_name_resolving_to_a_private_address_is_refused(server: Server) -> None:
    """DNS rebinding: the name is checked by what it resolves to, resolved once, and one private address
    among public ones refuses it."""
    dns = FakeDns({"api.example.com": ["93.184.215.14", "10.1.2.3"], "v6.example.com": ["::ffff:127.0.0.1"]})
    c = client(replace(LOCAL, allow_private=False), dns=dns)
    error = refused(Reason.HTTP_PRIVATE_ADDRESS, lambda: c.request(
        ["http:api.example.com"], "GET", "http://api.example.com/", deadline=soon()))
    assert "10.1.2.3" in error.message and "private" in error.message
    error = refused(Reason.HTTP_PRIVATE_ADDRESS, lambda: c.request(
        ["http:v6.example.com"], "GET", "http://v6.example.com/", deadline=soon()))
    assert "loopback" in error.message
    assert dns.lookups == ["api.example.com", "v6.example.com"]


def test_the_connection_goes_to_the_address_resolved_once(server: Server) -> None:
    """A resolver that answers differently the second time (rebinding) is asked once per request: the
    request goes where the checked answer points."""
    answers = iter([["127.0.0.1"], ["192.0.2.1"]])
    lookups = []

    def flipping(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    c = OutboundHttp(LOCAL, resolver=flipping)
    _CLIENTS.append(c)
    assert c.request([f"http:api.test:{server.port}"], "GET", server.url("api.test", "/echo"),
                     deadline=soon()).status == 200
    assert lookups == ["api.test"]


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"), ("100.64.0.1", "not globally routable"), ("255.255.255.255", "private"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::127.0.0.1", "loopback"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a00:1", "private"),
    ("fe80::1%eth0", "link-local"),
])
def test_unfit_addresses_are_named(address: str, kind: str) -> None:
    problem = address_problem(address)
    assert problem is not None and problem.startswith(kind), problem


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_global_addresses_are_fit(address: str) -> None:
    assert address_problem(address) is None


def test_a_name_that_does_not_resolve_is_refused(http: OutboundHttp) -> None:
    error = refused(Reason.HTTP_DNS_FAILED, lambda: http.request(
        ["http:missing.test"], "GET", "http://missing.test/", deadline=soon()))
    assert "missing.test" in error.message and error.code == grpc.StatusCode.UNAVAILABLE


def test_a_resolver_that_hangs_is_bounded_by_the_deadline() -> None:
    def hanging(host: str, port: int) -> list[str]:
        time.sleep(3)
        return ["127.0.0.1"]

    c = OutboundHttp(LOCAL, resolver=hanging)
    _CLIENTS.append(c)
    started = time.monotonic()
    refused(Reason.HTTP_TIMEOUT, lambda: c.request(["http:api.test"], "GET", "http://api.test/",
                                                   deadline=soon(0.3)))
    assert time.monotonic() - started < 1.5
    c.close()


def test_slow_names_cannot_hold_every_other_lookup() -> None:
    """Lookups waiting at once are bounded (a skill allowed `http:*.slow.test` cannot queue lookups without end
    in front of other skills'): past the bound a request is refused at once; lookups that timed out while still
    queued are cancelled and free their place."""
    from services.executor import outbound

    release = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        if host.endswith("slow.test"):
            release.wait(5)
        return ["127.0.0.1"]

    c = OutboundHttp(LOCAL, resolver=resolver)
    _CLIENTS.append(c)
    waiting: list[threading.Thread] = []
    try:
        for n in range(outbound.MAX_LOOKUPS):
            refused(Reason.HTTP_TIMEOUT, lambda n=n: c.request(["http:*.slow.test"], "GET", f"http://a{n}.slow.test/",
                                                              deadline=soon(0.02)))
        # The queued ones were cancelled; the running ones (DNS_THREADS of them) still count.
        assert c._lookups <= outbound.DNS_THREADS
        started = time.monotonic()
        waiting.extend(threading.Thread(target=lambda n=n: _quiet(lambda: c.request(
            ["http:*.slow.test"], "GET", f"http://b{n}.slow.test/", deadline=soon(3))), daemon=True)
            for n in range(outbound.MAX_LOOKUPS - outbound.DNS_THREADS))
        for thread in waiting:
            thread.start()
        time.sleep(0.2)
        refused(Reason.HTTP_DNS_FAILED, lambda: c.request(["http:api.test"], "GET", "http://api.test/",
                                                          deadline=soon(1)))
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
    for thread in waiting:
        thread.join(5)


def test_closing_the_client_refuses_lookups_still_queued() -> None:
    """The executor's shutdown cancels queued name lookups: their calls end with HTTP_DNS_FAILED, not a
    stray CancelledError."""
    release = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        release.wait(5)
        return ["127.0.0.1"]

    from services.executor import outbound
    c = OutboundHttp(LOCAL, resolver=resolver)
    errors: list[BaseException] = []

    def call(n: int) -> None:
        try:
            c.request(["http:*.slow.test"], "GET", f"http://q{n}.slow.test/", deadline=soon(5))
        except BaseException as exc:  # noqa: BLE001 - the test looks at what came out
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,), daemon=True) for n in range(outbound.DNS_THREADS + 2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    c.close()
    release.set()
    for thread in threads:
        thread.join(5)
    cancelled = [e for e in errors if isinstance(e, HttpRefused) and e.reason == Reason.HTTP_DNS_FAILED]
    assert len(cancelled) == 2, errors
    assert all("shutting down" in e.message for e in cancelled)
    assert all(isinstance(e, HttpRefused) for e in errors), errors


def _quiet(call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except HttpRefused:
        pass


def test_a_closed_port_is_a_connection_failure(http: OutboundHttp) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = refused(Reason.HTTP_CONNECTION_FAILED, lambda: http.request(
        [f"http:api.test:{port}"], "GET", f"http://api.test:{port}/", deadline=soon()))
    assert "127.0.0.1" in error.message


# Redirects.

def test_a_redirect_to_another_host_is_refused(server: Server, http: OutboundHttp) -> None:
    caps = [f"http:api.test:{server.port}"]
    target = server.url("evil.test", "/echo")
    error = refused(Reason.HTTP_REDIRECT_NOT_ALLOWED, lambda: http.request(
        caps, "GET", server.url("api.test", f"/redirect?to={target}"), deadline=soon()))
    assert "evil.test" in error.message and "redirected from" in error.message
    assert [r["host"] for r in server.seen.requests] == [f"api.test:{server.port}"]
    # Not followed, the redirect comes back as it is.
    response = http.request(caps, "GET", server.url("api.test", f"/redirect?to={target}"), deadline=soon(),
                            follow_redirects=False)
    assert response.status == 302 and ("Location", target) in response.headers


def test_a_redirect_to_an_allowed_host_is_followed_without_the_credentials(server: Server,
                                                                           http: OutboundHttp) -> None:
    caps = [f"http:api.test:{server.port}", f"http:other.test:{server.port}"]
    target = server.url("other.test", "/echo")
    usage = HttpUsage()
    response = http.request(caps, "POST", server.url("api.test", f"/redirect?code=303&to={target}"),
                            [("Authorization", "Bearer secret"), ("X-Keep", "1")], b"payload",
                            deadline=soon(), counters=usage)
    assert response.status == 200 and response.url == target
    echoed = json.loads(response.body)
    # 303: the follow-up is a GET without the body; another origin: no credentials.
    assert echoed["method"] == "GET" and echoed["body"] == ""
    assert "authorization" not in echoed["headers"] and echoed["headers"]["x-keep"] == "1"
    assert echoed["headers"]["host"] == f"other.test:{server.port}"
    assert usage.requests == 2


def test_a_307_redirect_keeps_method_body_and_same_origin_credentials(server: Server,
                                                                       http: OutboundHttp) -> None:
    caps = [f"http:api.test:{server.port}"]
    response = http.request(caps, "PUT", server.url("api.test", "/redirect?code=307&to=/echo"),
                            [("Authorization", "Bearer secret")], b"payload", deadline=soon())
    echoed = json.loads(response.body)
    assert (echoed["method"], echoed["body"], echoed["headers"]["authorization"]) == ("PUT", "payload",
                                                                                       "Bearer secret")


def test_redirects_are_followed_only_so_many_times(server: Server) -> None:
    c = client(replace(LOCAL, max_redirects=2))
    caps = [f"http:api.test:{server.port}"]
    loop = "/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/echo"
    # Three redirects before /echo: one too many.
    error = refused(Reason.HTTP_TOO_MANY_REDIRECTS, lambda: c.request(
        caps, "GET", server.url("api.test", loop), deadline=soon()))
    assert "more than 2 times" in error.message
    assert c.request(caps, "GET", server.url("api.test", "/redirect?to=/redirect%3Fto%3D/echo"),
                     deadline=soon()).status == 200


def test_a_redirect_to_another_scheme_is_refused(server: Server, http: OutboundHttp) -> None:
    refused(Reason.HTTP_SCHEME_NOT_ALLOWED, lambda: http.request(
        [f"http:api.test:{server.port}"], "GET", server.url("api.test", "/redirect?to=file:///etc/passwd"),
        deadline=soon()))


# Limits while talking.

def test_an_oversized_response_is_refused_from_its_length(server: Server) -> None:
    c = client(replace(LOCAL, max_response_bytes=1000))
    caps = [f"http:api.test:{server.port}"]
    assert len(c.request(caps, "GET", server.url("api.test", "/big?n=1000"), deadline=soon()).body) == 1000
    error = refused(Reason.HTTP_RESPONSE_TOO_LARGE, lambda: c.request(
        caps, "GET", server.url("api.test", "/big?n=1001"), deadline=soon()))
    assert "1001" in error.message and "1000" in error.message


def test_an_endless_response_is_read_only_up_to_the_limit(server: Server) -> None:
    c = client(replace(LOCAL, max_response_bytes=100_000))
    usage = HttpUsage()
    started = time.monotonic()
    refused(Reason.HTTP_RESPONSE_TOO_LARGE, lambda: c.request(
        [f"http:api.test:{server.port}"], "GET", server.url("api.test", "/endless"), deadline=soon(),
        counters=usage))
    assert time.monotonic() - started < 2
    # Stopped near the limit (plus one read's worth of buffering and chunk framing), and the server saw the
    # connection close under it.
    assert 100_000 < usage.bytes_received < 100_000 + 2 * 65536 + 4096
    assert server.seen.closed_early.wait(5)
    assert c.idle_connections() == 0


def test_oversized_response_headers_are_refused(server: Server, http: OutboundHttp) -> None:
    error = refused(Reason.HTTP_RESPONSE_TOO_LARGE, lambda: http.request(
        [f"http:api.test:{server.port}"], "GET", server.url("api.test", "/fat-headers"), deadline=soon()))
    assert "headers" in error.message


def test_a_slow_server_beyond_the_deadline_is_refused_in_time(server: Server, http: OutboundHttp) -> None:
    started = time.monotonic()
    error = refused(Reason.HTTP_TIMEOUT, lambda: http.request(
        [f"http:api.test:{server.port}"], "GET", server.url("api.test", "/slow?delay=3"), deadline=soon(0.3)))
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 1.5
    assert "call's deadline" in error.message and error.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_dripping_body_cannot_outlast_the_deadline(server: Server, http: OutboundHttp) -> None:
    """Every read is quick, the whole is not: the deadline bounds the whole, not each read."""
    started = time.monotonic()
    refused(Reason.HTTP_TIMEOUT, lambda: http.request(
        [f"http:api.test:{server.port}"], "GET", server.url("api.test", "/drip"), deadline=soon(0.5)))
    assert time.monotonic() - started < 2.0


def test_the_request_timeout_applies_without_a_call_deadline(server: Server) -> None:
    c = client(replace(LOCAL, timeout=0.3))
    started = time.monotonic()
    error = refused(Reason.HTTP_TIMEOUT, lambda: c.request(
        [f"http:api.test:{server.port}"], "GET", server.url("api.test", "/slow?delay=3")))
    assert time.monotonic() - started < 1.5 and "request timeout of 0.3 s" in error.message


def test_the_requests_of_a_call_are_limited(server: Server) -> None:
    c = client(replace(LOCAL, max_requests=3))
    caps = [f"http:api.test:{server.port}"]
    usage = HttpUsage()
    for _ in range(2):
        c.request(caps, "GET", server.url("api.test", "/echo"), deadline=soon(), counters=usage)
    # The third request is a redirect, its follow-up would be the fourth.
    error = refused(Reason.HTTP_TOO_MANY_REQUESTS, lambda: c.request(
        caps, "GET", server.url("api.test", "/redirect?to=/echo"), deadline=soon(), counters=usage))
    assert "at most 3" in error.message and usage.requests == 3
    # Another call has its own count.
    assert c.request(caps, "GET", server.url("api.test", "/echo"), deadline=soon(), counters=HttpUsage()).status == 200


# Connections.

def test_connections_are_reused(server: Server, http: OutboundHttp) -> None:
    caps = [f"http:api.test:{server.port}", f"http:other.test:{server.port}"]
    for _ in range(5):
        assert http.request(caps, "GET", server.url("api.test", "/echo"), deadline=soon()).status == 200
    assert server.seen.connections == 1 and len(server.seen.requests) == 5
    # Another name on the same address gets its own connection (a TLS connection is verified per name).
    http.request(caps, "GET", server.url("other.test", "/echo"), deadline=soon())
    assert server.seen.connections == 2 and http.idle_connections() == 2


def test_tls_connections_are_reused(tls_server: Server, pki: Pki) -> None:
    c = client(ca_file=pki.ca_file)
    try:
        for _ in range(4):
            c.request([f"http:api.test:{tls_server.port}"], "GET", tls_server.url("api.test", "/echo"),
                      deadline=soon())
        assert tls_server.seen.connections == 1 and tls_server.seen.sni == ["api.test"]
    finally:
        c.close()


def test_a_pooled_connection_the_server_closed_is_replaced(server: Server, http: OutboundHttp) -> None:
    caps = [f"http:api.test:{server.port}"]
    assert http.request(caps, "GET", server.url("api.test", "/close-after"), deadline=soon()).body == b"bye"
    time.sleep(0.1)  # the server closes its end
    assert http.request(caps, "GET", server.url("api.test", "/echo"), deadline=soon()).status == 200
    assert server.seen.connections == 2


@dataclass
class RacyServer:
    port: int
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


@pytest.fixture
def racy_server() -> Iterator[RacyServer]:
    """Answers the first request of each connection (keep-alive), then closes the connection when the next
    request arrives, unanswered: a server's idle timeout firing just as a pooled connection is used, which
    the client cannot see coming."""
    listener = socket.create_server(("127.0.0.1", 0))
    state = RacyServer(listener.getsockname()[1])

    def connection(conn: socket.socket) -> None:
        with conn:
            buffered = b""
            for answered in range(2):
                while b"\r\n\r\n" not in buffered:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                state.requests.append(head.split(b"\r\n", 1)[0])
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffered) < length:
                    buffered += conn.recv(65536)
                buffered = buffered[length:]
                if answered == 0:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            state.connections += 1
            threading.Thread(target=connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield state
    listener.close()


def test_a_pooled_connection_that_dies_under_a_request_is_retried_once_if_safe(racy_server: RacyServer,
                                                                               http: OutboundHttp) -> None:
    caps = [f"http:api.test:{racy_server.port}"]
    url = f"http://api.test:{racy_server.port}/x"
    usage = HttpUsage()
    assert http.request(caps, "GET", url, deadline=soon(), counters=usage).body == b"ok"
    # The pooled connection dies under the second GET: sent again on a new connection, counted once.
    assert http.request(caps, "GET", url, deadline=soon(), counters=usage).body == b"ok"
    assert racy_server.connections == 2 and len(racy_server.requests) == 3 and usage.requests == 2
    # A POST the server may have acted on is not repeated.
    error = refused(Reason.HTTP_CONNECTION_FAILED,
                    lambda: http.request(caps, "POST", url, [], b"once", deadline=soon()))
    assert "closed the connection" in error.message
    assert racy_server.requests[-1] == b"POST /x HTTP/1.1" and racy_server.connections == 2


def test_connections_are_shared_by_threads(server: Server, http: OutboundHttp) -> None:
    caps = [f"http:api.test:{server.port}"]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                body = http.request(caps, "POST", server.url("api.test", "/echo"), [], b"t", deadline=soon()).body
                assert json.loads(body)["body"] == "t"
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [] and len(server.seen.requests) == 40
    assert server.seen.connections <= 4


# TLS failures.

def test_a_certificate_for_another_name_is_a_tls_failure(tls_server: Server, pki: Pki) -> None:
    c = client(ca_file=pki.ca_file)
    error = refused(Reason.HTTP_TLS_FAILED, lambda: c.request(
        [f"http:other.test:{tls_server.port}"], "GET", tls_server.url("other.test", "/echo"), deadline=soon()))
    assert "other.test" in error.message
    # `*.svc.test` covers one label: `svc.test` itself is not in the certificate.
    refused(Reason.HTTP_TLS_FAILED, lambda: c.request(
        [f"http:svc.test:{tls_server.port}"], "GET", tls_server.url("svc.test", "/echo"), deadline=soon()))
    c.close()


def test_an_untrusted_certificate_is_a_tls_failure(tls_server: Server) -> None:
    c = client()  # the system trust store does not know the test CA
    refused(Reason.HTTP_TLS_FAILED, lambda: c.request(
        [f"http:api.test:{tls_server.port}"], "GET", tls_server.url("api.test", "/echo"), deadline=soon()))
    c.close()


# Capability syntax.

@pytest.mark.parametrize(("text", "host", "wildcard", "port"), [
    ("api.example.com", "api.example.com", False, None),
    ("API.Example.COM.", "api.example.com", False, None),
    ("api.example.com:8443", "api.example.com", False, 8443),
    ("*.example.com", "example.com", True, None),
    ("*.example.com:443", "example.com", True, 443),
    ("203.0.113.7", "203.0.113.7", False, None),
    ("[2001:DB8::1]:8080", "2001:db8::1", False, 8080),
    ("bücher.example", "xn--bcher-kva.example", False, None),
    ("localhost", "localhost", False, None),
])
def test_host_patterns_parse(text: str, host: str, wildcard: bool, port: int | None) -> None:
    pattern = parse_pattern(text)
    assert (pattern.host, pattern.wildcard, pattern.port) == (host, wildcard, port)
    assert parse_pattern(str(pattern)) == pattern


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"),
    ("https://api.example.com/v1", "without scheme, path"),
    ("api.example.com/v1", "without scheme, path"),
    ("user@api.example.com", "credentials"),
    ("api.example.com:0", "port"),
    ("api.example.com:65536", "port"),
    ("api.example.com:http", "port"),
    ("*", "only accepted as the whole first label"),
    ("*.com", "too broad"),
    ("a.*.example.com", "only accepted as the whole first label"),
    ("*example.com", "only accepted as the whole first label"),
    ("*.10.0.0.1", "IP address"),
    ("2001:db8::1", "brackets"),
    ("[2001:db8::1", "without closing"),
    ("[not-v6]", "IPv6"),
    ("-bad.example.com", "label '-bad'"),
    ("a..example.com", "label ''"),
    ("under_score.example.com", "label 'under_score'"),
    ("1.2.3", "dotted-quad"),
    ("x" * 64 + ".example.com", "label"),
])
def test_bad_host_patterns_say_why(text: str, says: str) -> None:
    with pytest.raises(PatternError) as caught:
        parse_pattern(text)
    assert says in str(caught.value), str(caught.value)


def test_wildcards_match_subdomains_at_any_depth_but_not_the_domain() -> None:
    pattern = parse_pattern("*.example.com")
    assert pattern.matches("a.example.com", 443, "https") and pattern.matches("a.b.example.com", 80, "http")
    assert not pattern.matches("example.com", 443, "https")
    assert not pattern.matches("badexample.com", 443, "https")
    assert not pattern.matches("a.example.com.evil.test", 443, "https")
    assert not pattern.matches("a.example.com", 8443, "https")
    exact = parse_pattern("api.example.com")
    assert exact.matches("api.example.com", 80, "http") and exact.matches("api.example.com", 443, "https")
    assert not exact.matches("api.example.com", 443, "http") and not exact.matches("x.api.example.com", 443, "https")
    ported = parse_pattern("api.example.com:8443")
    assert ported.matches("api.example.com", 8443, "https") and ported.matches("api.example.com", 8443, "http")
    assert not ported.matches("api.example.com", 443, "https")


def test_wildcard_capabilities_reach_subdomains_over_the_network(server: Server, http: OutboundHttp) -> None:
    caps = [f"http:*.svc.test:{server.port}"]
    assert http.request(caps, "GET", server.url("a.svc.test", "/echo"), deadline=soon()).status == 200
    assert http.request(caps, "GET", server.url("deep.a.svc.test", "/echo"), deadline=soon()).status == 200
    refused(Reason.HTTP_HOST_NOT_ALLOWED,
            lambda: http.request(caps, "GET", server.url("svc.test", "/echo"), deadline=soon()))


def test_publish_accepts_http_capabilities_and_explains_bad_ones() -> None:
    for good in ("http:api.example.com", "http:api.example.com:8443", "http:*.example.com", "http:[::1]:80"):
        assert capability_problem(good) is None, good
    problem = capability_problem("http:https://api.example.com")
    assert problem is not None and "not a valid `http:` capability" in problem and "`HOST:PORT`" in problem
    problem = capability_problem("http:*.com")
    assert problem is not None and "too broad" in problem
    assert http_patterns(["http:*.com", "http:ok.example", "files"]) == (parse_pattern("ok.example"),)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HttpSettings.from_env() == HttpSettings()
    monkeypatch.setenv("CLAWHUB_HTTP_ALLOW", "api.example.com, *.corp.example:8443,http:x.example")
    monkeypatch.setenv("CLAWHUB_HTTP_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("CLAWHUB_HTTP_MAX_RESPONSE_BYTES", "8MiB")
    monkeypatch.setenv("CLAWHUB_HTTP_MAX_REQUESTS", "3")
    monkeypatch.setenv("CLAWHUB_HTTP_TIMEOUT", "2.5")
    settings = HttpSettings.from_env()
    assert [str(p) for p in settings.allow] == ["api.example.com", "*.corp.example:8443", "x.example"]
    assert settings.allow_private and settings.max_response_bytes == 8 * 1024 * 1024
    assert settings.max_requests == 3 and settings.timeout == 2.5
    monkeypatch.setenv("CLAWHUB_HTTP_ALLOW", "https://api.example.com/")
    with pytest.raises(SettingsError, match="CLAWHUB_HTTP_ALLOW"):
        HttpSettings.from_env()
    monkeypatch.delenv("CLAWHUB_HTTP_ALLOW")
    monkeypatch.setenv("CLAWHUB_HTTP_ALLOW_PRIVATE", "maybe")
    with pytest.raises(SettingsError, match="CLAWHUB_HTTP_ALLOW_PRIVATE"):
        HttpSettings.from_env()


def test_every_refusal_reason_has_a_status() -> None:
    for reason in Reason:
        if reason.startswith("HTTP_"):
            assert HttpRefused(reason, "x").code != grpc.StatusCode.OK
    assert ipaddress.ip_address("93.184.215.14").is_global
