"""Uploads held by strangers (issue 9): publish streams that send their metadata and stall.

500 such streams used to hold 1,000 file descriptors and temporary files with no timeout; at a 1,024-descriptor
limit other publishes then failed INTERNAL "Too many open files", and empty temporary files stayed until a
restart. Now a stalled stream holds no descriptor, slots are bounded per caller and in all, a descriptor
budget refuses uploads before the process nears its limit, idle streams are dropped, and nothing stays on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.registry.v1 import registry_service_pb2 as pb
from google.rpc import error_details_pb2

from services.registry.blobs import BlobStore
from services.registry.limits import DescriptorBudget, UploadGate, UploadLimits, caller_key
from services.registry.trust import Caller
from services.runtime.errors import ServiceError, error_info, status_of
from tests.registry.conftest import Opener
from tests.registry.support import RegistryStub, digest, download, metadata, module, publish


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")


ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
# What every stalled stream declares (hashed once: hundreds of streams must not hash it hundreds of times).
STALLED_DATA = b"\0asm" + b"x" * (2 * MIB)
STALLED_SHA256 = hashlib.sha256(STALLED_DATA).hexdigest()


def leftovers(data_dir: Path) -> list[Path]:
    """Files an upload may leave: anything in blobs/ that is not a stored blob."""
    blobs = data_dir / "blobs"
    return [p for p in blobs.rglob("*") if p.is_file() and p.parent.parent != blobs / "sha256"]


def peer(name: str) -> tuple[tuple[str, str], ...]:
    return (("x-clawhub-peer", name),)


class Stalled:
    """A publish stream that sends its metadata (and `spill` bytes of module) and then nothing."""

    def __init__(self, stub: Any, who: str, *, spill: int = 0, bundle: bool = True) -> None:
        self.sent = asyncio.Event()
        self._release = asyncio.Event()
        data = STALLED_DATA
        request = metadata(b"", name=f"com.stranger.s{abs(hash(who)) % 10**8}", sha256=STALLED_SHA256,
                           size_bytes=len(data))
        if bundle:  # as in the attack: a declared bundle (two temporary files each, before)
            request.metadata.bundle_sha256 = hashlib.sha256(b"bundle").hexdigest()
            request.metadata.bundle_size_bytes = 6

        async def requests() -> AsyncIterator[pb.PublishSkillRequest]:
            yield request
            for offset in range(0, spill, 256 * 1024):
                yield pb.PublishSkillRequest(chunk=data[offset:min(offset + 256 * 1024, spill)])
            self.sent.set()
            await self._release.wait()

        self.call = stub.PublishSkill(requests(), timeout=60, metadata=peer(who))

    async def outcome(self) -> grpc.aio.AioRpcError | None:
        """The error the registry ended the stream with (None if it somehow succeeded)."""
        try:
            await self.call
        except grpc.aio.AioRpcError as err:
            return err
        return None

    def cancel(self) -> None:
        self.call.cancel()


def reason(err: grpc.aio.AioRpcError | None) -> tuple[str, str]:
    if err is None:
        return ("OK", "")
    info = error_info(err)
    return (err.code().name, info.reason if info else "")


def retry_after(err: grpc.aio.AioRpcError) -> float:
    status = status_of(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo")


async def settled(tasks: list[asyncio.Task[grpc.aio.AioRpcError | None]], count: int, timeout: float) -> None:
    """Wait until `count` of the tasks are done."""
    async def enough() -> None:
        while sum(t.done() for t in tasks) < count:
            await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)

    await asyncio.wait_for(enough(), timeout)


@pytest.mark.timeout(60)
async def test_hundreds_of_stalled_streams_from_a_stranger_hold_five_slots_then_time_out(
        open_registry: Opener) -> None:
    # The idle timeout outlasts the 2 s for which a refused stream is drained, so the five held streams are
    # still held when the others have their answer.
    client = await open_registry(max_uploads=40, max_uploads_per_caller=5, upload_idle_timeout_seconds=4)
    stub = client.stub
    kept = module("kept")
    await publish(stub, kept, name="com.acme.kept")
    # Three of the stranger's streams get far enough to spill to a temporary file before stalling.
    spilled = [Stalled(stub, "stranger", spill=MIB + 1000) for _ in range(3)]
    for stream in spilled:
        await asyncio.wait_for(stream.sent.wait(), 10)
    stalled = spilled + [Stalled(stub, "stranger") for _ in range(297)]
    tasks = [asyncio.ensure_future(s.outcome()) for s in stalled]
    try:
        await settled(tasks, 295, timeout=20)
        refused = [t.result() for t in tasks if t.done()]
        assert Counter(reason(e) for e in refused) == {("RESOURCE_EXHAUSTED", "TOO_MANY_UPLOADS"): 295}
        first = refused[0]
        assert first is not None and retry_after(first) > 0
        assert error_info(first).metadata["scope"] == "per_caller"  # type: ignore[union-attr]
        assert sum(not t.done() for t in tasks) == 5
        assert len(list((client.settings.data_dir / "blobs" / "tmp").iterdir())) == 3
        # Meanwhile everyone else publishes and reads as usual.
        friend = module("friend")
        published = await stub.PublishSkill(_stream(friend, "com.acme.friend"), timeout=10,
                                            metadata=peer("friend"))
        assert published.created
        assert b"".join(await download(stub, digest(kept))) == kept
        await stub.GetSkill(pb.GetSkillRequest(name="com.acme.friend"), timeout=5)
        # The five held streams are dropped by the idle timeout, with a clear status.
        await settled(tasks, 300, timeout=15)
        held = [t.result() for t in tasks if reason(t.result())[0] != "RESOURCE_EXHAUSTED"]
        assert Counter(reason(e) for e in held) == {("DEADLINE_EXCEEDED", "UPLOAD_TIMEOUT"): 5}
        assert "CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT" in (held[0].details() or "")  # type: ignore[union-attr]
    finally:
        for stream in stalled:
            stream.cancel()
    # Nothing stays behind, and the stranger can publish again.
    assert leftovers(client.settings.data_dir) == []
    assert (await stub.PublishSkill(_stream(module("again"), "com.stranger.back"), timeout=10,
                                    metadata=peer("stranger"))).created


def _stream(data: bytes, name: str) -> AsyncIterator[pb.PublishSkillRequest]:
    async def requests() -> AsyncIterator[pb.PublishSkillRequest]:
        yield metadata(data, name=name)
        yield pb.PublishSkillRequest(chunk=data)

    return requests()


async def test_the_total_bound_holds_across_callers(open_registry: Opener) -> None:
    client = await open_registry(max_uploads=4, max_uploads_per_caller=4, upload_idle_timeout_seconds=0.5)
    stalled = [Stalled(client.stub, f"stranger-{i}", bundle=False) for i in range(10)]
    tasks = [asyncio.ensure_future(s.outcome()) for s in stalled]
    try:
        await settled(tasks, 10, timeout=20)
    finally:
        for stream in stalled:
            stream.cancel()
    outcomes = [t.result() for t in tasks]
    assert Counter(reason(e) for e in outcomes) == {("RESOURCE_EXHAUSTED", "TOO_MANY_UPLOADS"): 6,
                                                    ("DEADLINE_EXCEEDED", "UPLOAD_TIMEOUT"): 4}
    scopes = {error_info(e).metadata["scope"] for e in outcomes  # type: ignore[union-attr]
              if reason(e)[0] == "RESOURCE_EXHAUSTED"}
    assert scopes == {"total"}
    assert leftovers(client.settings.data_dir) == []


async def test_a_client_that_goes_away_mid_upload_leaves_nothing(open_registry: Opener) -> None:
    client = await open_registry()
    tmp = client.settings.data_dir / "blobs" / "tmp"
    stream = Stalled(client.stub, "leaver", spill=2 * MIB)
    await asyncio.wait_for(stream.sent.wait(), 10)
    while not any(tmp.iterdir()):  # the spilled bytes reach the disk in a thread
        await asyncio.sleep(0.01)
    stream.cancel()
    for _ in range(500):
        if leftovers(client.settings.data_dir) == []:
            break
        await asyncio.sleep(0.01)
    assert leftovers(client.settings.data_dir) == []


async def test_an_upload_that_trickles_past_the_duration_cap_is_dropped(open_registry: Opener) -> None:
    client = await open_registry(upload_idle_timeout_seconds=5, upload_max_seconds=0.5)
    data = module("slow")

    async def trickle() -> AsyncIterator[pb.PublishSkillRequest]:
        yield metadata(data)
        for byte in data:
            yield pb.PublishSkillRequest(chunk=bytes([byte]))
            await asyncio.sleep(0.1)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.PublishSkill(trickle(), timeout=10)
    assert reason(caught.value) == ("DEADLINE_EXCEEDED", "UPLOAD_TIMEOUT")
    assert error_info(caught.value).metadata["timeout"] == "total"  # type: ignore[union-attr]
    assert leftovers(client.settings.data_dir) == []


async def test_an_unknown_token_is_refused_before_it_takes_a_slot(open_registry: Opener) -> None:
    client = await open_registry(admin_token="admin-0123456789-0123456789", max_uploads=1)

    async def never() -> AsyncIterator[pb.PublishSkillRequest]:
        await asyncio.Event().wait()
        yield pb.PublishSkillRequest()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.PublishSkill(never(), timeout=10, metadata=(("authorization", "Bearer made-up"),))
    assert reason(caught.value) == ("UNAUTHENTICATED", "INVALID_TOKEN")
    assert (await publish(client.stub, module("after"))).created


# The parts, directly.

async def test_an_upload_cancelled_while_its_file_is_being_created_still_removes_it(tmp_path: Path) -> None:
    """The leak behind "empty temporary files stay until a restart": a cancellation that lands while a thread
    is creating the file. The removal must wait for that thread, or it runs first and the file appears after."""
    blobs = BlobStore(tmp_path / "blobs")
    await blobs.open()
    upload = blobs.upload("ab" * 32)
    in_thread, release = threading.Event(), threading.Event()
    write = upload._write_sync

    def slow_write(data: bytes) -> None:
        in_thread.set()
        release.wait(10)
        write(data)

    upload._write_sync = slow_write  # type: ignore[method-assign]

    async def run() -> None:
        async with upload:
            await upload.write(b"x" * (MIB + 1))

    task = asyncio.ensure_future(run())
    await asyncio.to_thread(in_thread.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)  # the task's exit handler runs while the thread still holds the write
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await blobs.close()
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


def test_callers_are_told_apart_by_token_relayed_peer_or_address() -> None:
    class Context:
        def __init__(self, metadata: tuple[tuple[str, str], ...], address: str) -> None:
            self._metadata, self._address = metadata, address

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return self._metadata

        def peer(self) -> str:
            return self._address

    direct = Context((), "ipv4:10.0.0.7:5123")
    assert caller_key(direct, Caller(publisher="acme")) == "publisher:acme"
    assert caller_key(direct, Caller(admin=True)) == "admin"
    assert caller_key(Context(peer("ipv4:1.2.3.4:99"), "ipv4:10.0.0.1:1"), Caller()) == "peer:ipv4:1.2.3.4:99"
    # Without the port: a client does not get a fresh bucket per connection.
    assert caller_key(direct, Caller()) == caller_key(Context((), "ipv4:10.0.0.7:6000"), Caller()) == \
        "peer:ipv4:10.0.0.7"
    assert caller_key(Context((), "ipv6:[::1]:5123"), Caller()) == "peer:ipv6:[::1]"
    assert caller_key(None, Caller()) == "in-process"
    # A principal users' authentication established (an API key, a JWT) is counted as itself, from any address,
    # by the names the rate limits use; the anonymous principal falls back to the address.
    import contextvars

    from services.runtime.auth import _PRINCIPAL, Principal

    def as_principal(principal: Principal, context: Context) -> str:
        def run() -> str:
            _PRINCIPAL.set(principal)
            return caller_key(context, Caller())
        return contextvars.copy_context().run(run)

    key = Principal("ci (chk_0123456789ab)", "key", frozenset({"publisher"}), subject="0123456789ab")
    assert as_principal(key, direct) == as_principal(key, Context((), "ipv4:10.9.9.9:1")) == "key:chk_0123456789ab"
    assert as_principal(Principal("jwt:alice", "jwt", subject="alice"), direct) == "jwt:alice"
    assert as_principal(Principal("anonymous", "anonymous"), direct) == "peer:ipv4:10.0.0.7"


def test_the_gate_counts_slots_and_respects_the_descriptor_budget() -> None:
    open_now = [100]
    gate = UploadGate(UploadLimits(max_total=10, max_per_caller=2),
                      DescriptorBudget(limit=140, reserve=32, count_open=lambda: open_now[0]))
    with gate.admit("a"), gate.admit("a"):
        with pytest.raises(ServiceError) as caught, gate.admit("a"):
            pass
        assert caught.value.reason == "TOO_MANY_UPLOADS" and caught.value.retry_after_seconds
        with gate.admit("b"), gate.admit("c"), gate.admit("d"):
            # 140 - 32 - 100 = 8 descriptors of headroom, one per admitted upload: 3 more, not 4.
            with gate.admit("e"), gate.admit("f"), gate.admit("g"):
                with pytest.raises(ServiceError) as caught, gate.admit("h"):
                    pass
                assert caught.value.reason == "DESCRIPTOR_BUDGET_EXHAUSTED"
                assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                open_now[0] = 90  # ten descriptors came back (a connection closed, say)
                with gate.admit("h"):
                    pass
    assert gate.active == 0
    with gate.admit("a"), gate.admit("a"):  # the slots came back
        assert gate.active == 2


def test_the_budget_raises_the_soft_limit_and_keeps_a_reserve() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard == resource.RLIM_INFINITY or hard < 256:
            pytest.skip("needs a finite hard descriptor limit of at least 256")
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        budget = DescriptorBudget.from_process()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert budget.limit == hard and budget.reserve == max(32, hard // 8)
        headroom = budget.headroom()
        assert headroom is not None and 0 < headroom < hard - budget.reserve
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.timeout(60)
async def test_at_a_128_descriptor_limit_300_stalled_streams_never_exhaust_the_registry(tmp_path: Path) -> None:
    data_dir = tmp_path / "registry"
    env = {**os.environ, "CLAWHUB_REGISTRY_PORT": "0", "CLAWHUB_REGISTRY_HOST": "127.0.0.1",
           "CLAWHUB_REGISTRY_DATA_DIR": str(data_dir), "CLAWHUB_SHUTDOWN_GRACE": "0.5",
           # Slots are not the bound here (300 callers, 1000 slots): the descriptors are.
           "CLAWHUB_REGISTRY_MAX_UPLOADS": "1000", "CLAWHUB_REGISTRY_MAX_UPLOADS_PER_CALLER": "1000",
           "CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT": "2"}
    # `ulimit -n` sets the soft and the hard limit: the registry cannot raise it.
    log = tmp_path / "registry.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(["sh", "-c", 'ulimit -n 128 && exec "$0" -m services.registry', sys.executable],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.startswith("clawhub registry listening on "), line
        address = line.rsplit(" ", 1)[1].strip()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = RegistryStub(channel)
            kept = module("kept")
            await publish(stub, kept, name="com.acme.kept")
            # The first twenty spill a megabyte each to disk (a descriptor each), the rest send only metadata.
            stalled = [Stalled(stub, f"stranger-{i}", spill=MIB + 1000 if i < 20 else 0) for i in range(300)]
            tasks = [asyncio.ensure_future(s.outcome()) for s in stalled]
            try:
                await settled(tasks, 150, timeout=20)
                early = Counter(reason(t.result()) for t in tasks if t.done())
                assert set(early) <= {("RESOURCE_EXHAUSTED", "DESCRIPTOR_BUDGET_EXHAUSTED"),
                                      ("DEADLINE_EXCEEDED", "UPLOAD_TIMEOUT")}, early
                # Reads keep working (they draw on the reserve), and a publish is served or refused cleanly.
                assert b"".join(await download(stub, digest(kept))) == kept
                await stub.GetSkill(pb.GetSkillRequest(name="com.acme.kept"), timeout=5)
                try:
                    await publish(stub, module("during"), name="com.acme.during")
                except grpc.aio.AioRpcError as err:
                    assert reason(err) == ("RESOURCE_EXHAUSTED", "DESCRIPTOR_BUDGET_EXHAUSTED"), err.details()
                await settled(tasks, 300, timeout=30)
            finally:
                for stream in stalled:
                    stream.cancel()
            outcomes = Counter(reason(t.result()) for t in tasks)
            assert set(outcomes) == {("RESOURCE_EXHAUSTED", "DESCRIPTOR_BUDGET_EXHAUSTED"),
                                     ("DEADLINE_EXCEEDED", "UPLOAD_TIMEOUT")}, outcomes
            # Afterwards: everything works, nothing is left behind.
            assert (await publish(stub, module("after"), name="com.acme.after")).created
            assert leftovers(data_dir) == []
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


def test_upload_limit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.registry.settings import Settings
    from services.runtime.settings import SettingsError

    for name in ("CLAWHUB_REGISTRY_MAX_UPLOADS", "CLAWHUB_REGISTRY_MAX_UPLOADS_PER_CALLER",
                 "CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT", "CLAWHUB_REGISTRY_UPLOAD_MAX_DURATION"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert (settings.max_uploads, settings.max_uploads_per_caller, settings.upload_idle_timeout_seconds,
            settings.upload_max_seconds) == (64, 32, 30.0, 600.0)
    monkeypatch.setenv("CLAWHUB_REGISTRY_MAX_UPLOADS", "10")
    monkeypatch.setenv("CLAWHUB_REGISTRY_MAX_UPLOADS_PER_CALLER", "2")
    monkeypatch.setenv("CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT", "1.5")
    monkeypatch.setenv("CLAWHUB_REGISTRY_UPLOAD_MAX_DURATION", "60")
    settings = Settings.from_env()
    assert (settings.max_uploads, settings.max_uploads_per_caller, settings.upload_idle_timeout_seconds,
            settings.upload_max_seconds) == (10, 2, 1.5, 60.0)
    for name, bad in (("CLAWHUB_REGISTRY_MAX_UPLOADS", "0"), ("CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT", "0"),
                      ("CLAWHUB_REGISTRY_UPLOAD_MAX_DURATION", "inf")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SettingsError, match=name):
            Settings.from_env()
        monkeypatch.delenv(name)


async def test_through_the_gateway_a_client_cannot_choose_its_own_caller_bucket(
        open_registry: Opener, start_service: Any) -> None:
    """The gateway overwrites `x-clawhub-peer` with the client's real address: forging it per stream does not
    buy a stranger fresh per-caller slots."""
    from services.gateway.server import build_server as build_gateway
    from services.gateway.settings import Settings as GatewaySettings

    client = await open_registry(max_uploads=40, max_uploads_per_caller=2, upload_idle_timeout_seconds=3)
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=f"127.0.0.1:{client.host.port}", grace_seconds=0.5)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = RegistryStub(channel)
        stalled = [Stalled(stub, f"forged-{i}", bundle=False) for i in range(6)]
        tasks = [asyncio.ensure_future(s.outcome()) for s in stalled]
        try:
            await settled(tasks, 4, timeout=20)
            refused = [t.result() for t in tasks if t.done()]
            assert Counter(reason(e) for e in refused) == {("RESOURCE_EXHAUSTED", "TOO_MANY_UPLOADS"): 4}
            assert {error_info(e).metadata["scope"] for e in refused} == {"per_caller"}  # type: ignore[union-attr]
        finally:
            for stream in stalled:
                stream.cancel()
