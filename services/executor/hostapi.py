"""Host functions: what a skill imports from the `clawhub` module, linked only for the capabilities that grant
them (the contract for skill authors is docs/skills/host-api.md).

The types and the capability policy are in services/runtime/wasm.py (`HOST_IMPORTS`, shared with the
registry's verification); this module implements them. `HOST_FUNCTIONS` holds the implementations by the
same capability kind, so another kind (say `http_request` for `http:HOST`) is one more entry there and in
`HOST_IMPORTS`, plus what its grant carries in `HostGrant`.

How a call reaches its own state: the functions are defined once per compiled module, in the Linker its
InstancePre comes from (Store-independent), so they cannot close over a call. The sandbox binds the call's
`HostCall` to the worker thread for the length of the run (`bind`, `unbind`), and a host function, which wasmtime
runs on the thread that called into the guest, finds it there. A function called with nothing bound, or
without its capability in the call's grant, is refused (an error code, and a line on stderr) rather than
trusted to the earlier import check alone.

Conventions shared by every host function:

- pointers and lengths are i32 offsets into the guest's exported `memory`; a region outside it is an ABI
  violation, which traps the call (reported as trapped, like memory-v1's own violations);
- results are 0 or positive on success and negative error codes (`E_*`) otherwise; a refusal also writes
  one line on the call's stderr naming the ErrorInfo reason (`clawhub: kv_put: KV_VALUE_TOO_LARGE: ...`), so
  the author sees which limit was hit, while the skill decides what to do about it;
- each call is counted in `HostGrant.usage` by function name.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import wasmtime
from wasmtime import _func

from services.executor.kvstore import KvNamespace
from services.executor.outbound import HttpRefused, HttpResponse, HttpUsage, OutboundHttp
from services.runtime.errors import Reason, ServiceError
from services.runtime.wasm import (
    HOST_IMPORTS,
    HOST_MODULE,
    HTTP_KIND,
    KV_CAPABILITY,
    host_func_type,
    host_import_kind,
)

# Error codes a host function returns (negative; shared by every kind of host function).
E_NOT_FOUND = -1
E_INVALID = -2
E_KEY_TOO_LARGE = -3
E_VALUE_TOO_LARGE = -4
E_TOO_MANY_KEYS = -5
E_STORE_FULL = -6
E_UNAVAILABLE = -7
E_DENIED = -8
E_TIMEOUT = -9
E_TOO_LARGE = -10
E_LIMIT = -11

ERROR_CODES: dict[Reason, int] = {
    Reason.KV_INVALID_ARGUMENT: E_INVALID,
    Reason.KV_KEY_TOO_LARGE: E_KEY_TOO_LARGE,
    Reason.KV_VALUE_TOO_LARGE: E_VALUE_TOO_LARGE,
    Reason.KV_TOO_MANY_KEYS: E_TOO_MANY_KEYS,
    Reason.KV_STORE_FULL: E_STORE_FULL,
    Reason.KV_UNAVAILABLE: E_UNAVAILABLE,
    Reason.HTTP_HOST_NOT_ALLOWED: E_DENIED,
    Reason.HTTP_SCHEME_NOT_ALLOWED: E_DENIED,
    Reason.HTTP_PRIVATE_ADDRESS: E_DENIED,
    Reason.HTTP_REDIRECT_NOT_ALLOWED: E_DENIED,
    Reason.HTTP_INVALID_REQUEST: E_INVALID,
    Reason.HTTP_DNS_FAILED: E_UNAVAILABLE,
    Reason.HTTP_CONNECTION_FAILED: E_UNAVAILABLE,
    Reason.HTTP_TLS_FAILED: E_UNAVAILABLE,
    Reason.HTTP_TIMEOUT: E_TIMEOUT,
    Reason.HTTP_REQUEST_TOO_LARGE: E_TOO_LARGE,
    Reason.HTTP_RESPONSE_TOO_LARGE: E_TOO_LARGE,
    Reason.HTTP_TOO_MANY_REQUESTS: E_LIMIT,
    Reason.HTTP_TOO_MANY_REDIRECTS: E_LIMIT,
}


@dataclass
class HttpGrant:
    """A call's outbound HTTP: the executor's client, the skill's capabilities (its `http:` ones say where it
    may go), the call's deadline (time.monotonic(); set by the sandbox when the run starts), what it did, and
    the last response, which `http_response` copies out."""

    client: OutboundHttp
    capabilities: tuple[str, ...]
    deadline: float | None = None
    usage: HttpUsage = field(default_factory=HttpUsage)
    response: bytes = b""


@dataclass
class HostGrant:
    """What a call's host functions may use, and what they did (per call: build one for each). A field is
    None when the call's capabilities do not grant it."""

    kv: KvNamespace | None = None
    http: HttpGrant | None = None
    # Host function calls by name (`kv_get`: 3, ...), for usage reporting.
    usage: Counter[str] = field(default_factory=Counter)

    @property
    def kv_operations(self) -> int:
        return sum(n for name, n in self.usage.items() if name.startswith("kv_"))


class HostFault(Exception):
    """A guest passed a region outside its memory to a host function: the call traps (an ABI violation)."""


class HostCall:
    """One run's view for host functions: its grant, where its diagnostics go (the call's stderr, within its
    cap), and the ABI violation that trapped it, if one did."""

    __slots__ = ("grant", "note", "fault")

    def __init__(self, grant: HostGrant | None, note: Callable[[bytes], None]) -> None:
        self.grant = grant if grant is not None else HostGrant()
        self.note = note
        self.fault: HostFault | None = None


_bound = threading.local()
log = logging.getLogger("clawhub.executor.hostapi")


def bind(call: HostCall) -> None:
    """Make `call` the one this thread's host functions serve, until `unbind` (the sandbox brackets a run)."""
    _bound.call = call


def unbind(call: HostCall) -> None:
    _bound.call = None
    if call.fault is not None and _func.LAST_EXCEPTION is call.fault:
        # wasmtime-py keeps a host exception in a module global for its own wrappers to re-raise; the
        # sandbox reports the fault itself, so it must not surface in an unrelated later call.
        _func.LAST_EXCEPTION = None


class _Memory:
    """The guest's exported memory during one host call, bounds-checked."""

    __slots__ = ("_caller", "_memory", "_function")

    def __init__(self, caller: wasmtime.Caller, function: str) -> None:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise HostFault(f"`{HOST_MODULE}.{function}` needs the module to export its memory as `memory`")
        self._caller, self._memory, self._function = caller, memory, function

    def _base(self, what: str, ptr: int, length: int) -> int:
        ptr, length = ptr & 0xFFFFFFFF, length & 0xFFFFFFFF
        size = self._memory.data_len(self._caller)
        if ptr + length > size:
            raise HostFault(f"`{HOST_MODULE}.{self._function}` was given its {what} at [{ptr}, {ptr + length}), "
                            f"outside the {size}-byte memory")
        return ctypes.addressof(self._memory.data_ptr(self._caller).contents) + ptr

    def read(self, what: str, ptr: int, length: int) -> bytes:
        base = self._base(what, ptr, length)
        return ctypes.string_at(base, length & 0xFFFFFFFF) if length else b""

    def check(self, what: str, ptr: int, length: int) -> None:
        self._base(what, ptr, length)

    def write(self, what: str, ptr: int, data: bytes) -> None:
        base = self._base(what, ptr, len(data))
        if data:
            ctypes.memmove(base, data, len(data))


def kv_namespace(call: HostCall, function: str) -> KvNamespace:
    """The call's key-value namespace, or PERMISSION_DENIED (shared with the component interface `kv`)."""
    kv = call.grant.kv
    if kv is None:
        # Not one of the store's reasons: it maps to E_DENIED.
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED,
                           f"`{function}`: this call has no key-value store (the skill does not declare "
                           f"`{KV_CAPABILITY}`, or the executor has none)")
    return kv


def kv_get(call: HostCall, memory: _Memory, key_ptr: int, key_len: int, out_ptr: int, out_cap: int) -> int:
    """The value's length; the value is written at out_ptr only when it fits in out_cap (else call again
    with room for the length returned). E_NOT_FOUND when there is no such key."""
    key = memory.read("key", key_ptr, key_len)
    memory.check("output buffer", out_ptr, out_cap)
    value = kv_namespace(call, "kv_get").get(key)
    if value is None:
        return E_NOT_FOUND
    if len(value) <= (out_cap & 0xFFFFFFFF):
        memory.write("output buffer", out_ptr, value)
    return len(value)


def kv_put(call: HostCall, memory: _Memory, key_ptr: int, key_len: int, val_ptr: int, val_len: int,
           ttl_ms: int) -> int:
    """0 once stored; ttl_ms 0 never expires."""
    key = memory.read("key", key_ptr, key_len)
    value = memory.read("value", val_ptr, val_len)
    kv_namespace(call, "kv_put").put(key, value, ttl_ms)
    return 0


def kv_delete(call: HostCall, memory: _Memory, key_ptr: int, key_len: int) -> int:
    """1 when the key existed, 0 when it did not."""
    return int(kv_namespace(call, "kv_delete").delete(memory.read("key", key_ptr, key_len)))


def kv_list(call: HostCall, memory: _Memory, prefix_ptr: int, prefix_len: int, out_ptr: int, out_cap: int) -> int:
    """The byte length of the list of live keys starting with the prefix, in byte order, each as a 4-byte
    little-endian length then the key; written at out_ptr only when it fits in out_cap."""
    prefix = memory.read("prefix", prefix_ptr, prefix_len)
    memory.check("output buffer", out_ptr, out_cap)
    keys = kv_namespace(call, "kv_list").keys(prefix)
    data = b"".join(len(k).to_bytes(4, "little") + k for k in keys)
    if len(data) <= (out_cap & 0xFFFFFFFF):
        memory.write("output buffer", out_ptr, data)
    return len(data)


def http_grant(call: HostCall, function: str) -> HttpGrant:
    """The call's outbound HTTP, or PERMISSION_DENIED (shared with the component interface `http`)."""
    http = call.grant.http
    if http is None:
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED,
                           f"`{function}`: this call may make no HTTP request (the skill declares no `http:HOST` "
                           "capability, or the executor has no HTTP client)")
    return http


def parse_request(data: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """A request as a skill writes it: `METHOD URL`, then one `Name: value` header per line, an empty line,
    then the body (lines end with \n; \r\n is accepted)."""
    # The head ends at the first empty line, whichever line ending the request uses.
    ends = [(i, sep) for sep in (b"\n\n", b"\r\n\r\n") if (i := data.find(sep)) >= 0]
    if ends:
        at, sep = min(ends)
        head, body = data[:at], data[at + len(sep):]
    else:
        head, body = data, b""
    try:
        lines = head.decode("utf-8").replace("\r\n", "\n").split("\n")
    except UnicodeDecodeError:
        raise HttpRefused(Reason.HTTP_INVALID_REQUEST, "the request head is not UTF-8") from None
    method, _, url = lines[0].strip().partition(" ")
    if not method or not url.strip():
        raise HttpRefused(Reason.HTTP_INVALID_REQUEST, "the request must start with `METHOD URL`")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise HttpRefused(Reason.HTTP_INVALID_REQUEST, f"a header line is not `Name: value`: {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    return method, url.strip(), headers, body


def format_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A response as a skill reads it: the status code, one `Name: value` header per line, an empty line, the
    body."""
    head = "".join(f"{name}: {value}\n" for name, value in headers)
    return f"{status}\n{head}\n".encode() + body


def http_request(call: HostCall, memory: _Memory, req_ptr: int, req_len: int) -> int:
    """Make the request the guest wrote (`parse_request`); the response's length (`format_response`), to be
    copied out with `http_response`."""
    http = http_grant(call, "http_request")
    http.response = b""
    response = fetch(http, *parse_request(memory.read("request", req_ptr, req_len)))
    http.response = format_response(response.status, response.headers, response.body)
    return len(http.response)


def fetch(http: HttpGrant, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> HttpResponse:
    """One request on the call's behalf: its capabilities decide where it may go, what is left of its
    deadline how long it may take, and its usage counts it (shared with the component interface `http`).
    Raises HttpRefused."""
    return http.client.request(http.capabilities, method, url, headers, body, deadline=http.deadline,
                               counters=http.usage)


def http_response(call: HostCall, memory: _Memory, out_ptr: int, out_cap: int) -> int:
    """The last response's length; written at out_ptr only when it fits in out_cap."""
    http = http_grant(call, "http_response")
    memory.check("output buffer", out_ptr, out_cap)
    if len(http.response) <= (out_cap & 0xFFFFFFFF):
        memory.write("output buffer", out_ptr, http.response)
    return len(http.response)


HostImpl = Callable[..., int]

# Implementations by capability kind and name; each must match `HOST_IMPORTS`' type (checked at import).
HOST_FUNCTIONS: dict[str, dict[str, HostImpl]] = {
    KV_CAPABILITY: {"kv_get": kv_get, "kv_put": kv_put, "kv_delete": kv_delete, "kv_list": kv_list},
    HTTP_KIND: {"http_request": http_request, "http_response": http_response},
}
if {k: set(v) for k, v in HOST_FUNCTIONS.items()} != {k: set(v) for k, v in HOST_IMPORTS.items()}:
    raise RuntimeError("hostapi.HOST_FUNCTIONS is out of step with wasm.HOST_IMPORTS")


def _entry(name: str, impl: HostImpl) -> Callable[..., int]:
    """The wasmtime callback of host function `name`: finds the thread's call, turns refusals into error
    codes (and a stderr line), and an ABI violation into a trap."""
    label = f"{HOST_MODULE}: {name}"

    def callback(caller: wasmtime.Caller, *args: Any) -> int:
        call: HostCall | None = getattr(_bound, "call", None)
        if call is None:  # instantiated outside `Sandbox.run`: nothing to act for
            return E_DENIED
        call.grant.usage[name] += 1
        try:
            return impl(call, _Memory(caller, name), *args)
        except HostFault as fault:
            call.fault = fault
            raise
        except (ServiceError, HttpRefused) as exc:
            call.note(f"{label}: {exc.reason}: {exc.message}\n".encode())
            return ERROR_CODES.get(exc.reason, E_DENIED)
        except Exception:  # a bug or an unexpected backend error: the guest sees "unavailable", never a crash
            log.exception("host function %s failed", name)
            call.note(f"{label}: {Reason.INTERNAL}: internal error in the host\n".encode())
            return E_UNAVAILABLE

    return callback


def define(linker: wasmtime.Linker, module: wasmtime.Module) -> None:
    """Define in `linker` the host functions `module` imports (the ABI check has made sure they exist with
    the right types; which ones a call may use is its grant's business)."""
    for imp in module.imports:
        if imp.module != HOST_MODULE or imp.name is None:
            continue
        kind = host_import_kind(imp.name)
        if kind is None:
            continue  # refused by the ABI check
        linker.define_func(HOST_MODULE, imp.name, host_func_type(kind, imp.name),
                           _entry(imp.name, HOST_FUNCTIONS[kind][imp.name]), access_caller=True)
