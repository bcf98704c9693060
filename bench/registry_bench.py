"""Registry benchmark: publish throughput for 1 MB packages, and ResolveDependencies on a 1,000-package graph.

Both go through a real registry server in this process, called over a real gRPC channel on 127.0.0.1:

- **publish**: N distinct 1 MiB WASI modules, each streamed in 256 KiB chunks with its sha256, hashed while
  streaming, written to a temp file, fsynced, verified (compiled by wasmtime) and renamed into the blob
  store; one at a time, then 8 at a time.
- **resolve**: a generated graph of 1,000 packages × 5 versions over two majors (1.0.0 … 2.2.0). Each
  release depends on 0–6 lower-numbered packages (a DAG, so the roots reach about half of the graph);
  ~80% of the edges are shared. Every shared range accepts the newest major (`^2.0.0`, `>=2.0.0 <3.0.0`,
  `2.x`, `^2.1.0 || ^3.0.0`), and 1% of them pin an older minor (`~2.1`, which makes the resolver back
  off 2.2.0 when an earlier edge chose it); of the non-shared edges, 30% ask for the old major (`^1.0.0`,
  an isolated older copy), the rest for the newest. A second, stress run pins 5% of the shared edges.
  The graph's metadata is written straight into the registry's store (publishing 5,000 modules would
  only measure publishing again), then `ResolveDependencies` is called with 20 root requirements. The
  first call builds the resolver's catalogue from the store (reported as "cold"); the following calls
  reuse it until a publish or a yank changes the set. Target: p95 under 100 ms.

Usage: `python bench/registry_bench.py [--quick]`. Exits non-zero when a run is broken (a publish not
created, a resolution that fails); a missed target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `python bench/registry_bench.py` finds `services` without an install
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import wasmtime  # noqa: E402
from clawhub.common.v1 import skill_pb2  # noqa: E402
from clawhub.registry.v1 import registry_service_pb2 as pb  # noqa: E402
from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc  # noqa: E402

from services.registry.server import DATABASE_FILE, build_server  # noqa: E402
from services.registry.settings import Settings  # noqa: E402
from services.registry.store import NewVersion, SqliteMetadataStore, State  # noqa: E402

MIB = 1024 * 1024
CHUNK = 256 * 1024
MARKER = b"@@clawhub-bench-marker@@"  # replaced per package so every module has its own bytes
RESOLVE_TARGET_MS = 100.0


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {model}, {os.cpu_count()} cores ({usable} usable), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()} ({platform.python_implementation()})")


def one_mib_module() -> bytes:
    """A valid WASI command of about 1 MiB: a data segment holds the marker and filler."""
    filler = "y" * (MIB - len(MARKER) - 200)
    text = (f'(module (memory (export "memory") 18) (func (export "_start")) '
            f'(data (i32.const 0) "{MARKER.decode()}{filler}"))')
    return bytes(wasmtime.wat2wasm(text))


def variant(template: bytes, i: int) -> bytes:
    tag = f"{i:0{len(MARKER)}d}".encode()
    return template.replace(MARKER, tag, 1)


async def start(data_dir: Path) -> tuple[object, grpc.aio.Channel, pb_grpc.RegistryServiceStub]:
    settings = Settings(host="127.0.0.1", port=0, data_dir=data_dir, max_upload_bytes=64 * MIB,
                        shutdown_grace_seconds=0.5)
    host = await build_server(settings)
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}",
                                        options=[("grpc.max_receive_message_length", 16 * MIB)])
    return host, channel, pb_grpc.RegistryServiceStub(channel)


async def publish(stub: pb_grpc.RegistryServiceStub, data: bytes, name: str, version: str) -> None:
    manifest = skill_pb2.Manifest(name=name, version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1,
                                  description="bench package")

    async def stream() -> AsyncIterator[pb.PublishSkillRequest]:
        yield pb.PublishSkillRequest(metadata=pb.PublishSkillMetadata(
            manifest=manifest, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)))
        for offset in range(0, len(data), CHUNK):
            yield pb.PublishSkillRequest(chunk=data[offset:offset + CHUNK])

    response = await stub.PublishSkill(stream(), timeout=120)
    if not response.created:
        raise SystemExit(f"broken run: {name}@{version} was not created")


async def bench_publish(count: int) -> None:
    template = one_mib_module()
    size_mb = len(template) / 1e6
    with tempfile.TemporaryDirectory(prefix="clawhub-bench-") as tmp:
        host, channel, stub = await start(Path(tmp) / "registry")
        try:
            await publish(stub, variant(template, 10**9), "com.bench.warmup", "1.0.0")
            for concurrency in (1, 8):
                offset = concurrency * 100_000
                started = time.perf_counter()
                for batch in range(0, count, concurrency):
                    await asyncio.gather(*(
                        publish(stub, variant(template, offset + i), f"com.bench.pkg{concurrency}",
                                f"1.{i}.0")
                        for i in range(batch, min(batch + concurrency, count))))
                elapsed = time.perf_counter() - started
                print(f"publish {count} × {size_mb:.2f} MB, {concurrency} at a time: "
                      f"{count * size_mb / elapsed:7.1f} MB/s  {count / elapsed:6.1f} publishes/s  "
                      f"({elapsed / count * 1000:.1f} ms each)")
        finally:
            await channel.close()
            await host.stop(grace=0.5)  # type: ignore[attr-defined]


# The resolve benchmark's graph.

PACKAGES = 1000
VERSIONS = ("1.0.0", "1.1.0", "2.0.0", "2.1.0", "2.2.0")


def package(i: int) -> str:
    return f"com.bench.p{i:04d}"


def generate_graph(pinned_minor: float, seed: int = 4) -> dict[tuple[str, str], list[skill_pb2.Dependency]]:
    """The graph; `pinned_minor` is the share of shared edges that pin an older minor (`~2.1`)."""
    rng = random.Random(seed)
    graph: dict[tuple[str, str], list[skill_pb2.Dependency]] = {}
    for i in range(PACKAGES):
        # Which packages this one depends on stays mostly the same across its versions, as in real life.
        fan_out = min(i, rng.choice((0, 1, 2, 3, 3, 4, 4, 5, 6)))
        targets = rng.sample(range(i), fan_out) if fan_out else []
        for version in VERSIONS:
            deps = []
            for target in targets:
                shared = rng.random() < 0.8
                roll = rng.random()
                if shared:
                    # Every shared range admits some 2.x, so the graph is satisfiable, sometimes only after
                    # backing off the newest 2.2.0.
                    text = ("~2.1" if roll < pinned_minor else
                            rng.choice(("^2.0.0", "^2.0.0", ">=2.0.0 <3.0.0", "2.x", "^2.1.0 || ^3.0.0")))
                else:
                    text = "^1.0.0" if roll < 0.3 else rng.choice(("^2.0.0", "~2.2", "1.x || 2.x"))
                deps.append(skill_pb2.Dependency(package=package(target), version_range=text, is_shared=shared))
            graph[(package(i), version)] = deps
    return graph


async def write_graph(data_dir: Path, graph: dict[tuple[str, str], list[skill_pb2.Dependency]]) -> None:
    """Through the store's own API for the first version (so the schema is the store's), then the rest in
    one sqlite transaction: 5,000 separate commits would make this the slowest part of the benchmark."""
    store = await SqliteMetadataStore.open(data_dir / DATABASE_FILE)
    now = time.time_ns()
    rows = []
    for (name, version), deps in graph.items():
        manifest = skill_pb2.Manifest(name=name, version=version, abi=skill_pb2.ABI_WASI_COMMAND_V1,
                                      dependencies=deps).SerializeToString(deterministic=True)
        digest = "sha256:" + hashlib.sha256(f"{name}@{version}".encode()).hexdigest()
        rows.append((name, version, digest, manifest))
    try:
        name, version, digest, manifest = rows[0]
        await store.begin_version(NewVersion(name, version, digest, 1, manifest, now, now, "bench", "bench"))
        await store.transition(name, version, State.READY, "bench graph")
    finally:
        await store.close()
    with sqlite3.connect(data_dir / DATABASE_FILE) as db:
        db.executemany("INSERT OR IGNORE INTO skills (name, create_time_ns, update_time_ns) VALUES (?, ?, ?)",
                       [(name, now, now) for name, *_ in rows[1:]])
        db.executemany("INSERT INTO versions (name, version, digest, size_bytes, manifest, state, create_time_ns) "
                       "VALUES (?, ?, ?, 1, ?, ?, ?)", [(*row, State.READY.value, now) for row in rows[1:]])


async def bench_resolve(runs: int, pinned_minor: float, *, target: bool) -> bool:
    graph = generate_graph(pinned_minor)
    edges = sum(len(d) for d in graph.values())
    shared = sum(d.is_shared for deps in graph.values() for d in deps)
    roots = [skill_pb2.Dependency(package=package(i), version_range="^2.0.0", is_shared=i % 2 == 0)
             for i in range(PACKAGES - 20, PACKAGES)]
    with tempfile.TemporaryDirectory(prefix="clawhub-bench-") as tmp:
        data_dir = Path(tmp) / "registry"
        started = time.perf_counter()
        await write_graph(data_dir, graph)
        print(f"resolve graph: {PACKAGES} packages × {len(VERSIONS)} versions, {edges} dependency edges "
              f"({shared / edges:.0%} shared, {pinned_minor:.0%} of those pin an older minor), "
              f"written in {time.perf_counter() - started:.1f} s")
        host, channel, stub = await start(data_dir)
        try:
            request = pb.ResolveDependenciesRequest(requirements=roots)
            timings = []
            response = None
            for _ in range(runs + 1):
                started = time.perf_counter()
                response = await stub.ResolveDependencies(request, timeout=60)
                timings.append((time.perf_counter() - started) * 1000)
        finally:
            await channel.close()
            await host.stop(grace=0.5)  # type: ignore[attr-defined]
    assert response is not None
    cold, warm = timings[0], sorted(timings[1:])
    p50 = statistics.median(warm)
    p95 = warm[min(len(warm) - 1, round(0.95 * (len(warm) - 1)))]
    packages = {d.package for d in response.dependencies}
    print(f"resolve 20 roots → {len(response.dependencies)} package versions ({len(packages)} packages): "
          f"cold {cold:.1f} ms (builds the catalogue), then over {len(warm)} runs p50 {p50:.1f} ms, "
          f"p95 {p95:.1f} ms"
          + (f" (target < {RESOLVE_TARGET_MS:.0f} ms: {'met' if p95 < RESOLVE_TARGET_MS else 'MISSED'})" if target
             else " (stress run, no target)"))
    return p95 < RESOLVE_TARGET_MS


async def main_async(quick: bool) -> int:
    print(machine_line())
    await bench_publish(8 if quick else 40)
    met = await bench_resolve(5 if quick else 30, pinned_minor=0.01, target=True)
    # A stress variant: five times as many minor pins, each forcing the resolver to back off a shared
    # package it already chose (backjumping redoes the work after that choice). Reported, no target.
    await bench_resolve(3 if quick else 10, pinned_minor=0.05, target=False)
    if not met:
        print(f"note: the resolve target ({RESOLVE_TARGET_MS:.0f} ms p95) was missed on this machine")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    args, _ = parser.parse_known_args()  # `./dev bench` passes the same flags to every benchmark
    return asyncio.run(main_async(args.quick))


if __name__ == "__main__":
    sys.exit(main())
