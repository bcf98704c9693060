"""gen/ matches protos/, and the contracts pass buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(out)], check=True,
                   capture_output=True)
    expected, actual = _tree(out), _tree(ROOT / "gen")
    assert sorted(expected) == sorted(actual), "gen/ has missing or extra files: run ./dev gen"
    stale = [name for name in expected if expected[name] != actual[name]]
    assert not stale, f"gen/ is stale for {stale}: run ./dev gen and commit"


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.fail("buf is not installed: it comes with the dev extra (buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_proto_follows_the_layout() -> None:
    for service in ("registry", "deployer", "dispatcher", "executor", "gateway"):
        path = ROOT / "protos" / "clawhub" / service / "v1" / f"{service}_service.proto"
        assert path.is_file(), path
        assert f"package clawhub.{service}.v1;" in path.read_text()
