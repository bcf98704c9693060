"""Scaling out on one host (issue 15): InvokeSkill throughput with 1 and 2 executor processes and 1 and 2 gateway
worker processes (`CLAWHUB_GATEWAY_WORKERS`, which share the gateway's port), on the machine at hand.

Each configuration is a whole suite (`clawhub up --executors E`, free ports, a temporary data dir) serving the
memory-v1 echo (the cheapest skill, so the figures are the platform's own cost) with the edge as `up` runs it
(internal and user auth on, rate limits raised far above the load). The load is the same closed-loop generator
as bench/hot_path.py (2 processes, concurrency 100 between them, 64-byte input). The configurations run in
rounds whose order alternates (`--quick` 1 round, default 2, `--full` 3), and the best round of each is
reported with the spread of its rounds, as a ratio to the 1-executor, 1-gateway-worker configuration of the
same run.

What it shows: the core count decides. With more cores than the processes of one configuration keep busy, the
extra processes add throughput; on 2 cores, where the load generators, the gateway and the executor already
share both cores, the point is that adding processes costs little (ratio ≥ 0.9 is the target here) and that the
path is ready for more cores. The verdict line says which configurations met it.

Usage: `python bench/scale_out.py [--quick|--full]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._support import busy_cores, finish, header, machine_line, parse_args  # noqa: E402
from bench._support.suite import launch_up, stop_all  # noqa: E402
from bench.hot_path import ECHO_MEMORY, INPUT, load, manifest  # noqa: E402

BIN = Path(sys.executable).parent
SKILL = "com.bench.scale"
CONFIGS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (executor processes, gateway worker processes)
TARGET = 0.9


def run_config(tmp: Path, executors: int, workers: int, calls: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CLAWHUB_"))}
    env["XDG_CONFIG_HOME"] = os.environ["XDG_CONFIG_HOME"] = str(tmp / "config")
    for service in ("gateway", "registry", "deployer", "dispatcher", "executor"):
        env[f"CLAWHUB_{service.upper()}_PORT"] = "0"
    env.update(CLAWHUB_SHUTDOWN_GRACE="1", CLAWHUB_LOG_LEVEL="WARNING", CLAWHUB_DEPLOYER_BAKE="0",
               CLAWHUB_RATE_INVOKE="50000/100000", CLAWHUB_GATEWAY_WORKERS=str(workers))
    log: list[str] = []
    process, address, key = launch_up(tmp / "data", env, log, executors=executors,
                                      name=f"{executors} executor(s), {workers} gateway worker(s)")
    try:
        skill = tmp / "skill"
        skill.mkdir(exist_ok=True)
        (skill / "echo.wat").write_text((ECHO_MEMORY / "echo.wat").read_text())
        (skill / "skill.toml").write_text(manifest(SKILL, module="echo.wat", timeout_ms=2000))
        for args in (("publish", str(skill)), ("deploy", f"{SKILL}@1.0.0")):
            done = subprocess.run([str(BIN / "clawhub"), *args, "--gateway", address], capture_output=True,
                                  text=True, timeout=120, cwd=ROOT, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"clawhub {' '.join(args)}: {done.stderr}\n" + "".join(log[-20:]))
        spec = {"target": address, "kind": "invoke", "key": key, "payload": INPUT, "skill": SKILL, "expect": INPUT}
        # A short warm-up run (module tiers, connections of every worker), then the measured one.
        load(spec, concurrency=100, calls=min(1000, calls))
        return load(spec, concurrency=100, calls=calls)
    finally:
        stop_all([process])


def main() -> None:
    size = parse_args(__doc__ or "")
    header("scaling out on one host: executor processes and gateway workers (issue 15)", size)
    cores = os.cpu_count() or 1
    print(f"cores: {cores}")
    busy = busy_cores()
    print(f"other load before the run: {busy:.2f} cores busy" if busy is not None else "other load: unknown")
    rounds = size.pick(1, 2, 3)
    calls = size.pick(2000, 5000, 15000)
    results: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for round_ in range(rounds):
        order = CONFIGS if round_ % 2 == 0 else tuple(reversed(CONFIGS))
        for executors, workers in order:
            with tempfile.TemporaryDirectory(prefix="clawhub-scale-") as name:
                started = time.perf_counter()
                r = run_config(Path(name), executors, workers, calls)
            results[(executors, workers)].append(r)
            print(f"round {round_ + 1}: {executors} executor(s), {workers} gateway worker(s): "
                  f"{r['req_s']:7.0f} req/s, p99 {r['p99_ms']:6.1f} ms, errors {sum(r['errors'].values())} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    best = {c: max(rs, key=lambda r: float(r["req_s"])) for c, rs in results.items()}
    base = float(best[(1, 1)]["req_s"]) or 1.0
    print()
    print(f"machine: {machine_line()}")
    print("| executors | gateway workers | req/s (best) | rounds' req/s | p99 ms | × 1+1 | errors |")
    print("|---|---|---|---|---|---|---|")
    met: list[str] = []
    missed: list[str] = []
    for c in CONFIGS:
        r = best[c]
        spread = ", ".join(f"{float(x['req_s']):.0f}" for x in results[c])
        ratio = float(r["req_s"]) / base
        errors = sum(sum(x["errors"].values()) for x in results[c])
        print(f"| {c[0]} | {c[1]} | {float(r['req_s']):.0f} | {spread} | {float(r['p99_ms']):.1f} | {ratio:.2f} | "
              f"{errors} |")
        if c != (1, 1):
            (met if ratio >= TARGET and errors == 0 else missed).append(f"{c[0]}+{c[1]} ({ratio:.2f}×)")
    print()
    print(f"target on {cores} core(s): adding processes keeps ≥ {TARGET}× the 1+1 throughput with no error; "
          f"met: {', '.join(met) or 'none'}; missed: {', '.join(missed) or 'none'}")
    finish(0)


if __name__ == "__main__":
    main()
