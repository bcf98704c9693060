"""What watching the suite costs: invoke throughput with tracing and metrics on against both off (issue 12).

Starts five whole suites at once (`clawhub up`, 1 executor each, internal auth and the rest of the edge at
`up`'s defaults) and, for each traced suite, a no-op OTLP trace receiver in a process of its own
(`bench/_support/otlp_sink.py`: a gRPC `TraceService` that counts spans per service and throws them away),
then measures `InvokeSkill` calls/s on `examples/skills/uppercase` (16 in flight from one grpc.aio client,
every output checked) in rounds that rotate between the suites:

- **off**: no `OTEL_*` variable, every `CLAWHUB_<SERVICE>_METRICS_PORT=off` (`up` turns metrics on otherwise):
  nothing installed, nothing recorded, nothing served;
- **trace 100%**: `OTEL_EXPORTER_OTLP_ENDPOINT` at the receiver and `OTEL_TRACES_SAMPLER=always_on`: every
  call makes and exports the spans of every service on its path (gateway and executor; and the dispatcher
  with `CLAWHUB_GATEWAY_ROUTING=dispatcher` in the environment, which every suite then uses);
- **trace default**: the same endpoint and the default sampler (parent-based, 5% of the traces started here:
  services/runtime/tracing.py); the calls carry no trace context, so the gateway's root decision applies;
- **trace 0%** (for information, no target): the same endpoint with `OTEL_TRACES_SAMPLER=parentbased_traceidratio`
  and `OTEL_TRACES_SAMPLER_ARG=0`: tracing installed, no call recorded, which splits the default sampler's cost
  into what the machinery costs every call and what the recorded tenth costs;
- **metrics on**: `CLAWHUB_<SERVICE>_METRICS_PORT` set for all five services, tracing off; the receiver is
  scraped after the rounds to check every service serves them.

Checks before timing that trace 100% exports spans of the three services on the invoke path and that off
exports none, and after timing that trace default exported about its ratio. Reports, per configuration, the
best round and min / median / max calls/s, the cost against `off` (time per call of the best rounds, of the
medians, and the median of each round's ratio) and the suite's CPU per call read from /proc (steadier on a
shared machine: it does not move when a neighbour takes a core). Targets (issue 12): at most 15% cost with
every call traced, 5% with the default sampler, 3% with metrics on.

Usage: `python bench/observability_cost.py [--quick|--full]` (calls per round × rounds: 500 × 6 /
1,000 × 7 / 3,000 × 9; `--quick` takes about two minutes on 2 cores, 10–20 s of it starting suites).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb  # noqa: E402
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc  # noqa: E402

from bench._support import fail, finish, header, parse_args  # noqa: E402
from bench._support.suite import launch_up, stop_all  # noqa: E402
from bench.edge_cost import suite_cpu  # noqa: E402

BIN = Path(sys.executable).parent
UPPERCASE = ROOT / "examples" / "skills" / "uppercase"
SKILL = "com.example.uppercase"
SERVICES = ("gateway", "registry", "deployer", "dispatcher", "executor")
# The services an invocation passes through: the gateway calls the executor itself by default, through the
# dispatcher with CLAWHUB_GATEWAY_ROUTING=dispatcher (docs/routing.md); set in the environment, it applies to all
# five suites, so either path can be measured.
ROUTING = os.environ.get("CLAWHUB_GATEWAY_ROUTING", "").strip().lower() or "direct"
INVOKE_PATH = ("gateway", "dispatcher", "executor") if ROUTING == "dispatcher" else ("gateway", "executor")
CONCURRENCY = 16
WARMUP = 20
TARGETS = {"trace 100%": 1.15, "trace default": 1.05, "metrics on": 1.03}  # time per call / off (issue 12)


def metrics_port_variable(service: str) -> str:
    return f"CLAWHUB_{service.upper()}_METRICS_PORT"


METRICS_VARIABLES = tuple(metrics_port_variable(s) for s in SERVICES)


@dataclass
class Config:
    name: str
    tracing: str  # "", "always_on", "default" or "none" (installed, ratio 0)
    metrics: bool
    env: dict[str, str] = field(default_factory=dict)
    receiver: Receiver | None = None
    metrics_ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    address: str = ""
    key: str = ""
    calls: int = 0  # every call made on this suite, warm-ups and checks included
    log: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # suite CPU seconds per call, per round


CONFIGS = [
    Config("off", tracing="", metrics=False),
    Config("trace 100%", tracing="always_on", metrics=False),
    Config("trace default", tracing="default", metrics=False),
    Config("metrics on", tracing="", metrics=True),
    Config("trace 0%", tracing="none", metrics=False),
]


class Receiver:
    """The no-op OTLP receiver in its own process; `counts()` asks it how many spans each service sent."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "bench._support.otlp_sink"], cwd=ROOT, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            raise RuntimeError(f"the OTLP receiver did not start: {line}")
        self.endpoint = f"http://127.0.0.1:{line[1]}"

    def counts(self) -> dict[str, int]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        counts: dict[str, int] = json.loads(self.process.stdout.readline())
        return counts

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def environment(config: Config, base_env: dict[str, str]) -> dict[str, str]:
    """`config`'s suite environment: the base one without any OTEL_* or metrics variable, plus its own."""
    env = {k: v for k, v in base_env.items() if not k.startswith("OTEL_") and k not in METRICS_VARIABLES}
    for service in SERVICES:
        env[f"CLAWHUB_{service.upper()}_PORT"] = "0"
    env.update(CLAWHUB_SHUTDOWN_GRACE="1", CLAWHUB_LOG_LEVEL="WARNING", CLAWHUB_DEPLOYER_BAKE="0")
    if config.receiver is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = config.receiver.endpoint
        if config.tracing == "always_on":
            env["OTEL_TRACES_SAMPLER"] = "always_on"
        elif config.tracing == "none":
            env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    # `up` turns metrics on by default (docs/metrics.md): off must be said.
    env.update({variable: "off" for variable in METRICS_VARIABLES})
    if config.metrics:
        config.metrics_ports = {service: free_port() for service in SERVICES}
        env.update({metrics_port_variable(s): str(p) for s, p in config.metrics_ports.items()})
    return env


def start(config: Config, tmp: Path, base_env: dict[str, str]) -> None:
    """Start `config`'s suite (and its receiver) and publish and deploy the skill; raises RuntimeError when
    something fails."""
    if config.tracing:
        config.receiver = Receiver()
    env = config.env = environment(config, base_env)
    config.process, config.address, config.key = launch_up(
        tmp / config.name.replace(" ", "-").replace("%", ""), env, config.log, name=config.name)
    for args in (("publish", str(UPPERCASE)), ("deploy", f"{SKILL}@1.0.0")):
        done = subprocess.run([str(BIN / "clawhub"), *args, "--gateway", config.address], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{config.name}: clawhub {' '.join(args)}: {done.stderr}\nsuite log:\n"
                               + "".join(config.log[-20:]))


def stop(configs: list[Config]) -> None:
    for config in configs:
        if config.receiver is not None:
            config.receiver.stop()
    stop_all(c.process for c in configs)


async def calls_on(config: Config, count: int, *, concurrency: int = CONCURRENCY) -> float:
    """Makes `count` InvokeSkill calls on `config`'s suite, `concurrency` in flight, every output checked;
    returns the seconds they took and adds the suite's CPU seconds per call to `config.cpu`."""
    metadata = (("authorization", f"Bearer {config.key}"),)
    async with grpc.aio.insecure_channel(config.address) as channel:
        stub = gateway_grpc.GatewayServiceStub(channel)
        request = gateway_pb.InvokeSkillRequest(name=SKILL)
        request.input.string_value = "hello, clawhub"
        left = count

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                response = await stub.InvokeSkill(request, timeout=30, metadata=metadata)
                if response.output.string_value != "HELLO, CLAWHUB":
                    raise RuntimeError(f"{config.name}: unexpected output {response.output}")

        for _ in range(WARMUP):
            await stub.InvokeSkill(request, timeout=30, metadata=metadata)
        assert config.process is not None
        cpu = suite_cpu(config.process.pid)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        config.cpu.append((suite_cpu(config.process.pid) - cpu) / count)
        config.calls += count + WARMUP
        return elapsed


def spans_after(receiver: Receiver, before: dict[str, int]) -> dict[str, int]:
    """Spans per clawhub service that `receiver` got since `before`, once the exporters' batches have arrived
    (the SDK's batch processor sends every 5 s or every 512 spans): reads until a reading 6 s after the
    calls, and a second later, agree."""
    time.sleep(6.0)
    last = receiver.counts()
    for _ in range(10):
        time.sleep(1.0)
        now = receiver.counts()
        if now == last:
            break
        last = now
    got: dict[str, int] = {}
    for name, count in last.items():
        if count - before.get(name, 0):
            service = next((s for s in SERVICES if s in name), name)  # "clawhub-gateway" → "gateway"
            got[service] = got.get(service, 0) + count - before.get(name, 0)
    return got


def show(spans: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(spans.items())) or "none"


def check_tracing(traced: Config) -> None:
    """Trace 100% exports spans of every service on the invoke path (INVOKE_PATH) for every call (off has no
    endpoint)."""
    assert traced.receiver is not None
    before = traced.receiver.counts()
    asyncio.run(calls_on(traced, 50, concurrency=4))
    traced.cpu.clear()
    got = spans_after(traced.receiver, before)
    short = [s for s in INVOKE_PATH if got.get(s, 0) < 50 + WARMUP]
    if short:
        raise RuntimeError(f"trace 100%: expected ≥ {50 + WARMUP} spans from each of {INVOKE_PATH} for "
                           f"{50 + WARMUP} calls, the receiver got {got}")
    print(f"checked: trace 100% exported spans of {', '.join(INVOKE_PATH)} for every call ({show(got)} spans "
          f"for {50 + WARMUP} calls)")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


def check_metrics(config: Config) -> None:
    """Every service of `metrics on` serves /metrics, and the gateway counted every call made."""
    for service, port in config.metrics_ports.items():
        if "# TYPE clawhub_rpc_requests" not in scrape(port):
            raise RuntimeError(f"metrics on: {service}'s /metrics on port {port} has no RPC metric")
    counted = 0.0
    for line in scrape(config.metrics_ports["gateway"]).splitlines():
        if line.startswith("clawhub_rpc_requests_total{") and 'grpc_method="InvokeSkill"' in line:
            counted += float(line.rsplit(" ", 1)[1])
    if counted < config.calls:
        raise RuntimeError(f"metrics on: the gateway counted {counted:.0f} InvokeSkill calls of {config.calls}")
    print(f"checked: metrics on serves /metrics on all five services; the gateway counted {counted:.0f} "
          f"InvokeSkill calls ({config.calls} made)")


def paired(a: Config, b: Config) -> float:
    """Median over rounds of b's calls/s over a's in the same round: a's time per call relative to b's, from
    neighbours in time, so drift on the machine between rounds cancels out."""
    return statistics.median(y / x for x, y in zip(a.rates, b.rates, strict=True))


def spread(rates: list[float]) -> str:
    return f"min {min(rates):.0f} / median {statistics.median(rates):.0f} / max {max(rates):.0f}"


def main() -> None:
    size = parse_args(__doc__ or "")
    header("invoke throughput: tracing (every call / default sampler) and metrics on vs off", size)
    print(f"routing: {ROUTING} (invoke path {' → '.join(INVOKE_PATH)}; CLAWHUB_GATEWAY_ROUTING)")
    calls, rounds = size.pick(500, 1000, 3000), size.pick(6, 7, 9)
    with tempfile.TemporaryDirectory(prefix="clawhub-observability-") as name:
        tmp = Path(name)
        base_env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "config")}
        os.environ["XDG_CONFIG_HOME"] = base_env["XDG_CONFIG_HOME"]
        problems: list[str] = []

        def start_one(config: Config) -> None:
            try:
                start(config, tmp, base_env)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                problems.append(str(exc))

        try:
            started = time.perf_counter()
            threads = [threading.Thread(target=start_one, args=(c,)) for c in CONFIGS]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if problems:
                raise RuntimeError("\n".join(problems))
            print(f"{len(CONFIGS)} suites started, skill published and deployed in "
                  f"{time.perf_counter() - started:.1f} s")
            off, traced, default, metered, _ = CONFIGS
            check_tracing(traced)
            before = {c.name: c.receiver.counts() for c in CONFIGS if c.receiver is not None}
            made = {c.name: c.calls for c in CONFIGS}
            for index in range(rounds):
                shift = index % len(CONFIGS)
                for config in CONFIGS[shift:] + CONFIGS[:shift]:
                    rate = calls / asyncio.run(calls_on(config, calls))
                    config.rates.append(rate)
                    print(f"round {index + 1} {config.name:>13}: {rate:6.0f} calls/s, "
                          f"{config.cpu[-1] * 1e6:5.0f} µs suite CPU per call")
            spans = {c.name: spans_after(c.receiver, before[c.name]) for c in CONFIGS if c.receiver is not None}
            made = {c.name: c.calls - made[c.name] for c in CONFIGS}
            check_metrics(metered)
        except (grpc.RpcError, RuntimeError, OSError) as err:
            stop(CONFIGS)
            fail(str(err))
        finally:
            stop(CONFIGS)
    # Spans per call at 100% tell what the default sampler kept: its gateway spans per call over those.
    per_call = {name: {k: v / made[name] for k, v in got.items()} for name, got in spans.items()}
    every = per_call[traced.name]
    print(f"spans per call, trace 100%: {', '.join(f'{k} {v:.1f}' for k, v in sorted(every.items()))}")
    kept = per_call[default.name].get("gateway", 0.0) / every["gateway"] if every.get("gateway") else 0.0
    print(f"trace default exported {show(spans[default.name])} spans for {made[default.name]} calls: "
          f"{kept * 100:.1f}% of the calls traced (judging by the gateway's spans)")
    print(f"trace 0% exported {sum(spans['trace 0%'].values())} spans for {made['trace 0%']} calls")
    if spans[traced.name].get("gateway", 0) < made[traced.name]:
        print("note: trace 100% exported fewer gateway spans than calls (the SDK's queue dropped some under load)")
    print(f"{CONCURRENCY} in flight, {calls} calls per round, {rounds} rounds; calls/s:")
    for config in CONFIGS:
        print(f"  {config.name:>13}: best {max(config.rates):.0f} ({spread(config.rates)})")
    cpu = {c.name: statistics.median(c.cpu) for c in CONFIGS}
    print("suite CPU per call (median of rounds, gateway + dispatcher + executor + registry + deployer):")
    for config in CONFIGS:
        print(f"  {config.name:>13}: {cpu[config.name] * 1e6:.0f} µs "
              f"(min {min(config.cpu) * 1e6:.0f} / max {max(config.cpu) * 1e6:.0f})")
    print("cost against off (time per call; > 1 is slower):")
    for config in CONFIGS[1:]:
        target = TARGETS.get(config.name, 0.0)
        best = max(off.rates) / max(config.rates)
        median = statistics.median(off.rates) / statistics.median(config.rates)
        cpu_ratio = cpu[config.name] / cpu[off.name]
        print(f"  {config.name:>13}: {best:.3f}× best rounds ({(best - 1) * 100:+.1f}%), {median:.3f}× medians, "
              f"{paired(config, off):.3f}× median of the rounds' ratios; CPU per call {cpu_ratio:.3f}× "
              f"({(cpu_ratio - 1) * 100:+.1f}%)")
        if config.name not in TARGETS:
            continue
        checks = {"best rounds": best, "median of the rounds' ratios": paired(config, off), "CPU per call": cpu_ratio}
        print(f"  {'':>13}  target ≤ {target:g}×: "
              + "; ".join(f"{name} {'met' if ratio <= target else 'NOT met'}" for name, ratio in checks.items()))
    finish(0)


if __name__ == "__main__":
    main()
