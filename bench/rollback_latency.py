"""Rollback latency: time until 100% of traffic is back on the previous version, seen from the client under load.

Starts the whole suite (`clawhub up`, two executors, free ports, a temporary data dir) and keeps a load
generator (tests/e2e/loadgen.py, its own process) calling the skill at 200 calls/s. Each load call records
when it was sent, when it was answered and which version answered it (`InvokeSkillResponse.version`), on
the system-wide monotonic clock this script also reads. Two kinds of rounds:

- **manual**: 2.0.0 is deployed over 1.0.0 (blue-green, no bake) under load; after a second of traffic on
  2.0.0 the script calls `DeployerService/Rollback`. Start: just before the call is sent.
- **automatic**: a bad 2.0.0, which sleeps 300 ms on 2% of inputs (those carrying a marker the generator
  puts in), is deployed over 1.0.0 with a 60 s bake window and `max p99 100 ms`, and the deployer rolls it
  back by itself. The dispatcher hides failed calls from clients (it retries them on the previous
  version), so a failing version gives the client nothing to time from; a slow one does. Two starts:
  (a) *first slow answer*: when the client received the first answer from 2.0.0 that took ≥ 200 ms — the
  earliest moment a client could know something is wrong; (b) *breach reported*: when this script's
  `WatchDeployment` stream delivered the release's `ANALYSIS_BREACH` event. Also shown: the detection time,
  from the release's route acknowledgement to the breach. Each automatic round uses its own skill, so the
  deployment circuit breaker (failed deployments per skill) does not trip.

End, in both: the first call sent after the last call that 2.0.0 answered — from then on every call the
client sent was answered by 1.0.0 ("100% on the previous version"). The resolution is the load's call
spacing (5 ms at 200 calls/s). Target (issue 5): p50 ≤ 1 s. Every round also checks that no load call
failed and that 2.0.0 really took traffic.

Usage: `python bench/rollback_latency.py [--quick|--full]` (rounds of each kind: 2 / 5 / 10).
Exits non-zero when a run is broken (the suite does not start, a bad version is not rolled back, 2.0.0
never served); a missed target or failed calls are reported, not fatal.
"""

from __future__ import annotations

import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `python bench/rollback_latency.py` finds `services` and `tests`
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from clawhub.common.v1 import release_pb2  # noqa: E402
from clawhub.deployer.v1 import deployer_service_pb2 as pb  # noqa: E402
from clawhub.deployer.v1 import deployer_service_pb2_grpc as pb_grpc  # noqa: E402

from bench._support import fail, finish, header, parse_args  # noqa: E402
from tests.e2e.loadgen import LoadProcess  # noqa: E402
from tests.e2e.release_skills import HEALTHY, MARKER, SLOW_ON_MARKER, write_skill  # noqa: E402

RATE = 200.0
TARGET_P50 = 1.0
SLOW_MS = 300
SLOW_SEEN_MS = 200  # an answer this slow from 2.0.0 is the client-visible sign of the bad version
MAX_P99 = 0.1
MARKER_FRACTION = 0.02
TERMINAL = {release_pb2.RELEASE_STATE_ACTIVE, release_pb2.RELEASE_STATE_FAILED}
K = pb.DeploymentEventKind
BIN = Path(sys.executable).parent


class Broken(Exception):
    """The run cannot give a figure (reported once the suite is stopped: a leaked suite would skew the next)."""


@dataclass
class Suite:
    process: subprocess.Popen[str]
    gateway: str
    log: list[str] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "clawhub"), *args, "--gateway", self.gateway], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds the admin key `up` created as `authorization: Bearer` to every call (user auth is on by default)."""

    def __init__(self, key: str) -> None:
        self._entry = ("authorization", f"Bearer {key}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), self._entry))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def authorized(channel: grpc.Channel, gateway: str) -> grpc.Channel:
    from services.cli import credentials

    key = credentials.lookup(gateway)
    if not key:
        fail(f"no admin key recorded for {gateway}")
    return grpc.intercept_channel(channel, _Bearer(key))


def start_suite(data_dir: Path) -> Suite:
    env = dict(os.environ)
    # Its own config directory: `up` records the admin key there, and the CLI and load generators find it.
    env["XDG_CONFIG_HOME"] = os.environ["XDG_CONFIG_HOME"] = str(data_dir.parent / "config")
    for service in ("gateway", "registry", "deployer", "dispatcher", "executor"):
        env[f"CLAWHUB_{service.upper()}_PORT"] = "0"
    env["CLAWHUB_SHUTDOWN_GRACE"] = "2"
    env["CLAWHUB_LOG_LEVEL"] = "WARNING"
    process = subprocess.Popen([str(BIN / "clawhub"), "up", "--data-dir", str(data_dir), "--executors", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(iter(process.stderr.readline, "")),  # type: ignore[union-attr]
                     daemon=True).start()
    timer = threading.Timer(60, process.kill)
    timer.start()
    gateway = ""
    for line in process.stdout:
        label, _, address = line.strip().partition(" ")
        if label == "gateway":
            gateway = address
            break
    timer.cancel()
    if not gateway:
        process.kill()
        fail("clawhub up did not start:\n" + "".join(log[-30:]))
    return Suite(process, gateway, log)


def publish(suite: Suite, work: Path, name: str, version: str, mode: int) -> None:
    directory = write_skill(work / f"{name}-{version}", name, version, mode=mode, slow_ms=SLOW_MS)
    result = suite.cli("publish", str(directory))
    if result.returncode != 0:
        raise Broken(f"publish {name}@{version}: {result.stderr}")


def watch(stub: pb_grpc.DeployerServiceStub, deployment_id: str, events: queue.Queue[tuple[float, Any]]) -> None:
    """Put (monotonic receive time, response) of every WatchDeployment response into `events`."""
    try:
        for response in stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id), timeout=120):
            events.put((time.monotonic(), response))
            if response.deployment.state in TERMINAL:
                break
    except grpc.RpcError as err:
        events.put((time.monotonic(), err))
    events.put((time.monotonic(), None))


def deploy(stub: pb_grpc.DeployerServiceStub, name: str, version: str, *, bake: float = 0.0,
           analysis: pb.Analysis | None = None) -> tuple[pb.Deployment, list[tuple[float, Any]]]:
    """Deploy and wait for the end; returns the last deployment and every event with its receive time."""
    request = pb.CreateDeploymentRequest(skill=name, version=version, request_id=str(uuid.uuid4()))
    request.blue_green.bake.FromNanoseconds(round(bake * 1e9))
    if analysis is not None:
        request.analysis.CopyFrom(analysis)
    deployment = stub.CreateDeployment(request, timeout=30).deployment
    events: queue.Queue[tuple[float, Any]] = queue.Queue()
    threading.Thread(target=watch, args=(stub, deployment.id, events), daemon=True).start()
    seen: list[tuple[float, Any]] = []
    last = deployment
    while True:
        received, item = events.get(timeout=150)
        if item is None:
            break
        if isinstance(item, grpc.RpcError):
            raise Broken(f"WatchDeployment of {name}@{version}: {item.code().name}: {item.details()}")
        seen.append((received, item))
        last = item.deployment
    return last, seen


def back_on_previous(timeline: list[list[Any]], start: float, new: str) -> float | None:
    """Seconds from `start` to the first call sent after the last call `new` answered (None: never seen)."""
    after = [row for row in timeline if row[0] >= start - 5]
    last_new = max((row[0] for row in after if row[3] == new), default=None)
    if last_new is None:
        return None
    following = [row[0] for row in after if row[0] > last_new]
    if not following:
        return None
    return max(0.0, min(following) - start)


def summary_line(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label}: no rounds"
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    met = "met" if p50 <= TARGET_P50 else "NOT met"
    return (f"  {label + ':':<42} p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms, max {ordered[-1] * 1e3:.0f} ms "
            f"({len(values)} rounds)   target p50 ≤ {TARGET_P50:g} s: {met}")


@dataclass
class Totals:
    calls: int = 0
    failed: int = 0
    rates: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def add(self, summary: dict[str, Any]) -> None:
        self.calls += summary["total"]
        self.failed += summary["failed"]
        self.rates.append(summary["achieved_rate"])
        for key, count in summary["failures"].items():
            self.failures[key] = self.failures.get(key, 0) + count


def manual_rounds(suite: Suite, stub: pb_grpc.DeployerServiceStub, work: Path, rounds: int,
                  totals: Totals) -> list[float]:
    name = "com.bench.rollback-manual"
    publish(suite, work, name, "1.0.0", HEALTHY)
    publish(suite, work, name, "2.0.0", HEALTHY)
    deploy(stub, name, "1.0.0")
    load = LoadProcess(suite.gateway, name, work / "manual-load.json", rate=RATE, concurrency=32)
    starts: list[float] = []
    # Each round's calls: from its rollback until the next round's deploy.
    windows: list[float] = []
    try:
        for _ in range(rounds):
            time.sleep(0.5)
            windows.append(time.monotonic())
            last, _ = deploy(stub, name, "2.0.0")
            if last.state != release_pb2.RELEASE_STATE_ACTIVE:
                raise Broken(f"deploy of {name}@2.0.0 ended {last.state}: {last.history[-1].reason}")
            time.sleep(1.0)
            starts.append(time.monotonic())
            stub.Rollback(pb.RollbackRequest(skill=name, request_id=str(uuid.uuid4())), timeout=30)
        time.sleep(1.0)
    finally:
        summary = load.stop()
    totals.add(summary)
    latencies = []
    for start, end in zip(starts, [*windows[1:], float("inf")], strict=True):
        window = [row for row in summary["timeline"] if start - 0.5 <= row[0] < end]
        value = back_on_previous(window, start, "2.0.0")
        if value is None:
            raise Broken(f"a manual round saw no call answered by 2.0.0 before the rollback (versions over the whole "
                 f"run: {summary['versions']})")
        latencies.append(value)
    return latencies


def automatic_round(suite: Suite, stub: pb_grpc.DeployerServiceStub, work: Path, index: int,
                    totals: Totals) -> tuple[float, float, float]:
    name = f"com.bench.rollback-auto{index}"
    publish(suite, work, name, "1.0.0", HEALTHY)
    publish(suite, work, name, "2.0.0", SLOW_ON_MARKER)
    deploy(stub, name, "1.0.0")
    analysis = pb.Analysis(min_success_rate=0.99, min_requests=20)
    analysis.max_p99_latency.FromNanoseconds(round(MAX_P99 * 1e9))
    load = LoadProcess(suite.gateway, name, work / f"auto{index}-load.json", rate=RATE, concurrency=32,
                       marker=MARKER, marker_fraction=MARKER_FRACTION)
    try:
        time.sleep(0.5)
        last, events = deploy(stub, name, "2.0.0", bake=60.0, analysis=analysis)
        time.sleep(1.0)
    finally:
        summary = load.stop()
    totals.add(summary)
    if last.state != release_pb2.RELEASE_STATE_FAILED:
        raise Broken(f"the bad {name}@2.0.0 was not rolled back: it ended {release_pb2.ReleaseState.Name(last.state)}")
    def first(kind: int) -> float | None:
        return next((t for t, r in events if r.HasField("event") and r.event.kind == kind), None)

    breach, acked = first(K.DEPLOYMENT_EVENT_KIND_ANALYSIS_BREACH), first(K.DEPLOYMENT_EVENT_KIND_ACKED)
    if breach is None or acked is None:
        raise Broken(f"{name}@2.0.0 failed without an ANALYSIS_BREACH event: {last.history[-1].reason}")
    timeline = summary["timeline"]
    slow = [row[1] for row in timeline if row[3] == "2.0.0" and row[4] >= SLOW_SEEN_MS]
    if not slow:
        raise Broken(f"no slow answer from {name}@2.0.0 was seen before its rollback: {last.history[-1].reason}")
    first_slow = min(slow)
    from_slow = back_on_previous(timeline, first_slow, "2.0.0")
    from_breach = back_on_previous(timeline, breach, "2.0.0")
    if from_slow is None or from_breach is None:
        raise Broken(f"{name}: 2.0.0 never answered a call")
    return from_slow, from_breach, breach - acked


def main() -> None:
    size = parse_args(__doc__.splitlines()[0])
    header("rollback latency under load (client side)", size)
    rounds = size.pick(2, 5, 10)
    totals = Totals()
    with tempfile.TemporaryDirectory(prefix="clawhub-bench-") as tmp:
        work = Path(tmp)
        suite = start_suite(work / "data")
        try:
            with grpc.insecure_channel(suite.gateway) as channel:
                stub = pb_grpc.DeployerServiceStub(authorized(channel, suite.gateway))
                manual = manual_rounds(suite, stub, work, rounds, totals)
                print("time until every call the client sends is answered by the previous version:")
                print(summary_line("from the manual Rollback call", manual), flush=True)
                automatic = [automatic_round(suite, stub, work, i, totals) for i in range(rounds)]
        except Broken as exc:
            suite.stop()
            fail(str(exc))
        finally:
            suite.stop()
    print(summary_line("from the bad version's first slow answer", [a for a, _, _ in automatic]))
    print(summary_line("from the breach on WatchDeployment", [b for _, b, _ in automatic]))
    detection = sorted(d for _, _, d in automatic)
    print(f"  (detection, bad version's route acknowledged → breach: p50 {statistics.median(detection) * 1e3:.0f} ms, "
          f"max {detection[-1] * 1e3:.0f} ms)")
    print(f"bad version: sleeps {SLOW_MS} ms on {MARKER_FRACTION:.0%} of calls; analysis max p99 "
          f"{MAX_P99 * 1e3:.0f} ms after 20 calls")
    print(f"load: {RATE:g} calls/s target, achieved {min(totals.rates):.0f}–{max(totals.rates):.0f} calls/s, "
          f"{totals.calls:,} calls, {totals.failed} failed" + (f" {totals.failures}" if totals.failed else ""))
    print(f"zero failed calls: {'met' if totals.failed == 0 else 'NOT met'}")
    finish(0)


if __name__ == "__main__":
    main()
