"""TLS on every port: server certificates (and client certificates, mTLS) for what a service serves, a CA for
what it calls.

Servers: `CLAWHUB_TLS_CERT_FILE` + `CLAWHUB_TLS_KEY_FILE` (PEM) serve TLS; `CLAWHUB_TLS_CLIENT_CA_FILE` also
requires every client to present a certificate that CA signed (mTLS). Clients (the channels between services):
`CLAWHUB_TLS_CA_FILE` verifies the servers' certificates (the address's host must be in the certificate's
subject alternative names), with `CLAWHUB_TLS_CLIENT_CERT_FILE` + `CLAWHUB_TLS_CLIENT_KEY_FILE` presented to
servers that require mTLS. Unset: plaintext (a private network, or a service mesh that encrypts;
docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.runtime.settings import SettingsError, env_str

CERT = "CLAWHUB_TLS_CERT_FILE"
KEY = "CLAWHUB_TLS_KEY_FILE"
CLIENT_CA = "CLAWHUB_TLS_CLIENT_CA_FILE"
CA = "CLAWHUB_TLS_CA_FILE"
CLIENT_CERT = "CLAWHUB_TLS_CLIENT_CERT_FILE"
CLIENT_KEY = "CLAWHUB_TLS_CLIENT_KEY_FILE"


def _read(variable: str, path: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SettingsError(f"{variable}={path!r}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise SettingsError(f"{variable}={path!r} is not a PEM file")
    return data


def _pair(cert_variable: str, key_variable: str) -> tuple[bytes, bytes] | None:
    cert, key = env_str(cert_variable, ""), env_str(key_variable, "")
    if bool(cert) != bool(key):
        raise SettingsError(f"{cert_variable} and {key_variable} go together: set both or neither")
    return (_read(cert_variable, cert), _read(key_variable, key)) if cert else None


@dataclass(frozen=True)
class ServerTls:
    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


@dataclass(frozen=True)
class ClientTls:
    ca: bytes = field(repr=False)
    cert_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.private_key,
                                            certificate_chain=self.cert_chain)


@dataclass(frozen=True)
class TlsSettings:
    """The TLS of a service's port and of its calls; None each: plaintext."""

    server: ServerTls | None = None
    client: ClientTls | None = None

    @classmethod
    def from_env(cls) -> TlsSettings:
        pair = _pair(CERT, KEY)
        client_ca = env_str(CLIENT_CA, "")
        if client_ca and pair is None:
            raise SettingsError(f"{CLIENT_CA} requires clients to present certificates over TLS: set {CERT} and "
                                f"{KEY} too")
        server = ServerTls(pair[0], pair[1], _read(CLIENT_CA, client_ca) if client_ca else None) if pair else None
        ca = env_str(CA, "")
        client_pair = _pair(CLIENT_CERT, CLIENT_KEY)
        if client_pair is not None and not ca:
            raise SettingsError(f"{CLIENT_CERT} is for TLS connections: set {CA} too")
        client = None
        if ca:
            client = ClientTls(_read(CA, ca), *(client_pair or (None, None)))
        return cls(server=server, client=client)
