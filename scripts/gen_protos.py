"""Regenerate gen/ from protos/: protoc (grpcio-tools) + mypy-protobuf stubs, and the descriptor set.

The descriptor set (gen/clawhub/descriptor_set.binpb: every proto file and its imports, with source info)
keeps the proto comments, which protoc's Python output strips; services/runtime/reflection.py serves server
reflection from it, so `grpcurl describe` shows them.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: gen/)

The tool versions are pinned in pyproject.toml (the `dev` extra); tests/test_gen.py regenerates into a
temporary directory and fails on any difference, so gen/ always matches protos/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# Relative to the output directory; services/runtime/reflection.py reads it as a resource of `clawhub`.
DESCRIPTOR_SET = Path("clawhub") / "descriptor_set.binpb"


def generate(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    (out / DESCRIPTOR_SET).parent.mkdir(parents=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    # The mypy-protobuf plugins are console scripts installed next to this interpreter.
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"--descriptor_set_out={out / DESCRIPTOR_SET}",
        "--include_imports",
        "--include_source_info",
        *files,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    # Regular packages (not namespace packages), so mypy and setuptools see them plainly.
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        if directory != out:
            (directory / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "gen")
