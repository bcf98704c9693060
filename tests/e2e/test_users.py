"""Users, keys and roles through the real suite (`clawhub up`, the CLI, a second gateway process).

One suite for the module, started with JWT keys configured (an HS256 secret and a JWKS of an Ed25519 key); the
CLI finds the admin key `up` created in the credentials file (XDG_CONFIG_HOME is the test session's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.e2e.conftest import BIN, ROOT, Suite, start_up, stop_up, suite_env

HS256_SECRET = b"0123456789abcdef0123456789abcdef-test-secret"
EXAMPLES = ROOT / "examples" / "skills"


@pytest.fixture(scope="module")
def ed25519() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, ed25519: Ed25519PrivateKey) -> Iterator[Suite]:
    base = tmp_path_factory.mktemp("users")
    secret = base / "hs256.secret"
    secret.write_bytes(HS256_SECRET)
    secret.chmod(0o600)
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ed25519.public_key()))
    jwks = base / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "test-ed", "alg": "EdDSA", "use": "sig"}]}))
    running = start_up(base / "data", executors=1, env=suite_env(
        CLAWHUB_JWT_HS256_SECRET_FILE=str(secret), CLAWHUB_JWT_JWKS_FILE=str(jwks)))
    try:
        yield running
    finally:
        stop_up(running)


def run(suite: Suite, *args: str, token: str | None = None, anonymous: bool = False,
        gateway: str | None = None, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI against the suite: with the credentials file (the admin key), or `token` ($CLAWHUB_TOKEN), or as
    nobody (a config directory without credentials)."""
    env = dict(os.environ)
    env.pop("CLAWHUB_TOKEN", None)
    if token is not None:
        env["CLAWHUB_TOKEN"] = token
    if anonymous:
        env["XDG_CONFIG_HOME"] = str(tmp or Path("/nonexistent-clawhub-config"))
    return subprocess.run([str(BIN / "clawhub"), *args, "--gateway", gateway or suite.gateway], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)


def skill_dir(tmp: Path, name: str, source: str = "uppercase") -> Path:
    target = tmp / name
    shutil.copytree(EXAMPLES / source, target)
    toml = target / "skill.toml"
    toml.write_text(re.sub(r'^name = ".*"$', f'name = "{name}"', toml.read_text(), count=1, flags=re.M))
    return target


def create_key(suite: Suite, name: str, role: str, *scopes: str) -> str:
    args = ["keys", "create", name, "--role", role]
    for scope in scopes:
        args += ["--scope", scope]
    done = run(suite, *args)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert re.fullmatch(r"chk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key), key
    return key


@pytest.fixture(scope="module")
def deployed(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> str:
    """com.example.uppercase published and deployed by the admin key (the README's walkthrough, unchanged)."""
    for args in (("publish", str(EXAMPLES / "uppercase")), ("deploy", "com.example.uppercase@1.0.0", "--plain")):
        done = run(suite, *args)
        assert done.returncode == 0, done.stderr
    return "com.example.uppercase"


def test_the_credentials_file_is_private_and_names_the_gateway(suite: Suite) -> None:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "clawhub" / "credentials"
    assert path.stat().st_mode & 0o777 == 0o600
    assert suite.admin_key in path.read_text() and suite.gateway in path.read_text()
    copy = suite.data_dir / "secrets" / "admin.key"
    assert copy.stat().st_mode & 0o777 == 0o600 and copy.read_text().strip() == suite.admin_key


def test_anonymous_callers_are_refused_everything(suite: Suite, deployed: str, tmp_path: Path) -> None:
    for args in (("invoke", deployed, "--input", '"hi"'), ("status",), ("deploy", f"{deployed}@1.0.0", "--plain"),
                 ("publish", str(EXAMPLES / "uppercase"))):
        done = run(suite, *args, anonymous=True, tmp=tmp_path)
        assert done.returncode != 0, (args, done.stdout)
        assert "UNAUTHENTICATED" in done.stderr and "CREDENTIALS_REQUIRED" in done.stderr, (args, done.stderr)
    # grpcurl without a header, straight at the public port.
    refused = suite.grpcurl("clawhub.gateway.v1.GatewayService/InvokeSkill", data={"name": deployed, "input": 1},
                            anonymous=True)
    assert "Unauthenticated" in refused.stdout + refused.stderr


def test_an_invoker_key_invokes_but_cannot_deploy(suite: Suite, deployed: str) -> None:
    key = create_key(suite, "invoker-bot", "invoker")
    done = run(suite, "invoke", deployed, "--input", '"hi"', token=key)
    assert done.returncode == 0 and done.stdout.strip() == '"HI"', done.stderr
    refused = run(suite, "deploy", f"{deployed}@1.0.0", "--plain", token=key)
    assert refused.returncode != 0
    assert "PERMISSION_DENIED" in refused.stderr and "deployments.create" in refused.stderr, refused.stderr
    # A bad key is UNAUTHENTICATED, not anonymous.
    bad = run(suite, "invoke", deployed, "--input", '"hi"', token=key[:-4] + "AAAA")
    assert "UNAUTHENTICATED" in bad.stderr and "INVALID_TOKEN" in bad.stderr, bad.stderr


def test_a_scoped_operator_deploys_only_in_its_scope_and_the_audit_log_says_who(
        suite: Suite, deployed: str, tmp_path: Path) -> None:
    assert run(suite, "publish", str(skill_dir(tmp_path, "com.acme.upper"))).returncode == 0
    key = create_key(suite, "acme-ops", "operator", "com.acme.")
    key_id = key[4:16]
    refused = run(suite, "deploy", f"{deployed}@1.0.0", "--plain", token=key)
    assert refused.returncode != 0
    assert "PERMISSION_DENIED" in refused.stderr and "deployments.create" in refused.stderr
    assert deployed in refused.stderr and "only for com.acme" in refused.stderr, refused.stderr
    refused = run(suite, "rollback", deployed, token=key)
    assert "PERMISSION_DENIED" in refused.stderr and "deployments.rollback" in refused.stderr, refused.stderr
    done = run(suite, "deploy", "com.acme.upper@1.0.0", "--plain", token=key)
    assert done.returncode == 0, done.stderr
    audit = run(suite, "audit")
    assert audit.returncode == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert any("deployer" in line and f"chk_{key_id} (acme-ops)" in line and "CreateDeployment" in line
               and "com.acme.upper@1.0.0" in line and line.rstrip().split()[-2] == "OK" for line in lines), audit.stdout
    # The refusal is on the record too, at the owning service... only when the gateway let it through; the gateway
    # refused this one first, so the deployer never saw it. The admin's deploy is there.
    assert any("chk_" in line and "(admin)" in line and "CreateDeployment" in line for line in lines)
    assert any("registry" in line and "CreateApiKey" in line and "acme-ops" in line for line in lines)
    # Audit is the admin's: an operator is refused.
    assert "audit.read" in run(suite, "audit", token=key).stderr


def test_an_existing_publisher_token_still_publishes_and_cannot_deploy(suite: Suite, tmp_path: Path) -> None:
    made = run(suite, "publisher", "create", "globex")
    assert made.returncode == 0, made.stderr
    token = next(word for word in made.stdout.split() if word.startswith("clawhub_"))
    assert run(suite, "namespace", "create", "com.globex", "--owner", "globex").returncode == 0
    done = run(suite, "publish", str(skill_dir(tmp_path, "com.globex.upper")), token=token)
    assert done.returncode == 0, done.stderr
    # Another publisher's namespace: still the registry's NAMESPACE_NOT_OWNED.
    run(suite, "publisher", "create", "initech")
    other = run(suite, "publisher", "create", "initech2")
    other_token = next(word for word in other.stdout.split() if word.startswith("clawhub_"))
    refused = run(suite, "publish", str(skill_dir(tmp_path, "com.globex.other")), token=other_token)
    assert "NAMESPACE_NOT_OWNED" in refused.stderr, refused.stderr
    # Deploying (or rolling back) is an operator's: a publisher token is refused, in its own namespace too.
    refused = run(suite, "deploy", "com.globex.upper@1.0.0", "--plain", token=token)
    assert "PERMISSION_DENIED" in refused.stderr and "deployments.create" in refused.stderr, refused.stderr
    refused = run(suite, "rollback", "com.globex.upper", token=other_token)
    assert "PERMISSION_DENIED" in refused.stderr and "deployments.rollback" in refused.stderr, refused.stderr


def _jwt_hs256(claims: dict[str, object]) -> str:
    return jwt.encode(claims, HS256_SECRET, algorithm="HS256")


def test_jwts_are_accepted_when_valid_and_refused_when_expired_or_early(
        suite: Suite, deployed: str, ed25519: Ed25519PrivateKey) -> None:
    now = int(time.time())
    good = _jwt_hs256({"sub": "alice", "role": "invoker", "exp": now + 300})
    done = run(suite, "invoke", deployed, "--input", '"jwt"', token=good)
    assert done.returncode == 0 and done.stdout.strip() == '"JWT"', done.stderr
    eddsa = jwt.encode({"sub": "bob", "roles": ["viewer", "invoker"], "exp": now + 300}, ed25519,
                       algorithm="EdDSA", headers={"kid": "test-ed"})
    done = run(suite, "invoke", deployed, "--input", '"ed"', token=eddsa)
    assert done.returncode == 0 and done.stdout.strip() == '"ED"', done.stderr
    # Roles from the claims: an invoker JWT cannot deploy.
    refused = run(suite, "deploy", f"{deployed}@1.0.0", "--plain", token=good)
    assert "PERMISSION_DENIED" in refused.stderr and "jwt:alice" in refused.stderr, refused.stderr
    for bad, why in ((_jwt_hs256({"sub": "alice", "role": "invoker", "exp": now - 60}), "expired"),
                     (_jwt_hs256({"sub": "alice", "role": "invoker", "exp": now + 300, "nbf": now + 120}), "nbf"),
                     (jwt.encode({"sub": "x", "role": "admin", "exp": now + 300}, Ed25519PrivateKey.generate(),
                                 algorithm="EdDSA", headers={"kid": "test-ed"}), "does not verify")):
        refused = run(suite, "invoke", deployed, "--input", '"x"', token=bad)
        assert refused.returncode != 0 and "INVALID_TOKEN" in refused.stderr and why in refused.stderr, \
            (why, refused.stderr)


def _second_gateway(suite: Suite, **extra_env: str) -> tuple[subprocess.Popen[str], str]:
    """Another gateway process in front of the suite's services, as a second replica would be."""
    secrets = suite.data_dir / "secrets"
    env = {**os.environ, "CLAWHUB_GATEWAY_PORT": "0", "CLAWHUB_GATEWAY_HOST": "127.0.0.1",
           "CLAWHUB_REGISTRY_ADDRESS": suite.addresses["registry"],
           "CLAWHUB_DEPLOYER_ADDRESS": suite.addresses["deployer"],
           "CLAWHUB_DISPATCHER_ADDRESS": suite.addresses["dispatcher"],
           "CLAWHUB_SERVICE_TOKEN_FILE": str(secrets / "gateway.token"),
           "CLAWHUB_PLATFORM_IDENTITIES_FILE": str(secrets / "identities.json")}
    env.pop("CLAWHUB_USER_AUTH", None)
    env.update(extra_env)
    process = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    found: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if not found and (match := re.match(r"clawhub gateway listening on (\S+)", line)):
                found.append(match[1])

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 20
    while not found and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert found, "the second gateway did not start"
    return process, found[0]


def test_a_revoked_key_is_refused_within_a_second_by_every_gateway(suite: Suite, deployed: str) -> None:
    from services.cli import credentials

    second, address = _second_gateway(suite)
    try:
        # The second gateway's CLI finds the admin key under its own address too.
        credentials.remember(address, suite.admin_key, suite.data_dir)
        key = create_key(suite, "soon-revoked", "invoker")
        gateways = (suite.gateway, address)
        for gateway in gateways:  # both have the key cached now
            done = run(suite, "invoke", deployed, "--input", '"a"', token=key, gateway=gateway)
            assert done.returncode == 0, done.stderr
        stubs = {g: gateway_grpc.GatewayServiceStub(grpc.insecure_channel(g)) for g in gateways}
        request = gateway_pb.InvokeSkillRequest(name=deployed, raw_input=b'"a"')
        metadata = (("authorization", f"Bearer {key}"),)
        for stub in stubs.values():  # cached again, just before the revocation
            stub.InvokeSkill(request, metadata=metadata, timeout=10)
        revoked = run(suite, "keys", "revoke", key[4:16])
        assert revoked.returncode == 0, revoked.stderr
        after = time.monotonic()
        refused_at: dict[str, float] = {}
        while len(refused_at) < 2 and time.monotonic() - after < 5:
            for gateway, stub in stubs.items():
                if gateway in refused_at:
                    continue
                try:
                    stub.InvokeSkill(request, metadata=metadata, timeout=10)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
                    refused_at[gateway] = time.monotonic() - after
            time.sleep(0.02)
        assert set(refused_at) == set(gateways), refused_at
        # Within the 1 s cache bound (the revoke command itself took part of it).
        assert max(refused_at.values()) <= 1.0 + 0.1, refused_at
        listed = run(suite, "keys", "list").stdout
        assert any(key[4:16] in line and "soon-revoked" in line and line.split()[5] != "-"
                   for line in listed.splitlines()), listed
    finally:
        second.terminate()
        second.wait(10)
        if second.stdout is not None:
            second.stdout.close()
