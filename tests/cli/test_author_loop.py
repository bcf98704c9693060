"""The author's loop on the real `clawhub` entry point: `new` scaffolds a skill that passes its own examples,
`build` runs the language's toolchain (or names the missing one and how to install it), `run` and `test` run
the skill locally in the executor's sandbox, with no server.

Toolchains are used where this machine has them and skipped with the reason otherwise: C needs clang with a
WASI sysroot, Rust cargo with the wasm32-wasip1 target, AssemblyScript Node.js and the npm registry, Python
and JavaScript components a clawhub with the component-v1 ABI (and componentize-py, or componentize-js from
npm); without that ABI, every command must say it is not available."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import author

ROOT = Path(__file__).resolve().parents[2]
# The console script installed beside the interpreter running the tests (.venv/bin/clawhub).
CLAWHUB = Path(sys.executable).parent / "clawhub"
EXAMPLES = ROOT / "examples" / "skills" / "toolchains"


def clawhub(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if not CLAWHUB.exists():
        pytest.skip(f"{CLAWHUB} is not installed (run ./dev test, which installs the project)")
    return subprocess.run([str(CLAWHUB), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def c_toolchain() -> str:
    """Why C cannot be built here, or '' when it can."""
    try:
        author._find_clang()
    except author.ToolchainMissing as exc:
        return str(exc)
    return ""


def rust_wasm_target() -> str:
    """Why Rust cannot be built for wasm32-wasip1 here, or '' when it can."""
    if shutil.which("cargo") is None or shutil.which("rustc") is None:
        return "cargo is not installed"
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=False).stdout
    if not (Path(sysroot.strip()) / "lib" / "rustlib" / author.RUST_TARGET).is_dir():
        return (f"the Rust target {author.RUST_TARGET} is not installed (`rustup target add {author.RUST_TARGET}` "
                "downloads it from the Rust project's servers, which this machine may not reach)")
    return ""


@pytest.mark.parametrize("abi", ["wasi-command-v1", "memory-v1"])
def test_new_wat_then_test_passes(tmp_path: Path, abi: str) -> None:
    created = ok(clawhub("new", "com.acme.hello", "--lang", "wat", "--abi", abi, tmp_path / "hello"))
    assert "created" in created.stdout and "clawhub test" in created.stdout
    skill = tmp_path / "hello"
    manifest = (skill / "skill.toml").read_text()
    assert 'name = "com.acme.hello"' in manifest and f'abi = "{abi}"' in manifest
    assert 'module = "skill.wat"' in manifest and manifest.count("[[examples]]") == 2
    assert "clawhub test" in (skill / "README.md").read_text()
    # WAT needs no toolchain: build only checks the module, as the registry would.
    built = ok(clawhub("build", skill))
    assert abi in built.stdout
    tested = ok(clawhub("test", skill))
    lines = tested.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["ok", "ok"], tested.stdout
    assert lines[-1] == "com.acme.hello: 2 of 2 example(s) passed"


def test_new_default_name_and_directory(tmp_path: Path) -> None:
    ok(clawhub("new", "greet", "--lang", "wat", cwd=tmp_path))
    assert 'name = "com.example.greet"' in (tmp_path / "greet" / "skill.toml").read_text()
    # A directory with anything in it is never written into.
    again = clawhub("new", "greet", "--lang", "wat", cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = clawhub("new", "Bad_Name.x", "--lang", "wat", cwd=tmp_path)
    assert bad.returncode == 2 and "reverse-DNS" in bad.stderr
    wrong_abi = clawhub("new", "x", "--lang", "assemblyscript", "--abi", "wasi-command-v1", cwd=tmp_path)
    assert wrong_abi.returncode == 2 and "memory-v1" in wrong_abi.stderr


def test_run_prints_output_and_verbose_usage(tmp_path: Path) -> None:
    ok(clawhub("new", "com.acme.hello", "--lang", "wat", tmp_path / "s"))
    plain = ok(clawhub("run", tmp_path / "s", "--input", '"world"'))
    assert plain.stdout == '{"hello":"world"}' and plain.stderr == ""
    # --input is re-encoded as the gateway does (compact, keys sorted) before it reaches the skill.
    sorted_keys = ok(clawhub("run", tmp_path / "s", "--input", '{"b": 1, "a": [1, 2]}'))
    assert sorted_keys.stdout == '{"hello":{"a":[1,2],"b":1}}'
    raw = ok(clawhub("run", tmp_path / "s", "--raw", "not json"))
    assert raw.stdout == '{"hello":not json}'
    (tmp_path / "in.json").write_bytes(b"[1, 2]")
    assert ok(clawhub("run", tmp_path / "s", "--input-file", tmp_path / "in.json")).stdout == '{"hello":[1, 2]}'
    verbose = ok(clawhub("run", tmp_path / "s", "--input", '"world"', "-v"))
    assert verbose.stdout == '{"hello":"world"}'
    usage = verbose.stderr
    assert "usage:" in usage and "(limit 2000 ms)" in usage and "limit 16,777,216" in usage
    assert "peak memory 131,072 bytes" in usage  # two pages: the module's whole memory
    fuel = re.search(r"fuel ([\d,]+), output 17 bytes", usage)
    assert fuel is not None and int(fuel.group(1).replace(",", "")) > 0, usage
    bad = clawhub("run", tmp_path / "s", "--input", "{not json")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


def test_run_reports_failures_in_the_executors_words(tmp_path: Path) -> None:
    """A skill that loops forever hits the manifest's timeout; one that exits 3 prints its stderr with -v."""
    skill = tmp_path / "spin"
    ok(clawhub("new", "com.acme.spin", "--lang", "wat", skill))
    (skill / "skill.wat").write_text('(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))')
    toml = skill / "skill.toml"
    toml.write_text(toml.read_text().replace("timeout_ms = 2000", "timeout_ms = 200"))
    spun = clawhub("run", skill, "--input", '"x"')
    assert spun.returncode == 1 and spun.stdout == ""
    assert "DEADLINE_EXCEEDED / SKILL_TIMEOUT: the skill did not finish within its 200 ms" in spun.stderr
    (skill / "skill.wat").write_text('''(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "no input wanted\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 16))
    (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 3))))''')
    failed = clawhub("run", skill, "-v")
    assert failed.returncode == 1
    assert "ABORTED / SKILL_EXIT_NONZERO: the skill exited with code 3" in failed.stderr
    assert "stderr:\nno input wanted" in failed.stderr


def test_env_files_and_kv_are_granted_as_the_executor_grants_them(tmp_path: Path) -> None:
    """examples/skills/greeter reads `env:GREETING`, its bundled file and its argument; a kv skill's examples
    share one scratch store, and `run --kv-file` keeps its store between runs."""
    greeter = ROOT / "examples" / "skills" / "greeter"
    assert ok(clawhub("run", greeter, "--env", "GREETING=Hello", "--input", '""')).stdout == '"Hello, World!"'
    unset = clawhub("run", greeter, "--input", '""')
    assert unset.returncode == 1 and "SKILL_EXIT_NONZERO" in unset.stderr and "GREETING is not set" in unset.stderr
    undeclared = clawhub("run", greeter, "--env", "NOPE=1")
    assert undeclared.returncode == 2 and "does not declare env:NOPE" in undeclared.stderr
    counter = ROOT / "examples" / "skills" / "counter-kv"
    if not (counter / "skill.toml").is_file():
        pytest.skip("no kv example (examples/skills/counter-kv) in this checkout")
    ok(clawhub("test", counter))
    store = tmp_path / "kv.sqlite"
    counts = [ok(clawhub("run", counter, "--input", '"hit"', "--kv-file", store)).stdout for _ in range(2)]
    assert counts == ["1", "2"]
    assert ok(clawhub("run", counter, "--input", '"hit"')).stdout == "1"  # a scratch store without --kv-file


def test_failing_example_exits_1_with_a_diff(tmp_path: Path) -> None:
    skill = tmp_path / "s"
    ok(clawhub("new", "com.acme.hello", "--lang", "wat", skill))
    toml = skill / "skill.toml"
    toml.write_text(toml.read_text().replace('output = "{\\"hello\\":\\"world\\"}"',
                                             'output = "{\\"hello\\":\\"World\\"}"'))
    result = clawhub("test", skill)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL  example 0:") and "the output differs" in lines[0]
    assert lines[1].strip() == '- expected "{\\"hello\\":\\"World\\"}"'
    assert lines[2].strip() == '+ actual   "{\\"hello\\":\\"world\\"}"'
    # The caret stands under the first differing character of the expected text.
    assert lines[3].strip() == "^ first difference at byte 10"
    assert lines[3].index("^") == lines[1].index("W")
    assert lines[4].startswith("ok    example 1:")
    assert lines[-1] == "com.acme.hello: 1 of 2 example(s) passed, 1 failed"


def test_multiline_outputs_get_a_unified_diff() -> None:
    lines = author.diff(b"a\nb\nc\n", b"a\nB\nc\n")
    assert "-b" in lines and "+B" in lines and lines[0] == "--- expected"


def test_no_examples_is_a_failure(tmp_path: Path) -> None:
    skill = tmp_path / "s"
    ok(clawhub("new", "com.acme.hello", "--lang", "wat", skill))
    toml = skill / "skill.toml"
    toml.write_text(toml.read_text().split("[[examples]]")[0])
    result = clawhub("test", skill)
    assert result.returncode == 1 and "no [[examples]]" in result.stderr


def _without(*tools: str) -> dict[str, str]:
    """This environment with PATH narrowed to directories holding none of `tools` (and no C overrides)."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(Path(d, t).exists() for t in tools)
            and not any(name.startswith("clang") for name in _listdir(d))]
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "WASI_SYSROOT")}
    env["PATH"] = os.pathsep.join(keep) or "/nonexistent"
    env["WASI_SDK_PATH"] = "/nonexistent/wasi-sdk"
    return env


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def test_build_names_the_missing_toolchain(tmp_path: Path) -> None:
    ok(clawhub("new", "com.acme.r", "--lang", "rust", tmp_path / "r"))
    rust = clawhub("build", tmp_path / "r", env=_without("cargo", "rustc"))
    assert rust.returncode == 1
    assert "cargo (Rust) is not installed" in rust.stderr and "rustup target add wasm32-wasip1" in rust.stderr
    if Path("/opt/wasi-sdk/bin/clang").exists():
        pytest.skip("/opt/wasi-sdk has a clang: a narrowed PATH cannot hide it")
    ok(clawhub("new", "com.acme.c", "--lang", "c", tmp_path / "c"))
    c = clawhub("build", tmp_path / "c", env=_without("clang"))
    assert c.returncode == 1
    assert "no C compiler for WebAssembly (clang) found" in c.stderr
    assert "wasi-sdk" in c.stderr and "apt-get install clang lld wasi-libc" in c.stderr
    ok(clawhub("new", "com.acme.as", "--lang", "assemblyscript", tmp_path / "as"))
    asc = clawhub("build", tmp_path / "as")  # nothing installed in its node_modules
    assert asc.returncode == 1 and "npm install" in asc.stderr
    # Running a module that was never built says to build it.
    unbuilt = clawhub("run", tmp_path / "c")
    assert unbuilt.returncode == 1 and "not built yet: run `clawhub build" in unbuilt.stderr


def test_rust_without_the_wasm_target_says_how_to_add_it(tmp_path: Path) -> None:
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not installed")
    if not rust_wasm_target():
        pytest.skip(f"the {author.RUST_TARGET} target is installed here")
    ok(clawhub("new", "com.acme.r", "--lang", "rust", tmp_path / "r"))
    result = clawhub("build", tmp_path / "r")
    assert result.returncode == 1 and f"run `rustup target add {author.RUST_TARGET}`" in result.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize("abi", ["wasi-command-v1", "memory-v1"])
def test_rust_builds_and_passes(tmp_path: Path, abi: str) -> None:
    if why := rust_wasm_target():
        pytest.skip(why)
    skill = tmp_path / "r"
    ok(clawhub("new", "com.acme.r", "--lang", "rust", "--abi", abi, skill))
    ok(clawhub("build", skill, timeout=300))
    ok(clawhub("test", skill))


@pytest.mark.timeout(600)
def test_rust_scaffold_compiles_for_the_host(tmp_path: Path) -> None:
    """Without the wasm target, the Rust sources are still checked: the WASI command built for this machine
    answers the first example as the skill would."""
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not installed")
    skill = tmp_path / "r"
    ok(clawhub("new", "com.acme.r", "--lang", "rust", skill))
    subprocess.run([cargo, "build", "--quiet", "--offline"], cwd=skill, check=True, timeout=300)
    answer = subprocess.run([skill / "target" / "debug" / "skill"], input=b'"world"', capture_output=True,
                            check=True)
    assert answer.stdout == b'{"hello":"world"}'
    lib = tmp_path / "m"
    ok(clawhub("new", "com.acme.m", "--lang", "rust", "--abi", "memory-v1", lib))
    subprocess.run([cargo, "check", "--quiet", "--offline"], cwd=lib, check=True, timeout=300)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("abi", ["wasi-command-v1", "memory-v1"])
def test_c_builds_and_passes(tmp_path: Path, abi: str) -> None:
    if why := c_toolchain():
        pytest.skip(why)
    skill = tmp_path / "c"
    ok(clawhub("new", "com.acme.c", "--lang", "c", "--abi", abi, skill))
    built = ok(clawhub("build", skill))
    assert "--target=wasm32-wasi" in built.stderr and f"{abi})" in built.stdout
    ok(clawhub("test", skill))
    assert ok(clawhub("run", skill, "--input", "[true]")).stdout == '{"hello":[true]}'
    # Editing the source without rebuilding is pointed out.
    os.utime(skill / "src" / "skill.c")
    stale = ok(clawhub("run", skill, "--input", "1"))
    assert "older than its sources" in stale.stderr


@pytest.mark.timeout(600)
def test_assemblyscript_builds_and_passes(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("npx") is None:
        pytest.skip("Node.js (npm, npx) is not installed")
    skill = tmp_path / "as"
    ok(clawhub("new", "com.acme.as", "--lang", "assemblyscript", skill))
    installed = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=skill, capture_output=True,
                               text=True, timeout=300, check=False)
    if installed.returncode != 0:
        pytest.skip(f"`npm install assemblyscript` failed (is the npm registry reachable?): {installed.stderr[-300:]}")
    ok(clawhub("build", skill))
    ok(clawhub("test", skill))


@pytest.mark.parametrize(("lang", "tool"), [("python", "componentize-py"), ("js", "componentize-js")])
def test_component_languages_say_the_abi_is_not_available(tmp_path: Path, lang: str, tool: str) -> None:
    if author.component_abi_available():
        pytest.skip("this clawhub has the component-v1 ABI: test_python_component_builds_and_passes covers it")
    skill = tmp_path / lang
    created = ok(clawhub("new", "com.acme.comp", "--lang", lang, skill))
    assert "component-v1" in created.stdout
    assert 'abi = "component-v1"' in (skill / "skill.toml").read_text()
    assert (skill / "wit" / "skill.wit").is_file()
    for command in ("build", "test", "run"):
        result = clawhub(command, skill)
        assert result.returncode == 1
        assert "component-v1 ABI" in result.stderr and "cannot build, run or publish yet" in result.stderr
        assert tool in result.stderr


@pytest.mark.timeout(900)
def test_python_component_builds_and_passes(tmp_path: Path) -> None:
    """Where clawhub has the component-v1 ABI and componentize-py is installed, the Python scaffold builds into
    a component that passes its examples, and its `Err` fails a call with the message."""
    if not author.component_abi_available():
        pytest.skip("this clawhub does not have the component-v1 ABI yet (manifest.ABIS lacks it)")
    if shutil.which("componentize-py", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}") is None:
        pytest.skip(f"componentize-py is not installed (`{author.PY_INSTALL}`)")
    skill = tmp_path / "py"
    ok(clawhub("new", "com.acme.py", "--lang", "python", skill))
    ok(clawhub("build", skill, timeout=600))
    ok(clawhub("test", skill))
    # A component's peak memory is not observable (services/executor/components.py): -v says so, not "0 bytes".
    verbose = ok(clawhub("run", skill, "--input", '"world"', "-v"))
    assert "peak memory not measured for components" in verbose.stderr, verbose.stderr
    empty = clawhub("run", skill)
    assert empty.returncode == 1 and "SKILL_EXIT_NONZERO" in empty.stderr and "send some JSON" in empty.stderr


@pytest.mark.timeout(900)
def test_js_component_builds_and_passes(tmp_path: Path) -> None:
    """Where clawhub has the component-v1 ABI, Node.js is installed and the npm registry answers, the
    JavaScript scaffold builds with componentize-js into a component that passes its examples."""
    if not author.component_abi_available():
        pytest.skip("this clawhub does not have the component-v1 ABI yet (manifest.ABIS lacks it)")
    npm = shutil.which("npm")
    if npm is None or shutil.which("npx") is None:
        pytest.skip("Node.js (npm, npx) is not installed")
    skill = tmp_path / "js"
    ok(clawhub("new", "com.acme.js", "--lang", "js", skill))
    installed = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=skill, capture_output=True,
                               text=True, timeout=600, check=False)
    if installed.returncode != 0:
        pytest.skip(f"`npm install` of componentize-js failed (is the npm registry reachable?): "
                    f"{installed.stderr[-300:]}")
    ok(clawhub("build", skill, timeout=600))
    ok(clawhub("test", skill))


def test_c_example_builds_and_passes(tmp_path: Path) -> None:
    """examples/skills/toolchains/c, as committed (sources only), builds and passes its examples."""
    if why := c_toolchain():
        pytest.skip(why)
    skill = tmp_path / "c"
    shutil.copytree(EXAMPLES / "c", skill, ignore=shutil.ignore_patterns("*.wasm"))
    ok(clawhub("build", skill))
    ok(clawhub("test", skill))


def test_the_cli_imports_no_sandbox_at_start() -> None:
    """`clawhub --help` and the server commands never load the executor's sandbox: only run and test do."""
    code = ("import sys, services.cli.main; "
            "print(sorted(m for m in sys.modules if m.startswith('services.executor')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"
