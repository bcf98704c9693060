"""Capabilities end to end: a skill with a deploy-time environment variable, a bundled file and arguments,
published and deployed with the CLI, invoked through the gateway; an undeclared variable is refused."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

import grpc
import pytest
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.registry.v1 import registry_internal_pb2 as registry_internal_pb
from clawhub.registry.v1 import registry_internal_pb2_grpc as registry_internal_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.runtime.errors import bad_request, error_info
from tests.e2e.conftest import ROOT, Suite
from tests.e2e.test_suite import invoke

GREETER = ROOT / "examples" / "skills" / "greeter"
NAME = "com.example.greeter"


@pytest.fixture(scope="module")
def channel(suite: Suite) -> Iterator[grpc.Channel]:
    with suite.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def published(suite: Suite) -> Suite:
    result = suite.cli("publish", str(GREETER))
    assert result.returncode == 0, result.stderr
    assert "1 bundled file(s)" in result.stderr
    assert "file bundle sha256:" in result.stdout
    return suite


def test_the_bundle_is_published_and_downloadable(published: Suite, channel: grpc.Channel) -> None:
    registry = registry_grpc.RegistryServiceStub(channel)
    version = registry.GetSkillVersion(registry_pb.GetSkillVersionRequest(name=NAME, version="1.0.0"),
                                       timeout=10).skill_version
    assert list(version.manifest.capabilities) == ["env:GREETING", "files"]
    assert list(version.manifest.args) == ["!"]
    assert [f.path for f in version.manifest.files] == ["data/name.txt"]
    assert version.bundle_digest.startswith("sha256:")
    # Blobs are downloaded from the registry itself (as executors do): the public port does not serve them.
    request = registry_internal_pb.DownloadBlobRequest(digest=version.bundle_digest)
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(registry_internal_grpc.RegistryInternalServiceStub(channel).DownloadBlob(request, timeout=10)))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The registry's port answers only the platform's services: download as an executor does, with its token.
    executor_token = (published.data_dir / "secrets" / "executor.token").read_text().strip()
    with grpc.insecure_channel(published.addresses["registry"]) as direct:
        tar = b"".join(r.chunk for r in registry_internal_grpc.RegistryInternalServiceStub(direct).DownloadBlob(
            request, metadata=(("x-clawhub-service", executor_token),), timeout=10))
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        member = archive.getmember("data/name.txt")
        assert archive.extractfile(member).read() == (GREETER / "data" / "name.txt").read_bytes()  # type: ignore[union-attr]
    # Publishing the same directory again is idempotent.
    again = published.cli("publish", str(GREETER))
    assert again.returncode == 0 and "already published" in again.stdout, again.stderr


def test_an_undeclared_env_key_is_refused(published: Suite, channel: grpc.Channel) -> None:
    result = published.cli("deploy", f"{NAME}@1.0.0", "--env", "GREETING=Hello", "--env", "HOME=/root")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "error: env[HOME]: " in result.stderr, result.stderr
    with pytest.raises(grpc.RpcError) as caught:
        deployer_grpc.DeployerServiceStub(channel).CreateDeployment(deployer_pb.CreateDeploymentRequest(
            skill=NAME, version="1.0.0", env={"AWS_SECRET_ACCESS_KEY": "x"}), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None and info.domain == "deployer.clawhub"
    violations = bad_request(caught.value)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["env[AWS_SECRET_ACCESS_KEY]"]


def test_the_skill_reads_its_env_bundled_file_and_args(published: Suite, channel: grpc.Channel) -> None:
    """Needs an executor that grants env, args and the bundle (issue 3)."""
    deployed = published.cli("deploy", f"{NAME}@1.0.0", "--env", "GREETING=Hello")
    assert deployed.returncode == 0, deployed.stderr + "".join(published.log[-30:])
    assert invoke(channel, NAME, "").output.string_value == "Hello, World!"
    # The value is the deployment's: a new deployment with another value changes it.
    redeployed = published.cli("deploy", f"{NAME}@1.0.0", "--env", "GREETING=Bonjour")
    assert redeployed.returncode == 0, redeployed.stderr
    assert invoke(channel, NAME, "").output.string_value == "Bonjour, World!"
    # Rolling back restores the previous deployment's value.
    rolled = published.cli("rollback", NAME)
    assert rolled.returncode == 0, rolled.stderr
    assert invoke(channel, NAME, "").output.string_value == "Hello, World!"
    # Values never reach the logs.
    assert not any("Bonjour" in line for line in published.log)
