"""What a skill can see: only the env vars it declares, its arguments, and its bundle, read-only at /skill."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import grpc
import pytest
from clawhub.executor.v1 import executor_service_pb2 as pb

from services.executor.bundles import BundleRejected, unpack
from services.runtime.errors import error_info
from tests.executor import fixtures as f
from tests.executor.conftest import Executor

EPERM, EBADF, ENOTCAPABLE = 63, 8, 76
PASSWD = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else b"root:"


def tar(files: dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info)
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


async def run(ex: Executor, module: bytes, stdin: bytes = b"", **fields: object) -> pb.ExecuteResponse:
    digest = ex.source.add(module)
    return await ex.stub.Execute(pb.ExecuteRequest(digest=digest, input=stdin, **fields), timeout=10)


async def refused(ex: Executor, module: bytes, stdin: bytes = b"", **fields: object) -> tuple:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(ex, module, stdin, **fields)
    return caught.value.code(), error_info(caught.value).reason, dict(error_info(caught.value).metadata)


async def still_works(ex: Executor) -> None:
    assert (await run(ex, f.ECHO, b"alive")).output == b"ok:alive"


async def test_only_declared_env_vars_with_request_values(executor: Executor,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_TEST_SECRET", "host-secret")
    monkeypatch.setenv("API_KEY", "the-host-value")
    response = await run(executor, f.SHOWS_ARGS_AND_ENV,
                         capabilities=["env:API_KEY", "env:REGION", "env:UNSET"],
                         env={"API_KEY": "deploy-value", "REGION": "eu", "UNDECLARED": "x",
                              "CLAWHUB_TEST_SECRET": "y"})
    args, env = response.output.split(b"|")
    assert args == b"skill\0"
    assert sorted(env.split(b"\0")[:-1]) == [b"API_KEY=deploy-value", b"REGION=eu"]
    assert b"host-secret" not in response.output and b"the-host-value" not in response.output


async def test_host_environment_never_leaks(executor: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_TEST_SECRET", "host-secret")
    for capabilities in ([], ["env:CLAWHUB_TEST_SECRET"], ["env:PATH", "env:HOME"]):
        response = await run(executor, f.SHOWS_ARGS_AND_ENV, capabilities=capabilities)
        assert response.output == b"skill\0|", capabilities  # declared but not set at deploy: absent
    assert os.environ["CLAWHUB_TEST_SECRET"] == "host-secret"
    await still_works(executor)


async def test_arguments(executor: Executor) -> None:
    response = await run(executor, f.SHOWS_ARGS_AND_ENV, args=["--mode", "fast", "ünïcode", ""])
    assert response.output == "skill\0--mode\0fast\0ünïcode\0\0|".encode()


async def test_nul_in_args_or_env_is_refused(executor: Executor) -> None:
    code, reason, meta = await refused(executor, f.SHOWS_ARGS_AND_ENV, args=["a\0b"])
    assert (code, reason, meta["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "args[0]")
    code, reason, _ = await refused(executor, f.SHOWS_ARGS_AND_ENV, capabilities=["env:A"], env={"A": "x\0y"})
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_unknown_capability_is_module_invalid(executor: Executor) -> None:
    code, reason, meta = await refused(executor, f.ECHO, capabilities=["network"])
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")
    assert "unknown capability 'network'" in meta["problems"]


async def test_bundle_is_readable_at_skill(executor: Executor) -> None:
    bundle = executor.source.add(tar({"data/greeting.txt": b"hello from the bundle", "top.txt": b"top"}))
    for path, content in [(b"data/greeting.txt", b"hello from the bundle"), (b"top.txt", b"top"),
                          (b"./data/../top.txt", b"top")]:
        response = await run(executor, f.OPENS_FILE, b"r" + path, capabilities=["files"], bundle_digest=bundle)
        assert response.output == b"F" + content, path


async def test_bundle_cannot_be_written(executor: Executor) -> None:
    bundle = executor.source.add(tar({"top.txt": b"top"}))
    for path in (b"top.txt", b"new.txt", b"data"):
        response = await run(executor, f.OPENS_FILE, b"w" + path, capabilities=["files"], bundle_digest=bundle)
        assert response.output[:1] == b"E" and response.output[1] != 0, (path, response.output)
    # Still intact, on the host too.
    response = await run(executor, f.OPENS_FILE, b"rtop.txt", capabilities=["files"], bundle_digest=bundle)
    assert response.output == b"Ftop"
    unpacked = [p for p in Path(executor.data_dir, "bundles").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in unpacked] == [b"top"]
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in unpacked)


@pytest.mark.parametrize("path", [b"/etc/passwd", b"../../../../../../etc/passwd", b"../bundles",
                                  b"data/../../x", b"/skill/top.txt", b".."])
async def test_paths_cannot_escape_the_bundle(executor: Executor, path: bytes) -> None:
    bundle = executor.source.add(tar({"top.txt": b"top"}))
    response = await run(executor, f.OPENS_FILE, b"r" + path, capabilities=["files"], bundle_digest=bundle)
    assert response.output[:1] == b"E" and response.output[1] in (EPERM, ENOTCAPABLE, 44, 2), response.output
    assert PASSWD[:20] not in response.output
    await still_works(executor)


async def test_without_files_nothing_is_preopened(executor: Executor) -> None:
    # A module that imports path_open needs `files`; without it, the call is refused before it runs…
    bundle = executor.source.add(tar({"top.txt": b"top"}))
    code, reason, _ = await refused(executor, f.OPENS_FILE, b"r/etc/passwd", bundle_digest=bundle)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")
    # …and the bundle of a skill that does not declare `files` is not even fetched.
    assert bundle not in executor.source.fetches
    # With `files` but no bundle: an empty /skill.
    for path in (b"top.txt", b"/etc/passwd", b"../etc/passwd"):
        response = await run(executor, f.OPENS_FILE, b"r" + path, capabilities=["files"])
        assert response.output[:1] == b"E", path
    await still_works(executor)


async def test_a_module_checked_with_files_is_refused_without(executor: Executor) -> None:
    # The first call (with `files`) makes the module hot; a second call without `files` must still be
    # refused: the hot cache does not remember a check for other capabilities.
    assert (await run(executor, f.OPENS_FILE, b"rx", capabilities=["files"])).output[:1] == b"E"
    code, reason, _ = await refused(executor, f.OPENS_FILE, b"rx")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")
    digest = executor.source.add(f.OPENS_FILE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest), timeout=5)
    assert error_info(caught.value).reason == "MODULE_INVALID"
    loaded = await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest, capabilities=["files"]), timeout=5)
    assert loaded.already_loaded


async def test_bundle_is_unpacked_once_and_preloaded(executor: Executor) -> None:
    bundle = executor.source.add(tar({"a.txt": b"A"}))
    digest = executor.source.add(f.OPENS_FILE)
    await executor.stub.LoadSkill(pb.LoadSkillRequest(digest=digest, capabilities=["files"],
                                                      bundle_digest=bundle), timeout=5)
    assert executor.source.fetches[bundle] == 1
    for _ in range(3):
        response = await executor.stub.Execute(pb.ExecuteRequest(
            digest=digest, input=b"ra.txt", capabilities=["files"], bundle_digest=bundle), timeout=5)
        assert response.output == b"FA"
    assert executor.source.fetches[bundle] == 1


@pytest.mark.parametrize("members", [
    {"extra": [link("evil", "/etc/passwd")]},
    {"extra": [link("evil", "top.txt", tarfile.LNKTYPE)]},
    {"extra": [link("dev", "", tarfile.CHRTYPE)]},
    {"files": {"../escape.txt": b"x"}},
    {"files": {"/abs.txt": b"x"}},
    {"files": {"a/../../escape.txt": b"x"}},
], ids=["symlink", "hardlink", "device", "dotdot", "absolute", "nested-dotdot"])
async def test_unsafe_bundles_are_refused(executor: Executor, members: dict) -> None:
    bundle = executor.source.add(tar({"top.txt": b"top", **members.get("files", {})},
                                     extra=members.get("extra", [])))
    code, reason, meta = await refused(executor, f.OPENS_FILE, b"rtop.txt", capabilities=["files"],
                                       bundle_digest=bundle)
    assert (code, reason, meta["bundle_digest"]) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID", bundle)
    assert not list(Path(executor.data_dir, "bundles").glob("sha256-*"))  # nothing left behind
    await still_works(executor)


async def test_bundle_errors(executor: Executor) -> None:
    code, reason, _ = await refused(executor, f.OPENS_FILE, b"rx", capabilities=["files"],
                                    bundle_digest="sha256:" + "4" * 64)
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND")
    code, reason, meta = await refused(executor, f.OPENS_FILE, b"rx", capabilities=["files"], bundle_digest="x")
    assert (code, reason, meta["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DIGEST", "bundle_digest")
    lying = executor.source.add(tar({"a": b"a"}))
    executor.source.blobs[lying] = tar({"a": b"b"})
    code, reason, _ = await refused(executor, f.OPENS_FILE, b"ra", capabilities=["files"], bundle_digest=lying)
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    garbage = executor.source.add(b"not a tar file at all" * 50)
    code, reason, _ = await refused(executor, f.OPENS_FILE, b"ra", capabilities=["files"], bundle_digest=garbage)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODULE_INVALID")


def test_unpack_refuses_and_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(BundleRejected, match="contains `..`"):
        unpack(tar({"ok": b"1", "../x": b"2"}), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    unpack(tar({"d/ok": b"1"}), tmp_path / "b")
    assert (tmp_path / "b" / "d" / "ok").read_bytes() == b"1"
    assert not (tmp_path / "b" / "d").stat().st_mode & 0o222
