"""Downloads held by strangers (issue 9 review): DownloadBlob streams that read a chunk and stop reading.

Each download used to keep its blob file open until the client had read it all, with no bound on how many
one caller or everyone could hold: 260 stalled streams ran a 256-descriptor registry out of descriptors, so a
publish then failed DESCRIPTOR_BUDGET_EXHAUSTED and other downloads EMFILE. Now a download holds no
descriptor between chunks, and download slots are bounded per caller and in all (RESOURCE_EXHAUSTED
TOO_MANY_DOWNLOADS with a RetryInfo), which executors wait out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.registry.v1 import registry_internal_pb2 as internal_pb
from clawhub.registry.v1 import registry_service_pb2 as pb

from services.executor.source import RegistryModuleSource
from services.registry.blobs import DOWNLOAD_CHUNK_BYTES, BlobChanged, BlobStore
from services.registry.limits import DescriptorBudget, DownloadGate, DownloadLimits
from services.runtime.errors import ServiceError, error_info
from tests.registry.conftest import Opener
from tests.registry.support import RegistryStub, check_error, digest, download, module, publish
from tests.registry.test_integrity import big_module, blob_path
from tests.registry.test_uploads import ROOT, peer, reason, retry_after


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")


MIB = 1024 * 1024
# A client that stops reading: no BDP probing, so gRPC's receive window stays at its 64 KiB start and the
# registry's writes block soon (as a stranger's would), instead of the client buffering megabytes per stream.
STALLING_CLIENT = (("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1))


class StalledDownload:
    """A DownloadBlob stream that reads its first chunk (or its refusal) and then nothing more."""

    def __init__(self, stub: Any, blob: str, who: str | None = None) -> None:
        self.call = stub.DownloadBlob(internal_pb.DownloadBlobRequest(digest=blob), timeout=60,
                                      metadata=peer(who) if who else None)

    async def first(self) -> grpc.aio.AioRpcError | None:
        """None once the first chunk arrived (the download is admitted and now stalls), else its refusal."""
        try:
            response = await self.call.read()
        except grpc.aio.AioRpcError as err:
            return err
        assert response is not grpc.aio.EOF and response.chunk
        return None


def open_descriptors(pid: int | str = "self") -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


async def test_a_stalled_download_holds_no_file_descriptor_between_chunks(tmp_path: Path) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    blobs = BlobStore(tmp_path / "blobs")
    await blobs.open()
    data = os.urandom(3 * DOWNLOAD_CHUNK_BYTES + 10)
    blob = digest(data)
    async with blobs.upload(blob.removeprefix("sha256:")) as upload:
        await upload.write(data)
        await upload.finish()
        await upload.commit(blob)
    path = str(blobs.path_of(blob))
    chunks = (await blobs.read(blob)).chunks()
    received = [await anext(chunks)]
    # The reader is suspended with the rest unread, as behind a client that stopped reading.
    assert path not in open_descriptors()
    received += [chunk async for chunk in chunks]
    assert b"".join(received) == data
    assert path not in open_descriptors()


async def test_a_blob_replaced_mid_download_is_aborted_not_mixed(open_registry: Opener) -> None:
    """A repair or a quarantine between two chunks: the download is refused with a RetryInfo (ABORTED
    BLOB_CHANGED) rather than sending the end of another file after the start of this one."""
    client = await open_registry()
    data = big_module(6 * DOWNLOAD_CHUNK_BYTES)
    blob = digest(data)
    await publish(client.stub, data)
    path = blob_path(client, blob)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{client.host.port}", options=STALLING_CLIENT) as channel:
        stalled = StalledDownload(RegistryStub(channel), blob)
        assert await stalled.first() is None
        # Identical bytes, another file (as a repair puts them): the reader notices the swap.
        shutil.copyfile(path, path.with_suffix(".copy"))
        os.replace(path.with_suffix(".copy"), path)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await stalled.call.read() is not grpc.aio.EOF:
                pass
        assert check_error(caught.value, grpc.StatusCode.ABORTED, "BLOB_CHANGED")["digest"] == blob
        assert retry_after(caught.value) > 0
    # Downloaded again, it is whole.
    assert b"".join(await download(client.stub, blob)) == data


async def test_the_reader_refuses_a_file_swapped_under_it(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    await blobs.open()
    data = os.urandom(2 * DOWNLOAD_CHUNK_BYTES + 10)
    blob = digest(data)
    async with blobs.upload(blob.removeprefix("sha256:")) as upload:
        await upload.write(data)
        await upload.finish()
        await upload.commit(blob)
    chunks = (await blobs.read(blob)).chunks()
    await anext(chunks)
    blobs.path_of(blob).unlink()  # quarantined by another reader, say
    with pytest.raises(BlobChanged):
        await anext(chunks)


async def test_download_slots_are_bounded_per_caller_and_in_all(open_registry: Opener) -> None:
    client = await open_registry(max_downloads=5, max_downloads_per_caller=3)
    data = big_module(8 * DOWNLOAD_CHUNK_BYTES)
    blob = digest(data)
    await publish(client.stub, data)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{client.host.port}", options=STALLING_CLIENT) as channel:
        stub = RegistryStub(channel)
        streams = [StalledDownload(stub, blob, "stranger") for _ in range(4)]
        outcomes_first = [await s.first() for s in streams]
        assert Counter(reason(e) for e in outcomes_first) == {("OK", ""): 3,
                                                              ("RESOURCE_EXHAUSTED", "TOO_MANY_DOWNLOADS"): 1}
        [refusal] = [e for e in outcomes_first if e is not None]
        assert retry_after(refusal) > 0
        info = error_info(refusal)
        assert info is not None and dict(info.metadata) == {"scope": "per_caller", "max_downloads": "3"}
        assert "CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER" in (refusal.details() or "")
        # Others are served until everyone together holds the total.
        others = [StalledDownload(stub, blob, f"other-{i}") for i in range(3)]
        outcomes = [await s.first() for s in others]
        assert Counter(reason(e) for e in outcomes) == {("OK", ""): 2, ("RESOURCE_EXHAUSTED", "TOO_MANY_DOWNLOADS"): 1}
        [refusal] = [e for e in outcomes if e is not None]
        assert error_info(refusal).metadata["scope"] == "total"  # type: ignore[union-attr]
        # A stream that goes away gives its slot back.
        admitted = [s for s, e in zip(streams, outcomes_first, strict=True) if e is None]
        admitted[0].call.cancel()
        for _ in range(200):
            again = StalledDownload(stub, blob, "stranger")
            if await again.first() is None:
                break
            await asyncio.sleep(0.01)  # the cancellation reaches the registry's handler
        else:
            raise AssertionError("the slot of a cancelled download never came back")
        for stream in [*streams, *others, again]:
            stream.call.cancel()


def test_the_download_gate_counts_slots_and_keeps_descriptors_for_reads() -> None:
    open_now = [100]
    gate = DownloadGate(DownloadLimits(max_total=4, max_per_caller=2),
                        DescriptorBudget(limit=140, reserve=32, count_open=lambda: open_now[0]), read_descriptors=8)
    with gate.admit("a"), gate.admit("a"):
        with pytest.raises(ServiceError) as caught, gate.admit("a"):
            pass
        assert (caught.value.reason, caught.value.metadata["scope"]) == ("TOO_MANY_DOWNLOADS", "per_caller")
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and caught.value.retry_after_seconds
        # Downloads draw on the reserve: refused only when fewer descriptors than reads are left in all.
        open_now[0] = 133
        with pytest.raises(ServiceError) as caught, gate.admit("b"):
            pass
        assert caught.value.reason == "DESCRIPTOR_BUDGET_EXHAUSTED"
        open_now[0] = 132
        with gate.admit("b"), gate.admit("c"):
            with pytest.raises(ServiceError) as caught, gate.admit("d"):
                pass
            assert caught.value.metadata["scope"] == "total"
    assert gate.active == 0


async def test_an_executor_waits_out_a_refused_download(open_registry: Opener) -> None:
    """The executors of a host are one caller: when its download slots are taken, a fetch retries after the
    RetryInfo within its deadline instead of failing the load."""
    client = await open_registry(max_downloads_per_caller=1)
    data = big_module(8 * DOWNLOAD_CHUNK_BYTES)
    blob = digest(data)
    await publish(client.stub, data)
    refused = asyncio.Event()

    class Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "refusing a download" in record.getMessage():
                refused.set()

    handler = Refusals()
    logging.getLogger("clawhub.registry").addHandler(handler)
    try:
        address = f"127.0.0.1:{client.host.port}"
        async with grpc.aio.insecure_channel(address, options=STALLING_CLIENT) as stalling, \
                grpc.aio.insecure_channel(address) as channel:
            holder = StalledDownload(RegistryStub(stalling), blob)  # the same caller: no peer
            assert await holder.first() is None
            fetch = asyncio.ensure_future(RegistryModuleSource(channel, timeout=20).fetch(blob))
            await asyncio.wait_for(refused.wait(), 10)
            assert not fetch.done()
            holder.call.cancel()
            assert await asyncio.wait_for(fetch, 15) == data
    finally:
        logging.getLogger("clawhub.registry").removeHandler(handler)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.timeout(60)
async def test_at_a_128_descriptor_limit_300_stalled_downloads_leave_publishes_and_reads_working(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "registry"
    # The default download bounds: one stranger gets 256 slots, then TOO_MANY_DOWNLOADS.
    env = {**os.environ, "CLAWHUB_REGISTRY_PORT": "0", "CLAWHUB_REGISTRY_HOST": "127.0.0.1",
           "CLAWHUB_REGISTRY_DATA_DIR": str(data_dir), "CLAWHUB_SHUTDOWN_GRACE": "0.5"}
    for name in ("CLAWHUB_REGISTRY_MAX_DOWNLOADS", "CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER"):
        env.pop(name, None)
    log = tmp_path / "registry.log"
    with log.open("w") as stderr:
        # `ulimit -n` sets the soft and the hard limit: the registry cannot raise it.
        process = subprocess.Popen(["sh", "-c", 'ulimit -n 128 && exec "$0" -m services.registry', sys.executable],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.startswith("clawhub registry listening on "), line
        address = line.rsplit(" ", 1)[1].strip()
        big = big_module(4 * MIB, "big")
        kept = module("kept")
        async with grpc.aio.insecure_channel(address) as channel:
            stub = RegistryStub(channel)
            await publish(stub, big, name="com.acme.big", chunk_size=MIB)
            await publish(stub, kept, name="com.acme.kept")
            # 300 streams over four connections, each reading one chunk of the 4 MiB module and no more.
            stalling = [grpc.aio.insecure_channel(address, options=STALLING_CLIENT) for _ in range(4)]
            try:
                stalled = [StalledDownload(RegistryStub(stalling[i % 4]), digest(big), "stranger")
                           for i in range(300)]
                outcomes = Counter(reason(e) for e in await asyncio.gather(*(s.first() for s in stalled)))
                assert outcomes == {("OK", ""): 256, ("RESOURCE_EXHAUSTED", "TOO_MANY_DOWNLOADS"): 44}, outcomes
                # 256 downloads stalled mid-blob, and the registry holds no descriptor for them once their
                # HTTP/2 windows are full (until then a chunk read may be open for an instant).
                def held() -> int:
                    return sum(p.endswith(digest(big).removeprefix("sha256:")) for p in open_descriptors(process.pid))

                deadline = asyncio.get_running_loop().time() + 10
                while held() and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)
                assert held() == 0
                # Everyone else publishes and reads as usual, the stranger's stalled streams notwithstanding.
                assert (await publish(stub, module("during"), name="com.acme.during")).created
                assert b"".join(await download(stub, digest(kept))) == kept
                assert b"".join(await download(stub, digest(big))) == big
                await stub.GetSkill(pb.GetSkillRequest(name="com.acme.during"), timeout=5)
            finally:
                for stream in stalled:
                    stream.call.cancel()
                for channel_ in stalling:
                    await channel_.close()
            # Their slots come back when they go away.
            assert b"".join(await download(stub, digest(big))) == big
    finally:
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
    stderr = log.read_text()
    assert "Too many open files" not in stderr
    assert "unexpected error" not in stderr
    assert "file descriptors: limit 128" in stderr


def test_download_limit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.registry.settings import Settings
    from services.runtime.settings import SettingsError

    for name in ("CLAWHUB_REGISTRY_MAX_DOWNLOADS", "CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert (settings.max_downloads, settings.max_downloads_per_caller) == (512, 256)
    assert (Settings().max_downloads, Settings().max_downloads_per_caller) == (512, 256)
    monkeypatch.setenv("CLAWHUB_REGISTRY_MAX_DOWNLOADS", "10")
    monkeypatch.setenv("CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER", "2")
    assert (Settings.from_env().max_downloads, Settings.from_env().max_downloads_per_caller) == (10, 2)
    for name in ("CLAWHUB_REGISTRY_MAX_DOWNLOADS", "CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER"):
        monkeypatch.setenv(name, "0")
        with pytest.raises(SettingsError, match=name):
            Settings.from_env()
        monkeypatch.setenv(name, "3")
