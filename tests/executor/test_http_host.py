"""The `http:HOST` capability end to end in the sandbox: a real wasm guest (WAT, memory-v1) writes a request,
calls `clawhub.http_request`, copies the response out with `clawhub.http_response` and returns it; the server
is a real HTTP server on 127.0.0.1 (reached with the private-address setting on, as a local setup would), and
each refusal reaches the guest as its error code with the reason on stderr (docs/skills/host-api.md)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest

from services.executor.outbound import HttpSettings, OutboundHttp
from services.executor.sandbox import Grant, RunLimits, Sandbox, Verdict
from services.runtime.wasm import MEMORY_V1, compile_and_check, make_engine
from tests.conftest import wat
from tests.executor.test_outbound import FakeDns, Server, _serve

# Input: the request text (`METHOD URL`, headers, empty line, body). Output: http_request's result (i64 LE),
# then the response text when the request succeeded.
HTTP_SHELL = r'''
(module
  (import "clawhub" "http_request" (func $request (param i32 i32) (result i64)))
  (import "clawhub" "http_response" (func $response (param i32 i32) (result i64)))
  (memory (export "memory") 2)
  (func (export "clawhub_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "clawhub_run") (param $ptr i32) (param $len i32) (result i64)
    (local $r i64) (local $n i32)
    (local.set $r (call $request (local.get $ptr) (local.get $len)))
    (i64.store (i32.const 65536) (local.get $r))
    (local.set $n (i32.const 8))
    (if (i64.gt_s (local.get $r) (i64.const 0))
      (then
        (drop (call $response (i32.const 65544) (i32.const 60000)))
        (local.set $n (i32.add (i32.const 8) (i32.wrap_i64 (local.get $r))))))
    (i64.or (i64.shl (i64.const 65536) (i64.const 32)) (i64.extend_i32_u (local.get $n)))))
'''
RUN = RunLimits(memory_bytes=16 << 20, timeout_seconds=5, max_output_bytes=1 << 20, max_stderr_bytes=4096)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve(None)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    made = Sandbox(pool_slots=0)
    yield made
    made.close()


@pytest.fixture
def http() -> Iterator[OutboundHttp]:
    client = OutboundHttp(HttpSettings(allow_private=True, timeout=5.0),
                          resolver=FakeDns({"api.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}))
    yield client
    client.close()


def call(sandbox: Sandbox, http: OutboundHttp | None, capabilities: list[str], request: str) -> tuple[int, bytes, str]:
    compiled = sandbox.compile("sha256:http-shell", wat(HTTP_SHELL), capabilities)
    grant = Grant.of(capabilities, http=http)
    result = sandbox.run(compiled, request.encode(), RUN, grant)
    assert result.verdict is Verdict.OK, (result.verdict, result.detail, result.stderr)
    code = struct.unpack("<q", result.output[:8])[0]
    if grant.host is not None and grant.host.http is not None:
        assert grant.host.http.usage.requests == (1 if code > 0 else grant.host.http.usage.requests)
    return code, result.output[8:], result.stderr.decode()


def test_an_allowed_host_answers_the_guest(sandbox: Sandbox, http: OutboundHttp, server: Server) -> None:
    code, response, stderr = call(sandbox, http, [f"http:api.test:{server.port}"],
                                  f"POST http://api.test:{server.port}/echo\nX-Skill: yes\n\nping")
    assert code == len(response) > 0, stderr
    status, _, rest = response.partition(b"\n")
    assert status == b"200"
    _, _, body = rest.partition(b"\n\n")
    echoed = json.loads(body)  # the test server echoes what it got
    assert (echoed["method"], echoed["path"], echoed["body"]) == ("POST", "/echo", "ping")
    assert echoed["headers"]["x-skill"] == "yes"


@pytest.mark.parametrize(("capabilities", "url_host", "reason", "code"), [
    (["http:api.test"], "other.test", "HTTP_HOST_NOT_ALLOWED", -8),       # another host
    (["http:api.test:1"], "api.test", "HTTP_HOST_NOT_ALLOWED", -8),       # another port
])
def test_a_host_not_allowed_is_refused_with_its_reason(sandbox: Sandbox, http: OutboundHttp, server: Server,
                                                        capabilities: list[str], url_host: str, reason: str,
                                                        code: int) -> None:
    got, _, stderr = call(sandbox, http, capabilities, f"GET http://{url_host}:{server.port}/x\n\n")
    assert got == code and reason in stderr, stderr


def test_a_private_address_needs_the_operator_setting(sandbox: Sandbox, server: Server) -> None:
    strict = OutboundHttp(HttpSettings(allow_private=False, timeout=5.0), resolver=FakeDns({"api.test": ["127.0.0.1"]}))
    try:
        got, _, stderr = call(sandbox, strict, [f"http:api.test:{server.port}"],
                              f"GET http://api.test:{server.port}/x\n\n")
    finally:
        strict.close()
    assert got == -8 and "HTTP_PRIVATE_ADDRESS" in stderr, stderr


def test_a_malformed_request_is_invalid(sandbox: Sandbox, http: OutboundHttp) -> None:
    got, _, stderr = call(sandbox, http, ["http:api.test"], "GET\n\n")  # no URL
    assert got == -2 and "HTTP_INVALID_REQUEST" in stderr, stderr
    got, _, stderr = call(sandbox, http, ["http:api.test"], "GET http://api.test/\nno colon here\n\n")
    assert got == -2 and "HTTP_INVALID_REQUEST" in stderr, stderr


def test_without_a_client_the_call_is_denied_not_crashed(sandbox: Sandbox) -> None:
    got, _, stderr = call(sandbox, None, ["http:api.test"], "GET http://api.test/\n\n")
    assert got == -8 and "PERMISSION_DENIED" in stderr, stderr


def test_importing_http_without_an_http_capability_is_refused() -> None:
    _, problems = compile_and_check(make_engine(), wat(HTTP_SHELL), MEMORY_V1, [])
    assert problems and any("http:HOST" in p for p in problems), problems
    _, fine = compile_and_check(make_engine(), wat(HTTP_SHELL), MEMORY_V1, ["http:api.example.com"])
    assert not fine, fine
