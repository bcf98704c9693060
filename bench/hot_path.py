"""The hot path (issue 13): invoke throughput and latency through the whole suite against bare gRPC hops.

All in one invocation, on one machine, so every figure is a ratio to baselines measured in the same run:

- **baselines** at concurrency 100 with the same load generator: client → bare echo gRPC server (1 process);
  client → relay → echo (2 processes); client → relay → relay → echo (3 processes). The servers are the tiny
  grpc.aio programs of `bench/_support/echo_server.py` (one generic unary method, raw bytes, 64-byte payload);
- **InvokeSkill** through a whole suite (`clawhub up`, 1 executor, free ports, a temporary data dir and
  XDG_CONFIG_HOME) at concurrency 100, 500 and 1,000 (`--quick`: 100 and 500): req/s, mean, p50, p99, errors
  by ErrorInfo reason, and the CPU (cores) and RSS of every service process. The edge is on as `up` starts
  it (internal auth, user auth with the admin key as `authorization: Bearer`, rate limits, with the invoke
  limit raised to 50,000/s so that it stays far above the load) plus input validation (the skill is
  published with an `input_schema`), and tracing at its default sampler exporting to a no-op OTLP receiver
  (`bench/_support/otlp_sink.py`). The skill is the memory-v1 echo (`examples/skills/echo-memory`, the
  cheapest one) with a 64-byte input (a 62-character JSON string);
- **cache hits**: the same skill published under another name with `[cache] ttl = "60s"` (docs/cache.md),
  the same input every call, at concurrency 100, against the bare hop;
- **isolation**: 20 calls of a skill that spins until its 1-second timeout kept in flight (each replaced as
  it ends) while another skill (the echo) is called 16 at a time: the echo's refusals and p99.

The load comes from separate processes (`bench/_support/loadgen.py`, grpc.aio, 2 of them, the concurrency
split between them), which warm up, then start together. The paths compared at concurrency 100 (the
baselines, uncached invoke, cache hits) run in 2 / 3 / 5 rounds (`--quick` / default / `--full`) whose order
alternates, and the best round of each is reported, as in the other benchmarks. The generators' CPU use is
reported, and the bare echo shows what the same generator reaches when the server is cheap: the generator is
not what limits the suite.

Targets (issue 13): uncached invoke at concurrency 100 ≥ 0.8× the 2-process chain's req/s with p99 ≤ 1.5×
its p99; a cache hit ≥ 0.8× one bare hop; no refused caller at 100 and 500 (at 1,000 only deliberate
shedding: RESOURCE_EXHAUSTED with RetryInfo); isolation: the other skill not refused, p99 < 50 ms. Not yet
here: the 10-minute soak and kill -9 of the control plane (other benches / tests).

Writes `docs/benchmarks.md` (machine line, tables) and `docs/benchmarks.json` (every figure); PNG plots of
throughput and latency against concurrency only when matplotlib is importable (it is not a dependency).

Usage: `python bench/hot_path.py [--quick|--full]` (`--quick` ≈ 1 minute on 2 cores, of which ~15 s start
the suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._support import busy_cores, fail, finish, header, machine_line, parse_args  # noqa: E402
from bench._support.suite import launch_up, stop_all  # noqa: E402
from bench.observability_cost import Receiver  # noqa: E402

BIN = Path(sys.executable).parent
ECHO_MEMORY = ROOT / "examples" / "skills" / "echo-memory"
SERVICES = ("gateway", "registry", "deployer", "dispatcher", "executor")
EXECUTORS = 1
LOAD_PROCESSES = 2
ECHO_SKILL, CACHED_SKILL, SPIN_SKILL = "com.bench.echo", "com.bench.echo-cached", "com.bench.spin"
INPUT = "x" * 62  # 64 bytes as JSON text (the quotes)
PAYLOAD = "x" * 64  # the baselines' raw payload
THROUGHPUT_TARGET, P99_TARGET, CACHE_TARGET, ISOLATION_P99_MS = 0.8, 1.5, 0.8, 50.0
SPINNERS, ISOLATION_CONCURRENCY = 20, 16
BASELINES = ("client → echo", "client → relay → echo", "client → relay → relay → echo")
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


def start_suite(tmp: Path, env: dict[str, str]) -> Suite:
    suite = Suite()
    process, suite.address, suite.key = launch_up(tmp / "data", env, suite.log, executors=EXECUTORS)
    suite.process = process
    executors = 0
    for pid in children(process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for service in SERVICES:
            if f"services.{service}".encode() in argv:
                if service == "executor":
                    executors += 1
                    service = f"executor-{executors}" if EXECUTORS > 1 else "executor"
                suite.pids[service] = pid
    for skill in skill_dirs(tmp):
        for args in (("publish", str(skill)), ("deploy", f"{skill.name}@1.0.0")):
            done = subprocess.run([str(BIN / "clawhub"), *args, "--gateway", suite.address], capture_output=True,
                                  text=True, timeout=120, cwd=ROOT, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"clawhub {' '.join(args)}: {done.stderr}\nsuite log:\n" + "".join(suite.log[-20:]))
    return suite


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
              "warmup": spec.get("warmup", 50)} for i in range(processes)]
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


def verdict_line(what: str, met: bool, detail: str) -> bool:
    print(f"{what}: {detail}: {'met' if met else 'NOT met'}")
    return met


def write_doc(report: dict[str, Any], plots: list[str], plot_note: str) -> None:
    rows = ["| path | c | req/s | mean | p50 | p99 | errors |", "|---|---|---|---|---|---|---|"]

    def row(name: str, c: int, r: dict[str, Any]) -> None:
        errors = ", ".join(f"{n} `{k}`" for k, n in sorted(r["errors"].items())) or "0"
        rows.append(f"| {name} | {c} | {r['req_s']:,.0f} | {r['mean_ms']:.1f} ms | {r['p50_ms']:.1f} ms | "
                    f"{r['p99_ms']:.1f} ms | {errors} |")

    for name, r in report["baselines"].items():
        row(name, 100, r)
    for c, r in report["invoke"].items():
        row("`InvokeSkill` through the suite", int(c), r)
    row("`InvokeSkill`, cache hits", 100, report["cache_hit"])
    iso = report["isolation"]
    row(f"`InvokeSkill` (echo) while {SPINNERS} 1-s loops run", ISOLATION_CONCURRENCY, iso["echo"])
    svc = ["| c | " + " | ".join(report["invoke"][next(iter(report["invoke"]))]["services"]) + " | load generators |",
           "|---|" + "---|" * (len(report["invoke"][next(iter(report["invoke"]))]["services"]) + 1)]
    for c, r in report["invoke"].items():
        svc.append(f"| {c} | " + " | ".join(f"{s['cpu_cores']:.2f} cores, {s['rss_mib']:.0f} MiB"
                                            for s in r["services"].values())
                   + f" | {r['loadgen_cpu_cores']:.2f} cores |")
    targets = "\n".join(f"- {t['what']}: {t['detail']}: **{'met' if t['met'] else 'NOT met'}**"
                        for t in report["targets"])
    text = f"""# Benchmarks: the hot path

Generated by `bench/hot_path.py{' --' + report['size'] if report['size'] != 'default' else ''}` on
{report['date']} (issue 13). Every figure below comes from one invocation on one machine, so the ratios compare
like with like; re-run it to refresh this page (it rewrites this file and `docs/benchmarks.json`, which holds
every figure).

{report['machine']}; {report['busy_before']}.

The baselines are tiny grpc.aio servers (`bench/_support/echo_server.py`: one generic unary method, raw
bytes, 64-byte payload): an echo, and relays that forward each call over one channel. `InvokeSkill` runs a
whole suite (`clawhub up`, {EXECUTORS} executor) with the edge on (internal auth, the admin key as
`authorization: Bearer`, rate limits far above the load, an input schema) and tracing at its default sampler
exporting to a no-op OTLP receiver; the skill is the memory-v1 echo with a 64-byte input. The load comes
from {LOAD_PROCESSES} separate grpc.aio processes (`bench/_support/loadgen.py`), every answer checked; latencies
are of successful calls, errors are counted by ErrorInfo reason. Concurrency is calls in flight. The
three baselines, `InvokeSkill` at 100 and the cache hits run in {report['round_count']} rounds whose order
alternates; each row shows its best round (every round is in `docs/benchmarks.json`). Refusals at 100 count every round.

## Throughput and latency

{chr(10).join(rows)}

Cache hits: {', '.join(f"{n:,} {k.removeprefix('CACHE_STATUS_')}" for k, n in report['cache_hit']['cache'].items())}
answers (the skill is published with `[cache] ttl = "60s"`, the same input
every call). Isolation: {iso['spin']['calls']} calls of the spinning skill ended in the run, as
{', '.join(f"{n} `{k}`" for k, n in iso['spin']['errors'].items()) or 'successes'}.

## CPU and RSS of each service process during the `InvokeSkill` runs

CPU in cores (CPU seconds over the run's wall time, from /proc), RSS after the run.

{chr(10).join(svc)}

The load generators are not the bottleneck: the same generator drives the bare echo at
{report['baselines']['client → echo']['req_s']:,.0f} req/s, {report['generator_headroom']:.1f}× what the suite
answers at concurrency 100.

## Targets (issue 13)

{targets}

## Plots

{plot_note}
{chr(10).join(f'![{p}]({p})' for p in plots)}

Not measured here yet: the 10-minute soak (`bench/memory_soak.py` covers the executor's sandbox alone) and
kill -9 of the control plane under load.
"""
    DOC.write_text(text)
    DATA.write_text(json.dumps(report, indent=1) + "\n")


def plot(report: dict[str, Any]) -> tuple[list[str], str]:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return [], ("No plots in this run: matplotlib is not installed (it is not a dependency; "
                    "`.venv/bin/pip install matplotlib` and re-run to get them).")
    cs = [int(c) for c in report["invoke"]]
    rs = list(report["invoke"].values())
    names = []
    fig, ax = plt.subplots()
    ax.plot(cs, [r["req_s"] for r in rs], marker="o", label="InvokeSkill")
    for name, b in report["baselines"].items():
        ax.axhline(b["req_s"], linestyle="--", linewidth=1, label=f"{name} (c=100)")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("req/s")
    ax.legend(fontsize="small")
    fig.savefig(DOC.parent / "benchmarks-throughput.png", dpi=100)
    names.append("benchmarks-throughput.png")
    fig, ax = plt.subplots()
    ax.plot(cs, [r["p50_ms"] for r in rs], marker="o", label="p50")
    ax.plot(cs, [r["p99_ms"] for r in rs], marker="o", label="p99")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("ms")
    ax.legend()
    fig.savefig(DOC.parent / "benchmarks-latency.png", dpi=100)
    names.append("benchmarks-latency.png")
    return names, "Throughput and latency percentiles of `InvokeSkill` against concurrency:"


def main() -> None:
    size = parse_args(__doc__ or "")
    header("the hot path: InvokeSkill through the suite against bare gRPC hops (issue 13)", size)
    busy = busy_cores()
    report: dict[str, Any] = {"size": size.name, "machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
                              "busy_before": f"other load before the run: {busy:.2f} cores busy" if busy is not None
                              else "other load before the run: unknown"}
    levels = [100, 500] if size.name == "quick" else [100, 500, 1000]
    invoke_calls = {100: size.pick(1500, 5000, 20000), 500: size.pick(2500, 8000, 25000),
                    1000: size.pick(4000, 10000, 30000)}
    base_calls = size.pick(2000, 6000, 20000)
    isolation_seconds = size.pick(5, 10, 30)
    rounds = report["round_count"] = size.pick(2, 3, 5)
    history: dict[str, list[dict[str, Any]]] = {}  # every round of the paths measured in rounds

    def best(path: str) -> dict[str, Any]:
        return max(history[path], key=lambda r: float(r["req_s"]))

    with tempfile.TemporaryDirectory(prefix="clawhub-hot-") as name:
        tmp = Path(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CLAWHUB_"))}
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
                  f"{time.perf_counter() - started:.1f} s")
            invoke = {"target": suite.address, "kind": "invoke", "key": suite.key, "payload": INPUT}
            report["invoke"] = {}

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
            report["baselines"] = {path: best(path) for path in BASELINES}
            report["invoke"]["100"] = best("invoke 100")
            report["cache_hit"] = best("cache hit")
            print("-- higher concurrency")
            for c in levels[1:]:
                r = load({**invoke, "skill": ECHO_SKILL, "expect": INPUT}, concurrency=c, calls=invoke_calls[c],
                         watch=suite.pids)
                report["invoke"][str(c)] = r
                print(line("InvokeSkill", c, r))
                print(services_line(r))
            spin = {**invoke, "skill": SPIN_SKILL, "expect": None, "concurrency": SPINNERS, "warmup": 0,
                    "seconds": isolation_seconds, "timeout": 30}
            r = load({**invoke, "skill": ECHO_SKILL, "expect": INPUT}, concurrency=ISOLATION_CONCURRENCY,
                     seconds=isolation_seconds, processes=1, watch=suite.pids, alongside=[spin])
            report["isolation"] = {"echo": r, "spin": r.pop("alongside")[0]}
            print(line(f"InvokeSkill (echo) beside {SPINNERS} loops", ISOLATION_CONCURRENCY, r))
            spin_r = report["isolation"]["spin"]
            print(f"    the loops: {spin_r['calls']} calls ended, {spin_r['errors'] or 'all succeeded'}")
            print(services_line(r))
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            stop_suite(suite)
            receiver.stop()
            fail(str(err))
        finally:
            stop_suite(suite)
            receiver.stop()

    chain = report["baselines"]["client → relay → echo"]
    bare = report["baselines"]["client → echo"]
    at100 = report["invoke"]["100"]
    report["rounds"] = {path: [{k: r[k] for k in ("req_s", "p50_ms", "p99_ms", "errors")} for r in runs]
                        for path, runs in history.items()}
    print(f"best of {rounds} rounds at c=100: "
          + "; ".join(f"{path} {best(path)['req_s']:.0f} req/s (rounds: "
                      + ", ".join(f"{r['req_s']:.0f}" for r in runs) + ")" for path, runs in history.items()))
    report["generator_headroom"] = bare["req_s"] / at100["req_s"] if at100["req_s"] else float("inf")
    print(f"load generators: the same generator drives the bare echo at {bare['req_s']:.0f} req/s, "
          f"{report['generator_headroom']:.1f}× the suite at c=100 (generators used "
          f"{at100['loadgen_cpu_cores']:.2f} cores there)")
    targets = []

    def target(what: str, met: bool, detail: str) -> None:
        verdict_line(what, met, detail)
        targets.append({"what": what, "met": met, "detail": detail})

    ratio = at100["req_s"] / chain["req_s"]
    target("uncached invoke at c=100 vs client → relay → echo", ratio >= THROUGHPUT_TARGET,
           f"{at100['req_s']:.0f} / {chain['req_s']:.0f} req/s = {ratio:.2f}× (target ≥ {THROUGHPUT_TARGET}×)")
    p99 = at100["p99_ms"] / chain["p99_ms"]
    target("p99 at c=100 vs client → relay → echo", p99 <= P99_TARGET,
           f"{at100['p99_ms']:.1f} / {chain['p99_ms']:.1f} ms = {p99:.2f}× (target ≤ {P99_TARGET}×)")
    hit = report["cache_hit"]
    cache_ratio = hit["req_s"] / bare["req_s"]
    target("cache hit vs client → echo", cache_ratio >= CACHE_TARGET,
           f"{hit['req_s']:.0f} / {bare['req_s']:.0f} req/s = {cache_ratio:.2f}× (target ≥ {CACHE_TARGET}×)")
    refused = {100: sum(sum(r["errors"].values()) for r in history["invoke 100"]),
               500: sum(report["invoke"]["500"]["errors"].values())}
    target("no refused callers at c=100 and 500", not any(refused.values()),
           ", ".join(f"{n} refused at {c}" for c, n in refused.items()))
    if "1000" in report["invoke"]:
        top = report["invoke"]["1000"]
        shed_only = all(k.startswith("RESOURCE_EXHAUSTED") and k.endswith("+RetryInfo") for k in top["errors"])
        target("at c=1000 only deliberate shedding (RESOURCE_EXHAUSTED with RetryInfo)", shed_only,
               f"errors {top['errors'] or 0}, p99 of admitted calls {top['p99_ms']:.0f} ms")
    iso = report["isolation"]["echo"]
    target(f"isolation: echo beside {SPINNERS} 1-s loops", not iso["errors"] and iso["p99_ms"] < ISOLATION_P99_MS,
           f"{sum(iso['errors'].values())} refused, p99 {iso['p99_ms']:.1f} ms (target 0 and < "
           f"{ISOLATION_P99_MS:.0f} ms)")
    report["targets"] = targets
    plots, note = plot(report)
    print(note)
    write_doc(report, plots, note)
    print(f"wrote {DOC.relative_to(ROOT)} and {DATA.relative_to(ROOT)}")
    if not hit["cache"].get("CACHE_STATUS_HIT_L1"):
        fail(f"the cached skill was never answered from the cache: {hit['cache']}")
    finish(0)


if __name__ == "__main__":
    main()
