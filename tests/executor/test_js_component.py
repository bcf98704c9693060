"""A JavaScript skill that uses the host's `kv` and `http` interfaces (examples/skills/toolchains/js-counter),
built by the real `clawhub build` with componentize-js and run through the executor's real Sandbox: the counter
counts in a real key-value store, a URL of a declared host is fetched from a local HTTP server, and a host the
skill does not declare is refused with HTTP_HOST_NOT_ALLOWED, which reaches JavaScript and fails the call.

componentize-js comes from the npm registry (`npm install`, cached by package.json across runs); the test is
skipped, with the reason, where Node.js is missing, the npm install fails, or this clawhub lacks the
component-v1 ABI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.cli import author
from services.executor.components import CompiledComponent
from services.executor.kvstore import KvStore, MemoryBackend
from services.executor.outbound import HttpSettings, OutboundHttp
from services.executor.sandbox import Grant, RunLimits, Sandbox, Verdict

# npm install (first run), componentize-js (about 17 s) and compiling an 11 MB component on a busy 2-core machine.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "skills" / "toolchains" / "js-counter"
CLAWHUB = Path(sys.executable).parent / "clawhub"
MiB = 1024 * 1024
LIMITS = RunLimits(memory_bytes=64 * MiB, timeout_seconds=5.0, max_output_bytes=MiB, max_stderr_bytes=4096)
SKILL = "com.example.counter-js"


def _node_modules(cache: Path) -> Path:
    """componentize-js installed from the example's package.json into a cache directory keyed by that file, so
    that only the first run on a machine downloads it. Skips when Node.js or the npm registry is missing."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("npx") is None or shutil.which("node") is None:
        pytest.skip("Node.js (node, npm, npx) is not installed")
    package = (EXAMPLE / "package.json").read_bytes()
    target = cache / hashlib.sha256(package).hexdigest()[:16]
    if not (target / "node_modules" / ".bin" / "componentize-js").exists():
        target.mkdir(parents=True, exist_ok=True)
        (target / "package.json").write_bytes(package)
        installed = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=target, capture_output=True,
                                   text=True, timeout=600, check=False)
        if installed.returncode != 0:
            pytest.skip(f"`npm install` of componentize-js failed (is the npm registry reachable?): "
                        f"{installed.stderr[-300:]}")
    return target / "node_modules"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    """The example as committed (sources only), built by `clawhub build` and checked by `clawhub test`."""
    if not author.component_abi_available():
        pytest.skip("this clawhub does not have the component-v1 ABI yet (manifest.ABIS lacks it)")
    if not CLAWHUB.exists():
        pytest.skip(f"{CLAWHUB} is not installed (run ./dev test, which installs the project)")
    cache = getattr(pytestconfig, "cache", None)  # None under `-p no:cacheprovider`: then every run installs
    node_modules = _node_modules(cache.mkdir("clawhub-componentize-js") if cache is not None
                                 else tmp_path_factory.mktemp("npm"))
    skill = tmp_path_factory.mktemp("js") / "js-counter"
    shutil.copytree(EXAMPLE, skill, ignore=shutil.ignore_patterns("*.wasm", "node_modules"))
    (skill / "node_modules").symlink_to(node_modules, target_is_directory=True)
    for command in ("build", "test"):
        result = subprocess.run([str(CLAWHUB), command, str(skill)], capture_output=True, text=True, timeout=600,
                                check=False)
        assert result.returncode == 0, f"clawhub {command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        if command == "build":
            # The world follows the capabilities: `kv` and `http:` → skill-kv-http.
            assert "--world-name skill-kv-http" in result.stderr
        else:
            assert "4 of 4 example(s) passed" in result.stdout
    return skill / "counter.wasm"


class _Handler(BaseHTTPRequestHandler):
    """GET /hello answers a fixed text, with the request's Accept header echoed in it."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path != "/hello":
            self.send_error(404)
            return
        body = f"hello from the test server ({self.headers.get('accept')})".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


def test_the_js_counter_counts_in_kv_and_fetches_only_declared_hosts(
        built: Path, sandbox: Sandbox, server: ThreadingHTTPServer) -> None:
    manifest = tomllib.loads((EXAMPLE / "skill.toml").read_text())
    assert manifest["abi"] == "component-v1" and manifest["module"] == "counter.wasm"
    port = server.server_address[1]
    capabilities = ["kv", f"http:127.0.0.1:{port}"]
    compiled = sandbox.compile("sha256:counter-js", built.read_bytes(), capabilities)
    assert isinstance(compiled, CompiledComponent)
    store = KvStore(MemoryBackend())
    client = OutboundHttp(HttpSettings(allow_private=True, timeout=2.0))  # the server is on loopback

    def call(request: object, caps: list[str] = capabilities, *, kv: bool = True) -> tuple[Verdict, bytes, bytes]:
        grant = Grant.of(caps, kv=store.namespace(SKILL) if kv else None, http=client)
        result = sandbox.run(compiled, json.dumps(request).encode(), LIMITS, grant)
        return result.verdict, result.output, result.stderr

    try:
        assert call({})[:2] == (Verdict.OK, b'{"count":1}')
        assert call({})[:2] == (Verdict.OK, b'{"count":2}')
        assert store.namespace(SKILL).get(b"count") == b"2"  # the count is the store's, not the instance's

        url = f"http://127.0.0.1:{port}/hello"
        verdict, output, stderr = call({"url": url})
        assert verdict is Verdict.OK, stderr
        assert json.loads(output) == {"count": 3, "status": 200,
                                      "body": "hello from the test server (text/plain, application/json)"}
        assert stderr.startswith(f"GET {url}: 200, ".encode())  # the skill's `log` line
        assert json.loads(call({"url": f"http://127.0.0.1:{port}/missing"})[1])["status"] == 404

        # A host the capabilities do not name: refused by the host, the refusal's text fails the call, and the
        # call does not count.
        verdict, output, stderr = call({"url": "http://example.com/"})
        assert (verdict, output) == (Verdict.EXIT_NONZERO, b"")
        assert stderr.startswith(b"HTTP_HOST_NOT_ALLOWED: http://example.com:80 is not allowed"), stderr
        # Another port of the same host is another host.
        verdict, _, stderr = call({"url": f"http://127.0.0.1:{port + 1 if port < 65535 else 1}/hello"})
        assert verdict is Verdict.EXIT_NONZERO and stderr.startswith(b"HTTP_HOST_NOT_ALLOWED: "), stderr
        assert call({})[:2] == (Verdict.OK, b'{"count":5}')

        # Without a store for the call, the kv refusal reaches JavaScript the same way.
        verdict, _, stderr = call({}, kv=False)
        assert verdict is Verdict.EXIT_NONZERO and stderr.startswith(b"PERMISSION_DENIED: `kv.get`"), stderr

        assert call({"reset": True})[:2] == (Verdict.OK, b'{"count":0}')
        grant = Grant.of(capabilities, kv=store.namespace(SKILL), http=client)
        result = sandbox.run(compiled, b"not json", LIMITS, grant)
        assert result.verdict is Verdict.EXIT_NONZERO and result.stderr.startswith(b"the input is not JSON: ")
        verdict, _, stderr = call([1, 2])
        assert verdict is Verdict.EXIT_NONZERO and stderr.startswith(b"send a JSON object"), stderr
        verdict, _, stderr = call({"url": 42})
        assert verdict is Verdict.EXIT_NONZERO and stderr.startswith(b'"url" must be a string'), stderr
    finally:
        client.close()
        store.close()
