"""File bundles: deterministic tars, safe paths, checking a bundle against the manifest's files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from clawhub.common.v1 import skill_pb2

from services.runtime import bundle

FILES = {"data/words.txt": b"alpha\nbeta\n", "a.txt": b"", "data/deep/x.bin": bytes(range(256)) * 10}


def declared(files: dict[str, bytes]) -> list[skill_pb2.BundledFile]:
    return [skill_pb2.BundledFile(path=p, size_bytes=len(d), digest=bundle.file_digest(d)) for p, d in files.items()]


def test_build_is_deterministic_and_normalized(tmp_path: Path) -> None:
    data = bundle.build(FILES)
    assert data == bundle.build(dict(reversed(list(FILES.items()))))
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(FILES)
        for m in members:
            assert m.isreg() and (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o444, 0, 0, "", "")
            assert tar.extractfile(m).read() == FILES[m.name]  # type: ignore[union-attr]
    path = tmp_path / "b.tar"
    path.write_bytes(data)
    assert bundle.problems(path, declared(FILES)) == []


def test_long_and_unicode_names_survive(tmp_path: Path) -> None:
    files = {"d/" + "n" * 150 + ".txt": b"long", "données/é.txt": b"accent"}
    path = tmp_path / "b.tar"
    path.write_bytes(bundle.build(files))
    entries, problems = bundle.read_entries(path)
    assert problems == [] and sorted(e.path for e in entries) == sorted(files)


@pytest.mark.parametrize(("path", "needle"), [
    ("", "empty"), ("/etc/passwd", "absolute"), ("../x", "`..`"), ("a/../../x", "`..`"), ("a//b", "plain"),
    ("./a", "plain"), ("a/", "plain"), ("a\\b", "backslash"), ("a\0b", "NUL"), ("x" * 2000, "longer"),
])
def test_unsafe_paths(path: str, needle: str) -> None:
    problem = bundle.path_problem(path)
    assert problem is not None and needle in problem
    with pytest.raises(ValueError):
        bundle.build({path: b"x"})


@pytest.mark.parametrize("good", ["a", "data/words.txt", "a.b/c-d_e/.hidden", "..x/y.."])
def test_safe_paths(good: str) -> None:
    assert bundle.path_problem(good) is None


def _tar(add: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in add:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(("data", "files", "needle"), [
    (b"definitely not a tar archive" * 30, {}, "not a valid uncompressed tar"),
    (b"", {}, "not a valid uncompressed tar"),
    (_tar([(_info("a.txt"), b"x"), (_info("data", tarfile.DIRTYPE), b"")]), {"a.txt": b"x"}, "not a regular file"),
    (_tar([(_info("link", tarfile.SYMTYPE, "/etc/passwd"), b"")]), {}, "not a regular file"),
    (_tar([(_info("hard", tarfile.LNKTYPE, "a.txt"), b"")]), {}, "not a regular file"),
    (_tar([(_info("../escape.txt"), b"x")]), {}, "`..`"),
    (_tar([(_info("/abs.txt"), b"x")]), {}, "absolute"),
    (_tar([(_info("a.txt"), b"x"), (_info("a.txt"), b"x")]), {"a.txt": b"x"}, "more than once"),
    (bundle.build({"a.txt": b"x", "extra.txt": b"y"}), {"a.txt": b"x"}, "'extra.txt' is not listed"),
    (bundle.build({"a.txt": b"x"}), {"a.txt": b"x", "b.txt": b"y"}, "does not contain"),
    (bundle.build({"a.txt": b"xy"}), {"a.txt": b"x"}, "is 2 bytes, the manifest says 1"),
    (bundle.build({"a.txt": b"y"}), {"a.txt": b"x"}, "has digest"),
])
def test_bad_bundles(tmp_path: Path, data: bytes, files: dict[str, bytes], needle: str) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(data)
    problems = bundle.problems(path, declared(files))
    assert any(needle in p for p in problems), problems


def test_compressed_bundle_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = _info("a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    path = tmp_path / "b.tar.gz"
    path.write_bytes(buffer.getvalue())
    assert any("not a valid uncompressed tar" in p for p in bundle.problems(path, declared({"a.txt": b"x"})))


def test_truncated_bundle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(bundle.build({"a.txt": b"x" * 5000})[:1500])
    assert bundle.problems(path, declared({"a.txt": b"x" * 5000}))
