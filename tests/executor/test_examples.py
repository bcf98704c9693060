"""The example skills in examples/skills: manifests parse, modules build from source and behave."""

from __future__ import annotations

import io
import json
import tarfile
import tomllib
from pathlib import Path

import pytest
import wasmtime
from clawhub.common.v1 import skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.runtime.components import COMPONENT_V1, compile_component
from services.runtime.names import skill_name_problem, version_problem
from services.runtime.settings import parse_size
from services.runtime.wasm import (
    LIBRARY_V1,
    MEMORY_V1,
    WASI_COMMAND_V1,
    capability_problems,
    compile_and_check,
    env_names,
    make_engine,
)
from tests.executor.conftest import Executor, limits

SKILLS = Path(__file__).resolve().parents[2] / "examples" / "skills"
EXAMPLES = sorted(p.parent.name for p in SKILLS.glob("*/skill.toml"))
MiB = 1024 * 1024


def manifest(skill: str) -> dict:
    with open(SKILLS / skill / "skill.toml", "rb") as fh:
        return tomllib.load(fh)


def build(skill: str) -> bytes:
    source = SKILLS / skill / manifest(skill)["module"]
    return wasmtime.wat2wasm(source.read_text()) if source.suffix == ".wat" else source.read_bytes()


def bundle(skill: str) -> bytes:
    """The skill's `files` as an uncompressed tar, the way they are published."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as archive:
        for name in manifest(skill).get("files", []):
            archive.add(SKILLS / skill / name, arcname=name, recursive=False)
    return buffer.getvalue()


def dependencies(ex: Executor, skill: str) -> list[skill_pb2.ResolvedDependency]:
    """The skill's dependencies resolved to the example packages of those names (one version each)."""
    by_name = {manifest(s)["name"]: s for s in EXAMPLES}
    return [skill_pb2.ResolvedDependency(
        package=d["package"], version=manifest(by_name[d["package"]])["version"],
        digest=ex.source.add(build(by_name[d["package"]])), is_shared=d.get("is_shared", False),
        required_by=["(root)"]) for d in manifest(skill).get("dependencies", [])]


async def run(ex: Executor, skill: str, data: bytes, env: dict[str, str] | None = None) -> bytes:
    """Execute the skill the way a deployment would: its capabilities, args, bundle, dependencies and `env`."""
    m = manifest(skill)
    lim = limits(memory=parse_size(m["limits"]["memory"]), timeout_ms=m["limits"]["timeout_ms"],
                 max_input=8 * MiB)
    digest = ex.source.add(build(skill))
    bundle_digest = ex.source.add(bundle(skill)) if m.get("files") else ""
    response = await ex.stub.Execute(pb.ExecuteRequest(
        digest=digest, input=data, limits=lim, capabilities=m.get("capabilities", []), args=m.get("args", []),
        env=env or {}, bundle_digest=bundle_digest, dependencies=dependencies(ex, skill)),
        timeout=300 if m["abi"] == "component-v1" else 10)  # a Python component compiles for seconds
    return response.output


def test_there_are_examples() -> None:
    assert {"uppercase", "wordcount"} <= set(EXAMPLES)


@pytest.mark.parametrize("skill", EXAMPLES)
def test_manifest_schema_and_module(skill: str) -> None:
    m = manifest(skill)
    assert set(m) <= {"name", "version", "description", "abi", "module", "capabilities", "limits",
                      "examples", "dependencies", "input_schema", "cache", "args", "files"}
    assert skill_name_problem(m["name"]) is None
    assert version_problem(m["version"]) is None
    assert m["description"]
    abi = {"wasi-command-v1": WASI_COMMAND_V1, "memory-v1": MEMORY_V1, "library-v1": LIBRARY_V1,
           "component-v1": COMPONENT_V1}[m["abi"]]
    assert capability_problems(m["capabilities"]) == []
    if m["abi"] != "library-v1":  # a library runs under its dependent's limits
        assert parse_size(m["limits"]["memory"]) > 0 and m["limits"]["timeout_ms"] > 0
    # Skills that need deploy-time environment values cannot have fixed smoke examples, nor libraries.
    assert m.get("examples") or env_names(m["capabilities"]) or m["abi"] == "library-v1", \
        "every example skill has smoke examples"
    for name in m.get("files", []):
        assert (SKILLS / skill / name).is_file()
    if abi is COMPONENT_V1:  # a component of wit/skill.wit (tests/executor/test_components.py)
        assert (compile_component(make_engine(), build(skill), m["capabilities"])[1]) == []
        return
    module, problems = compile_and_check(make_engine(), build(skill), abi, m["capabilities"],
                                         {d["package"] for d in m.get("dependencies", [])})
    assert module is not None and problems == []


@pytest.mark.parametrize("skill", EXAMPLES)
async def test_smoke_examples_pass(executor: Executor, skill: str) -> None:
    for example in manifest(skill).get("examples", []):
        json.loads(example["input"])  # inputs are JSON text, as `clawhub invoke --input` takes them
        assert await run(executor, skill, example["input"].encode()) == example["output"].encode()


async def test_uppercase(executor: Executor) -> None:
    assert await run(executor, "uppercase", b'"hello"') == b'"HELLO"'
    assert await run(executor, "uppercase", b"") == b""
    text = "Mixed 123 az AZ {}[]`~ caf\xe9\n".encode()
    # Only ASCII letters change (bytes.upper() does the same); UTF-8 sequences pass through untouched.
    assert await run(executor, "uppercase", text) == text.upper() == "MIXED 123 AZ AZ {}[]`~ CAF\xe9\n".encode()


async def test_uppercase_streams_large_input(executor: Executor) -> None:
    data = (b"the quick brown fox jumps over the lazy dog\n" * 30_000)[: 1 * MiB + 17]
    assert await run(executor, "uppercase", data) == data.upper()


async def test_wordcount(executor: Executor) -> None:
    output = await run(executor, "wordcount", b'"hello brave new world"')
    assert json.loads(output) == {"bytes": 23, "lines": 0, "words": 4}
    assert json.loads(await run(executor, "wordcount", b"")) == {"bytes": 0, "lines": 0, "words": 0}
    text = b"  one\ttwo\r\nthree\n\n four  \x0bfive\x0c"
    assert json.loads(await run(executor, "wordcount", text)) == {
        "bytes": len(text), "lines": 3, "words": len(text.split())}


async def test_wordcount_large_input(executor: Executor) -> None:
    # Words straddle the 64 KiB read chunks; each must be counted once.
    data = b"lorem ipsum dolor\nsit amet, consectetur " * 40_000
    result = json.loads(await run(executor, "wordcount", data))
    assert result == {"bytes": len(data), "lines": data.count(b"\n"), "words": len(data.split())}
    assert result["bytes"] > MiB


async def test_greeter_uses_env_args_and_bundle(executor: Executor) -> None:
    if "greeter" not in EXAMPLES:
        pytest.skip("no greeter example")
    name = (SKILLS / "greeter" / "data" / "name.txt").read_text().rstrip()
    end = manifest("greeter").get("args", ["."])[0]
    output = await run(executor, "greeter", b"", env={"GREETING": "Hello", "HOME": "/root"})
    assert json.loads(output) == f"Hello, {name}{end}"


async def test_echo_memory(executor: Executor) -> None:
    # memory-v1 through the executor's gRPC server: the input comes back byte for byte, empty and large too
    # (1 MiB makes clawhub_alloc grow the memory).
    big = bytes(range(256)) * 4096
    for data in (b'"hello"', b"", big):
        assert await run(executor, "echo-memory", data) == data


async def test_cipher_calls_its_rot13_library(executor: Executor) -> None:
    assert await run(executor, "cipher", b'"Hello, World!"') == b'"Uryyb, Jbeyq!"'
    text = bytes(range(256))
    assert await run(executor, "cipher", await run(executor, "cipher", text)) == text
