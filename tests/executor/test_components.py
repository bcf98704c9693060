"""The component-v1 ABI (WebAssembly components of wit/skill.wit): the Python example through the real sandbox
and executor, every limit with its verdict and ErrorInfo reason, the world check at publish (the registry's
verifier) and at load.

Three kinds of component: small hand-written ones (component WAT, compiled in milliseconds) for exact
behaviours; the committed Python example `examples/skills/hello-python/hello.wasm`; and a misbehaving Python
skill (`components/limits_app.py`), built here with componentize-py (cached by source) and skipped, with the
reason, where componentize-py is not installed."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.executor.components import CompiledComponent, runner_for
from services.executor.kvstore import KvLimits, KvStore, MemoryBackend
from services.executor.outbound import HttpSettings, OutboundHttp
from services.executor.sandbox import (
    NO_GRANT,
    CompiledModule,
    Grant,
    ModuleRejected,
    RunControl,
    RunLimits,
    RunResult,
    Sandbox,
    Verdict,
)
from services.registry.verify import ABIS, Verifier
from services.runtime.components import COMPONENT_V1, NOT_A_COMPONENT, compile_component
from services.runtime.errors import error_info
from services.runtime.wasm import WASI_COMMAND_V1, is_component, make_engine
from tests.conftest import wat
from tests.executor.conftest import Executor, ExecutorFactory, MemorySource, limits
from tests.executor.test_outbound import FakeDns, Server, _serve

# Compiling a Python component takes 7-30 s on a busy 2-core machine, and a componentize-py build as long again:
# more than the suite's 60 s default for the tests that do both.
pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
WIT = ROOT / "wit"
HELLO = ROOT / "examples" / "skills" / "hello-python"
FIXTURES = Path(__file__).resolve().parent / "components"
MiB = 1024 * 1024
LIMITS = RunLimits(memory_bytes=64 * MiB, timeout_seconds=2.0, max_output_bytes=MiB, max_stderr_bytes=4096)

# --- hand-written components -------------------------------------------------------------------------------

_RUN_TYPE = '(param "input" (list u8)) (result (result (list u8) (error string)))'


def component(run: str, *, data: str = "", pages: int = 1, imports: str = "") -> bytes:
    """A component of the skill world: imports `log`, and exports `run`, whose core body is `run` (params
    $ptr, $len: the input; returns the address of the result: tag byte at +0, then pointer and length at +4
    and +8). `$log` (ptr, len) writes a log line; `ok` and `err` below build results."""
    return wat(f"""(component
      (import "log" (func $log (param "line" string)))
      {imports}
      (core module $mem (memory (export "memory") {pages}))
      (core instance $mi (instantiate $mem))
      (core func $log_lowered (canon lower (func $log) (memory (core memory $mi "memory"))))
      (core module $m
        (import "env" "memory" (memory {pages}))
        (import "env" "log" (func $log (param i32 i32)))
        {data}
        (global $heap (mut i32) (i32.const 4096))
        (func (export "realloc") (param i32 i32 i32 i32) (result i32)
          (local $p i32)
          (local.set $p (global.get $heap))
          (global.set $heap (i32.add (global.get $heap) (local.get 3)))
          ;; grow to fit [p, heap); a refused growth traps
          (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
            (then (if (i32.eq (memory.grow (i32.sub (i32.shr_u (i32.add (global.get $heap) (i32.const 65535))
                                                               (i32.const 16)) (memory.size)))
                              (i32.const -1))
              (then unreachable))))
          (local.get $p))
        (func $result (param $tag i32) (param $ptr i32) (param $len i32) (result i32)
          (i32.store8 (i32.const 16) (local.get $tag))
          (i32.store (i32.const 20) (local.get $ptr))
          (i32.store (i32.const 24) (local.get $len))
          (i32.const 16))
        (func (export "run") (param $ptr i32) (param $len i32) (result i32) {run}))
      (core instance $i (instantiate $m (with "env" (instance (export "memory" (memory $mi "memory"))
                                                              (export "log" (func $log_lowered))))))
      (func (export "run") {_RUN_TYPE}
        (canon lift (core func $i "run") (memory (core memory $mi "memory")) (realloc (core func $i "realloc")))))""")


ECHO = component("(call $result (i32.const 0) (local.get $ptr) (local.get $len))")
LOGS = component("""(call $log (i32.const 100) (i32.const 9))
                    (call $result (i32.const 0) (local.get $ptr) (local.get $len))""",
                 data='(data (i32.const 100) "hello log")')
FAILS = component("(call $result (i32.const 1) (i32.const 100) (i32.const 4))", data='(data (i32.const 100) "boom")')
TRAPS = component("unreachable")
SPINS = component("(loop $forever (br $forever)) unreachable")
# 32 pages = 2 MiB of memory at instantiation.
BIG = component("(call $result (i32.const 0) (local.get $ptr) (local.get $len))", pages=32)
# Claims an output region far outside its memory: the host refuses to read it (a trap, never a host crash).
LIES = component("(call $result (i32.const 0) (i32.const 65000) (i32.const 100000))")
# Returns an `err` whose message is not UTF-8: the canonical ABI refuses it (a trap).
BAD_STRING = component("(call $result (i32.const 1) (i32.const 100) (i32.const 2))",
                       data='(data (i32.const 100) "\\ff\\fe")')


def bare(body: str) -> bytes:
    """A component that is only `body` (for world checks: types and imports, nothing runs)."""
    return wat(f"(component {body})")


# --- componentize-py builds, cached ------------------------------------------------------------------------

def _componentize_py() -> str | None:
    return shutil.which("componentize-py", path=str(Path(sys.executable).parent)) or shutil.which("componentize-py")


def componentize(app_dir: Path, module: str, cache: Path, world: str = "skill") -> bytes:
    """`module` in `app_dir` built into a component of `world` in wit/skill.wit with componentize-py, cached by
    the sources, the world and componentize-py's version (a build takes 10-20 s). Skips when componentize-py
    is missing."""
    exe = _componentize_py()
    if exe is None:
        pytest.skip("componentize-py is not installed (`pip install componentize-py==0.25.1`, a dev dependency): "
                    "the Python component cannot be built")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    key = hashlib.sha256(f"{version}\0{world}".encode())
    for source in sorted(WIT.glob("*.wit")) + [app_dir / f"{module}.py"]:
        key.update(source.name.encode() + b"\0" + source.read_bytes())
    built = cache / f"{module}-{key.hexdigest()[:16]}.wasm"
    if not built.exists():
        scratch = built.with_suffix(".tmp")
        subprocess.run([exe, "-d", str(WIT), "-w", world, "componentize", "-p", str(app_dir), module,
                        "-o", str(scratch)], check=True, capture_output=True, timeout=600)
        scratch.replace(built)
    return built.read_bytes()


# --- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


@pytest.fixture(scope="module")
def hello_bytes() -> bytes:
    return (HELLO / "hello.wasm").read_bytes()


@pytest.fixture(scope="module")
def hello(sandbox: Sandbox, hello_bytes: bytes) -> CompiledComponent:
    compiled = sandbox.compile("sha256:hello", hello_bytes)
    assert isinstance(compiled, CompiledComponent)
    return compiled


@pytest.fixture(scope="module")
def limits_app(sandbox: Sandbox, pytestconfig: pytest.Config) -> CompiledComponent:
    data = componentize(FIXTURES, "limits_app", pytestconfig.cache.mkdir("clawhub-components"))
    compiled = sandbox.compile("sha256:limits-app", data, ["files", "env:GREETING"])
    assert isinstance(compiled, CompiledComponent)
    return compiled


def examples() -> list[dict[str, str]]:
    with open(HELLO / "skill.toml", "rb") as fh:
        manifest = tomllib.load(fh)
    assert manifest["abi"] == "component-v1" and manifest["module"] == "hello.wasm"
    return list(manifest["examples"])


def run(sandbox: Sandbox, compiled: CompiledModule, data: bytes, limits: RunLimits = LIMITS, *,
        grant: Grant = NO_GRANT, control: RunControl | None = None) -> RunResult:
    return sandbox.run(compiled, data, limits, grant, control)


# --- the Python example ------------------------------------------------------------------------------------

def test_the_example_is_a_committed_component_of_the_world(hello_bytes: bytes) -> None:
    assert is_component(hello_bytes)
    size = len(hello_bytes)
    assert 1 * MiB < size < 20 * MiB, f"hello.wasm is {size} bytes: over 20 MiB it should be built in CI instead"
    # Its world is checked where it is compiled (the `hello` fixture) and verified (the registry test below);
    # a truncated copy is refused as not compiling, not crashing anything.
    component, problems = compile_component(make_engine(), hello_bytes[:4096])
    assert component is None and problems[0].startswith("the component does not compile")


def test_hello_python_passes_its_examples_in_the_sandbox(sandbox: Sandbox, hello: CompiledComponent) -> None:
    for example in examples():
        result = run(sandbox, hello, example["input"].encode())
        assert result.verdict is Verdict.OK, (result.detail, result.stderr)
        assert result.output == example["output"].encode()
        # Its `log` line went to the call's stderr.
        assert result.stderr.startswith(b"greeting a name of ")


def test_an_err_result_fails_the_call_with_its_message(sandbox: Sandbox, hello: CompiledComponent) -> None:
    for bad in (b"42", b"not json", b'""'):
        result = run(sandbox, hello, bad)
        assert result.verdict is Verdict.EXIT_NONZERO and result.exit_code == 1
        assert result.output == b""
        assert b"send a name" in result.stderr or b"not JSON" in result.stderr
    # The next call is a fresh instance: nothing carried over.
    assert run(sandbox, hello, b'"Ada"').output == b'"Hello, Ada!"'


def test_memory_below_the_interpreter_heap_is_a_memory_limit(sandbox: Sandbox, hello: CompiledComponent) -> None:
    small = RunLimits(memory_bytes=4 * MiB, timeout_seconds=2.0, max_output_bytes=MiB, max_stderr_bytes=4096)
    result = run(sandbox, hello, b'"Ada"', small)
    assert result.verdict is Verdict.MEMORY_LIMIT
    assert "exceeds memory limits" in result.detail


def test_a_precompiled_component_runs_like_a_compiled_one(sandbox: Sandbox, hello: CompiledComponent) -> None:
    """The warm tier's ingredients: serialize, deserialize (about 0.1 s against 10 s of compiling), link."""
    runner = runner_for(sandbox)
    artifact = bytes(hello.component.serialize())
    started = time.perf_counter()
    warm = runner.link("sha256:hello", hello.size_bytes, runner.deserialize(artifact))
    loaded = time.perf_counter() - started
    assert loaded < 5.0
    assert run(sandbox, warm, b'"Ada"').output == b'"Hello, Ada!"'


def test_the_committed_example_matches_its_source(sandbox: Sandbox, pytestconfig: pytest.Config) -> None:
    """hello.wasm is committed (18 MiB; componentize-py builds are not byte-reproducible): app.py built afresh
    must pass the same examples, so the two cannot drift apart unnoticed."""
    data = componentize(HELLO, "app", pytestconfig.cache.mkdir("clawhub-components"))
    rebuilt = sandbox.compile("sha256:hello-rebuilt", data)
    assert isinstance(rebuilt, CompiledComponent)
    for example in examples():
        assert run(sandbox, rebuilt, example["input"].encode()).output == example["output"].encode()


# --- limits and verdicts, hand-written components ----------------------------------------------------------

@pytest.fixture(scope="module")
def small(sandbox: Sandbox) -> dict[str, CompiledComponent]:
    built = {name: sandbox.compile(f"sha256:{name}", data) for name, data in
             {"echo": ECHO, "logs": LOGS, "fails": FAILS, "traps": TRAPS, "spins": SPINS, "big": BIG,
              "lies": LIES, "bad_string": BAD_STRING}.items()}
    assert all(isinstance(c, CompiledComponent) for c in built.values())
    return built  # type: ignore[return-value]


def test_input_and_output_bytes_round_trip(sandbox: Sandbox, small: dict[str, CompiledComponent]) -> None:
    for data in (b"", b"x", bytes(range(256)), bytes(range(256)) * 4096):  # up to 1 MiB
        result = run(sandbox, small["echo"], data)
        assert result.verdict is Verdict.OK and result.output == data


def test_log_lines_go_to_stderr(sandbox: Sandbox, small: dict[str, CompiledComponent]) -> None:
    result = run(sandbox, small["logs"], b"in")
    assert (result.verdict, result.output, result.stderr) == (Verdict.OK, b"in", b"hello log\n")


def test_verdicts(sandbox: Sandbox, small: dict[str, CompiledComponent]) -> None:
    failed = run(sandbox, small["fails"], b"")
    assert (failed.verdict, failed.exit_code, failed.stderr) == (Verdict.EXIT_NONZERO, 1, b"boom")
    trapped = run(sandbox, small["traps"], b"")
    assert trapped.verdict is Verdict.TRAPPED and "unreachable" in trapped.detail
    for name in ("lies", "bad_string"):
        assert run(sandbox, small[name], b"").verdict is Verdict.TRAPPED, name
    tight = RunLimits(memory_bytes=MiB, timeout_seconds=2.0, max_output_bytes=8, max_stderr_bytes=4096)
    assert run(sandbox, small["big"], b"", tight).verdict is Verdict.MEMORY_LIMIT
    over = run(sandbox, small["echo"], b"123456789", tight)
    assert (over.verdict, over.output) == (Verdict.OUTPUT_LIMIT, b"")
    assert run(sandbox, small["echo"], b"12345678", tight).output == b"12345678"
    quiet = RunLimits(memory_bytes=MiB, timeout_seconds=2.0, max_output_bytes=MiB, max_stderr_bytes=4)
    assert run(sandbox, small["logs"], b"", quiet).verdict is Verdict.STDERR_LIMIT


def test_wall_clock_cancel_and_fuel(sandbox: Sandbox, small: dict[str, CompiledComponent]) -> None:
    short = RunLimits(memory_bytes=MiB, timeout_seconds=0.2, max_output_bytes=MiB, max_stderr_bytes=4096)
    started = time.monotonic()
    result = run(sandbox, small["spins"], b"", short)
    assert result.verdict is Verdict.TIMEOUT
    assert 0.15 < time.monotonic() - started < 1.5

    control = RunControl()
    threading.Timer(0.1, control.cancel).start()
    started = time.monotonic()
    result = run(sandbox, small["spins"], b"", LIMITS, control=control)
    assert result.verdict is Verdict.CANCELLED and time.monotonic() - started < 1.0

    metered = sandbox.compile("sha256:spins-metered", SPINS, metered=True)
    fuelled = RunLimits(memory_bytes=MiB, timeout_seconds=5.0, max_output_bytes=MiB, max_stderr_bytes=4096,
                        fuel=1_000_000)
    result = run(sandbox, metered, b"", fuelled)
    assert result.verdict is Verdict.FUEL_EXHAUSTED and result.fuel_consumed >= 1_000_000
    echo = sandbox.compile("sha256:echo-metered", ECHO, metered=True)
    result = run(sandbox, echo, b"hi", fuelled)
    assert result.verdict is Verdict.OK and 0 < result.fuel_consumed < 1_000_000


# --- limits and refusals, a misbehaving Python skill -------------------------------------------------------

def test_python_failures_map_to_their_verdicts(sandbox: Sandbox, limits_app: CompiledComponent) -> None:
    raised = run(sandbox, limits_app, b"raise")
    assert raised.verdict is Verdict.TRAPPED
    assert b"ValueError: deliberate failure" in raised.stderr  # the traceback, for the skill's logs
    assert run(sandbox, limits_app, b"err nope").stderr == b"nope"
    exited = run(sandbox, limits_app, b"exit 3")
    assert exited.verdict is Verdict.EXIT_NONZERO  # WASI 0.2's exit has no codes: any failure is 1
    assert run(sandbox, limits_app, b"exit 0").verdict is Verdict.TRAPPED  # exiting is not returning
    assert run(sandbox, limits_app, b"ok").output == b"ok"


def test_python_limits(sandbox: Sandbox, limits_app: CompiledComponent) -> None:
    tight = RunLimits(memory_bytes=32 * MiB, timeout_seconds=0.5, max_output_bytes=1000, max_stderr_bytes=4096)
    started = time.monotonic()
    assert run(sandbox, limits_app, b"spin", tight).verdict is Verdict.TIMEOUT
    assert time.monotonic() - started < 2.0
    grew = run(sandbox, limits_app, b"alloc", tight)
    assert grew.verdict is Verdict.MEMORY_LIMIT and b"MemoryError" in grew.stderr
    assert run(sandbox, limits_app, b"big 1000", tight).verdict is Verdict.OK
    assert run(sandbox, limits_app, b"big 1001", tight).verdict is Verdict.OUTPUT_LIMIT
    printed = run(sandbox, limits_app, b"print 100000", tight)
    assert printed.verdict is Verdict.STDERR_LIMIT and len(printed.stderr) <= 4096
    assert run(sandbox, limits_app, b"log 100000", tight).verdict is Verdict.STDERR_LIMIT
    # Each call is a fresh instance: the sandbox is fine after all that.
    assert run(sandbox, limits_app, b"ok", tight).output == b"ok"


def test_python_sees_only_its_grant(sandbox: Sandbox, limits_app: CompiledComponent, tmp_path: Path) -> None:
    (tmp_path / "name.txt").write_bytes(b"from the bundle")
    granted = Grant.of(["files", "env:GREETING"], env={"GREETING": "hi", "HOME": "/root"},
                       bundle_dir=str(tmp_path))
    assert run(sandbox, limits_app, b"env", grant=granted).output == b"GREETING=hi"
    assert run(sandbox, limits_app, b"file /skill/name.txt", grant=granted).output == b"from the bundle"
    assert run(sandbox, limits_app, b"env").output == b""
    denied = run(sandbox, limits_app, b"file /skill/name.txt")
    assert denied.verdict is Verdict.EXIT_NONZERO and b"No such file" in denied.stderr
    # Read-only: the bundle cannot be written through.
    assert run(sandbox, limits_app, b"file /etc/passwd", grant=granted).verdict is Verdict.EXIT_NONZERO


def test_python_has_no_network(sandbox: Sandbox, limits_app: CompiledComponent) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run(sandbox, limits_app, f"net 127.0.0.1:{port}".encode())
        assert result.verdict is Verdict.EXIT_NONZERO and result.output == b""
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected


# --- the world check: at load and at publish ---------------------------------------------------------------

_CORE = wat('(module (memory (export "memory") 1) (func (export "_start")))')


def test_a_core_module_is_not_a_component(sandbox: Sandbox) -> None:
    assert not is_component(_CORE) and is_component(ECHO)
    sandbox_for_components = Sandbox(COMPONENT_V1, pool_slots=0)
    try:
        with pytest.raises(ModuleRejected) as caught:
            sandbox_for_components.compile("sha256:core", _CORE)
        assert caught.value.problems == [NOT_A_COMPONENT]
    finally:
        sandbox_for_components.close()
    # And the other way round: a component declared as a core ABI.
    with pytest.raises(ModuleRejected, match='declare abi = "component-v1"'):
        Sandbox(WASI_COMMAND_V1, pool_slots=0).compile("sha256:echo", ECHO)


WORLD_PROBLEMS = {
    "no-run": (bare(""), "does not export `run`"),
    "run-of-the-wrong-type": (wat("""(component
        (core module $m (func (export "f") (param i32 i32) (result i32) (i32.const 0)))
        (core instance $i (instantiate $m))
        (func (export "run") (param "input" u32) (param "len" u32) (result u32) (canon lift (core func $i "f"))))"""),
        "the export `run` must be `run: func(input: list<u8>) -> result<list<u8>, string>`"),
    "wasi-http": (bare('(import "wasi:http/outgoing-handler@0.2.0" (instance))'),
                  "imports `wasi:http/outgoing-handler@0.2.0`, which a skill may not use"),
    "unknown-import": (bare('(import "acme:evil/backdoor" (instance))'),
                       "imports `acme:evil/backdoor`, which is not part of the clawhub skill world"),
    "log-of-the-wrong-type": (bare('(import "log" (func (param "line" u32)))'),
                              "the import `log` must be `log: func(line: string)`"),
}


@pytest.mark.parametrize("case", sorted(WORLD_PROBLEMS))
def test_the_registry_refuses_components_outside_the_world(case: str) -> None:
    data, problem = WORLD_PROBLEMS[case]
    problems = Verifier().check(data, COMPONENT_V1, [], set())
    assert any(problem in p for p in problems), problems


async def test_the_registry_verifies_component_uploads(hello_bytes: bytes) -> None:
    verifier = Verifier()
    assert verifier.check(ECHO, COMPONENT_V1, [], set()) == []
    assert verifier.check(_CORE, COMPONENT_V1, [], set()) == [NOT_A_COMPONENT]
    assert any('declare abi = "component-v1"' in p for p in verifier.check(ECHO, WASI_COMMAND_V1, [], set()))
    assert any("cannot have dependencies" in p for p in verifier.check(ECHO, COMPONENT_V1, [], {"com.acme.x"}))
    assert any("unknown capability" in p for p in verifier.check(ECHO, COMPONENT_V1, ["sockets"], set()))
    started = time.perf_counter()
    assert verifier.check(hello_bytes, COMPONENT_V1, [], set()) == []
    assert time.perf_counter() - started < 120
    # A manifest can declare the ABI once protos/ has its enum value (a pending change: see verify.py).
    assert (COMPONENT_V1 in ABIS.values()) == hasattr(skill_pb2, "ABI_COMPONENT_V1")


@pytest.mark.skipif(not hasattr(skill_pb2, "ABI_COMPONENT_V1"), reason="protos/ has no ABI_COMPONENT_V1 yet")
async def test_the_registry_verifies_a_component_manifest(hello_bytes: bytes) -> None:
    manifest = skill_pb2.Manifest(name="com.example.hello-python", version="1.0.0",
                                  abi=skill_pb2.ABI_COMPONENT_V1)  # type: ignore[attr-defined]
    assert await Verifier().verify(hello_bytes, manifest) == []
    assert await Verifier().verify(_CORE, manifest) == [NOT_A_COMPONENT]


# --- through the executor ----------------------------------------------------------------------------------

async def test_components_through_the_executor(executor: Executor, hello_bytes: bytes) -> None:
    """The real Execute path: loader (compile once per digest), scheduler, sandbox, ErrorInfo reasons."""
    digest = executor.source.add(hello_bytes)
    lim = limits(memory=64 * MiB, timeout_ms=2000)
    first = examples()[0]
    response = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=first["input"].encode(),
                                                              limits=lim), timeout=300)  # compiles: seconds
    assert response.output == first["output"].encode()
    for example in examples()[1:]:
        started = time.perf_counter()
        response = await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=example["input"].encode(),
                                                                  limits=lim), timeout=10)
        assert response.output == example["output"].encode()
        assert time.perf_counter() - started < 2.0  # hot: no second compile
    assert executor.source.fetches[digest] == 1

    async def reason(data: bytes, module: bytes, **kw: int) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await executor.stub.Execute(pb.ExecuteRequest(digest=executor.source.add(module), input=data,
                                                          limits=limits(**kw)), timeout=30)
        info = error_info(caught.value)
        assert info is not None
        return caught.value.code(), info.reason, dict(info.metadata)

    code, why, meta = await reason(b"42", hello_bytes, memory=64 * MiB)
    assert (code, why) == (grpc.StatusCode.ABORTED, "SKILL_EXIT_NONZERO") and "send a name" in meta["stderr_tail"]
    assert (await reason(b"", TRAPS))[:2] == (grpc.StatusCode.ABORTED, "SKILL_TRAPPED")
    assert (await reason(b"", SPINS, timeout_ms=200))[:2] == (grpc.StatusCode.DEADLINE_EXCEEDED, "SKILL_TIMEOUT")
    assert (await reason(b"", BIG, memory=MiB))[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MEMORY_LIMIT_EXCEEDED")
    assert (await reason(b"123", ECHO, output=2))[1] == "OUTPUT_LIMIT_EXCEEDED"
    code, why, meta = await reason(b"", bare(""))
    assert (code, why) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")
    assert "does not export `run`" in meta["problems"]


async def test_a_restarted_executor_loads_the_component_from_its_warm_tier(
        make_executor: ExecutorFactory, hello_bytes: bytes, tmp_path: Path) -> None:
    """The first executor compiles the component and stores its artifact; the next one on the same data dir
    deserializes it (about 0.1 s instead of seconds of compiling) without fetching the module again."""
    source = MemorySource()
    digest = source.add(hello_bytes)
    request = pb.ExecuteRequest(digest=digest, input=b'"Ada"', limits=limits(memory=64 * MiB, timeout_ms=2000))
    first = await make_executor(source=source, data_dir=tmp_path / "shared")
    assert (await first.stub.Execute(request, timeout=300)).output == b'"Hello, Ada!"'
    artifacts = list((tmp_path / "shared" / "artifacts").glob("*.cwasm"))
    assert len(artifacts) == 1 and artifacts[0].stat().st_size > len(hello_bytes)
    second = await make_executor(source=source, data_dir=tmp_path / "shared")
    started = time.perf_counter()
    assert (await second.stub.Execute(request, timeout=60)).output == b'"Hello, Ada!"'
    assert time.perf_counter() - started < 5.0
    assert source.fetches[digest] == 1  # the warm tier needed no fetch
    # A corrupt artifact is never run: deleted, and the component compiled again.
    blob = bytearray(artifacts[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifacts[0].write_bytes(bytes(blob))
    third = await make_executor(source=source, data_dir=tmp_path / "shared")
    assert (await third.stub.Execute(request, timeout=300)).output == b'"Hello, Ada!"'
    assert source.fetches[digest] == 2


def test_json_examples_are_json() -> None:
    for example in examples():
        json.loads(example["input"])
        json.loads(example["output"])


# --- the capability-gated interfaces: kv and http ----------------------------------------------------------

COUNTER = ROOT / "examples" / "skills" / "counter-python"
KV_LIMITS = KvLimits(max_key_bytes=16, max_value_bytes=64, max_keys=3, max_total_bytes=150)
# Hand-written components importing an interface (an empty instance: no function needs checking).
IMPORTS_KV = component("(call $result (i32.const 0) (local.get $ptr) (local.get $len))",
                       imports='(import "clawhub:skill/kv@1.0.0" (instance))')
IMPORTS_HTTP = component("(call $result (i32.const 0) (local.get $ptr) (local.get $len))",
                         imports='(import "clawhub:skill/http@1.0.0" (instance))')

CAPABILITY_PROBLEMS = {
    "kv-undeclared": (IMPORTS_KV, [], "imports `clawhub:skill/kv@1.0.0`, which its capabilities do not cover: it "
                                      "needs the `kv` capability"),
    "kv-with-http-only": (IMPORTS_KV, ["http:api.test"], "needs the `kv` capability"),
    "http-undeclared": (IMPORTS_HTTP, [], "imports `clawhub:skill/http@1.0.0`, which its capabilities do not "
                                          "cover: it needs an `http:HOST` capability"),
    "http-with-kv-only": (IMPORTS_HTTP, ["kv"], "needs an `http:HOST` capability"),
    "kv-get-of-the-wrong-type": (
        bare('(import "clawhub:skill/kv@1.0.0" (instance (export "get" (func (param "key" string)))))'), ["kv"],
        "the function `get` of `clawhub:skill/kv@1.0.0` must be `get: func(key: list<u8>) -> "
        "result<option<list<u8>>, string>`, not `func(key: string)`"),
    "kv-unknown-function": (bare('(import "clawhub:skill/kv@1.0.0" (instance (export "scan" (func))))'), ["kv"],
                            "the import `clawhub:skill/kv@1.0.0` has no function `scan`"),
    "kv-other-version": (bare('(import "clawhub:skill/kv@2.0.0" (instance))'), ["kv"],
                         "this platform implements `clawhub:skill/kv@1.0.0`"),
}


@pytest.mark.parametrize("case", sorted(CAPABILITY_PROBLEMS))
def test_the_registry_refuses_interfaces_the_capabilities_do_not_grant(case: str) -> None:
    data, capabilities, problem = CAPABILITY_PROBLEMS[case]
    problems = Verifier().check(data, COMPONENT_V1, capabilities, set())
    assert any(problem in p for p in problems), problems


def test_declared_interfaces_pass_the_world_check() -> None:
    verifier = Verifier()
    assert verifier.check(IMPORTS_KV, COMPONENT_V1, ["kv"], set()) == []
    assert verifier.check(IMPORTS_HTTP, COMPONENT_V1, ["http:api.test", "http:*.svc.test:8443"], set()) == []


@pytest.fixture(scope="module")
def host_server() -> Iterator[Server]:
    yield from _serve(None)


@pytest.fixture(scope="module")
def host_app(sandbox: Sandbox, pytestconfig: pytest.Config, host_server: Server) -> CompiledComponent:
    data = componentize(FIXTURES, "host_app", pytestconfig.cache.mkdir("clawhub-components"), world="skill-kv-http")
    compiled = sandbox.compile("sha256:host-app", data, _host_caps(host_server))
    assert isinstance(compiled, CompiledComponent)
    return compiled


def _host_caps(server: Server) -> list[str]:
    return ["kv", f"http:api.test:{server.port}", f"http:missing.test:{server.port}", "http:api.test:1"]


class HostShell:
    """host_app run as one skill: each `op` is one call with a fresh grant (kept in `last`)."""

    def __init__(self, sandbox: Sandbox, compiled: CompiledComponent, server: Server, store: KvStore,
                 http: OutboundHttp | None) -> None:
        self.sandbox, self.compiled, self.server, self.store, self.http = sandbox, compiled, server, store, http
        self.last: Grant | None = None

    def op(self, op: str, capabilities: list[str] | None = None, **args: object) -> dict[str, object]:
        caps = _host_caps(self.server) if capabilities is None else capabilities
        self.last = Grant.of(caps, kv=self.store.namespace("com.acme.host"), http=self.http)
        result = self.sandbox.run(self.compiled, json.dumps({"op": op, **args}).encode(), LIMITS, self.last)
        assert result.verdict is Verdict.OK, (result.verdict, result.stderr)
        answer: dict[str, object] = json.loads(result.output)
        return answer


@pytest.fixture
def shell(sandbox: Sandbox, host_app: CompiledComponent, host_server: Server) -> Iterator[HostShell]:
    store = KvStore(MemoryBackend(), KV_LIMITS)
    client = OutboundHttp(HttpSettings(allow_private=True, timeout=1.0, max_response_bytes=1024),
                          resolver=FakeDns({"api.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}))
    yield HostShell(sandbox, host_app, host_server, store, client)
    client.close()
    store.close()


def _usage(shell: HostShell) -> dict[str, int]:
    assert shell.last is not None and shell.last.host is not None
    return dict(shell.last.host.usage)


def test_python_gets_puts_lists_and_deletes_in_kv(shell: HostShell) -> None:
    assert shell.op("get", key="name") == {"ok": None}
    assert _usage(shell) == {"kv_get": 1}
    assert shell.op("put", key="name", value="Ada") == {"ok": None}
    assert shell.op("put", key="nick", value="\x00\xff") == {"ok": None}
    assert shell.op("get", key="name") == {"ok": "Ada"}
    assert shell.op("get", key="nick") == {"ok": "\x00\xff"}  # bytes, not text
    assert shell.op("keys", prefix="n") == {"ok": ["name", "nick"]}
    assert shell.op("keys", prefix="x") == {"ok": []}
    assert _usage(shell) == {"kv_list": 1}
    assert shell.op("delete", key="name") == {"ok": True}
    assert shell.op("delete", key="name") == {"ok": False}
    assert shell.op("get", key="name") == {"ok": None}
    assert shell.last is not None and shell.last.host is not None and shell.last.host.kv_operations == 1


def test_every_kv_refusal_reaches_python_as_its_reason(shell: HostShell) -> None:
    def err(op: str, **args: Any) -> str:
        answer = shell.op(op, **args)
        assert set(answer) == {"err"}, answer
        return str(answer["err"])

    assert err("get", key="").startswith("KV_INVALID_ARGUMENT: ")  # a negative TTL cannot be sent: u64
    assert err("put", key="k", key_times=17, value="v").startswith("KV_KEY_TOO_LARGE: ")
    assert err("put", key="k", value="v", value_times=65).startswith("KV_VALUE_TOO_LARGE: ")
    for key in ("a", "b", "c"):
        assert shell.op("put", key=key, value="v") == {"ok": None}
    assert err("put", key="d", value="v").startswith("KV_TOO_MANY_KEYS: ")
    # 150 bytes in all: two 65-byte entries fit, a third does not.
    assert shell.op("put", key="a", value="v", value_times=64) == {"ok": None}
    assert shell.op("put", key="b", value="v", value_times=64) == {"ok": None}
    assert err("put", key="c", value="v", value_times=64).startswith("KV_STORE_FULL: ")
    # Without the capability the interface is not linked for a new component; for this one (linked, then
    # run without a grant) every call is refused, never served.
    assert shell.op("get", capabilities=[f"http:api.test:{shell.server.port}"], key="a")["err"] == (
        "PERMISSION_DENIED: `kv.get`: this call has no key-value store (the skill does not declare `kv`, or the "
        "executor has none)")


def test_python_makes_http_requests(shell: HostShell) -> None:
    url = shell.server.url("api.test", "/echo?status=201")
    answer = shell.op("http", method="POST", url=url, headers=[["X-Token", "t"]], body="hi")
    ok = answer["ok"]
    assert isinstance(ok, dict), answer
    assert ok["status"] == 201
    assert ["X-Reply", "yes"] in ok["headers"] and ok["headers"].count(["Set-Cookie", "a=1"]) == 1
    assert ["Set-Cookie", "b=2"] in ok["headers"]
    echoed = json.loads(str(ok["body"]))
    assert (echoed["method"], echoed["body"], echoed["headers"]["x-token"]) == ("POST", "hi", "t")
    assert _usage(shell) == {"http_request": 1}
    assert shell.last is not None and shell.last.host is not None and shell.last.host.http is not None
    usage = shell.last.host.http.usage
    assert usage.requests == 1 and usage.bytes_sent > 0 and usage.bytes_received > len(str(ok["body"]))


def test_every_http_refusal_reaches_python_as_its_reason(shell: HostShell) -> None:
    port = shell.server.port

    def err(url: str, **args: Any) -> str:
        answer = shell.op("http", url=url, **args)
        assert set(answer) == {"err"}, answer
        return str(answer["err"])

    assert err(f"http://other.test:{port}/echo").startswith("HTTP_HOST_NOT_ALLOWED: ")
    assert err(f"ftp://api.test:{port}/").startswith("HTTP_SCHEME_NOT_ALLOWED: ")
    assert err(f"http://api.test:{port}/echo", method="BAD METHOD").startswith("HTTP_INVALID_REQUEST: ")
    assert err(f"http://missing.test:{port}/").startswith("HTTP_DNS_FAILED: ")
    assert err("http://api.test:1/").startswith("HTTP_CONNECTION_FAILED: ")
    assert err(shell.server.url("api.test", f"/redirect?to=http://other.test:{port}/echo")).startswith(
        "HTTP_REDIRECT_NOT_ALLOWED: ")
    assert err(shell.server.url("api.test", "/big?n=2048")).startswith("HTTP_RESPONSE_TOO_LARGE: ")
    assert err(shell.server.url("api.test", "/slow?delay=2")).startswith("HTTP_TIMEOUT: ")
    # A private address, with a client that does not allow them (the operator's default).
    strict = OutboundHttp(HttpSettings(timeout=2.0), resolver=FakeDns({"api.test": ["127.0.0.1"]}))
    try:
        shell.http = strict
        assert err(f"http://api.test:{port}/echo").startswith("HTTP_PRIVATE_ADDRESS: ")
    finally:
        strict.close()
    # No `http:` capability in the call's grant: refused, never sent.
    assert shell.op("http", capabilities=["kv"], url=f"http://api.test:{port}/echo")["err"] == (
        "PERMISSION_DENIED: `http.request`: this call may make no HTTP request (the skill declares no `http:HOST` "
        "capability, or the executor has no HTTP client)")


def test_counter_python_passes_its_examples_on_a_scratch_store(sandbox: Sandbox, pytestconfig: pytest.Config,
                                                              host_server: Server) -> None:
    """The example's smoke examples need no network (as at publish) and count from an empty store."""
    data = componentize(COUNTER, "app", pytestconfig.cache.mkdir("clawhub-components"), world="skill-kv-http")
    manifest = tomllib.loads((COUNTER / "skill.toml").read_text())
    compiled = sandbox.compile("sha256:counter-python", data, manifest["capabilities"])
    store = KvStore(MemoryBackend())
    for example in manifest["examples"]:
        grant = Grant.of(manifest["capabilities"], kv=store.namespace("com.example.counter-python"))
        result = run(sandbox, compiled, example["input"].encode(), grant=grant)
        assert (result.verdict, result.output) == (Verdict.OK, example["output"].encode()), result.stderr
    # And with a URL of an allowed host, the response comes back with the count.
    client = OutboundHttp(HttpSettings(allow_private=True, timeout=2.0))
    try:
        caps = ["kv", f"http:127.0.0.1:{host_server.port}"]
        grant = Grant.of(caps, kv=store.namespace("com.example.counter-python"), http=client)
        url = f"http://127.0.0.1:{host_server.port}/big?n=5"
        result = run(sandbox, compiled, json.dumps({"url": url}).encode(), grant=grant)
        assert json.loads(result.output) == {"count": 2, "status": 200, "body": "xxxxx"}, result.stderr
        grant = Grant.of(caps, kv=store.namespace("com.example.counter-python"), http=client)
        result = run(sandbox, compiled, b'{"url": "http://example.com/"}', grant=grant)
        assert result.verdict is Verdict.EXIT_NONZERO and result.stderr.startswith(b"HTTP_HOST_NOT_ALLOWED: ")
    finally:
        client.close()


async def test_the_executor_refuses_an_interface_without_its_capability(executor: Executor) -> None:
    for skill, module, capability, need in (
            ("com.acme.kv", IMPORTS_KV, "kv", "the `kv` capability"),
            ("com.acme.http", IMPORTS_HTTP, "http:api.test", "an `http:HOST` capability")):
        digest = executor.source.add(module)
        assert executor.assigned is not None
        executor.assigned.publish(skill, "1.0.0", digest)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await executor.stub.Execute(pb.ExecuteRequest(digest=digest, input=b"x", skill=skill, version="1.0.0"),
                                        timeout=30)
        info = error_info(caught.value)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info is not None
        assert info.reason == "MODULE_INVALID" and f"it needs {need}" in info.metadata["problems"]
        # Declared: it runs.
        executor.assigned.publish(skill, "1.0.1", digest, capabilities=(capability,))
        response = await executor.stub.Execute(pb.ExecuteRequest(
            digest=digest, input=b"x", skill=skill, version="1.0.1", capabilities=[capability]),
            timeout=30)
        assert response.output == b"x"


async def test_the_executor_reports_kv_and_http_usage_of_a_component(
        make_executor: ExecutorFactory, pytestconfig: pytest.Config, host_server: Server) -> None:
    data = componentize(FIXTURES, "host_app", pytestconfig.cache.mkdir("clawhub-components"), world="skill-kv-http")
    executor = await make_executor(http=HttpSettings(allow_private=True, timeout=5.0))
    digest = executor.source.add(data)
    caps = ["kv", f"http:127.0.0.1:{host_server.port}"]
    assert executor.assigned is not None
    executor.assigned.publish("com.acme.host", "1.0.0", digest, capabilities=tuple(caps))

    async def execute(request: dict[str, object], timeout: float = 10) -> pb.ExecuteResponse:
        response: pb.ExecuteResponse = await executor.stub.Execute(pb.ExecuteRequest(
            digest=digest, input=json.dumps(request).encode(), skill="com.acme.host", version="1.0.0",
            capabilities=caps, limits=limits(memory=64 * MiB, timeout_ms=5000)), timeout=timeout)
        return response

    put = await execute({"op": "put", "key": "k", "value": "v"}, timeout=300)  # compiles: seconds
    assert json.loads(put.output) == {"ok": None} and put.usage.kv_operations == 1
    got = await execute({"op": "get", "key": "k"})
    assert json.loads(got.output) == {"ok": "v"} and got.usage.kv_operations == 1
    fetched = await execute({"op": "http", "url": f"http://127.0.0.1:{host_server.port}/big?n=3"})
    assert json.loads(fetched.output)["ok"]["body"] == "xxx"
    usage = fetched.usage
    assert (usage.kv_operations, usage.http_requests) == (0, 1)
    assert usage.http_bytes_sent > 0 and usage.http_bytes_received > 3


def test_a_component_gets_at_most_its_own_cap_of_a_response_body(shell: HostShell,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the client's response cap, a body over the component cap (each byte costs the host 32 while it is
    handed over) is refused with HTTP_RESPONSE_TOO_LARGE rather than lowered."""
    from services.executor import components

    monkeypatch.setattr(components, "MAX_COMPONENT_HTTP_BODY", 512)
    answer = shell.op("http", url=shell.server.url("api.test", "/big?n=800"))
    assert str(answer.get("err", "")).startswith("HTTP_RESPONSE_TOO_LARGE: "), answer
    answer = shell.op("http", url=shell.server.url("api.test", "/big?n=400"))
    assert "err" not in answer, answer
