"""The `kv` capability end to end, with real wasm guests (WAT) in the real sandbox and executor: the host
functions under both ABIs, what the guest sees of every limit (its error code, and the reason on stderr),
TTL, listing, ABI violations, isolation between skills and sharing between versions and executors, smoke
examples on a scratch store, the raw fast path left alone, and the refusal of undeclared imports at run
(executor) and at publish (registry verification)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb
from clawhub.registry.v1 import registry_service_pb2 as registry_pb

from services.executor import hostapi
from services.executor.kvstore import KvLimits, KvStore, MemoryBackend, SqliteBackend
from services.executor.sandbox import Grant, RunLimits, RunResult, Sandbox, Verdict
from services.runtime.errors import error_info
from services.runtime.wasm import LIBRARY_V1, MEMORY_V1, WASI_COMMAND_V1, compile_and_check, make_engine
from tests.conftest import wat
from tests.executor.conftest import Executor, ExecutorFactory, limits
from tests.executor.kv_modules import (
    KV_GET_ONLY,
    KV_GET_WRONG_TYPE,
    KV_SHELL,
    KV_WASI,
    NOT_A_HOST_FUNCTION,
    answer,
    command,
    listed,
)
from tests.registry.conftest import open_registry, registry, registry_overrides  # noqa: F401 (fixtures)
from tests.registry.support import Client, check_error, metadata, publish_raw
from tests.registry.support import chunks as publish_chunks

COUNTER_WAT = Path(__file__).resolve().parents[2] / "examples" / "skills" / "counter-kv" / "counter.wat"
LIMITS = KvLimits(max_key_bytes=16, max_value_bytes=64, max_keys=3, max_total_bytes=150)
RUN = RunLimits(memory_bytes=16 << 20, timeout_seconds=5, max_output_bytes=1 << 20, max_stderr_bytes=4096)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    sandbox = Sandbox(pool_slots=0)
    yield sandbox
    sandbox.close()


class Guest:
    """KV_SHELL compiled in a sandbox, run as one skill over a sqlite store with small limits."""

    def __init__(self, sandbox: Sandbox, store: KvStore, skill: str = "com.acme.shell") -> None:
        self.sandbox, self.store, self.skill = sandbox, store, skill
        self.compiled = sandbox.compile("sha256:shell", wat(KV_SHELL), ["kv"])
        self.last: Grant | None = None

    def run(self, data: bytes, skill: str | None = None) -> RunResult:
        self.last = Grant.of(["kv"], kv=self.store.namespace(skill or self.skill))
        return self.sandbox.run(self.compiled, data, RUN, self.last)

    def op(self, op: str, key: bytes = b"", value: bytes = b"", *, ttl_ms: int = 0,
           cap: int = 4096) -> tuple[int, bytes, bytes]:
        """(result, bytes written, stderr) of one operation, which must not fail the call."""
        result = self.run(command(op, key, value, ttl_ms=ttl_ms, cap=cap))
        assert result.verdict is Verdict.OK, (result.verdict, result.detail)
        return (*answer(result.output), result.stderr)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def guest(sandbox: Sandbox, tmp_path: Path, clock: Clock) -> Iterator[Guest]:
    store = KvStore(SqliteBackend(tmp_path / "kv.sqlite3"), LIMITS, clock)
    yield Guest(sandbox, store)
    store.close()


def test_a_guest_gets_puts_lists_and_deletes(guest: Guest) -> None:
    assert guest.op("g", b"name")[:2] == (hostapi.E_NOT_FOUND, b"")
    assert guest.op("p", b"name", b"clawhub")[0] == 0
    assert guest.op("g", b"name")[:2] == (7, b"clawhub")
    # A buffer too small: the length, nothing written; the guest can call again with room for it.
    assert guest.op("g", b"name", cap=3)[:2] == (7, b"")
    guest.op("p", b"n2", b"")
    result, data, _ = guest.op("l", b"n")
    assert result == len(data) == 4 + 4 + 4 + 2 and listed(data) == [b"n2", b"name"]
    assert listed(guest.op("l", b"na")[1]) == [b"name"]
    assert guest.op("l", b"n", cap=5)[:2] == (14, b"")
    assert guest.op("d", b"name")[0] == 1
    assert guest.op("d", b"name")[0] == 0
    assert guest.op("g", b"name")[0] == hostapi.E_NOT_FOUND
    assert guest.last is not None and guest.last.host is not None
    assert dict(guest.last.host.usage) == {"kv_get": 1} and guest.last.host.kv_operations == 1


def test_every_limit_reaches_the_guest_as_its_code_and_the_reason_on_stderr(guest: Guest) -> None:
    cases: list[tuple[str, bytes, bytes, int, int, str]] = [  # op, key, value, ttl, code, stderr's start
        ("p", b"", b"v", 0, hostapi.E_INVALID, "clawhub: kv_put: KV_INVALID_ARGUMENT"),
        ("p", b"k", b"v", -5, hostapi.E_INVALID, "clawhub: kv_put: KV_INVALID_ARGUMENT"),
        ("p", b"k" * 17, b"v", 0, hostapi.E_KEY_TOO_LARGE,
         "clawhub: kv_put: KV_KEY_TOO_LARGE: the key is 17 bytes, over the limit of 16"),
        ("g", b"k" * 17, b"", 0, hostapi.E_KEY_TOO_LARGE, "clawhub: kv_get: KV_KEY_TOO_LARGE"),
        ("p", b"k", b"v" * 65, 0, hostapi.E_VALUE_TOO_LARGE,
         "clawhub: kv_put: KV_VALUE_TOO_LARGE: the value is 65 bytes, over the limit of 64"),
    ]
    for op, key, value, ttl, code, line in cases:
        result, _, stderr = guest.op(op, key, value, ttl_ms=ttl)
        assert result == code, (op, key, value, ttl)
        assert stderr.decode().startswith(line), stderr
    # Store full: 2 keys of 1 + 64 bytes = 130; another 1 + 20 is 151 > 150.
    assert guest.op("p", b"a", b"x" * 64)[0] == 0
    assert guest.op("p", b"b", b"x" * 64)[0] == 0
    result, _, stderr = guest.op("p", b"c", b"x" * 20)
    assert result == hostapi.E_STORE_FULL
    assert stderr.startswith(b"clawhub: kv_put: KV_STORE_FULL: ") and b"over its limit of 150 bytes" in stderr
    # Too many keys: a third key fits the bytes, a fourth is one key too many.
    assert guest.op("p", b"c", b"")[0] == 0
    result, _, stderr = guest.op("p", b"d", b"")
    assert result == hostapi.E_TOO_MANY_KEYS and b"KV_TOO_MANY_KEYS" in stderr
    # A refusal is the guest's to handle: nothing was stored, and the calls themselves succeeded.
    assert guest.op("g", b"d")[0] == hostapi.E_NOT_FOUND


def test_ttl_expiry_seen_by_the_guest(guest: Guest, clock: Clock) -> None:
    assert guest.op("p", b"otp", b"123456", ttl_ms=30_000)[0] == 0
    clock.now += 29_999
    assert guest.op("g", b"otp")[:2] == (6, b"123456")
    clock.now += 1
    assert guest.op("g", b"otp")[0] == hostapi.E_NOT_FOUND
    assert listed(guest.op("l", b"")[1]) == []


def test_a_region_outside_memory_traps_as_an_abi_violation(guest: Guest) -> None:
    result = guest.run(command("x"))
    assert result.verdict is Verdict.TRAPPED
    assert result.detail.startswith("ABI violation: `clawhub.kv_get` was given its key at [2147483392, ")
    # The next call on the same thread is unaffected.
    assert guest.op("p", b"k", b"v")[0] == 0


def test_skills_are_isolated(guest: Guest) -> None:
    guest.op("p", b"secret", b"mine")
    other = guest.run(command("g", b"secret"), skill="com.evil.other")
    assert answer(other.output)[0] == hostapi.E_NOT_FOUND
    assert listed(answer(guest.run(command("l"), skill="com.evil.other").output)[1]) == []
    assert guest.op("g", b"secret")[1] == b"mine"


def test_wasi_command_abi(sandbox: Sandbox) -> None:
    compiled = sandbox.compile("sha256:wasi", wat(KV_WASI), ["kv"])
    store = KvStore(MemoryBackend())
    result = sandbox.run(compiled, b"", RUN, Grant.of(["kv"], kv=store.namespace("com.acme.wasi")))
    assert result.verdict is Verdict.OK, result.detail
    # The value read back, then the error code of the 300-byte key (-3), and the reason on stderr.
    assert result.output == b"hello from wasi 3"
    assert result.stderr == b"clawhub: kv_put: KV_KEY_TOO_LARGE: the key is 300 bytes, over the limit of 256\n"
    assert store.namespace("com.acme.wasi").get(b"greeting") == b"hello from wasi"


def test_a_call_without_a_store_is_denied_not_crashed(sandbox: Sandbox) -> None:
    compiled = sandbox.compile("sha256:shell", wat(KV_SHELL), ["kv"])
    result = sandbox.run(compiled, command("g", b"k"), RUN, Grant.of(["kv"]))  # `kv` declared, no store given
    assert result.verdict is Verdict.OK and answer(result.output)[0] == hostapi.E_DENIED
    assert b"PERMISSION_DENIED" in result.stderr


def test_the_raw_fast_path_is_kept_for_plain_memory_modules(sandbox: Sandbox) -> None:
    plain = sandbox.compile("sha256:plain", wat('''(module (memory (export "memory") 1)
        (func (export "clawhub_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "clawhub_run") (param i32 i32) (result i64) (i64.const 0)))'''))
    assert plain.raw_pre and not plain.host
    with_kv = sandbox.compile("sha256:kv", wat(KV_SHELL), ["kv"])
    assert with_kv.host and not with_kv.raw_pre and with_kv.abi is MEMORY_V1


def test_the_policy_refuses_undeclared_wrong_and_unknown_host_imports() -> None:
    engine = make_engine()
    _, problems = compile_and_check(engine, wat(KV_GET_ONLY), MEMORY_V1, [])
    assert problems == ["the module imports `clawhub.kv_get`, which its capabilities do not cover: it needs the "
                        "`kv` capability (declare capabilities = [\"kv\"] in skill.toml)"]
    assert compile_and_check(engine, wat(KV_GET_ONLY), MEMORY_V1, ["kv"])[1] == []
    assert compile_and_check(engine, wat(KV_GET_ONLY), MEMORY_V1, ["files", "env:X"])[1] == problems
    _, problems = compile_and_check(engine, wat(KV_GET_WRONG_TYPE), MEMORY_V1, ["kv"])
    assert problems == ["the import `clawhub.kv_get` must be a function `(i32, i32, i32, i32) -> i64`"]
    _, problems = compile_and_check(engine, wat(NOT_A_HOST_FUNCTION), MEMORY_V1, ["kv"])
    assert len(problems) == 1 and "`clawhub.kv_increment`, which is not a clawhub host function" in problems[0]
    assert "`kv_put`" in problems[0]
    # WASI commands alike; a library never (it would act with its dependent's grant).
    _, problems = compile_and_check(engine, wat(KV_WASI), WASI_COMMAND_V1, [])
    assert len(problems) == 2 and all("needs the `kv` capability" in p for p in problems)
    library = wat('(module (import "clawhub" "kv_get" (func (param i32 i32 i32 i32) (result i64))) '
                  '(func (export "f")))')
    _, problems = compile_and_check(engine, library, LIBRARY_V1, ["kv"])
    assert problems == ["a library may not import `clawhub.kv_get`: it runs in its dependent's sandbox and would act "
                        "with the dependent's grant"]
    # A skill with dependencies cannot use host functions yet: refused rather than failing at link time.
    _, problems = compile_and_check(engine, wat(KV_GET_ONLY), MEMORY_V1, ["kv"], {"com.acme.lib"})
    assert problems and "has dependencies" in problems[0]


# Through the executor's gRPC server.

async def execute(ex: Executor, digest: str, data: bytes, *, skill: str, version: str = "1.0.0",
                  capabilities: tuple[str, ...] = ("kv",)) -> pb.ExecuteResponse:
    assert ex.assigned is not None
    ex.assigned.publish(skill, version, digest, capabilities=capabilities)
    response: pb.ExecuteResponse = await ex.stub.Execute(pb.ExecuteRequest(
        digest=digest, input=data, capabilities=list(capabilities), skill=skill, version=version,
        limits=limits(timeout_ms=5000)), timeout=10)
    return response


async def test_counter_example_counts_per_skill_across_versions(executor: Executor) -> None:
    v1 = executor.source.add(wat(COUNTER_WAT.read_text()))
    # Version 2: other bytes (a comment-free recompile with one more data byte), same skill.
    v2 = executor.source.add(wat(COUNTER_WAT.read_text().replace('"0")', '"0") (data (i32.const 300) "v2")')))
    assert v1 != v2
    counts = [(await execute(executor, v1, b'"hit"', skill="com.acme.counter")).output for _ in range(3)]
    assert counts == [b"1", b"2", b"3"]
    assert (await execute(executor, v2, b'"hit"', skill="com.acme.counter", version="2.0.0")).output == b"4"
    # Another skill running the very same module has a counter of its own.
    assert (await execute(executor, v1, b'"hit"', skill="com.other.counter")).output == b"1"
    assert (await execute(executor, v1, b'"reset"', skill="com.acme.counter")).output == b"0"
    assert (await execute(executor, v1, b'"hit"', skill="com.other.counter")).output == b"2"
    # The store is the sqlite file in the executor's data dir.
    assert (executor.data_dir / "kv.sqlite3").is_file()


async def test_run_refuses_a_kv_import_without_the_capability(executor: Executor) -> None:
    digest = executor.source.add(wat(KV_GET_ONLY))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(executor, digest, b"", skill="com.acme.sneaky", capabilities=())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None and info.reason == "MODULE_INVALID"
    assert "`clawhub.kv_get`" in info.metadata["problems"] and "needs the `kv` capability" in info.metadata["problems"]
    # The same module, declared: runs.
    assert (await execute(executor, digest, b"", skill="com.acme.sneaky", version="1.0.1")).output == b""


async def test_smoke_examples_run_on_a_scratch_store(executor: Executor) -> None:
    digest = executor.source.add(wat(COUNTER_WAT.read_text()))
    assert executor.assigned is not None
    executor.assigned.publish("com.acme.counter", "1.0.0", digest, capabilities=("kv",))
    examples = [skill_pb2.SmokeExample(input=b'"hit"', expected_output=n) for n in (b"1", b"2")]
    request = pb.LoadSkillRequest(digest=digest, capabilities=["kv"], examples=examples, skill="com.acme.counter",
                                  version="1.0.0")
    await executor.stub.LoadSkill(request, timeout=10)
    await executor.stub.LoadSkill(request, timeout=10)  # a second deploy starts from empty again
    # The skill's real counter was never touched.
    assert (await execute(executor, digest, b'"hit"', skill="com.acme.counter")).output == b"1"
    # And the smoke examples cannot see the real state either.
    await executor.stub.LoadSkill(request, timeout=10)


async def test_redis_backend_is_shared_by_executors(make_executor: ExecutorFactory, redis_url: str,
                                                   redis_prefix: str) -> None:
    first = await make_executor(kv_redis_url=redis_url, kv_redis_prefix=redis_prefix)
    second = await make_executor(source=first.source, kv_redis_url=redis_url, kv_redis_prefix=redis_prefix)
    digest = first.source.add(wat(COUNTER_WAT.read_text()))
    outputs = [(await execute(ex, digest, b'"hit"', skill="com.acme.counter")).output
               for ex in (first, second, first, second)]
    assert outputs == [b"1", b"2", b"3", b"4"]
    assert not (first.data_dir / "kv.sqlite3").exists()


async def test_executors_sharing_a_data_dir_share_the_sqlite_store(make_executor: ExecutorFactory,
                                                                   tmp_path: Path) -> None:
    first = await make_executor(data_dir=tmp_path / "shared")
    second = await make_executor(source=first.source, data_dir=tmp_path / "shared")
    digest = first.source.add(wat(COUNTER_WAT.read_text()))
    outputs = [(await execute(ex, digest, b'"hit"', skill="com.acme.counter")).output
               for ex in (first, second, second, first)]
    assert outputs == [b"1", b"2", b"3", b"4"]


# At publish: the registry's verification.

def _publish_request(data: bytes, capabilities: list[str], version: str) -> list[registry_pb.PublishSkillRequest]:
    request = metadata(data, name="com.acme.kvskill", version=version, abi=skill_pb2.ABI_MEMORY_V1)
    request.metadata.manifest.capabilities.extend(capabilities)
    return [request, *publish_chunks(data, 64 * 1024)]


async def test_publish_refuses_a_kv_import_without_the_capability(registry: Client) -> None:  # noqa: F811
    data = wat(KV_GET_ONLY)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, _publish_request(data, [], "1.0.0"))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    details = caught.value.details() or ""
    assert "`clawhub.kv_get`" in details and "needs the `kv` capability" in details
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(registry.stub, _publish_request(wat(KV_GET_WRONG_TYPE), ["kv"], "1.0.1"))
    check_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_FAILED")
    assert "must be a function `(i32, i32, i32, i32) -> i64`" in (caught.value.details() or "")
    # Declared: published.
    published = await publish_raw(registry.stub, _publish_request(data, ["kv"], "1.0.2"))
    assert published.skill_version.manifest.capabilities == ["kv"]


async def test_publish_accepts_the_counter_example(registry: Client) -> None:  # noqa: F811
    data = wat(COUNTER_WAT.read_text())
    published = await publish_raw(registry.stub, _publish_request(data, ["kv"], "2.0.0"))
    assert list(published.skill_version.manifest.capabilities) == ["kv"]
