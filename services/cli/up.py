"""`clawhub up`: run all five services on this machine, each its own process, until Ctrl-C.

Start order follows the dependencies (registry, executors, deployer, dispatcher, gateway); each service
prints `clawhub NAME listening on HOST:PORT` once it serves, and its address is handed to the next ones.
Shutdown runs the other way round, gateway first, each with SIGTERM (NOT_SERVING, drain, close).

What `up` guarantees (docs/supervision.md says more):

- One suite per data directory: `up` locks the data directory (services/runtime/datadir.py), and so do the
  registry and the deployer for theirs, so a second suite on the same directory is refused, naming the
  process that holds it, whether that is another `up` or a service left over from one.
- The services die with `up`, even when `up` is killed with SIGKILL (services/runtime/lifeline.py), yet
  Ctrl-C reaches only `up`: each service runs in a session of its own.
- No service is essential to the others' supervision: one that dies is restarted on the same address,
  again and again, backing off up to `CLAWHUB_UP_RESTART_MAX_DELAY`, while the rest keep serving (invoking
  needs no registry or deployer). `up` reports when a service goes down, each attempt, and when it is back.
  It exits only on Ctrl-C/SIGTERM, or when the first start of the suite fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.cli import credentials
from services.runtime.datadir import DataDirInUse, lock_data_dir
from services.runtime.identity import (
    AUTH_VARIABLE,
    IDENTITIES_FILE,
    IDENTITIES_VARIABLE,
    TOKEN_FILE_VARIABLE,
    write_credentials,
)
from services.runtime.lifeline import LIFELINE_VARIABLE
from services.runtime.settings import SettingsError, env_float

LISTENING = re.compile(r"^clawhub (\S+) listening on (\S+):(\d+)$")
# The line a service prints before it listens when its metrics port is on (services/runtime/server.py).
METRICS_LINE = re.compile(r"^clawhub (\S+) metrics on (http://\S+)$")
DEFAULT_PORTS = {
    "gateway": 50051, "registry": 50052, "deployer": 50053, "dispatcher": 50054, "executor": 50055,
}
DEFAULT_GATEWAY = f"127.0.0.1:{DEFAULT_PORTS['gateway']}"
# Each service's Prometheus metrics port under `up` (docs/metrics.md): 915x as its gRPC port is 5005x;
# executor i gets 9155 + i - 1. A service on a free gRPC port (0) gets a free metrics port too.
DEFAULT_METRICS_PORTS = {
    "gateway": 9151, "registry": 9152, "deployer": 9153, "dispatcher": 9154, "executor": 9155,
}
# Hosts at which a client looking at 127.0.0.1 (the CLI's default) reaches a service bound there.
_LOOPBACK_REACHABLE = {"127.0.0.1", "localhost", "0.0.0.0", "[::]", "::"}
START_TIMEOUT = 30.0
# A service that served this long before it died starts its restart backoff afresh.
STABLE_SECONDS = 60.0
# This many deaths within the window are reported as a crash loop (retrying goes on).
CRASH_LOOP = (6, 60.0)
TICK_SECONDS = 0.1
# Where `up` keeps the suite's secrets: one token file per service, the identities file, the registry's admin
# token (docs/security.md).
SECRETS_DIR = "secrets"
ADMIN_TOKEN_FILE = "registry-admin.token"
ADMIN_TOKEN_VARIABLES = ("CLAWHUB_REGISTRY_ADMIN_TOKEN", "CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE")


@dataclass(frozen=True)
class RestartPolicy:
    """How soon a dead service is started again: `first_delay`, doubling per consecutive failure up to
    `max_delay` (`CLAWHUB_UP_RESTART_DELAY`, `CLAWHUB_UP_RESTART_MAX_DELAY`)."""

    first_delay: float = 0.5
    max_delay: float = 30.0

    @classmethod
    def from_env(cls) -> RestartPolicy:
        d = cls()
        first = env_float("CLAWHUB_UP_RESTART_DELAY", d.first_delay, minimum=0.0)
        cap = env_float("CLAWHUB_UP_RESTART_MAX_DELAY", d.max_delay, minimum=0.0)
        if cap < first:
            raise SettingsError(f"CLAWHUB_UP_RESTART_MAX_DELAY={cap} is less than CLAWHUB_UP_RESTART_DELAY={first}")
        return cls(first_delay=first, max_delay=cap)

    def delay(self, failures: int) -> float:
        """The wait before the next start, after `failures` consecutive deaths (1 or more)."""
        return min(self.first_delay * 2.0 ** min(failures - 1, 30), self.max_delay)


class StartFailed(RuntimeError):
    """The suite could not be started; the message says which service and why."""


@dataclass
class Child:
    """One process of a service."""

    label: str
    process: subprocess.Popen[bytes]
    # Write end of the child's lifeline pipe: held, never written, closed once the child is gone.
    lifeline: int
    started: float
    pump: threading.Thread | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    address: str = ""
    # Where Prometheus scrapes it (`http://HOST:PORT/metrics`); empty with its metrics port off.
    metrics_url: str = ""
    last_line: str = ""
    # Its death has been reported and its restart scheduled.
    handled: bool = False


@dataclass
class Service:
    """A service `up` supervises: restarted as a new Child on the same address whenever it dies."""

    label: str
    module: str
    # The environment the service is started with beyond the suite's own (ports, peer addresses).
    extra: dict[str, str]
    child: Child
    address: str = ""
    metrics_url: str = ""
    # Deaths since it last served for STABLE_SECONDS: they set the backoff.
    failures: int = 0
    deaths: deque[float] = field(default_factory=deque)
    down_since: float | None = None
    retry_at: float = 0.0
    attempts: int = 0
    crash_loop_reported: bool = False


def _pump(child: Child, stream: IO[bytes], out: IO[str]) -> None:
    """Relay a child's output line by line with its label; notice its `listening` line."""
    width = 11
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if line.strip():
            child.last_line = line.strip()
        metrics = METRICS_LINE.match(line)
        if metrics and not child.ready.is_set():
            child.metrics_url = metrics[2]
        match = LISTENING.match(line)
        if match and not child.ready.is_set():
            child.address = f"{match[2]}:{match[3]}"
            child.ready.set()
        try:
            print(f"{child.label:<{width}}| {line}", file=out, flush=True)
        except (OSError, ValueError):
            # Nobody reads our output any more (the parent went away): keep draining the child's pipe, or
            # the child would block on its next log line, shutdown included.
            pass
    stream.close()


def _port(env: Mapping[str, str], service: str) -> int:
    raw = env.get(f"CLAWHUB_{service.upper()}_PORT", "").strip()
    return int(raw) if raw else DEFAULT_PORTS[service]


def _metrics_port(env: Mapping[str, str], service: str, grpc_port: int, index: int = 0) -> str:
    """`CLAWHUB_<SERVICE>_METRICS_PORT` for the `index`-th process of `service` under `up`: as set (`off`, 0, or
    a port, + index for the executors), else the default metrics port, or a free one (0) for a service whose
    gRPC port is free."""
    raw = env.get(f"CLAWHUB_{service.upper()}_METRICS_PORT", "").strip()
    if raw:
        return str(int(raw) + index) if raw.isdigit() and int(raw) else raw
    return str(DEFAULT_METRICS_PORTS[service] + index) if grpc_port else "0"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Suite:
    """The processes of one suite. Every process is started from the thread that created the Suite (the
    main thread in `clawhub up`): the children's parent-death signal follows the thread that forked them."""

    def __init__(self, data_dir: Path, executors: int, host: str, gateway_port: int | None,
                 log: IO[str], policy: RestartPolicy | None = None) -> None:
        self.data_dir = data_dir
        self.executors = executors
        self.host = host
        self.gateway_port = gateway_port
        self.log = log
        self.policy = policy or RestartPolicy()
        self.services: list[Service] = []
        self.env = dict(os.environ)
        self.env.pop(LIFELINE_VARIABLE, None)
        self.env["CLAWHUB_DATA_DIR"] = str(data_dir)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # Secrets go to the one service that needs each, as file paths (`_secrets_of`), never to every child's
        # environment: the admin token only to the registry, each service token only to its service.
        self._admin_token = {name: self.env.pop(name) for name in ADMIN_TOKEN_VARIABLES if name in self.env}
        for name in (TOKEN_FILE_VARIABLE, IDENTITIES_VARIABLE):
            self.env.pop(name, None)
        self.internal_auth = self.env.get(AUTH_VARIABLE, "").strip().lower() != "off"
        self._secret_env: dict[str, dict[str, str]] = {}

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / SECRETS_DIR

    def prepare_secrets(self) -> None:
        """Create `<data-dir>/secrets/` (0700) on first start: a token per service (0600) and the identities
        file; later starts reuse them. The admin token given to `up` is written there too (0600), for the
        registry to read."""
        secrets = self.secrets_dir
        if self.internal_auth:
            write_credentials(secrets)
            for service in DEFAULT_PORTS:
                self._secret_env[service] = {TOKEN_FILE_VARIABLE: str(secrets / f"{service}.token"),
                                             IDENTITIES_VARIABLE: str(secrets / IDENTITIES_FILE)}
        admin_file = self._admin_token.get("CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE", "")
        admin_token = self._admin_token.get("CLAWHUB_REGISTRY_ADMIN_TOKEN", "").strip()
        if admin_token and not admin_file:
            secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = secrets / ADMIN_TOKEN_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, admin_token.encode() + b"\n")
            finally:
                os.close(fd)
            os.chmod(path, 0o600)
            admin_file = str(path)
        elif admin_token:
            # Both given: the registry refuses to start, naming them.
            self._secret_env.setdefault("registry", {})["CLAWHUB_REGISTRY_ADMIN_TOKEN"] = admin_token
        if admin_file:
            self._secret_env.setdefault("registry", {})["CLAWHUB_REGISTRY_ADMIN_TOKEN_FILE"] = admin_file

    def _secrets_of(self, service: str) -> dict[str, str]:
        return self._secret_env.get(service, {})

    def say(self, message: str) -> None:
        try:
            print(f"clawhub up: {message}", file=self.log, flush=True)
        except (OSError, ValueError):
            pass

    def _spawn(self, label: str, service: str, extra: dict[str, str]) -> Child:
        # The lifeline: the child holds the read end, only `up` the write end, so the child reads EOF
        # as soon as `up` is gone, however it went (services/runtime/lifeline.py).
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"],
                env={**self.env, **extra, **self._secrets_of(service), LIFELINE_VARIABLE: str(read_end)},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                pass_fds=(read_end,),
                # Own session: Ctrl-C reaches only `up`, which then stops the services in order.
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        child = Child(label=label, process=process, lifeline=write_end, started=time.monotonic())
        assert process.stdout is not None
        child.pump = threading.Thread(target=_pump, args=(child, process.stdout, self.log), daemon=True,
                                      name=f"pump-{label}")
        child.pump.start()
        return child

    def _start(self, label: str, module: str, extra: dict[str, str], stopping: threading.Event) -> Service:
        service = Service(label=label, module=module, extra=extra, child=self._spawn(label, module, extra))
        self.services.append(service)
        self._wait_ready(service.child, stopping)
        service.address = service.child.address
        service.metrics_url = service.child.metrics_url
        return service

    def _wait_ready(self, child: Child, stopping: threading.Event) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not child.ready.wait(0.05):
            if child.process.poll() is not None:
                raise StartFailed(f"{child.label} {_describe_exit(child.process.returncode)} while starting"
                                  f"{self._why(child)}")
            if stopping.is_set():
                raise StartFailed("interrupted before the suite was up")
            if time.monotonic() > deadline:
                raise StartFailed(f"{child.label} did not start within {START_TIMEOUT:.0f}s")

    @staticmethod
    def _why(child: Child) -> str:
        """`: <its last output line>`, the reason a service gives when it refuses to start."""
        if child.pump is not None:
            child.pump.join(1.0)  # the line may still be in the pipe
        return f": {child.last_line.removeprefix('clawhub: ')}" if child.last_line else ""

    def start(self, stopping: threading.Event | None = None) -> dict[str, str]:
        """Start every service, each once the ones it needs serve; returns label → address."""
        stopping = stopping or threading.Event()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prepare_secrets()
        # Users: an admin API key on the first start, which the registry adopts (services/cli/credentials.py).
        self._secret_env.setdefault("registry", {}).update(credentials.bootstrap_admin_key(self.secrets_dir))
        host = {f"CLAWHUB_{s.upper()}_HOST": self.host for s in DEFAULT_PORTS}
        registry_port = _port(self.env, "registry")
        registry = self._start("registry", "registry",
                               {**host, "CLAWHUB_REGISTRY_PORT": str(registry_port),
                                "CLAWHUB_REGISTRY_METRICS_PORT": _metrics_port(self.env, "registry", registry_port)},
                               stopping)
        executor_base = _port(self.env, "executor")
        executors = []
        for i in range(self.executors):
            port = executor_base + i if executor_base else 0
            executors.append(self._start(
                f"executor-{i + 1}" if self.executors > 1 else "executor", "executor",
                {**host, "CLAWHUB_EXECUTOR_PORT": str(port), "CLAWHUB_REGISTRY_ADDRESS": registry.address,
                 "CLAWHUB_EXECUTOR_METRICS_PORT": _metrics_port(self.env, "executor", port, i)},
                stopping))
        executor_addresses = ",".join(e.address for e in executors)
        deployer_port = _port(self.env, "deployer")
        deployer = self._start("deployer", "deployer", {
            **host, "CLAWHUB_DEPLOYER_PORT": str(deployer_port),
            "CLAWHUB_DEPLOYER_METRICS_PORT": _metrics_port(self.env, "deployer", deployer_port),
            "CLAWHUB_REGISTRY_ADDRESS": registry.address, "CLAWHUB_EXECUTOR_ADDRESSES": executor_addresses},
            stopping)
        dispatcher_port = _port(self.env, "dispatcher")
        dispatcher = self._start("dispatcher", "dispatcher", {
            **host, "CLAWHUB_DISPATCHER_PORT": str(dispatcher_port),
            "CLAWHUB_DISPATCHER_METRICS_PORT": _metrics_port(self.env, "dispatcher", dispatcher_port),
            "CLAWHUB_DEPLOYER_ADDRESS": deployer.address, "CLAWHUB_EXECUTOR_ADDRESSES": executor_addresses},
            stopping)
        gateway_port = self.gateway_port if self.gateway_port is not None else _port(self.env, "gateway")
        self._start("gateway", "gateway", {
            **host, "CLAWHUB_GATEWAY_PORT": str(gateway_port),
            "CLAWHUB_GATEWAY_METRICS_PORT": _metrics_port(self.env, "gateway", gateway_port),
            "CLAWHUB_DISPATCHER_ADDRESS": dispatcher.address, "CLAWHUB_REGISTRY_ADDRESS": registry.address,
            "CLAWHUB_DEPLOYER_ADDRESS": deployer.address}, stopping)
        addresses = {s.label: s.address for s in self.services}
        # The CLI on this machine finds the admin key by the gateway's address (like a kubeconfig).
        credentials.remember_admin_key(addresses["gateway"], self.secrets_dir, self.data_dir)
        return addresses

    def supervise(self, now: float, stopping: threading.Event) -> None:
        """One round of supervision: report deaths, restart the services whose backoff is over, and report
        the ones that serve again. Never stops the suite."""
        for service in self.services:
            child = service.child
            code = child.process.poll()
            if code is None:
                if service.down_since is not None and child.ready.is_set():
                    self.say(f"{service.label} is back on {service.address} after {now - service.down_since:.1f}s "
                             f"down ({service.attempts} restart attempt(s))")
                    service.down_since = None
                    service.attempts = 0
                    service.crash_loop_reported = False
                elif not child.ready.is_set() and now - child.started > START_TIMEOUT:
                    self.say(f"{service.label} did not start within {START_TIMEOUT:.0f}s; killing it")
                    child.process.kill()
                continue
            if not child.handled:
                self._died(service, code, now)
            elif now >= service.retry_at and not stopping.is_set():
                self._restart(service)

    def _died(self, service: Service, code: int, now: float) -> None:
        child = service.child
        child.handled = True
        self._close_lifeline(child)
        if child.ready.is_set() and now - child.started >= STABLE_SECONDS:
            service.failures = 0
        service.failures += 1
        delay = self.policy.delay(service.failures)
        service.retry_at = now + delay
        count, window = CRASH_LOOP
        service.deaths.append(now)
        while service.deaths and now - service.deaths[0] > window:
            service.deaths.popleft()
        why = _describe_exit(code) + ("" if child.ready.is_set() else " while starting" + self._why(child))
        if service.down_since is None:
            service.down_since = now
            self.say(f"{service.label} is DOWN: it {why}. The other services keep serving; restarting it on "
                     f"{service.address} in {delay:.1f}s")
        else:
            self.say(f"{service.label} is still down: restart attempt {service.attempts} {why}; next attempt "
                     f"in {delay:.1f}s")
        if len(service.deaths) >= count and not service.crash_loop_reported:
            service.crash_loop_reported = True
            self.say(f"{service.label} keeps dying ({len(service.deaths)} times within {window:.0f}s); still "
                     f"retrying, at most {self.policy.max_delay:g}s apart, until it serves again or Ctrl-C")

    def _restart(self, service: Service) -> None:
        service.attempts += 1
        port = service.address.rpartition(":")[2]
        self.say(f"restarting {service.label} on {service.address} (attempt {service.attempts})")
        # Its metrics on the same port too, so Prometheus's target stays right.
        metrics = ({f"CLAWHUB_{service.module.upper()}_METRICS_PORT": service.metrics_url.rpartition(":")[2]
                    .partition("/")[0]} if service.metrics_url else {})
        service.child = self._spawn(service.label, service.module,
                                    {**service.extra, f"CLAWHUB_{service.module.upper()}_PORT": port, **metrics})

    @staticmethod
    def _close_lifeline(child: Child) -> None:
        if child.lifeline >= 0:
            os.close(child.lifeline)
            child.lifeline = -1

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM in reverse start order, each waited for; SIGKILL whatever outlives `timeout`."""
        for service in reversed(self.services):
            child = service.child
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.say(f"{child.label} did not stop within {timeout:.0f}s; killing it")
                    child.process.kill()
                    child.process.wait()
            self._close_lifeline(child)


def clients_find(gateway: str) -> bool:
    """Whether a client with no --gateway and no CLAWHUB_GATEWAY reaches the gateway at this address."""
    host, _, port = gateway.rpartition(":")
    return port == str(DEFAULT_PORTS["gateway"]) and host in _LOOPBACK_REACHABLE


def banner(addresses: Mapping[str, str], data_dir: Path) -> str:
    """What `up` prints once every service serves: each address with its service and role, then commands to
    try, which tell the clients where the gateway is when they would not find it by default."""
    gateway = addresses["gateway"]
    rows = [(label, address, "public: clients talk to this one" if label == "gateway" else "internal")
            for label, address in addresses.items()]
    rows.append(("data dir", str(data_dir), ""))
    width = max(len(label) for label, _, _ in rows)
    column = max(len(address) for _, address, role in rows if role)
    lines = [f"  {label:<{width}}  {address:<{column}}  {role}".rstrip() for label, address, role in rows]
    tries = []
    if not clients_find(gateway):
        tries.append(f"  export CLAWHUB_GATEWAY={gateway}   # clients look at {DEFAULT_GATEWAY} otherwise "
                     "(or give --gateway)")
    tries += ["  clawhub publish examples/skills/uppercase",
              "  clawhub deploy com.example.uppercase@1.0.0",
              "  clawhub invoke com.example.uppercase --input '\"hello\"'"]
    return ("\nclawhub is up. Services (to move a port: clawhub up --help):\n" + "\n".join(lines)
            + "\n\nTry it in another terminal:\n" + "\n".join(tries) + "\nPress Ctrl-C to stop.\n")


def metrics_banner(urls: Mapping[str, str]) -> str:
    """Where Prometheus scrapes each service (empty when every metrics port is off)."""
    if not urls:
        return ""
    width = max(len(label) for label in urls)
    return ("Prometheus metrics (docs/metrics.md; CLAWHUB_<SERVICE>_METRICS_PORT moves or turns off one):\n"
            + "\n".join(f"  {label:<{width}}  {url}" for label, url in urls.items()) + "\n")


def run_up(data_dir: Path, executors: int, host: str, gateway_port: int | None) -> int:
    log = sys.stderr
    data_dir = data_dir.resolve()
    try:
        policy = RestartPolicy.from_env()
        # Held until `up` exits: a second `up` on this directory is refused, naming this one.
        lock = lock_data_dir(data_dir, owner="clawhub up", variable="--data-dir (or CLAWHUB_DATA_DIR)")
    except (DataDirInUse, SettingsError) as exc:
        print(f"clawhub up: {exc}" if isinstance(exc, SettingsError) else str(exc), file=log)
        return 1
    suite = Suite(data_dir, executors, host, gateway_port, log, policy)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            addresses = suite.start(stopping)
        except StartFailed as exc:
            suite.say(f"{exc}; stopping")
            suite.stop()
            return 1
        print(banner(addresses, suite.data_dir), file=log, flush=True)
        metrics = metrics_banner({s.label: s.metrics_url for s in suite.services if s.metrics_url})
        if metrics:
            print(metrics, file=log, flush=True)
        # For scripts and tests, `LABEL ADDRESS` lines on stdout, the gateway last (`up --help` says so). Not on
        # a terminal, where they would only repeat the banner.
        if not sys.stdout.isatty():
            for label, address in sorted(addresses.items(), key=lambda item: item[0] == "gateway"):
                print(f"{label} {address}", flush=True)
        while not stopping.wait(TICK_SECONDS):
            suite.supervise(time.monotonic(), stopping)
        print("\nclawhub up: stopping (gateway first)…", file=log, flush=True)
        suite.stop()
        print("clawhub up: all services stopped", file=log, flush=True)
        return 0
    finally:
        # Whatever ended `up` (an exception, such as a broken pipe to a parent that died), the services it
        # started must not outlive it; stop() skips the ones already stopped.
        try:
            suite.stop()
        except OSError:
            pass
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.release()
