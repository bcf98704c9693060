"""A load generator for release tests and benchmarks: steady `GatewayService/InvokeSkill` traffic from its own process.

    python -m tests.e2e.loadgen --gateway 127.0.0.1:50051 --skill com.example.x --rate 200 \\
        --concurrency 16 --output summary.json [--duration 30] [--marker-fraction 0.1]

Open loop: calls are *scheduled* at a fixed rate (one every 1/rate s), and `--concurrency` workers on one
grpc.aio channel take the next slot, wait for its time and send. While the suite keeps up, the achieved rate
is the target rate; when every worker is busy, slots run late (the lateness is recorded), so a slow server
shows as a lower achieved rate and higher latencies rather than being hidden.

It runs until `--duration` seconds have passed, SIGTERM/SIGINT, or (with `--stdin`) its stdin closes, then
waits for the calls in flight and writes one JSON document to `--output` (`-` for stdout): the totals, the
achieved rate, the failures by status and reason, the count per serving version, latency percentiles, and a
timeline of every call `[sent, received, ok, version, latency_ms, code, reason]`. Times are
`time.monotonic()` seconds; on Linux that clock (CLOCK_MONOTONIC) is system-wide, so the parent process
can compare them with its own readings. Once the first call has been answered, it prints `ready` on stdout.

`--marker-fraction F` puts `--marker` into the input of that fraction of calls (evenly spread, every
round(1/F)-th call), which lets a test skill misbehave on some inputs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc

from services.runtime.channels import grpc_target
from services.runtime.errors import error_info

PLAIN_INPUT = "hello clawhub"


@dataclass
class Record:
    sent: float
    received: float
    ok: bool
    version: str
    code: str
    reason: str

    @property
    def latency_ms(self) -> float:
        return (self.received - self.sent) * 1000


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0
    late_slots: int = 0
    retried: int = 0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    records = run.records
    elapsed = max(run.stopped - run.started, 1e-9)
    failures: dict[str, int] = {}
    versions: dict[str, int] = {}
    for r in records:
        if r.ok:
            versions[r.version] = versions.get(r.version, 0) + 1
        else:
            key = f"{r.code} {r.reason}".strip()
            failures[key] = failures.get(key, 0) + 1
    latencies = sorted(r.latency_ms for r in records)
    failed = sum(failures.values())
    return {
        "skill": args.skill, "target_rate": args.rate, "concurrency": args.concurrency,
        "started": run.started, "stopped": run.stopped, "elapsed_s": round(elapsed, 3),
        "total": len(records), "ok": len(records) - failed, "failed": failed,
        "achieved_rate": round(len(records) / elapsed, 1), "late_slots": run.late_slots, "retried": run.retried,
        "failures": failures, "versions": versions,
        "latency_ms": {"p50": round(percentile(latencies, 0.5), 2), "p95": round(percentile(latencies, 0.95), 2),
                       "p99": round(percentile(latencies, 0.99), 2),
                       "max": round(latencies[-1], 2) if latencies else 0.0},
        "timeline": [[round(r.sent, 6), round(r.received, 6), r.ok, r.version, round(r.latency_ms, 3), r.code,
                      r.reason] for r in records],
    }


async def generate(args: argparse.Namespace, stop: asyncio.Event) -> Run:
    run = Run()
    interval = 1.0 / args.rate
    every = round(1 / args.marker_fraction) if args.marker_fraction > 0 else 0
    plain = gateway_pb.InvokeSkillRequest(name=args.skill)
    plain.input.string_value = PLAIN_INPUT
    marked = gateway_pb.InvokeSkillRequest(name=args.skill)
    marked.input.string_value = f"{PLAIN_INPUT} {args.marker}"
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    counter = 0
    next_slot = 0.0

    # The credential the CLI would send to this gateway (the key `clawhub up` created).
    from services.cli import credentials

    token = os.environ.get("CLAWHUB_TOKEN", "") or credentials.lookup(args.gateway)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    # Several gateways (`IP:PORT,IP:PORT`): calls are balanced over the ones that are up.
    target, balancing = grpc_target(args.gateway)
    async with grpc.aio.insecure_channel(target, options=balancing) as channel:
        stub = gateway_grpc.GatewayServiceStub(channel)
        # Wait for the channel so the first second is not spent connecting.
        await asyncio.wait_for(channel.channel_ready(), timeout=args.timeout)

        async def worker() -> None:
            nonlocal counter, next_slot
            while not stop.is_set():
                # Take the next slot of the schedule (single-threaded loop: no lock needed).
                slot = next_slot
                next_slot += interval
                counter += 1
                request = marked if every and counter % every == 0 else plain
                delay = slot - loop.time()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        return
                elif delay < -interval:
                    run.late_slots += 1
                sent = time.monotonic()
                try:
                    for attempt in range(args.retry_unavailable + 1):
                        try:
                            response = await stub.InvokeSkill(request, timeout=sent + args.timeout - time.monotonic(),
                                                              metadata=metadata)
                            break
                        except grpc.aio.AioRpcError as err:
                            # A client of several gateways retries a gateway that went away on another one.
                            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == args.retry_unavailable:
                                raise
                            run.retried += 1
                            await asyncio.sleep(0.05 * (attempt + 1))
                except grpc.aio.AioRpcError as err:
                    info = error_info(err)
                    run.records.append(Record(sent, time.monotonic(), False, "", err.code().name,
                                              info.reason if info else (err.details() or "")[:200]))
                else:
                    run.records.append(Record(sent, time.monotonic(), True, response.version, "", ""))
                    if not ready.is_set():
                        ready.set()
                        print("ready", flush=True)

        next_slot = loop.time()
        run.started = time.monotonic()
        workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        await asyncio.gather(*workers)
        run.stopped = time.monotonic()
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", required=True, help="gateway address, such as 127.0.0.1:50051")
    parser.add_argument("--skill", required=True, help="skill to invoke")
    parser.add_argument("--rate", type=float, default=200.0, help="target calls per second (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at most (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run (default: until signalled)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, s (default: %(default)s)")
    parser.add_argument("--marker", default="!boom", help="text put into marked inputs (default: %(default)s)")
    parser.add_argument("--marker-fraction", type=float, default=0.0,
                        help="fraction of calls whose input carries the marker (default: 0)")
    parser.add_argument("--retry-unavailable", type=int, default=0,
                        help="retry a call that fails UNAVAILABLE up to N times, on another gateway when several "
                             "are given (default: %(default)s)")
    parser.add_argument("--stdin", action="store_true", help="also stop when stdin closes")
    parser.add_argument("--output", default="-", help="where to write the JSON summary ('-': stdout)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.concurrency < 1 or not 0 <= args.marker_fraction <= 1:
        parser.error("--rate must be > 0, --concurrency ≥ 1 and --marker-fraction within [0, 1]")
    return args


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.duration > 0:
        loop.call_later(args.duration, stop.set)
    if args.stdin:
        def on_stdin() -> None:
            if not sys.stdin.buffer.read1(4096):  # type: ignore[attr-defined]
                loop.remove_reader(sys.stdin.fileno())
                stop.set()
        loop.add_reader(sys.stdin.fileno(), on_stdin)
    return summarize(await generate(args, stop), args)


class LoadProcess:
    """The parent's handle on a load generator running in its own process (for tests and benchmarks)."""

    def __init__(self, gateway: str, skill: str, output: Path, *, rate: float = 200.0, concurrency: int = 16,
                 marker: str = "!boom", marker_fraction: float = 0.0, ready_timeout: float = 20.0,
                 retry_unavailable: int = 0, env: dict[str, str] | None = None) -> None:
        self.output = output
        root = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.loadgen", "--gateway", gateway, "--skill", skill, "--rate", str(rate),
             "--concurrency", str(concurrency), "--marker", marker, "--marker-fraction", str(marker_fraction),
             "--retry-unavailable", str(retry_unavailable), "--stdin", "--output", str(output)],
            cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout = self.process.stdout
        assert stdout is not None
        # Read the `ready` line on a thread, so a generator that never gets an answer cannot hang the caller.
        ready = threading.Event()

        def wait_ready() -> None:
            if stdout.readline().strip() == "ready":
                ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()
        if not ready.wait(ready_timeout) or self.process.poll() is not None:
            self.process.kill()
            _, err = self.process.communicate()
            raise RuntimeError(f"the load generator did not get a first answer within {ready_timeout:g}s:\n{err}")

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop the load (stdin closed), wait for the calls in flight, and return the JSON summary."""
        try:
            # communicate() closes stdin first: that is the generator's signal to stop.
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise RuntimeError("the load generator did not stop") from None
        if self.process.returncode != 0:
            raise RuntimeError(f"the load generator exited with code {self.process.returncode}:\n{err}")
        summary: dict[str, Any] = json.loads(self.output.read_text())
        return summary

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(amain(args))
    text = json.dumps(summary)
    if args.output == "-":
        print(text, flush=True)
    else:
        tmp = Path(args.output + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.output)  # whole or absent: the reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
