"""Server reflection as grpcurl users meet it: the public port lists and describes only what a client can call,
with the proto comments; the internal services live on the internal ports only."""

from __future__ import annotations

import subprocess

from tests.e2e.conftest import BIN, ROOT, Suite

PUBLIC = {"clawhub.gateway.v1.GatewayService", "clawhub.registry.v1.RegistryService",
          "clawhub.registry.v1.AccessService", "clawhub.deployer.v1.DeployerService", "grpc.health.v1.Health",
          "grpc.reflection.v1alpha.ServerReflection"}
INTERNAL_SERVICES = ("clawhub.deployer.v1.DeployerInternalService", "clawhub.registry.v1.RegistryInternalService")
INTERNAL_METHODS = ("WatchRoutes", "AcknowledgeRoutes", "ReportStats", "DownloadBlob", "Authenticate")
# Types only the internal services use.
INTERNAL_SYMBOLS = (*INTERNAL_SERVICES, "clawhub.deployer.v1.DeployerInternalService.WatchRoutes",
                    "clawhub.deployer.v1.WatchRoutesRequest", "clawhub.deployer.v1.ReportStatsRequest",
                    "clawhub.deployer.v1.LatencyHistogram", "clawhub.registry.v1.DownloadBlobRequest",
                    "clawhub.registry.v1.AuthenticateRequest")


def listed(suite: Suite, address: str | None = None) -> set[str]:
    result = suite.grpcurl("list", address=address)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_public_port_lists_exactly_the_public_services(suite: Suite) -> None:
    assert listed(suite) == PUBLIC


def test_no_public_service_describes_an_internal_method(suite: Suite) -> None:
    for service in PUBLIC:
        described = suite.grpcurl("describe", service)
        assert described.returncode == 0, described.stderr
        assert not [m for m in INTERNAL_METHODS if m in described.stdout], (service, described.stdout)


def test_internal_symbols_are_not_found_on_the_public_port(suite: Suite) -> None:
    for symbol in INTERNAL_SYMBOLS:
        described = suite.grpcurl("describe", symbol)
        assert described.returncode != 0, (symbol, described.stdout)
        assert "not found" in described.stderr.lower(), described.stderr


def test_describe_shows_the_proto_comments(suite: Suite) -> None:
    method = suite.grpcurl("describe", "clawhub.gateway.v1.GatewayService.InvokeSkill")
    assert method.returncode == 0, method.stderr
    assert "// Invokes the active version of a skill." in method.stdout, method.stdout
    message = suite.grpcurl("describe", "clawhub.registry.v1.SkillVersion")
    assert message.returncode == 0, message.stderr
    assert "// One immutable version of a skill." in message.stdout, message.stdout
    assert "// Content digest of the module, `sha256:<hex>`." in message.stdout, message.stdout


def test_error_details_decode_through_reflection(suite: Suite) -> None:
    """grpcurl resolves the ErrorInfo of a refusal through the port's reflection."""
    refused = suite.grpcurl("clawhub.gateway.v1.GatewayService/InvokeSkill", data={"name": "NOT A NAME"})
    assert refused.returncode != 0
    assert '"reason":"INVALID_NAME"' in refused.stderr.replace(" ", ""), refused.stderr


def test_an_internal_method_called_on_the_public_port_is_refused(suite: Suite) -> None:
    # The caller has the contract (the internal proto file), as a dispatcher would; the gateway still refuses.
    for proto, method in (("clawhub/deployer/v1/deployer_internal.proto",
                           "clawhub.deployer.v1.DeployerInternalService/ReportStats"),
                          ("clawhub/registry/v1/registry_internal.proto",
                           "clawhub.registry.v1.RegistryInternalService/DownloadBlob")):
        called = subprocess.run(
            [str(BIN / "grpcurl"), "-plaintext", "-max-time", "20", "-import-path", str(ROOT / "protos"),
             "-proto", proto, "-d", "{}", suite.gateway, method], capture_output=True, text=True, timeout=30)
        assert called.returncode != 0, called.stdout
        assert "Code: Unimplemented" in called.stderr, called.stderr
        assert "internal to the platform" in called.stderr, called.stderr


def test_the_internal_ports_list_and_describe_their_internal_services(suite: Suite) -> None:
    for label, public, internal, method in (
            ("deployer", "clawhub.deployer.v1.DeployerService", "clawhub.deployer.v1.DeployerInternalService",
             "WatchRoutes"),
            ("registry", "clawhub.registry.v1.RegistryService", "clawhub.registry.v1.RegistryInternalService",
             "DownloadBlob")):
        address = suite.addresses[label]
        assert {public, internal} <= listed(suite, address)
        described = suite.grpcurl("describe", internal, address=address)
        assert described.returncode == 0, described.stderr
        assert f"rpc {method}" in described.stdout and "// " in described.stdout, described.stdout
