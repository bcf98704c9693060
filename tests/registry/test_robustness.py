"""Robustness of the registry: a kill mid-upload, many concurrent publishes, no leaked handles."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.registry.v1 import registry_service_pb2 as pb

from tests.registry.support import Client, RegistryStub, digest, download, metadata, module, publish

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def big_module(size: int) -> bytes:
    """A valid WASI command of about `size` bytes (a data segment fills it)."""
    return module("y" * size, pages=size // 65536 + 2)


class Registry:
    """`python -m services.registry` in a subprocess over `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        env = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off",
               "CLAWHUB_REGISTRY_PORT": "0", "CLAWHUB_REGISTRY_HOST": "127.0.0.1",
               "CLAWHUB_REGISTRY_DATA_DIR": str(data_dir), "CLAWHUB_SHUTDOWN_GRACE": "0.5"}
        self.process = subprocess.Popen([sys.executable, "-m", "services.registry"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.address = ""

    async def started(self) -> str:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 30)
        assert line.startswith("clawhub registry listening on "), line
        self.address = line.rsplit(" ", 1)[1].strip()
        return self.address

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


def tmp_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*.tmp") if p.is_file()]


def blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]


def rows(data_dir: Path) -> tuple[int, int, int]:
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        counts = tuple(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                       for table in ("skills", "versions", "transitions"))
    return counts[0], counts[1], counts[2]


async def test_a_registry_killed_mid_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "registry"
    data = big_module(4 * MIB)
    first = Registry(data_dir)
    try:
        address = await first.started()
        half_sent = asyncio.Event()

        async def slow_stream() -> AsyncIterator[pb.PublishSkillRequest]:
            yield metadata(data, name="com.acme.big")
            for offset in range(0, len(data) // 2, 64 * 1024):
                yield pb.PublishSkillRequest(chunk=data[offset:offset + 64 * 1024])
                await asyncio.sleep(0.002)
            half_sent.set()
            await asyncio.sleep(3600)  # the rest never comes: the registry dies first

        async with grpc.aio.insecure_channel(address) as channel:
            call = RegistryStub(channel).PublishSkill(slow_stream(), timeout=60)
            waiter = asyncio.ensure_future(call)
            await asyncio.wait_for(half_sent.wait(), 30)
            # The registry has the upload half-written on disk when it dies.
            deadline = time.monotonic() + 10
            while not any(p.stat().st_size >= MIB for p in tmp_files(data_dir)):
                assert time.monotonic() < deadline, "the upload never reached the disk"
                await asyncio.sleep(0.02)
            first.kill()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await waiter
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        first.stop()

    second = Registry(data_dir)
    try:
        address = await second.started()
        # Restarted on the same data: no temporary file, no blob, no row.
        assert tmp_files(data_dir) == []
        assert blob_files(data_dir) == []
        assert rows(data_dir) == (0, 0, 0)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = RegistryStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetSkill(pb.GetSkillRequest(name="com.acme.big"), timeout=5)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            # A full publish of the same version then works.
            response = await publish(stub, data, name="com.acme.big", chunk_size=256 * 1024)
            assert response.created and response.skill_version.state == release_pb2.RELEASE_STATE_READY
            assert b"".join(await download(stub, digest(data))) == data
        assert rows(data_dir)[:2] == (1, 1)
        assert len(blob_files(data_dir)) == 1
    finally:
        second.stop()


async def test_twenty_concurrent_publishes_of_one_skill_all_land(registry: Client) -> None:
    versions = [f"2.{i}.0" for i in range(20)]
    results = await asyncio.gather(*(
        publish(registry.stub, module(f"v{v}"), name="com.acme.many", version=v, chunk_size=64) for v in versions))
    assert all(r.created and r.skill_version.state == release_pb2.RELEASE_STATE_READY for r in results)
    listed = await registry.stub.ListSkillVersions(pb.ListSkillVersionsRequest(name="com.acme.many", page_size=100),
                                                   timeout=5)
    assert sorted(v.version for v in listed.skill_versions) == sorted(versions)
    skill = (await registry.stub.GetSkill(pb.GetSkillRequest(name="com.acme.many"), timeout=5)).skill
    assert skill.latest_version == "2.19.0"


def open_fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed between listing and reading (the listing's own fd among them)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.timeout(120)
async def test_a_thousand_publishes_and_reads_leak_no_handles(registry: Client) -> None:
    stub = registry.stub
    database = str(registry.settings.data_dir / "registry.sqlite3")

    async def round_(i: int) -> None:
        data = module(f"leak{i}")
        name = f"com.acme.leak{i % 10}"
        version = f"1.{i}.0"
        await publish(stub, data, name=name, version=version)
        await stub.GetSkillVersion(pb.GetSkillVersionRequest(name=name, version=version), timeout=10)
        assert b"".join(await download(stub, digest(data))) == data
        if i % 50 == 0:
            await stub.ListSkills(pb.ListSkillsRequest(prefix="com.acme.", query="leak"), timeout=10)
            await stub.ResolveDependencies(pb.ResolveDependenciesRequest(requirements=[
                skill_pb2.Dependency(package=name, version_range="^1.0.0")]), timeout=10)

    async def rounds(start: int, stop: int) -> None:
        # Ten at a time: concurrency exercises the locks and the thread pools, as real clients would.
        for batch in range(start, stop, 10):
            await asyncio.gather(*(round_(i) for i in range(batch, min(batch + 10, stop))))

    # Warm up: thread pools, wasmtime and gRPC open what they keep for the life of the process.
    await rounds(0, 50)
    before = open_fds()
    await rounds(50, 384)  # 1,000 calls: 334 publishes, 668 reads (and a few searches and resolutions)
    after = open_fds()

    assert len(after) <= len(before) + 5, (Counter(after) - Counter(before)).most_common(10)
    # The metadata store still holds exactly its connections (writer and reader: each the database, its
    # WAL and shared memory), and no blob or temporary file stays open.
    sqlite_before = sorted(p for p in before if p.startswith(database))
    assert sorted(p for p in after if p.startswith(database)) == sqlite_before
    assert sqlite_before and len([p for p in sqlite_before if p == database]) == 2
    blobs = str(registry.settings.data_dir / "blobs")
    assert [p for p in after if p.startswith(blobs)] == []
