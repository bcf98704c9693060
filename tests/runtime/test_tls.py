"""TLS on every port: a TLS gateway (called by grpcurl and the CLI), an mTLS registry behind it (called with
the gateway's client certificate and platform token), plaintext refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from clawhub.registry.v1 import registry_service_pb2 as pb
from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.channels import Outgoing, channel
from services.runtime.identity import load_identity, write_credentials
from services.runtime.settings import SettingsError
from services.runtime.tls import ClientTls, ServerTls, TlsSettings
from tests.conftest import Starter

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    ca_file: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey, issuer: str, *,
           ca: bool = False, server: bool = False) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issue("clawhub test CA", ca_key, ca_key, "clawhub test CA", ca=True)
    server = _issue("clawhub service", server_key, ca_key, "clawhub test CA", server=True)
    client = _issue("clawhub client", client_key, ca_key, "clawhub test CA")
    (tmp_path / "ca.pem").write_bytes(ca)
    return Pki(ca, server, _pem(server_key), client, _pem(client_key), tmp_path / "ca.pem")


async def test_tls_gateway_and_mtls_registry(start_service: Starter, pki: Pki, tmp_path: Path) -> None:
    write_credentials(tmp_path / "secrets")

    def me(service: str) -> object:
        secrets = tmp_path / "secrets"
        return load_identity(service, secrets / f"{service}.token", secrets / "identities.json")

    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", identity=me("registry"),  # type: ignore[arg-type]
        tls=TlsSettings(server=ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca)))))
    registry_address = f"127.0.0.1:{registry.port}"
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=registry_address, dispatcher_address="127.0.0.1:1",
        deployer_address="127.0.0.1:1", identity=me("gateway"),  # type: ignore[arg-type]
        tls=TlsSettings(server=ServerTls(pki.server_cert, pki.server_key),
                        client=ClientTls(pki.ca, pki.client_cert, pki.client_key)))))
    gateway_address = f"127.0.0.1:{gateway.port}"

    async def run(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(*args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode or 0, out.decode()

    # grpcurl over TLS, verifying the gateway's certificate with the CA.
    code, out = await run(str(BIN / "grpcurl"), "-cacert", str(pki.ca_file), gateway_address, "list")
    assert code == 0 and "clawhub.registry.v1.RegistryService" in out, out
    # The CLI over TLS: the call crosses the gateway, then mTLS + the gateway's token to the registry.
    code, out = await run(str(BIN / "clawhub"), "search", "anything", "--gateway", gateway_address,
                          "--tls-ca", str(pki.ca_file))
    assert code == 0, out
    code, out = await run(str(BIN / "clawhub"), "health", gateway_address, "--tls-ca", str(pki.ca_file))
    assert code == 0, out
    # Plaintext clients get nowhere.
    code, out = await run(str(BIN / "grpcurl"), "-plaintext", "-max-time", "5", gateway_address, "list")
    assert code != 0, out
    code, out = await run(str(BIN / "clawhub"), "search", "anything", "--gateway", gateway_address, "--timeout", "5")
    assert code != 0, out

    async def list_skills(security: Outgoing) -> grpc.StatusCode:
        async with channel(registry_address, security=security) as ch:
            try:
                await pb_grpc.RegistryServiceStub(ch).ListSkills(pb.ListSkillsRequest(), timeout=5)
            except grpc.aio.AioRpcError as err:
                return err.code()
        return grpc.StatusCode.OK

    token = me("gateway").token  # type: ignore[attr-defined]
    # The registry requires a client certificate (mTLS), and then the platform token.
    assert await list_skills(Outgoing(token=token)) == grpc.StatusCode.UNAVAILABLE
    assert await list_skills(Outgoing(token=token, tls=ClientTls(pki.ca))) == grpc.StatusCode.UNAVAILABLE
    assert await list_skills(Outgoing(tls=ClientTls(pki.ca, pki.client_cert, pki.client_key))) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert await list_skills(Outgoing(token=token, tls=ClientTls(pki.ca, pki.client_cert, pki.client_key))) == \
        grpc.StatusCode.OK


def test_tls_settings_are_read_together(monkeypatch: pytest.MonkeyPatch, pki: Pki, tmp_path: Path) -> None:
    for name in ("CLAWHUB_TLS_CERT_FILE", "CLAWHUB_TLS_KEY_FILE", "CLAWHUB_TLS_CLIENT_CA_FILE", "CLAWHUB_TLS_CA_FILE",
                 "CLAWHUB_TLS_CLIENT_CERT_FILE", "CLAWHUB_TLS_CLIENT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert TlsSettings.from_env() == TlsSettings()
    (tmp_path / "cert.pem").write_bytes(pki.server_cert)
    monkeypatch.setenv("CLAWHUB_TLS_CERT_FILE", str(tmp_path / "cert.pem"))
    with pytest.raises(SettingsError, match="set both or neither"):
        TlsSettings.from_env()
    (tmp_path / "key.pem").write_bytes(pki.server_key)
    monkeypatch.setenv("CLAWHUB_TLS_KEY_FILE", str(tmp_path / "key.pem"))
    monkeypatch.setenv("CLAWHUB_TLS_CLIENT_CA_FILE", str(pki.ca_file))
    monkeypatch.setenv("CLAWHUB_TLS_CA_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="CLAWHUB_TLS_CA_FILE=.*cannot read it"):
        TlsSettings.from_env()
    monkeypatch.setenv("CLAWHUB_TLS_CA_FILE", str(pki.ca_file))
    loaded = TlsSettings.from_env()
    assert loaded.server is not None and loaded.server.client_ca == pki.ca and loaded.client is not None
    assert "BEGIN" not in repr(loaded)
