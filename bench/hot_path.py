"""The hot path (issue 13): invoke throughput and latency through the whole suite against bare gRPC hops.

All in one invocation, on one machine, so every figure is a ratio to baselines measured in the same run:

- **baselines** at concurrency 100 with the same load generator: client → bare echo gRPC server (1 process);
  client → relay → echo (2 processes); client → relay → relay → echo (3 processes). The servers are the tiny
  grpc.aio programs of `bench/_support/echo_server.py` (one generic unary method, raw bytes, 64-byte payload);
- **InvokeSkill** through a whole suite (`clawhub up`, 1 executor, one gateway process as `up` starts it; with
  `CLAWHUB_GATEWAY_WORKERS=N` in the environment the gateway runs N workers, each one's CPU and RSS reported as
  gateway-wN), free ports, a temporary data dir and XDG_CONFIG_HOME) at concurrency 100, 500 and 1,000
  (`--quick`: 100 and 500): req/s, mean, p50, p99, errors by ErrorInfo reason, and the CPU (cores) and RSS of
  every service process. The edge is on as `up` starts it (internal auth, user auth with the admin key as
  `authorization: Bearer`, rate limits, with the invoke limit raised to 50,000/s so that it stays far above
  the load) plus input validation (the skill is published with an `input_schema`), and tracing at its default
  sampler exporting to a no-op OTLP receiver (`bench/_support/otlp_sink.py`). The skill is the memory-v1 echo
  (`examples/skills/echo-memory`, the cheapest one) with a 64-byte input (a 62-character JSON string);
- **cache hits**: the same skill published under another name with `[cache] ttl = "60s"` (docs/cache.md), the
  same input every call, at concurrency 100, against the bare hop;
- **isolation**: 20 calls of a skill that spins until its 1-second timeout kept in flight (each replaced as it
  ends) while another skill (the echo) is called 16 at a time: the echo's refusals and p99;
- **soak**: the echo through the gateway at a steady 200 calls/s (paced: an open loop, ≤ 64 in flight) for 10
  minutes (`--quick`: 45 s; `--soak-seconds N` to change), the RSS of every service process sampled every few
  seconds from /proc: first, last, max and the growth per minute of a least-squares line through the samples
  after a warm-up (the first quarter, at most 60 s); errors by reason, req/s (and per 10-s interval);
- **kill**: kill -9 of the dispatcher, then of the deployer, under a paced 150 calls/s of the echo (the rate
  of the issue's own measurement). The service's process is found among the children of `clawhub up` by its
  command line; `up` restarts it (docs/supervision.md); the load goes on 5 s after `up` reports it back. Every
  call comes back as [sent, answered, reason], so the failed calls are counted by reason and placed in time
  against the kill (nothing is retried by the client nor filtered).

The load comes from separate processes (`bench/_support/loadgen.py`, grpc.aio, 2 of them for the closed-loop
runs, the concurrency split between them, each over 4 connections, each call on the one with the fewest calls
in flight (as an L7 balancer's least-request policy in front of a service does; a gateway's workers share its
port and the kernel spreads connections, not calls, over them); one paced process for the
soak and the kills), which warm up, then start together. The paths compared at concurrency 100 (the baselines,
uncached invoke, cache hits) run in 2 / 3 / 5 rounds (`--quick` / default / `--full`) whose order alternates,
and the best round of each is reported, as in the other benchmarks. The generators' CPU use is reported, and
the bare echo shows what the same generator reaches when the server is cheap: the generator is not what limits
the suite.

Targets (issue 13): uncached invoke at concurrency 100 ≥ 0.8× the 2-process chain's req/s with p99 ≤ 1.5× its
p99; a cache hit ≥ 0.8× one bare hop; no refused caller at 100 and 500 (at 1,000 only deliberate shedding:
RESOURCE_EXHAUSTED with RetryInfo); isolation: the other skill not refused, p99 < 50 ms; kill -9 of the
dispatcher (or the deployer) under load costs no call. The soak's criterion (the issue sets no figure): no
failed call, no service restarted, and no service's RSS growing by more than 10% after the warm-up.

Writes `docs/benchmarks.md` (machine line, the code measured, tables, verdicts) and `docs/benchmarks.json`
(every figure); PNG plots (throughput and latency percentiles against concurrency, the soak's RSS, calls
around each kill) when matplotlib is importable (the optional `bench` extra).

Usage: `python bench/hot_path.py [--quick|--full] [--only compare,concurrency,isolation,soak,kill]
[--soak-seconds N]`. `--quick` ≈ 3 minutes on 2 cores (~15 s of it starting the suite), default ≈ 15 minutes (the
10-minute soak). `--only` runs some scenarios and keeps the others' figures from the last report (marked in
the page with the run they come from); `compare` is the c=100 rounds (baselines, uncached invoke, cache hits),
`concurrency` the runs at 500 and 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._support import busy_cores, fail, finish, header, machine_line, parse_args_with  # noqa: E402
from bench._support.suite import launch_up, stop_all  # noqa: E402
from bench.observability_cost import Receiver  # noqa: E402

BIN = Path(sys.executable).parent
ECHO_MEMORY = ROOT / "examples" / "skills" / "echo-memory"
SERVICES = ("gateway", "registry", "deployer", "dispatcher", "executor")
EXECUTORS = 1
LOAD_PROCESSES = 2
# Connections per load process: callers are many, and a service running worker processes on one port gets
# them spread by the kernel per connection.
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "4"))
ECHO_SKILL, CACHED_SKILL, SPIN_SKILL = "com.bench.echo", "com.bench.echo-cached", "com.bench.spin"
INPUT = "x" * 62  # 64 bytes as JSON text (the quotes)
PAYLOAD = "x" * 64  # the baselines' raw payload
THROUGHPUT_TARGET, P99_TARGET, CACHE_TARGET, ISOLATION_P99_MS = 0.8, 1.5, 0.8, 50.0
SPINNERS, ISOLATION_CONCURRENCY = 20, 16
# The soak: a steady, moderate paced load (about a third of what the suite carries here at concurrency 100).
SOAK_RATE, SOAK_CONCURRENCY, SOAK_BUCKET_S, SOAK_WARMUP_MAX_S, SOAK_GROWTH_PCT = 200, 64, 10.0, 60.0, 10.0
# kill -9 under load: the rate of the issue's own measurement (172 calls failed over 1.1 s at 150 calls/s).
KILL_RATE, KILL_CONCURRENCY, KILL_CALL_TIMEOUT_S = 150, 64, 10.0
KILL_BEFORE_S, KILL_AFTER_S, KILL_BACK_TIMEOUT_S, KILL_BIN_S = 3.0, 5.0, 60.0, 0.1
KILLED = ("dispatcher", "deployer")
SCENARIOS = ("compare", "concurrency", "isolation", "soak", "kill")
BASELINES = ("client → echo", "client → relay → echo", "client → relay → relay → echo")
COMPARED_SETTINGS = ("CLAWHUB_EVENT_LOOP", "CLAWHUB_GATEWAY_ROUTING", "CLAWHUB_EXECUTOR_INLINE",
                     "CLAWHUB_EXECUTOR_CALLS", "CLAWHUB_GATEWAY_WORKERS")
DOC, DATA = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks.json"

SPIN_WAT = """;; Spins until the executor stops it (its 1-second timeout): a hostile or runaway skill.
(module
  (memory (export "memory") 1)
  (func (export "clawhub_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "clawhub_run") (param i32 i32) (result i64) (loop $forever (br $forever)) (i64.const 0)))
"""


def manifest(name: str, *, module: str, timeout_ms: int, cache: bool = False, examples: bool = True) -> str:
    text = (f'name = "{name}"\nversion = "1.0.0"\ndescription = "bench/hot_path.py"\nabi = "memory-v1"\n'
            f'module = "{module}"\ncapabilities = []\ninput_schema = {{ type = "string", maxLength = 1000 }}\n\n'
            f'[limits]\nmemory = "16MiB"\ntimeout_ms = {timeout_ms}\n')
    if cache:
        text += '\n[cache]\nttl = "60s"\n'
    if examples:
        text += '\n[[examples]]\ninput = "\\"hello\\""\noutput = "\\"hello\\""\n'
    return text


def skill_dirs(tmp: Path) -> list[Path]:
    """The echo, its cached copy and the spinner, each a directory `clawhub publish` takes."""
    made = []
    for name, cache in ((ECHO_SKILL, False), (CACHED_SKILL, True)):
        target = tmp / "skills" / name
        target.mkdir(parents=True)
        (target / "echo.wat").write_text((ECHO_MEMORY / "echo.wat").read_text())
        (target / "skill.toml").write_text(manifest(name, module="echo.wat", timeout_ms=2000, cache=cache))
        made.append(target)
    target = tmp / "skills" / SPIN_SKILL
    target.mkdir(parents=True)
    (target / "spin.wat").write_text(SPIN_WAT)
    (target / "skill.toml").write_text(manifest(SPIN_SKILL, module="spin.wat", timeout_ms=1000, examples=False))
    made.append(target)
    return made


def listener(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start `python -m MODULE ARGS` that prints `listening PORT`; returns it and its port."""
    process = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().split()
    if len(line) != 2 or line[0] != "listening":
        raise RuntimeError(f"{args[0]} did not start: {line}")
    return process, int(line[1])


def close(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


@dataclass
class Suite:
    process: subprocess.Popen[str] | None = None
    address: str = ""
    key: str = ""
    log: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # service (executor-N) → pid


def children(root: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == root:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def argv_of(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def service_pids(up: int) -> dict[str, int]:
    """The service processes `clawhub up` (pid `up`) runs, by name (executor-N when there are several), found
    among its children by their command line (`python -m services.NAME`): after a restart, the new pid."""
    pids: dict[str, int] = {}
    executors = 0
    for pid in sorted(children(up)):
        argv = argv_of(pid)
        for service in SERVICES:
            module = f"services.{service}".encode()
            if module in argv:
                if service == "executor":
                    executors += 1
                    service = f"executor-{executors}" if EXECUTORS > 1 else "executor"
                workers = [child for child in sorted(children(pid)) if module in argv_of(child)]
                if workers:
                    # A service running worker processes (CLAWHUB_GATEWAY_WORKERS): the supervisor idles, the
                    # workers serve; each is watched on its own (gateway-w1, gateway-w2, ...).
                    for index, worker in enumerate(workers, 1):
                        pids[f"{service}-w{index}"] = worker
                else:
                    pids[service] = pid
    return pids


def start_suite(tmp: Path, env: dict[str, str]) -> Suite:
    suite = Suite()
    process, suite.address, suite.key = launch_up(tmp / "data", env, suite.log, executors=EXECUTORS)
    suite.process = process
    suite.pids = service_pids(process.pid)
    for skill in skill_dirs(tmp):
        for args in (("publish", str(skill)), ("deploy", f"{skill.name}@1.0.0")):
            done = subprocess.run([str(BIN / "clawhub"), *args, "--gateway", suite.address], capture_output=True,
                                  text=True, timeout=120, cwd=ROOT, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"clawhub {' '.join(args)}: {done.stderr}\nsuite log:\n" + "".join(suite.log[-20:]))
    return suite


def settle(suite: Suite, *, idle_cores: float = 0.15, window: float = 1.0, timeout: float = 30.0) -> float:
    """Wait until the suite's processes together use under `idle_cores` over `window` seconds (what deploys
    leave running, such as compiling modules, ends before anything is measured), at most `timeout` seconds;
    returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        before = sum(cpu_of(pid) for pid in suite.pids.values())
        time.sleep(window)
        if (sum(cpu_of(pid) for pid in suite.pids.values()) - before) / window < idle_cores:
            break
    return time.perf_counter() - started


def stop_suite(suite: Suite) -> None:
    stop_all([suite.process])


TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(spec: dict[str, Any], *, concurrency: int, calls: int = 0, seconds: float = 0.0,
         processes: int = LOAD_PROCESSES, watch: dict[str, int] | None = None,
         alongside: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run `processes` load generators on `spec`, `concurrency` and `calls` split between them (or for
    `seconds`); `alongside` are more generators (each one process, its own spec) started with them, whose
    results come back under "alongside". Returns the merged figures and the CPU cores / RSS of `watch`."""
    specs = [{**spec, "concurrency": concurrency // processes + (i < concurrency % processes),
              "calls": calls // processes + (i < calls % processes), "seconds": seconds,
              "warmup": spec.get("warmup", 50), "connections": spec.get("connections", CONNECTIONS)}
             for i in range(processes)]
    specs += alongside or []
    procs = [subprocess.Popen([sys.executable, "-m", "bench._support.loadgen", json.dumps(s)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for s in specs]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            for other in procs:
                other.kill()
            raise RuntimeError(f"a load generator did not warm up (said {line!r}): is the target serving?")
    watch = watch or {}
    cpu_before = {name: cpu_of(pid) for name, pid in watch.items()}
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"a load generator failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - started
    services = {name: {"cpu_cores": (cpu_of(pid) - cpu_before[name]) / wall, "rss_mib": rss_mib(pid)}
                for name, pid in watch.items()}
    main = merge(results[:processes])
    main["services"] = services
    main["alongside"] = [merge([r]) for r in results[processes:]]
    return main


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    errors: Counter[str] = Counter()
    cache: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        cache.update(r["cache"])
    elapsed = max(r["elapsed"] for r in results)
    ok, failed = len(latencies), sum(errors.values())
    return {"calls": ok + failed, "ok": ok, "errors": dict(errors), "cache": dict(cache), "seconds": elapsed,
            "req_s": ok / elapsed if elapsed else 0.0,
            "mean_ms": sum(latencies) / ok if ok else float("nan"),
            "p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
            "max_ms": latencies[-1] if latencies else float("nan"),
            "loadgen_cpu_cores": sum(r["cpu"] for r in results) / elapsed if elapsed else 0.0}


def line(name: str, concurrency: int, r: dict[str, Any]) -> str:
    errors = ", ".join(f"{n} {k}" for k, n in sorted(r["errors"].items())) or "0"
    return (f"{name:<34} c={concurrency:<5} {r['req_s']:7.0f} req/s  mean {r['mean_ms']:6.1f}  p50 "
            f"{r['p50_ms']:6.1f}  p99 {r['p99_ms']:7.1f} ms  errors {errors}  (load generators "
            f"{r['loadgen_cpu_cores']:.2f} cores)")


def services_line(r: dict[str, Any]) -> str:
    return "    " + ", ".join(f"{n} {s['cpu_cores']:.2f} cores {s['rss_mib']:.0f} MiB"
                              for n, s in r["services"].items())


def baselines(calls: int) -> dict[str, dict[str, Any]]:
    """The three bare chains at concurrency 100, each started fresh and stopped after its run."""
    out: dict[str, dict[str, Any]] = {}
    for hops, name in enumerate(BASELINES, start=1):
        started: list[subprocess.Popen[str]] = []
        try:
            process, port = listener("bench._support.echo_server")
            started.append(process)
            for _ in range(hops - 1):
                process, port = listener("bench._support.echo_server", "--upstream", f"127.0.0.1:{port}")
                started.append(process)
            watch = {f"{'echo' if i == 0 else 'relay'}-{i}": p.pid for i, p in enumerate(started)}
            spec = {"target": f"127.0.0.1:{port}", "kind": "echo", "payload": PAYLOAD, "expect": PAYLOAD,
                    "warmup": 200}
            out[name] = load(spec, concurrency=100, calls=calls, watch=watch)
            print(line(name, 100, out[name]))
            print(services_line(out[name]))
        finally:
            for process in reversed(started):
                close(process)
    return out


def start_paced(spec: dict[str, Any]) -> subprocess.Popen[str]:
    """One paced load generator (`spec` has a `rate`), warmed up and started; its figures come from
    `end_paced`."""
    proc = subprocess.Popen([sys.executable, "-m", "bench._support.loadgen", json.dumps(spec)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    said = proc.stdout.readline().strip()
    if said != "ready":
        proc.kill()
        raise RuntimeError(f"a load generator did not warm up (said {said!r}): is the target serving?")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


def end_paced(proc: subprocess.Popen[str], *, stop: bool) -> dict[str, Any]:
    """Stop a paced generator (`stop`: the line that ends an `until_stdin` run) and return its result."""
    if stop:
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"a load generator failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def soak(suite: Suite, invoke: dict[str, Any], seconds: float, every: float) -> dict[str, Any]:
    """A steady SOAK_RATE calls/s of the echo through the gateway for `seconds`, the RSS of every service
    sampled every `every` s. Growth is judged after a warm-up (the first quarter, at most 60 s): caches,
    pools and allocator arenas fill up first, which is not a leak; a least-squares line through the samples
    after it gives MiB per minute, steadier than last minus first."""
    warmup = min(SOAK_WARMUP_MAX_S, seconds / 4)
    spec = {**invoke, "skill": ECHO_SKILL, "expect": INPUT, "concurrency": SOAK_CONCURRENCY, "rate": SOAK_RATE,
            "seconds": seconds, "bucket_seconds": SOAK_BUCKET_S, "warmup": 50}
    pids = dict(suite.pids)
    cpu_before = {name: cpu_of(pid) for name, pid in pids.items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
    proc = start_paced(spec)
    started = time.monotonic()
    end = started + seconds
    while True:
        now = time.monotonic()
        for name, pid in pids.items():
            rss = rss_mib(pid)
            if rss:
                samples[name].append((round(now - started, 2), round(rss, 2)))
        if now >= end:
            break
        time.sleep(min(every, max(0.0, end - now)))
    wall = time.monotonic() - started
    r = end_paced(proc, stop=False)
    after = service_pids(suite.process.pid) if suite.process else {}
    restarted = sorted(name for name, pid in pids.items() if after.get(name) != pid)
    services: dict[str, Any] = {}
    for name, points in samples.items():
        steady = [(t, rss) for t, rss in points if t >= warmup]
        slope = fit_slope([(t / 60, rss) for t, rss in steady])
        base = steady[0][1] if steady else float("nan")
        span_min = (steady[-1][0] - steady[0][0]) / 60 if len(steady) > 1 else 0.0
        services[name] = {"first_mib": points[0][1] if points else float("nan"),
                          "last_mib": points[-1][1] if points else float("nan"),
                          "max_mib": max((rss for _, rss in points), default=float("nan")),
                          "after_warmup_mib": base, "growth_mib_per_min": slope,
                          "fitted_growth_mib": slope * span_min,
                          "fitted_growth_pct": slope * span_min / base * 100 if base else float("nan"),
                          "cpu_cores": (cpu_of(pids[name]) - cpu_before[name]) / wall,
                          "samples": points}
    summary = merge([r])
    buckets = r.get("buckets", [])[:-1] or r.get("buckets", [])  # the last one is cut short by the end
    rates = [ok / SOAK_BUCKET_S for ok, _ in buckets]
    return {**summary, "target_rate": SOAK_RATE, "duration_s": seconds, "warmup_s": warmup,
            "sample_every_s": every, "late_slots": r.get("late_slots", 0),
            "req_s_min_bucket": min(rates, default=0.0), "req_s_max_bucket": max(rates, default=0.0),
            "bucket_seconds": SOAK_BUCKET_S, "buckets": r.get("buckets", []), "services": services,
            "restarted": restarted}


def soak_lines(r: dict[str, Any]) -> list[str]:
    errors = ", ".join(f"{n} {k}" for k, n in sorted(r["errors"].items())) or "0"
    out = [f"soak: {r['duration_s']:.0f} s at {r['target_rate']} calls/s (echo, ≤ {SOAK_CONCURRENCY} in flight): "
           f"{r['calls']:,} calls, {r['req_s']:.0f} req/s (per {r['bucket_seconds']:.0f}-s interval "
           f"{r['req_s_min_bucket']:.0f}–{r['req_s_max_bucket']:.0f}), p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} "
           f"max {r['max_ms']:.0f} ms, errors {errors}, late slots {r['late_slots']}"
           + (f", RESTARTED during the soak: {', '.join(r['restarted'])}" if r["restarted"] else "")]
    for name, s in r["services"].items():
        out.append(f"    {name:<10} RSS first {s['first_mib']:.1f} last {s['last_mib']:.1f} max {s['max_mib']:.1f} MiB;"
                   f" after {r['warmup_s']:.0f}-s warm-up {s['growth_mib_per_min']:+.2f} MiB/min "
                   f"({s['fitted_growth_mib']:+.1f} MiB, {s['fitted_growth_pct']:+.1f}% fitted); "
                   f"{s['cpu_cores']:.2f} cores")
    return out


def kill_under_load(suite: Suite, invoke: dict[str, Any], service: str) -> dict[str, Any]:
    """kill -9 one service of the suite while KILL_RATE calls/s of the echo go through the gateway, let
    `clawhub up` restart it (docs/supervision.md), keep the load KILL_AFTER_S s after it is back; every call's
    [sent, done, reason] comes back, so the failed calls are counted by reason and placed in time against the
    kill and the moment `up` reported the service back. Nothing is retried or filtered here: a failed call is
    one a client saw."""
    if suite.process is None:
        raise RuntimeError("no suite")
    pid = service_pids(suite.process.pid).get(service)
    if pid is None:
        raise RuntimeError(f"no {service} process among the children of clawhub up (pid {suite.process.pid})")
    spec = {**invoke, "skill": ECHO_SKILL, "expect": INPUT, "concurrency": KILL_CONCURRENCY, "rate": KILL_RATE,
            "until_stdin": True, "timeline": True, "timeout": KILL_CALL_TIMEOUT_S, "warmup": 50}
    proc = start_paced(spec)
    try:
        time.sleep(KILL_BEFORE_S)
        seen = len(suite.log)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        back_at: float | None = None
        back_line = ""
        while time.monotonic() - killed_at < KILL_BACK_TIMEOUT_S:
            for entry in suite.log[seen:]:
                if f"{service} is back on" in entry:
                    back_at, back_line = time.monotonic(), entry.strip()
                    break
            if back_at is not None:
                break
            time.sleep(0.02)
        time.sleep(KILL_AFTER_S)
    finally:
        r = end_paced(proc, stop=True)
    suite.pids = service_pids(suite.process.pid)
    timeline: list[list[Any]] = r.pop("timeline")
    failed = [e for e in timeline if e[2]]
    reasons = Counter(e[2] for e in failed)
    # Calls sent from the kill until a second after `up` saw it back: how much slower the survivors were.
    upto = (back_at if back_at is not None else killed_at + KILL_BACK_TIMEOUT_S) + 1.0
    during = sorted((done - sent) * 1e3 for sent, done, reason in timeline if not reason and killed_at <= sent < upto)
    before = sorted((done - sent) * 1e3 for sent, done, reason in timeline if not reason and sent < killed_at)
    summary = merge([{**r, "timeline": None}])
    return {**summary, "service": service, "old_pid": pid, "new_pid": suite.pids.get(service),
            "target_rate": KILL_RATE, "late_slots": r.get("late_slots", 0),
            "down_s": None if back_at is None else back_at - killed_at, "back_line": back_line,
            "failed": len(failed), "failed_by_reason": dict(reasons),
            "failed_from_s": min(e[0] for e in failed) - killed_at if failed else None,
            "failed_until_s": max(e[1] for e in failed) - killed_at if failed else None,
            "p99_before_ms": percentile(before, 0.99), "p99_during_ms": percentile(during, 0.99),
            "max_during_ms": during[-1] if during else float("nan"),
            "bins": bins_of(timeline, killed_at)}


def bins_of(timeline: list[list[Any]], zero: float) -> dict[str, Any]:
    """Calls answered and failed per KILL_BIN_S of send time from `zero` (for the plot; a partial last bin is
    dropped), and the slowest answer of each bin (null when none was answered)."""
    if not timeline:
        return {"step_s": KILL_BIN_S, "from_s": 0.0, "ok": [], "failed": [], "max_ms": []}
    first = min(sent for sent, _, _ in timeline) - zero
    count = int((max(sent for sent, _, _ in timeline) - zero - first) / KILL_BIN_S)
    ok, failed = [0] * count, [0] * count
    slowest: list[float | None] = [None] * count  # None: no answer in that bin (a gap in the plot)
    for sent, done, reason in timeline:
        index = int((sent - zero - first) / KILL_BIN_S)
        if index < count:
            (failed if reason else ok)[index] += 1
            if not reason:
                slowest[index] = max(slowest[index] or 0.0, round((done - sent) * 1e3, 1))
    return {"step_s": KILL_BIN_S, "from_s": round(first, 4), "ok": ok, "failed": failed, "max_ms": slowest}


def kill_line(r: dict[str, Any]) -> str:
    down = f"back after {r['down_s']:.1f} s (as `up` reported it)" if r["down_s"] is not None else \
        f"NOT back within {KILL_BACK_TIMEOUT_S:.0f} s"
    failed = (f"{r['failed']} failed ({', '.join(f'{n} {k}' for k, n in sorted(r['failed_by_reason'].items()))}) "
              f"from {r['failed_from_s']:+.2f} s to {r['failed_until_s']:+.2f} s after the kill "
              f"({r['failed_until_s'] - r['failed_from_s']:.2f} s)") if r["failed"] else "0 failed"
    return (f"kill -9 {r['service']} (pid {r['old_pid']}) under {r['target_rate']} calls/s: {down}; "
            f"{r['calls']:,} calls, {failed}; p99 {r['p99_before_ms']:.1f} ms before, "
            f"{r['p99_during_ms']:.1f} ms (max {r['max_during_ms']:.0f} ms) from the kill to 1 s after it was back; "
            f"late slots {r['late_slots']}")


def verdict_line(what: str, met: bool, detail: str) -> bool:
    print(f"{what}: {detail}: {'met' if met else 'NOT met'}")
    return met


def write_doc(report: dict[str, Any], plots: list[str], plot_note: str) -> None:
    """docs/benchmarks.md from the report: every section whose figures it holds, each marked with the run it
    comes from when that is not this one (--only keeps the other scenarios' last figures)."""
    runs = report["runs"]

    def origin(*scenarios: str) -> str:
        older = sorted({f"{runs[s]['date']} ({runs[s]['size']} run, code: {runs[s].get('code', '?')})"
                        for s in scenarios
                        if s in runs and runs[s]["date"] != report["date"]})
        return f"\n\n*From an earlier run: {', '.join(older)}.*" if older else ""

    def errors_of(r: dict[str, Any]) -> str:
        return ", ".join(f"{n} `{k}`" for k, n in sorted(r["errors"].items())) or "0"

    parts = [f"""# Benchmarks: the hot path

Generated by `bench/hot_path.py{' --' + report['size'] if report['size'] != 'default' else ''}"""
             f"""{' --only ' + ','.join(report['only']) if len(report['only']) < len(SCENARIOS) else ''}` on
{report['date']} UTC (issue 13). The figures of one scenario come from one invocation on one machine, so the
ratios compare like with like; re-run it to refresh this page (it rewrites this file, `docs/benchmarks.json`,
which holds every figure, and the plots; `--only` re-runs some scenarios and keeps the others' last figures,
marked with their run).

{report['machine']}; {report['busy_before']}. Code measured: {report['code']}.

The baselines are tiny grpc.aio servers (`bench/_support/echo_server.py`: one generic unary method, raw
bytes, 64-byte payload): an echo, and relays that forward each call over one channel. `InvokeSkill` runs a
whole suite (`clawhub up`, {EXECUTORS} executor) with the edge on (internal auth, the admin key as
`authorization: Bearer`, rate limits far above the load, an input schema) and tracing at its default sampler
exporting to a no-op OTLP receiver; the skill is the memory-v1 echo with a 64-byte input. The load comes
from separate grpc.aio processes (`bench/_support/loadgen.py`; {LOAD_PROCESSES} for the closed-loop runs),
every answer checked; latencies are of successful calls, errors are counted by ErrorInfo reason.
Concurrency is calls in flight."""]
    rows = ["| path | c | req/s | mean | p50 | p99 | errors |", "|---|---|---|---|---|---|---|"]

    def row(name: str, c: int, r: dict[str, Any]) -> None:
        rows.append(f"| {name} | {c} | {r['req_s']:,.0f} | {r['mean_ms']:.1f} ms | {r['p50_ms']:.1f} ms | "
                    f"{r['p99_ms']:.1f} ms | {errors_of(r)} |")

    for name, r in report.get("baselines", {}).items():
        row(name, 100, r)
    for c, r in report["invoke"].items():
        row("`InvokeSkill` through the suite", int(c), r)
    if "cache_hit" in report:
        row("`InvokeSkill`, cache hits", 100, report["cache_hit"])
    if "isolation" in report:
        row(f"`InvokeSkill` (echo) while {SPINNERS} 1-s loops run", ISOLATION_CONCURRENCY, report["isolation"]["echo"])
    if len(rows) > 2:
        text = "## Throughput and latency\n\n"
        if "baselines" in report:
            text += (f"The three baselines, `InvokeSkill` at 100 and the cache hits run in {report['round_count']} "
                     "rounds whose order alternates; each row shows its best round (every round is in "
                     "`docs/benchmarks.json`). Refusals at 100 count every round.\n\n")
        text += "\n".join(rows)
        if "cache_hit" in report:
            hit = report["cache_hit"]
            text += ("\n\nCache hits: " + ", ".join(f"{n:,} {k.removeprefix('CACHE_STATUS_')}"
                                                   for k, n in hit["cache"].items())
                     + ' answers (the skill is published with `[cache] ttl = "60s"`, the same input every call).')
        if "isolation" in report:
            spin = report["isolation"]["spin"]
            text += (f" Isolation: {spin['calls']} calls of the spinning skill ended in the run, as "
                     f"{errors_of(spin) if spin['errors'] else 'successes'}.")
        parts.append(text + origin("compare", "concurrency", "isolation"))
    if report["invoke"]:
        first = next(iter(report["invoke"].values()))
        svc = ["| c | " + " | ".join(first["services"]) + " | load generators |",
               "|---|" + "---|" * (len(first["services"]) + 1)]
        for c, r in report["invoke"].items():
            svc.append(f"| {c} | " + " | ".join(f"{s['cpu_cores']:.2f} cores, {s['rss_mib']:.0f} MiB"
                                                for s in r["services"].values())
                       + f" | {r['loadgen_cpu_cores']:.2f} cores |")
        text = ("## CPU and RSS of each service process during the `InvokeSkill` runs\n\n"
                "CPU in cores (CPU seconds over the run's wall time, from /proc), RSS after the run.\n\n"
                + "\n".join(svc))
        if "generator_headroom" in report:
            text += (f"\n\nThe load generators are not the bottleneck: the same generator drives the bare echo at "
                     f"{report['baselines']['client → echo']['req_s']:,.0f} req/s, "
                     f"{report['generator_headroom']:.1f}× what the suite answers at concurrency 100.")
        parts.append(text + origin("compare", "concurrency"))
    if "soak" in report:
        sk = report["soak"]
        table = ["| service | RSS first | after warm-up | last | max | growth after warm-up (fit) | CPU |",
                 "|---|---|---|---|---|---|---|"]
        for name, s in sk["services"].items():
            table.append(f"| {name} | {s['first_mib']:.1f} MiB | {s['after_warmup_mib']:.1f} MiB | "
                         f"{s['last_mib']:.1f} MiB | {s['max_mib']:.1f} MiB | {s['growth_mib_per_min']:+.2f} MiB/min "
                         f"({s['fitted_growth_mib']:+.1f} MiB, {s['fitted_growth_pct']:+.1f}%) | "
                         f"{s['cpu_cores']:.2f} cores |")
        parts.append(f"""## Soak: {sk['duration_s']:.0f} s at a steady {sk['target_rate']} calls/s

The echo through the gateway, paced (an open loop: one call scheduled every 1/{sk['target_rate']} s, at most
{SOAK_CONCURRENCY} in flight), the RSS of every service process sampled every {sk['sample_every_s']:.0f} s from
/proc. Growth is a least-squares line through the samples after a warm-up of {sk['warmup_s']:.0f} s (caches,
pools and allocator arenas fill first; that is not a leak).

{sk['calls']:,} calls, {sk['req_s']:.0f} req/s (per {sk['bucket_seconds']:.0f}-s interval
{sk['req_s_min_bucket']:.0f}–{sk['req_s_max_bucket']:.0f}; {sk['late_slots']} slots sent late), p50
{sk['p50_ms']:.1f} ms, p99 {sk['p99_ms']:.1f} ms, max {sk['max_ms']:.0f} ms; errors: {errors_of(sk)};
services restarted during the soak: {', '.join(sk['restarted']) or 'none'}.

{chr(10).join(table)}{origin('soak')}""")
    if "kill" in report:
        table = ["| killed | back after | calls | failed | by reason | failures from → to (after the kill) | "
                 "p99 before | p99 from kill to back + 1 s | max then |", "|---|---|---|---|---|---|---|---|---|"]
        for service, k in report["kill"].items():
            window = (f"{k['failed_from_s']:+.2f} s → {k['failed_until_s']:+.2f} s "
                      f"({k['failed_until_s'] - k['failed_from_s']:.2f} s)") if k["failed"] else "–"
            reasons = ", ".join(f"{n} `{r}`" for r, n in sorted(k["failed_by_reason"].items())) or "–"
            down = f"{k['down_s']:.1f} s" if k["down_s"] is not None else f"not within {KILL_BACK_TIMEOUT_S:.0f} s"
            table.append(f"| {service} | {down} | {k['calls']:,} | {k['failed']} | {reasons} | {window} | "
                         f"{k['p99_before_ms']:.1f} ms | {k['p99_during_ms']:.1f} ms | {k['max_during_ms']:.0f} ms |")
        rate = next(iter(report["kill"].values()))["target_rate"]
        parts.append(f"""## kill -9 of the control plane under load

{rate} calls/s of the echo through the gateway (paced, at most {KILL_CONCURRENCY} in flight, a
{KILL_CALL_TIMEOUT_S:.0f}-s deadline per call, no retry by the client); {KILL_BEFORE_S:.0f} s in, the service
process (a child of `clawhub up`, found by its command line) gets SIGKILL; `up` restarts it on its address
(docs/supervision.md) and the load goes on {KILL_AFTER_S:.0f} s after `up` reports it back. "Back after" is
from the kill to that report; every failed call a client saw is counted, by reason, with the span from the
first failed call's sending to the last one's answer.

{chr(10).join(table)}{origin('kill')}""")
    def since(scenario: str) -> str:
        run = runs.get(scenario)
        return f" *(run of {run['date']})*" if run and run["date"] != report["date"] else ""

    targets = "\n".join(f"- {t['what']}: {t['detail']}: **{'met' if t['met'] else 'NOT met'}**"
                        f"{since(t.get('scenario', ''))}" for t in report["targets"])
    parts.append(f"## Targets (issue 13)\n\n{targets}")
    parts.append(f"## Plots\n\n{plot_note}\n\n" + "\n".join(f"![{p}]({p})" for p in plots))
    DOC.write_text("\n\n".join(reflow(part) for part in parts).rstrip() + "\n")
    DATA.write_text(compact_lists(json.dumps(report, indent=1)) + "\n")


def reflow(text: str) -> str:
    """Re-wrap the prose paragraphs of `text` (figures interpolated into fixed lines leave ragged ones);
    headings, tables, lists, images and emphasis lines stay as they are."""
    out = []
    for paragraph in text.split("\n\n"):
        if paragraph.lstrip().startswith(("#", "|", "-", "!", "*")):
            out.append(paragraph)
        else:
            out.append(textwrap.fill(" ".join(paragraph.split()), width=110, break_long_words=False,
                                     break_on_hyphens=False))
    return "\n\n".join(out)


def compact_lists(text: str) -> str:
    """Indented JSON with every innermost list (samples, bins) on one line: readable, and a diff of a
    re-run shows which figures moved rather than thousands of one-number lines."""

    def one_line(match: re.Match[str]) -> str:
        try:
            return json.dumps(json.loads(match.group(0)), ensure_ascii=False)
        except ValueError:
            return match.group(0)

    return re.sub(r"\[[^\[\]{}]*\]", one_line, text)


def plot(report: dict[str, Any]) -> tuple[list[str], str]:
    """PNG plots next to docs/benchmarks.md (only when matplotlib is importable: the optional `bench` extra):
    throughput and latency percentiles against concurrency, the soak's RSS over time, and each kill's calls
    over time."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return [], ("No plots in this run: matplotlib is not installed (`.venv/bin/pip install -e '.[bench]'` "
                    "and re-run to get them).")
    names: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(DOC.parent / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        names.append(name)

    invoke = report.get("invoke", {})
    if invoke:
        cs = [int(c) for c in invoke]
        rs = list(invoke.values())
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(cs, [r["req_s"] for r in rs], marker="o", linewidth=2, label="InvokeSkill through the suite")
        if "cache_hit" in report:
            ax.plot([100], [report["cache_hit"]["req_s"]], marker="*", markersize=12, linestyle="none",
                    label="InvokeSkill, cache hits (c=100)")
        styles = zip(("tab:green", "tab:purple", "tab:brown"), ("--", "-.", ":"), strict=True)
        for (name, b), (color, style) in zip(report.get("baselines", {}).items(), styles, strict=False):
            ax.axhline(b["req_s"], linestyle=style, linewidth=1.2, color=color, label=f"{name} (c=100)")
        ax.set_xticks(cs)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency (calls in flight)")
        ax.set_ylabel("successful calls / s")
        ax.set_title("Throughput against concurrency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        save(fig, "benchmarks-throughput.png")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in (("p50_ms", "p50"), ("mean_ms", "mean"), ("p99_ms", "p99")):
            ax.plot(cs, [r[key] for r in rs], marker="o", label=f"InvokeSkill {label}")
        chain = report.get("baselines", {}).get("client → relay → echo")
        if chain:
            ax.plot([100, 100], [chain["p50_ms"], chain["p99_ms"]], marker="_", markersize=14, linestyle="none",
                    color="grey", label="client → relay → echo p50, p99 (c=100)")
        ax.set_xticks(cs)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency (calls in flight)")
        ax.set_ylabel("latency of successful calls (ms)")
        ax.set_title("Latency percentiles against concurrency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save(fig, "benchmarks-latency.png")
    if "soak" in report:
        sk = report["soak"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, s in sk["services"].items():
            ax.plot([t / 60 for t, _ in s["samples"]], [rss for _, rss in s["samples"]],
                    label=f"{name} ({s['growth_mib_per_min']:+.2f} MiB/min)")
        ax.axvline(sk["warmup_s"] / 60, linestyle=":", color="grey", label="end of warm-up")
        ax.set_xlabel("minutes into the soak")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"Soak: RSS per service at {sk['target_rate']} calls/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save(fig, "benchmarks-soak-rss.png")
    if "kill" in report:
        kills = report["kill"]
        fig, axes = plt.subplots(len(kills), 1, figsize=(7, 2.6 * len(kills) + 0.6), sharex=True, squeeze=False)
        for ax, (service, k) in zip((a[0] for a in axes), kills.items(), strict=True):
            b = k["bins"]
            xs = [b["from_s"] + (i + 0.5) * b["step_s"] for i in range(len(b["ok"]))]
            ax.plot(xs, [n / b["step_s"] for n in b["ok"]], linewidth=1, label="answered calls/s (by send time)")
            ax.plot(xs, [n / b["step_s"] for n in b["failed"]], linewidth=1.5, color="red", label="failed calls/s")
            ax.axvline(0, color="black", linestyle="--", linewidth=1, label="kill -9")
            if k["down_s"] is not None:
                ax.axvline(k["down_s"], color="green", linestyle=":", linewidth=1.5, label="back (up's report)")
            ax.set_ylabel("calls/s")
            ax.set_ylim(bottom=0)
            slow = ax.twinx()
            slow.plot(xs, b["max_ms"], linewidth=0.8, color="grey", alpha=0.7, label="slowest answer (ms, right)")
            slow.set_ylabel("ms", color="grey")
            slow.set_ylim(bottom=0)
            ax.set_title(f"kill -9 of the {service}: {k['failed']} failed calls", fontsize="medium")
            ax.grid(alpha=0.3)
            handles = ax.get_legend_handles_labels()
            more = slow.get_legend_handles_labels()
            ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize="x-small", loc="center right")
        axes[-1][0].set_xlabel("seconds from the kill")
        save(fig, "benchmarks-kill.png")
    return names, ("Throughput and latency percentiles of `InvokeSkill` against concurrency; the soak's RSS per "
                   "service; calls over time around each kill -9:") if names else "No figures to plot."


# Which keys of the report each scenario writes (for --only: the others are kept from the last report).
SECTION_KEYS = {"compare": ("baselines", "cache_hit", "rounds", "round_count", "generator_headroom"),
                "concurrency": (), "isolation": ("isolation",), "soak": ("soak",), "kill": ("kill",)}


def code_version() -> str:
    """Which code the run measured: the commit and whether tracked files differ from it (`BENCH_CODE` says it
    instead for a copy that is not a git checkout)."""
    if os.environ.get("BENCH_CODE"):
        return os.environ["BENCH_CODE"]
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--"], timeout=30).returncode
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {head.stdout.strip()}" + (" with uncommitted changes" if dirty else "")


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=",".join(SCENARIOS), metavar="LIST",
                        help=f"comma-separated scenarios to run, of {', '.join(SCENARIOS)} (default: all). The "
                             "report keeps the other scenarios' last figures (docs/benchmarks.json), each marked "
                             "with the run it comes from")
    parser.add_argument("--soak-seconds", type=float, default=None, metavar="N",
                        help="length of the soak (default: 600; --quick: 45)")


def merge_previous(report: dict[str, Any], ran: list[str]) -> None:
    """Fill the scenarios this run skipped (--only) from the last report, keeping where each came from."""
    try:
        previous: dict[str, Any] = json.loads(DATA.read_text())
    except (OSError, ValueError):
        return
    origin = {"date": previous.get("date", "?"), "size": previous.get("size", "?"),
              "busy_before": previous.get("busy_before", ""), "code": previous.get("code", "not recorded")}
    for scenario in SCENARIOS:
        if scenario in ran:
            continue
        keys = SECTION_KEYS[scenario]
        old_invoke = previous.get("invoke", {})
        levels = ["100"] if scenario == "compare" else [c for c in old_invoke if c != "100"] \
            if scenario == "concurrency" else []
        if not any(k in previous for k in keys) and not any(c in old_invoke for c in levels):
            continue
        for k in keys:
            if k in previous:
                report[k] = previous[k]
        for c in levels:
            if c in old_invoke:
                report.setdefault("invoke", {})[c] = old_invoke[c]
        report["runs"][scenario] = previous.get("runs", {}).get(scenario, origin)
    report["invoke"] = dict(sorted(report.get("invoke", {}).items(), key=lambda kv: int(kv[0])))


def judge(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict on each target whose figures the report holds."""
    targets: list[dict[str, Any]] = []

    def target(what: str, met: bool, detail: str, scenario: str) -> None:
        verdict_line(what, met, detail)
        targets.append({"what": what, "met": met, "detail": detail, "scenario": scenario})

    invoke = report.get("invoke", {})
    if "baselines" in report and "100" in invoke:
        chain = report["baselines"]["client → relay → echo"]
        bare = report["baselines"]["client → echo"]
        at100 = invoke["100"]
        ratio = at100["req_s"] / chain["req_s"]
        target("uncached invoke at c=100 vs client → relay → echo", ratio >= THROUGHPUT_TARGET,
               f"{at100['req_s']:.0f} / {chain['req_s']:.0f} req/s = {ratio:.2f}× (target ≥ {THROUGHPUT_TARGET}×)",
               "compare")
        p99 = at100["p99_ms"] / chain["p99_ms"]
        target("p99 at c=100 vs client → relay → echo", p99 <= P99_TARGET,
               f"{at100['p99_ms']:.1f} / {chain['p99_ms']:.1f} ms = {p99:.2f}× (target ≤ {P99_TARGET}×)", "compare")
        hit = report["cache_hit"]
        cache_ratio = hit["req_s"] / bare["req_s"]
        target("cache hit vs client → echo", cache_ratio >= CACHE_TARGET,
               f"{hit['req_s']:.0f} / {bare['req_s']:.0f} req/s = {cache_ratio:.2f}× (target ≥ {CACHE_TARGET}×)",
               "compare")
    refused = {}
    if "invoke 100" in report.get("rounds", {}):
        refused[100] = sum(sum(r["errors"].values()) for r in report["rounds"]["invoke 100"])
    if "500" in invoke:
        refused[500] = sum(invoke["500"]["errors"].values())
    if refused:
        target(f"no refused callers at c={' and '.join(map(str, refused))}", not any(refused.values()),
               ", ".join(f"{n} refused at {c}" for c, n in refused.items()), "concurrency")
    if "1000" in invoke:
        top = invoke["1000"]
        shed_only = all(k.startswith("RESOURCE_EXHAUSTED") and k.endswith("+RetryInfo") for k in top["errors"])
        target("at c=1000 only deliberate shedding (RESOURCE_EXHAUSTED with RetryInfo)", shed_only,
               f"errors {top['errors'] or 0}, p99 of admitted calls {top['p99_ms']:.0f} ms", "concurrency")
    if "isolation" in report:
        iso = report["isolation"]["echo"]
        target(f"isolation: echo beside {SPINNERS} 1-s loops", not iso["errors"] and iso["p99_ms"] < ISOLATION_P99_MS,
               f"{sum(iso['errors'].values())} refused, p99 {iso['p99_ms']:.1f} ms (target 0 and < "
               f"{ISOLATION_P99_MS:.0f} ms)", "isolation")
    if "soak" in report:
        sk = report["soak"]
        worst = max(sk["services"].items(), key=lambda kv: float(kv[1]["fitted_growth_pct"]))
        failed = sum(sk["errors"].values())
        met = not failed and not sk["restarted"] and all(
            s["fitted_growth_pct"] <= SOAK_GROWTH_PCT for s in sk["services"].values())
        target(f"soak ({sk['duration_s']:.0f} s at {sk['target_rate']} calls/s): no failed call, no restart, RSS "
               f"growth after warm-up ≤ {SOAK_GROWTH_PCT:.0f}% per service", met,
               f"{failed} failed of {sk['calls']:,}, {len(sk['restarted'])} restarted, most growth: {worst[0]} "
               f"{worst[1]['growth_mib_per_min']:+.2f} MiB/min ({worst[1]['fitted_growth_pct']:+.1f}%)", "soak")
    for service, k in report.get("kill", {}).items():
        back = k["down_s"] is not None
        window = (f" over {k['failed_until_s'] - k['failed_from_s']:.2f} s "
                  f"({', '.join(f'{n} {r}' for r, n in sorted(k['failed_by_reason'].items()))})") if k["failed"] else ""
        target(f"kill -9 of the {service} under {k['target_rate']} calls/s costs no call", back and not k["failed"],
               f"{k['failed']} of {k['calls']:,} calls failed{window}; "
               + (f"back after {k['down_s']:.1f} s" if back else f"NOT back within {KILL_BACK_TIMEOUT_S:.0f} s"),
               "kill")
    return targets


def main() -> None:
    size, args = parse_args_with(__doc__ or "", options)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown or not only:
        print(f"--only: unknown scenario {', '.join(unknown) or '(none given)'}; choose from {', '.join(SCENARIOS)}",
              file=sys.stderr)
        finish(2)
    soak_seconds = args.soak_seconds if args.soak_seconds is not None else float(size.pick(45, 600, 600))
    header("the hot path: InvokeSkill through the suite against bare gRPC hops (issue 13)", size)
    print(f"scenarios: {', '.join(s for s in SCENARIOS if s in only)}"
          + (f" (soak {soak_seconds:.0f} s)" if "soak" in only else ""))
    busy = busy_cores()
    busy_text = (f"other load before the run: {busy:.2f} cores busy" if busy is not None
                 else "other load before the run: unknown")
    report: dict[str, Any] = {"size": size.name, "machine": machine_line(), "date": time.strftime("%Y-%m-%d %H:%M"),
                              "code": code_version() + "".join(
                                  f"; {k}={os.environ[k]}" for k in COMPARED_SETTINGS if os.environ.get(k)),
                              "busy_before": busy_text,
                              "only": [s for s in SCENARIOS if s in only], "invoke": {}, "runs": {}}
    levels = [100, 500] if size.name == "quick" else [100, 500, 1000]
    invoke_calls = {100: size.pick(1500, 5000, 20000), 500: size.pick(2500, 8000, 25000),
                    1000: size.pick(4000, 10000, 30000)}
    base_calls = size.pick(2000, 6000, 20000)
    isolation_seconds = size.pick(5, 10, 30)
    rounds = size.pick(2, 3, 5)
    history: dict[str, list[dict[str, Any]]] = {}  # every round of the paths measured in rounds

    def best(path: str) -> dict[str, Any]:
        return max(history[path], key=lambda r: float(r["req_s"]))

    with tempfile.TemporaryDirectory(prefix="clawhub-hot-") as name:
        tmp = Path(name)
        # A clean environment, but for the settings worth comparing (CLAWHUB_EVENT_LOOP=asyncio,
        # CLAWHUB_GATEWAY_ROUTING=dispatcher, CLAWHUB_EXECUTOR_INLINE=0); the page says which were set.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OTEL_", "CLAWHUB_")) or k in COMPARED_SETTINGS}
        env["XDG_CONFIG_HOME"] = os.environ["XDG_CONFIG_HOME"] = str(tmp / "config")
        for service in SERVICES:
            env[f"CLAWHUB_{service.upper()}_PORT"] = "0"
        env.update(CLAWHUB_SHUTDOWN_GRACE="1", CLAWHUB_LOG_LEVEL="WARNING", CLAWHUB_DEPLOYER_BAKE="0",
                   CLAWHUB_RATE_INVOKE="50000/100000")
        receiver = Receiver()
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        suite = Suite()
        try:
            started = time.perf_counter()
            suite = start_suite(tmp, env)
            print(f"suite started ({', '.join(suite.pids)}), 3 skills published and deployed in "
                  f"{time.perf_counter() - started:.1f} s; idle after {settle(suite):.1f} s more")
            invoke = {"target": suite.address, "kind": "invoke", "key": suite.key, "payload": INPUT}

            def suite_at_100() -> None:
                r = load({**invoke, "skill": ECHO_SKILL, "expect": INPUT}, concurrency=100, calls=invoke_calls[100],
                         watch=suite.pids)
                history.setdefault("invoke 100", []).append(r)
                print(line("InvokeSkill", 100, r))
                print(services_line(r))
                r = load({**invoke, "skill": CACHED_SKILL, "expect": INPUT}, concurrency=100, calls=base_calls,
                         watch=suite.pids)
                history.setdefault("cache hit", []).append(r)
                print(line("InvokeSkill, cached skill", 100, r) + f"  cache {r['cache']}")
                print(services_line(r))

            if "compare" in only:
                # The paths compared at c=100 run in rounds whose order alternates, so that drift on a shared
                # machine hits them alike; the best round of each is reported (as timeit advises).
                for index in range(rounds):
                    print(f"-- round {index + 1} of {rounds}")
                    for step in ((baselines, suite_at_100) if index % 2 == 0 else (suite_at_100, baselines)):
                        if step is baselines:
                            for path, r in baselines(base_calls).items():
                                history.setdefault(path, []).append(r)
                        else:
                            suite_at_100()
                report["round_count"] = rounds
                report["baselines"] = {path: best(path) for path in BASELINES}
                report["invoke"]["100"] = best("invoke 100")
                report["cache_hit"] = best("cache hit")
                report["rounds"] = {path: [{k: r[k] for k in ("req_s", "p50_ms", "p99_ms", "errors")} for r in runs]
                                    for path, runs in history.items()}
                bare, at100 = report["baselines"]["client → echo"], report["invoke"]["100"]
                report["generator_headroom"] = bare["req_s"] / at100["req_s"] if at100["req_s"] else float("inf")
                print(f"best of {rounds} rounds at c=100: "
                      + "; ".join(f"{path} {best(path)['req_s']:.0f} req/s (rounds: "
                                  + ", ".join(f"{r['req_s']:.0f}" for r in runs) + ")"
                                  for path, runs in history.items()))
                print(f"load generators: the same generator drives the bare echo at {bare['req_s']:.0f} req/s, "
                      f"{report['generator_headroom']:.1f}× the suite at c=100 (generators used "
                      f"{at100['loadgen_cpu_cores']:.2f} cores there)")
            if "concurrency" in only:
                print("-- higher concurrency")
                for c in levels[1:]:
                    r = load({**invoke, "skill": ECHO_SKILL, "expect": INPUT}, concurrency=c, calls=invoke_calls[c],
                             watch=suite.pids)
                    report["invoke"][str(c)] = r
                    print(line("InvokeSkill", c, r))
                    print(services_line(r))
            if "isolation" in only:
                print("-- isolation")
                spin = {**invoke, "skill": SPIN_SKILL, "expect": None, "concurrency": SPINNERS, "warmup": 0,
                        "seconds": isolation_seconds, "timeout": 30}
                r = load({**invoke, "skill": ECHO_SKILL, "expect": INPUT}, concurrency=ISOLATION_CONCURRENCY,
                         seconds=isolation_seconds, processes=1, watch=suite.pids, alongside=[spin])
                report["isolation"] = {"echo": r, "spin": r.pop("alongside")[0]}
                print(line(f"InvokeSkill (echo) beside {SPINNERS} loops", ISOLATION_CONCURRENCY, r))
                spin_r = report["isolation"]["spin"]
                print(f"    the loops: {spin_r['calls']} calls ended, {spin_r['errors'] or 'all succeeded'}")
                print(services_line(r))
            if "soak" in only:
                print(f"-- soak: {soak_seconds:.0f} s")
                report["soak"] = soak(suite, invoke, soak_seconds, every=2.0 if soak_seconds <= 120 else 5.0)
                print("\n".join(soak_lines(report["soak"])))
            if "kill" in only:
                print(f"-- kill -9 under {KILL_RATE} calls/s")
                report["kill"] = {}
                for service in KILLED:
                    report["kill"][service] = kill_under_load(suite, invoke, service)
                    print(kill_line(report["kill"][service]))
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            stop_suite(suite)
            receiver.stop()
            fail(str(err) + ("\nsuite log:\n" + "".join(suite.log[-20:]) if suite.log else ""))
        finally:
            stop_suite(suite)
            receiver.stop()

    for scenario in report["only"]:
        report["runs"][scenario] = {"date": report["date"], "size": size.name, "busy_before": busy_text,
                                    "code": report["code"]}
    if len(report["only"]) < len(SCENARIOS):
        merge_previous(report, report["only"])
    report["targets"] = judge(report)
    plots, note = plot(report)
    print(note)
    write_doc(report, plots, note)
    print(f"wrote {DOC.relative_to(ROOT)} and {DATA.relative_to(ROOT)}" + (f" and {', '.join(plots)}" if plots else ""))
    hit = report.get("cache_hit")
    if "compare" in only and hit and not hit["cache"].get("CACHE_STATUS_HIT_L1"):
        fail(f"the cached skill was never answered from the cache: {hit['cache']}")
    finish(0)


if __name__ == "__main__":
    main()
