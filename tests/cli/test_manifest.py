from __future__ import annotations

from pathlib import Path

import pytest
from clawhub.common.v1 import skill_pb2

from services.cli import manifest

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
        assert package.manifest.abi == skill_pb2.ABI_WASI_COMMAND_V1


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


def test_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(manifest.ManifestError, match="no skill.toml"):
        manifest.load(tmp_path)
