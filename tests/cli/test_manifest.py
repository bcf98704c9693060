from __future__ import annotations

import os
from pathlib import Path

import pytest
from clawhub.common.v1 import skill_pb2

from services.cli import main, manifest
from services.runtime import bundle

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "skills"
MINIMAL = '(module (memory (export "memory") 1) (func (export "_start")))'


def write(tmp_path: Path, toml: str, module: str = MINIMAL) -> Path:
    (tmp_path / "skill.toml").write_text(toml)
    (tmp_path / "m.wat").write_text(module)
    return tmp_path


def test_examples_load() -> None:
    directories = sorted(p for p in EXAMPLES.iterdir() if (p / "skill.toml").exists())
    assert len(directories) >= 2
    for directory in directories:
        package = manifest.load(directory)
        assert package.module.startswith(b"\0asm")
        assert package.manifest.abi in manifest.ABIS.values()
    # The manifest's abi string maps to the enum (memory-v1: examples/skills/echo-memory).
    assert manifest.load(EXAMPLES / "uppercase").manifest.abi == skill_pb2.ABI_WASI_COMMAND_V1
    assert manifest.load(EXAMPLES / "echo-memory").manifest.abi == skill_pb2.ABI_MEMORY_V1


def test_full_manifest(tmp_path: Path) -> None:
    package = manifest.load(write(tmp_path, '''
name = "com.acme.thing"
version = "1.2.3"
module = "m.wat"
capabilities = ["env:API_URL"]
input_schema = {type = "string"}
[limits]
memory = "8MiB"
timeout_ms = 250
max_output = 1024
[[dependencies]]
package = "com.acme.base"
version_range = "^1.2.0"
is_shared = true
[[examples]]
input = "a"
output = "A"
'''))
    m = package.manifest
    assert (m.name, m.version, list(m.capabilities)) == ("com.acme.thing", "1.2.3", ["env:API_URL"])
    assert m.limits.memory_bytes == 8 * 1024 * 1024 and m.limits.timeout.ToMilliseconds() == 250
    assert m.limits.max_output_bytes == 1024
    assert m.dependencies[0].is_shared and m.dependencies[0].version_range == "^1.2.0"
    assert m.examples[0].expected_output == b"A"
    assert '"string"' in m.input_schema


@pytest.mark.parametrize(("toml", "needle"), [
    ('version = "1.0.0"\nmodule = "m.wat"', "`name` is required"),
    ('name = "Acme"\nversion = "1.0.0"\nmodule = "m.wat"', "reverse-DNS"),
    ('name = "com.a.b"\nversion = "1.0"\nmodule = "m.wat"', "SemVer"),
    ('name = "com.a.b"\nversion = "1.0.0"\nmodule = "missing.wat"', "does not exist"),
    ('name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wat"\nabi = "cobol"', "not supported"),
    ('name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wat"\ncolour = 1', "unknown key"),
    ('name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wat"\n[limits]\nmemory = "lots"', "limits.memory"),
    ('name = = "x"', "not valid TOML"),
])
def test_bad_manifests_name_the_problem(tmp_path: Path, toml: str, needle: str) -> None:
    with pytest.raises(manifest.ManifestError, match=needle):
        manifest.load(write(tmp_path, toml))


def test_bad_wat_is_reported(tmp_path: Path) -> None:
    with pytest.raises(manifest.ManifestError, match="cannot compile WAT"):
        manifest.load(write(tmp_path, 'name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wat"', "(module (oops"))


def test_a_wat_compile_error_keeps_its_line_and_column(tmp_path: Path) -> None:
    source = "(module\n  (func\n    (i32.bogus)))\n"
    with pytest.raises(manifest.ManifestError) as caught:
        manifest.load(write(tmp_path, 'name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wat"', source))
    first, *excerpt = str(caught.value).splitlines()
    assert first == f"{tmp_path / 'm.wat'}:3:6: cannot compile WAT: unknown operator or unexpected token"
    # Then the source line, with a caret under the column.
    assert any(line.endswith("3 |     (i32.bogus)))") for line in excerpt)
    assert excerpt[-1].endswith("|      ^")
    assert "<anon>" not in str(caught.value)


@pytest.mark.parametrize("text", [MINIMAL, "\n;; a comment\n(; another ;)\n" + MINIMAL, "(component)"])
def test_a_wasm_file_that_is_wat_text_is_told_to_be_renamed(tmp_path: Path, text: str) -> None:
    (tmp_path / "skill.toml").write_text('name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wasm"')
    (tmp_path / "m.wasm").write_text(text)
    with pytest.raises(manifest.ManifestError, match=r"is WebAssembly text \(WAT\), not a binary module: "
                                                     r"rename it to m\.wat"):
        manifest.load(tmp_path)


def test_a_wasm_file_that_is_neither_is_uploaded_for_the_registry_to_judge(tmp_path: Path) -> None:
    (tmp_path / "skill.toml").write_text('name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wasm"')
    (tmp_path / "m.wasm").write_bytes(b"#!/bin/sh\n")
    assert manifest.load(tmp_path).module == b"#!/bin/sh\n"


def test_an_unknown_capability_names_its_index_and_the_accepted_forms(tmp_path: Path) -> None:
    toml = 'name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wat"\ncapabilities = ["files", "network"]'
    with pytest.raises(manifest.ManifestError) as caught:
        manifest.load(write(tmp_path, toml))
    from services.runtime.wasm import CAPABILITY_FORMS

    assert str(caught.value) == (
        f"{tmp_path / 'skill.toml'}: capabilities[1]: unknown capability 'network'; a capability is "
        f"{CAPABILITY_FORMS}")
    assert "`files`" in CAPABILITY_FORMS and "`env:NAME`" in CAPABILITY_FORMS


def test_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(manifest.ManifestError, match="no skill.toml"):
        manifest.load(tmp_path)


BASE = 'name = "com.a.b"\nversion = "1.0.0"\nmodule = "m.wat"\ncapabilities = ["files"]\n'


def test_args_and_files_make_a_deterministic_bundle(tmp_path: Path) -> None:
    skill = write(tmp_path, BASE + 'args = ["--loud", "x y"]\nfiles = ["data/words.txt", "b.txt", "link.txt"]\n')
    (skill / "data").mkdir()
    (skill / "data" / "words.txt").write_bytes(b"alpha\nbeta\n")
    (skill / "b.txt").write_bytes(b"")
    # A symlink that stays inside the skill directory is read through.
    (skill / "link.txt").symlink_to(skill / "data" / "words.txt")
    package = manifest.load(skill)
    m = package.manifest
    assert list(m.args) == ["--loud", "x y"]
    assert [(f.path, f.size_bytes) for f in m.files] == [("b.txt", 0), ("data/words.txt", 11), ("link.txt", 11)]
    assert m.files[1].digest == bundle.file_digest(b"alpha\nbeta\n")
    words = b"alpha\nbeta\n"
    assert package.bundle == bundle.build({"data/words.txt": words, "b.txt": b"", "link.txt": words})
    tar = tmp_path / "bundle.tar"
    tar.write_bytes(package.bundle)
    assert bundle.problems(tar, list(m.files)) == []
    # Loading again (other mtimes, same content) gives the same bytes.
    os.utime(skill / "b.txt", (1, 1))
    assert manifest.load(skill).bundle == package.bundle


def test_no_files_no_bundle(tmp_path: Path) -> None:
    package = manifest.load(write(tmp_path, BASE))
    assert package.bundle == b"" and list(package.manifest.files) == [] and list(package.manifest.args) == []


@pytest.mark.parametrize(("files", "needle"), [
    ('["/etc/passwd"]', r"files\[0\]: '/etc/passwd' is absolute"),
    ('["../outside.txt"]', r"files\[0\]: .*`\.\.`"),
    ('["ok.txt", "data/../ok.txt"]', r"files\[1\]: .*`\.\.`"),
    ('["missing.txt"]', r"files\[0\]: 'missing.txt' does not exist"),
    ('["data"]', r"files\[0\]: 'data' is a directory"),
    ('["escape.txt"]', r"files\[0\]: 'escape.txt' resolves to .* outside the skill directory"),
    ('["ok.txt", "ok.txt"]', r"files\[1\]: 'ok.txt' is listed twice"),
    ('"ok.txt"', "files must be a list"),
    ('[1]', "files must be a list"),
])
def test_bad_files_name_the_field(tmp_path: Path, files: str, needle: str) -> None:
    skill = tmp_path / "skill"
    skill.mkdir()
    write(skill, BASE + f"files = {files}\n")
    (skill / "ok.txt").write_text("ok")
    (skill / "data").mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (skill / "escape.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(manifest.ManifestError, match=needle):
        manifest.load(skill)


@pytest.mark.parametrize(("module", "needle"), [
    ("../../../etc/passwd", r"module: .*`\.\.`"),
    ("/etc/passwd", r"module: '/etc/passwd' is absolute"),
    ("escape.wasm", r"module: 'escape.wasm' resolves to .* outside the skill directory"),
    ("sub/../m.wat", r"module: .*`\.\.`"),
])
def test_module_outside_the_skill_directory_is_refused_before_reading(tmp_path: Path, module: str,
                                                                       needle: str) -> None:
    """A hostile skill directory cannot make `clawhub publish` read (and upload) a file from elsewhere."""
    skill = tmp_path / "skill"
    skill.mkdir()
    (tmp_path / "secret.wasm").write_bytes(b"\0asm\1\0\0\0 secret")
    (skill / "escape.wasm").symlink_to(tmp_path / "secret.wasm")
    write(skill, BASE.replace('module = "m.wat"', f"module = {module!r}"))
    with pytest.raises(manifest.ManifestError, match=needle):
        manifest.load(skill)


def test_module_in_a_subdirectory_and_an_inner_symlink_still_work(tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "m.wat").write_text(MINIMAL)
    (tmp_path / "link.wat").symlink_to(tmp_path / "build" / "m.wat")
    for module in ("build/m.wat", "link.wat"):
        package = manifest.load(write(tmp_path, BASE.replace('module = "m.wat"', f"module = {module!r}")))
        assert package.module.startswith(b"\0asm")


@pytest.mark.parametrize(("args", "needle"), [('"--x"', "args must be a list"), ('["a\\u0000b"]', r"args\[0\]")])
def test_bad_args(tmp_path: Path, args: str, needle: str) -> None:
    with pytest.raises(manifest.ManifestError, match=needle):
        manifest.load(write(tmp_path, BASE + f"args = {args}\n"))


def test_deploy_env_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_TEST_SECRET", "s3cret=x")
    assert main.parse_env(None) == {}
    assert main.parse_env(["A=1", "B=", "C=x=y", "CLAWHUB_TEST_SECRET"]) == {
        "A": "1", "B": "", "C": "x=y", "CLAWHUB_TEST_SECRET": "s3cret=x"}
    args = main.build_parser().parse_args(["deploy", "com.a.b@1.0.0", "--env", "A=1", "--env", "B=2"])
    assert args.env == ["A=1", "B=2"]
    monkeypatch.delenv("CLAWHUB_TEST_UNSET", raising=False)
    for bad, needle in ((["=v"], "expected KEY=VALUE"), (["A=1", "A=2"], "more than once"),
                        (["CLAWHUB_TEST_UNSET"], "is not set")):
        with pytest.raises(main.CliError, match=needle):
            main.parse_env(bad)
