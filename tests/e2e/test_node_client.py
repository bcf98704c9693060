"""The Node.js example client (examples/clients/node) against the real suite: invoke a skill, list skills, and the
structured error of a failure decoded from the grpc-status-details-bin trailer.

Needs `node` and `npm`; without them the tests skip and say so. Its npm dependencies are installed once per
package-lock.json (`npm ci` into a cache directory keyed by the lock's hash) and linked into a copy of the example,
so the working tree is never written to and concurrent runs do not race. Where npm cannot install (offline), the
tests skip, except under CI (`CI` set), where the client must run: there they fail with npm's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Suite, start_up, stop_up

EXAMPLE = ROOT / "examples" / "clients" / "node"
SKILLS = ROOT / "examples" / "skills"
MIN_NODE_MAJOR = 18

# npm ci on a cold cache, and a suite started for this module, take longer than the default 60 s.
pytestmark = pytest.mark.timeout(300)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the Node.js client must run, but: {reason}")
    pytest.skip(reason)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(base) / "clawhub-tests"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "clawhub-tests"
        root.mkdir(parents=True, exist_ok=True)
    return root


def _node_modules() -> Path:
    """node_modules for the example's package-lock.json, installed by `npm ci` once per lock."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"the Node.js client example needs node and npm on PATH ({'node' if node is None else 'npm'} "
                    "is missing)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    found = re.match(r"v(\d+)\.", version)
    if found is None or int(found.group(1)) < MIN_NODE_MAJOR:
        pytest.skip(f"the Node.js client example needs Node.js {MIN_NODE_MAJOR} or later (found {version!r})")
    lock = (EXAMPLE / "package-lock.json").read_bytes()
    key = hashlib.sha256(lock + (EXAMPLE / "package.json").read_bytes()).hexdigest()[:16]
    target = _cache_root() / f"node-client-{key}"
    if (target / "node_modules" / "@grpc" / "grpc-js" / "package.json").exists():
        return target / "node_modules"
    # Install beside the target and move it into place: a concurrent run installs its own copy, and the
    # first to finish wins, so nobody ever sees half an install.
    staging = Path(tempfile.mkdtemp(prefix=f"node-client-{key}-", dir=target.parent))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(EXAMPLE / name, staging / name)
        try:
            result = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"],
                                    cwd=staging, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            _skip_or_fail("npm ci did not finish in 240 s (is the npm registry reachable?)")
        if result.returncode != 0:
            _skip_or_fail(f"npm ci failed (offline?), exit status {result.returncode}:\n{result.stderr[-2000:]}")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "node_modules").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "node_modules"


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example in the repository's layout (its protos/ at ../../../protos), with node_modules."""
    modules = _node_modules()
    tree = tmp_path_factory.mktemp("node-client")
    copy = tree / "examples" / "clients" / "node"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("node_modules"))
    (copy / "node_modules").symlink_to(modules, target_is_directory=True)
    (tree / "protos").symlink_to(ROOT / "protos", target_is_directory=True)
    return copy


@pytest.fixture(scope="module")
def deployed(client_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    running = start_up(tmp_path_factory.mktemp("clawhub-node"), executors=1)
    try:
        for skill in ("uppercase", "echo-memory"):
            published = running.cli("publish", str(SKILLS / skill))
            assert published.returncode == 0, published.stderr
            deploy = running.cli("deploy", f"com.example.{skill}@1.0.0")
            assert deploy.returncode == 0, deploy.stderr + "".join(running.log[-30:])
        yield running
    finally:
        code = stop_up(running)
    assert code == 0, "clawhub up did not stop cleanly:\n" + "".join(running.log[-40:])


def node(client_dir: Path, *args: str, gateway: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    from services.cli import credentials

    command = ["node", "client.js", *args] + (["--gateway", gateway] if gateway else [])
    # The credential the CLI would send to that gateway (the admin key `clawhub up` created), as $CLAWHUB_TOKEN.
    token = credentials.lookup(gateway or (env or {}).get("CLAWHUB_GATEWAY", ""))
    return subprocess.run(command, cwd=client_dir, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **({"CLAWHUB_TOKEN": token} if token else {}), **(env or {})})


def test_unit_tests_of_the_example(client_dir: Path) -> None:
    # Value <-> JSON through proto-loader's own serializer, and the Status decoding, RetryInfo included.
    result = subprocess.run(["node", "--test"], cwd=client_dir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


def test_invoke_returns_the_skill_output(deployed: Suite, client_dir: Path) -> None:
    result = node(client_dir, "invoke", "com.example.uppercase", "--input", '"hello from node"',
                  gateway=deployed.gateway)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '"HELLO FROM NODE"\n'
    raw = node(client_dir, "invoke", "com.example.uppercase", "--raw", "not json", gateway=deployed.gateway)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == "NOT JSON"


def test_every_kind_of_json_value_survives_the_trip(deployed: Suite, client_dir: Path) -> None:
    # The gateway default comes from CLAWHUB_GATEWAY, as for the clawhub CLI.
    env = {"CLAWHUB_GATEWAY": deployed.gateway}
    value = {"null": None, "bools": [True, False], "numbers": [0, -1.5, 1e300, 2**53], "strings": ["", "ünï ✓"],
             "empty": [[], {}], "nested": {"a": {"b": [None, {"c": "d"}]}}}
    for given in (value, None, False, 0, "", [], {}):
        result = node(client_dir, "invoke", "com.example.echo-memory", "--input", json.dumps(given), env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == given


def test_list_shows_the_published_skills(deployed: Suite, client_dir: Path) -> None:
    result = node(client_dir, "list", gateway=deployed.gateway)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "com.example.uppercase\t1.0.0\tEchoes its input in upper case" in lines
    assert any(line.startswith("com.example.echo-memory\t1.0.0\t") for line in lines)
    only = node(client_dir, "list", "--prefix", "com.example.upper", gateway=deployed.gateway)
    assert [line.split("\t")[0] for line in only.stdout.splitlines()] == ["com.example.uppercase"]


def test_a_failure_prints_status_reason_and_field(deployed: Suite, client_dir: Path) -> None:
    result = node(client_dir, "invoke", "Not A Name", "--input", "1", gateway=deployed.gateway)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT (3): 'Not A Name' is not a reverse-DNS skill name")
    assert "  ErrorInfo: reason INVALID_NAME, domain gateway.clawhub" in lines
    assert "    field: name" in lines
    assert any(line.startswith("  BadRequest: field name: 'Not A Name' is not a reverse-DNS") for line in lines)

    unknown = node(client_dir, "invoke", "com.example.does-not-exist", "--error-format", "json",
                   gateway=deployed.gateway)
    assert unknown.returncode == 1
    status = json.loads(unknown.stderr)
    assert (status["code"], status["code_name"]) == (5, "NOT_FOUND")
    assert status["message"] == "no skill named 'com.example.does-not-exist' is published"
    assert status["details"] == [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SKILL_NOT_FOUND",
                                  "domain": "gateway.clawhub", "metadata": {"skill": "com.example.does-not-exist"}}]


def test_an_unreachable_gateway_says_where_it_looked(client_dir: Path) -> None:
    # A port nothing listens on: gRPC's own UNAVAILABLE, which carries no details.
    result = node(client_dir, "list", gateway="127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE (14):")
    assert "Is clawhub running at 127.0.0.1:1?" in result.stderr
