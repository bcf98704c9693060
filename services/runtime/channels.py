"""Client channels between services, and the message size limits of servers and channels.

gRPC buffers a whole message before a handler sees it, so the receive limit is what bounds the memory a
caller can make a service spend per call: each limit below is what its methods need, no more. An oversized
message is refused by gRPC itself (`RESOURCE_EXHAUSTED`, "Received message larger than max") as soon as
its length prefix arrives, before it is buffered.

- Skill input and output: the executors' `CLAWHUB_EXECUTOR_MAX_INPUT`, `_MAX_OUTPUT` and `_MAX_STDERR`
  bound every message that carries them (`InvocationLimits`); the gateway's own `CLAWHUB_GATEWAY_MAX_INPUT`
  bounds what its public port accepts. Each adds `ENVELOPE_BYTES` for the rest of the message.
- Uploads: one `PublishSkill` message carries at most `MAX_CHUNK_BYTES` of module or bundle (the CLI sends
  256 KiB); the registry accepts messages of `PUBLISH_MESSAGE_BYTES`, which also bounds a manifest.
- Everything else (catalogue pages, deployments, route tables, stats): `CONTROL_MESSAGE_BYTES`.

gRPC takes its limits as C ints, so no message can be 2 GiB or more: the settings that size payloads are read
with `env_payload_size` (at most `MAX_PAYLOAD_SETTING_BYTES`, else a SettingsError naming the variable), and
`size_options` caps what reaches gRPC (output and stderr together could still add up past it).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.runtime.settings import SettingsError, env_size
from services.runtime.tls import ClientTls
from services.runtime.wrapchannel import WrappingChannel

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# What a message carries besides its payload: names, ids, digests, usage, the status of a call.
ENVELOPE_BYTES = 64 * KiB
# Messages that carry no skill payload, either way. gRPC's own default receive limit; a route table of
# thousands of skills fits.
CONTROL_MESSAGE_BYTES = 4 * MiB
# Largest `chunk` / `bundle_chunk` of one PublishSkill message.
MAX_CHUNK_BYTES = 1 * MiB
# What the registry accepts per message: a chunk, or the metadata with its manifest.
PUBLISH_MESSAGE_BYTES = MAX_CHUNK_BYTES + ENVELOPE_BYTES
# A JSON value encoded as google.protobuf.Value can be larger than its JSON text: `[0,0,…]` takes 2 bytes
# per element as text and 11 as protobuf (a ListValue entry holding a double). Used to tell, without
# encoding, whether a JSON output can exceed a limit once it is a Value.
VALUE_INFLATION = 6
# gRPC's largest message size limit (a C int); a larger one is an OverflowError in the channel arguments.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
# Largest value of a setting that sizes a payload: its message adds up to CONTROL_MESSAGE_BYTES +
# ENVELOPE_BYTES around it and must stay below 2 GiB.
MAX_PAYLOAD_SETTING_BYTES = 2 * GiB - 8 * MiB


def env_payload_size(name: str, default: str) -> int:
    """A size setting that bounds a gRPC message (skill input, output, stderr): below 2 GiB."""
    return env_size(name, default, maximum=MAX_PAYLOAD_SETTING_BYTES,
                    why="it sizes gRPC messages, which cannot reach 2 GiB")


@dataclass(frozen=True)
class InvocationLimits:
    """The sizes that bound an invocation's messages, from the executors' settings.

    The executor reads them as its own settings; the dispatcher and the gateway read the same variables to
    size the messages that carry the same input and output (so set them alike on every service).
    """

    max_input: int = 4 * MiB
    """CLAWHUB_EXECUTOR_MAX_INPUT: largest input of a call."""
    max_output: int = 4 * MiB
    """CLAWHUB_EXECUTOR_MAX_OUTPUT: largest stdout of a call."""
    max_stderr: int = 64 * KiB
    """CLAWHUB_EXECUTOR_MAX_STDERR: largest stderr kept per call."""

    @classmethod
    def from_env(cls) -> InvocationLimits:
        d = cls()
        return cls(
            max_input=env_payload_size("CLAWHUB_EXECUTOR_MAX_INPUT", str(d.max_input)),
            max_output=env_payload_size("CLAWHUB_EXECUTOR_MAX_OUTPUT", str(d.max_output)),
            max_stderr=env_payload_size("CLAWHUB_EXECUTOR_MAX_STDERR", str(d.max_stderr)),
        )

    @property
    def execute_request(self) -> int:
        """ExecuteRequest: the input plus its route's env, args and dependencies (bounded as a route table is)."""
        return self.max_input + CONTROL_MESSAGE_BYTES

    @property
    def execute_response(self) -> int:
        """ExecuteResponse: output and stderr."""
        return self.max_output + self.max_stderr + ENVELOPE_BYTES

    @property
    def dispatch_request(self) -> int:
        return self.max_input + ENVELOPE_BYTES

    @property
    def dispatch_response(self) -> int:
        return self.max_output + ENVELOPE_BYTES


_KEEPALIVE_CHANNEL: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly when a peer restarts (the default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Clients reconnect every few minutes (a GOAWAY; calls and streams in flight finish on the old connection),
    # resolving `dns:///` addresses again: replicas added since are found by clients already connected.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)


def size_options(max_receive_bytes: int, max_send_bytes: int) -> tuple[tuple[str, int], ...]:
    return (("grpc.max_receive_message_length", min(max_receive_bytes, GRPC_MAX_MESSAGE_BYTES)),
            ("grpc.max_send_message_length", min(max_send_bytes, GRPC_MAX_MESSAGE_BYTES)))


@dataclass(frozen=True)
class Outgoing:
    """How a service's calls to other services identify and protect themselves: its platform token (sent as
    `x-clawhub-service` on every call; services/runtime/identity.py) and the TLS of its channels."""

    token: str | None = field(default=None, repr=False)
    tls: ClientTls | None = None


_PLAINTEXT = Outgoing()
_OUTGOING: ContextVar[Outgoing | None] = ContextVar("clawhub_outgoing", default=None)


@contextmanager
def outgoing(security: Outgoing) -> Iterator[None]:
    """Channels created inside (by `channel()`) use `security`. Each service's build_server wraps its body in
    it, so every client it builds (deployer backends, dispatcher executor clients, ...) carries its token."""
    reset = _OUTGOING.set(security)
    try:
        yield
    finally:
        _OUTGOING.reset(reset)


def current_outgoing() -> Outgoing:
    """The security `outgoing` set (plaintext outside it): for clients that open channels later, outside the
    build (services/runtime/executors.py opens one per executor as executors appear)."""
    return _OUTGOING.get() or _PLAINTEXT


def channel(address: str, *, max_receive_bytes: int = CONTROL_MESSAGE_BYTES,
            max_send_bytes: int = CONTROL_MESSAGE_BYTES, security: Outgoing | None = None,
            traced: bool | None = None, policy: str = "round_robin") -> grpc.aio.Channel:
    """An aio channel to another clawhub service.

    `security` (default: the one `outgoing` set, else none) adds the service's token to every call and TLS to
    the connection; without either, a plaintext channel (loopback, a private network or a mesh). The limits
    default to the control-plane cap; channels that carry skill input or output pass theirs. `traced` False
    leaves the channel untraced even when tracing is on now (a client that opens channels later keeps the
    choice made when it was built)."""
    security = security or _OUTGOING.get() or _PLAINTEXT
    target, balancing = grpc_target(address, policy=policy)
    options = (*_KEEPALIVE_CHANNEL, *size_options(max_receive_bytes, max_send_bytes), *balancing)
    if security.tls is not None:
        opened = grpc.aio.secure_channel(target, security.tls.credentials(), options=options)
    else:
        opened = grpc.aio.insecure_channel(target, options=options)
    # When tracing is on, each call gets a client span and carries its traceparent (services/runtime/tracing.py;
    # imported here so that the CLI, which imports this module, does not load OpenTelemetry).
    from services.runtime import tracing

    if traced is None or traced:
        opened = tracing.traced(opened)
    return TokenChannel(opened, security.token) if security.token else opened


class AddressError(SettingsError):
    """An address setting gRPC cannot use; the message says what to write instead (a SettingsError: a service
    reading it at start exits with that one line)."""


def grpc_target(address: str, *, policy: str = "round_robin") -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The gRPC target of a service address setting, and the channel options it needs.

    - `host:port`: one server, as is.
    - `dns:///name:port`: every address the name resolves to (a headless Kubernetes Service gives one per
      pod), balanced round-robin; gRPC resolves the name again when a connection fails.
    - `10.0.0.1:50052,10.0.0.2:50052`: replicas by IP address, balanced round-robin; calls go to the ones
      that are up, and a stream that breaks reconnects to another (`localhost` counts as 127.0.0.1).

    `policy` "pick_first" sends every call to one replica (the first that answers) until it fails: for a client
    whose calls belong together (a follower's acknowledgements go to the dispatcher whose stream it follows).
    """
    balancing: tuple[tuple[str, Any], ...] = (("grpc.lb_policy_name", policy),)
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) <= 1:
        target = parts[0] if parts else address.strip()
        return target, (balancing if target.startswith("dns:") else ())
    families: set[int] = set()
    entries: list[str] = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or host.endswith(":"):
            raise AddressError(f"{address!r}: {part!r} has no port (IP:PORT)")
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise AddressError(f"{address!r}: a list of replicas takes IP:PORT entries ({part!r} is not one); for "
                               "names use dns:///NAME:PORT, one name that resolves to every replica") from None
        families.add(ip.version)
        entries.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise AddressError(f"{address!r}: a list of replicas is all IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(entries)}", balancing


SERVICE_METADATA = "x-clawhub-service"


class _WithToken:
    """A multi-callable that adds the token to the metadata of every call it makes."""

    __slots__ = ("_inner", "_entry")

    def __init__(self, inner: Any, entry: tuple[str, str]) -> None:
        self._inner = inner
        self._entry = entry

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        # A relayed call's metadata is its caller's: any token entry in it is replaced, never passed on.
        own = (*(e for e in metadata if e[0] != SERVICE_METADATA), self._entry) if metadata else (self._entry,)
        return self._inner(*args, metadata=own, **kwargs)


class TokenChannel(WrappingChannel):
    """An aio channel whose every call carries `x-clawhub-service: <token>`: each multi-callable a stub takes
    from it adds the entry to the call's metadata. Not a client interceptor: grpc.aio runs interceptors through
    an extra task per call, which cost about 5% of invoke throughput where this costs one function call
    (docs/security.md, bench/edge_cost.py)."""

    def __init__(self, inner: grpc.aio.Channel, token: str) -> None:
        super().__init__(inner)
        self._entry = (SERVICE_METADATA, token)

    def _wrap(self, method: str, callable_: Any, kind: str) -> Any:
        return _WithToken(callable_, self._entry)


# Metadata the gateway sets, on every call it relays, to the address of the client it relays for (any value the
# client sent is dropped): behind the gateway the services' own peer is the gateway, and per-caller bounds
# (the registry's uploads) need the real client. A direct caller of an internal port can set it; that only
# moves it to another per-caller bucket, never past a total bound.
PEER_METADATA = "x-clawhub-peer"


def peer_host(peer: str) -> str:
    """A gRPC peer without its port: `ipv4:10.0.0.7:5123` → `ipv4:10.0.0.7`, `ipv6:[::1]:5123` → `ipv6:[::1]`;
    anything else unchanged. Each connection has its own port: with it, a client would get a fresh identity (and
    a fresh per-caller bound) per connection.

    gRPC writes IPv6 peers URL-encoded (`ipv6:%5B::1%5D:5123` since about 1.6x); both spellings give the same
    host."""
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return f"{scheme}:{rest.rpartition(':')[0] or rest}"
    if scheme == "ipv6":
        rest = urllib.parse.unquote(rest)
        if rest.startswith("["):
            return f"{scheme}:{rest.partition(']')[0]}]"
        # Unbracketed (not what gRPC writes today): the port is after the last colon.
        return f"{scheme}:[{rest.rpartition(':')[0] or rest}]"
    return peer
