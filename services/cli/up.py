"""`clawhub up`: run all five services on this machine, each its own process, until Ctrl-C.

Start order follows the dependencies (registry, executors, deployer, dispatcher, gateway); each service
prints `clawhub NAME listening on HOST:PORT` once it serves, and its address is handed to the next ones.
Shutdown runs the other way round, gateway first, each with SIGTERM (NOT_SERVING, drain, close).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LISTENING = re.compile(r"^clawhub (\S+) listening on (\S+):(\d+)$")
DEFAULT_PORTS = {
    "gateway": 50051, "registry": 50052, "deployer": 50053, "dispatcher": 50054, "executor": 50055,
}
START_TIMEOUT = 30.0
# A service that dies is restarted on the same address after a backoff that doubles up to the cap; one
# that dies more than MAX_RESTARTS times within RESTART_WINDOW is broken, and the suite stops.
RESTART_BACKOFF = (0.5, 8.0)
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


@dataclass
class Child:
    label: str
    module: str
    process: subprocess.Popen[bytes]
    # The environment the service was started with beyond the suite's own (ports, peer addresses).
    extra: dict[str, str] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    address: str = ""
    restarts: list[float] = field(default_factory=list)


def _pump(child: Child, stream: IO[bytes], out: IO[str]) -> None:
    """Relay a child's output line by line with its label; notice its `listening` line."""
    width = 11
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
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


class Suite:
    def __init__(self, data_dir: Path, executors: int, host: str, gateway_port: int | None,
                 log: IO[str]) -> None:
        self.data_dir = data_dir
        self.executors = executors
        self.host = host
        self.gateway_port = gateway_port
        self.log = log
        self.children: list[Child] = []
        self.env = dict(os.environ)
        self.env["CLAWHUB_DATA_DIR"] = str(data_dir)
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def _spawn(self, label: str, service: str, extra: dict[str, str]) -> Child:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            env={**self.env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own process group: Ctrl-C reaches only `up`, which then stops the services in order.
            start_new_session=True,
        )
        child = Child(label=label, module=service, process=process, extra=extra)
        assert process.stdout is not None
        threading.Thread(target=_pump, args=(child, process.stdout, self.log), daemon=True).start()
        return child

    def _start(self, label: str, service: str, extra: dict[str, str]) -> Child:
        child = self._spawn(label, service, extra)
        self.children.append(child)
        self._wait_ready(child)
        return child

    def _wait_ready(self, child: Child) -> None:
        label, process = child.label, child.process
        deadline = time.monotonic() + START_TIMEOUT
        while not child.ready.wait(0.05):
            if process.poll() is not None:
                raise RuntimeError(f"{label} exited with code {process.returncode} while starting "
                                   "(its output is above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not start within {START_TIMEOUT:.0f}s")

    def restart(self, dead: Child, stopping: threading.Event) -> bool:
        """Start `dead` again on the address it had (its peers know that address). False if it keeps dying."""
        now = time.monotonic()
        recent = [t for t in dead.restarts if now - t < RESTART_WINDOW]
        if len(recent) >= MAX_RESTARTS:
            print(f"clawhub up: {dead.label} died {len(recent) + 1} times within {RESTART_WINDOW:.0f}s; "
                  "giving up and stopping the suite", file=self.log, flush=True)
            return False
        delay = min(RESTART_BACKOFF[0] * 2 ** len(recent), RESTART_BACKOFF[1])
        print(f"clawhub up: {dead.label} exited with code {dead.process.returncode}; restarting it on "
              f"{dead.address} in {delay:.1f}s", file=self.log, flush=True)
        if stopping.wait(delay):
            return True
        port = dead.address.rpartition(":")[2]
        child = self._spawn(dead.label, dead.module, {**dead.extra, f"CLAWHUB_{dead.module.upper()}_PORT": port})
        child.restarts = [*recent, now]
        self.children[self.children.index(dead)] = child
        try:
            self._wait_ready(child)
        except RuntimeError as exc:
            print(f"clawhub up: {exc}", file=self.log, flush=True)
            child.address = dead.address
            return self.restart(child, stopping) if child.process.poll() is not None else False
        return True

    def start(self) -> dict[str, str]:
        """Start every service; returns label → address."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        host = {f"CLAWHUB_{s.upper()}_HOST": self.host for s in DEFAULT_PORTS}
        registry = self._start("registry", "registry",
                               {**host, "CLAWHUB_REGISTRY_PORT": str(_port(self.env, "registry"))})
        executor_base = _port(self.env, "executor")
        executors = []
        for i in range(self.executors):
            port = executor_base + i if executor_base else 0
            executors.append(self._start(
                f"executor-{i + 1}" if self.executors > 1 else "executor", "executor",
                {**host, "CLAWHUB_EXECUTOR_PORT": str(port), "CLAWHUB_REGISTRY_ADDRESS": registry.address}))
        executor_addresses = ",".join(e.address for e in executors)
        deployer = self._start("deployer", "deployer", {
            **host, "CLAWHUB_DEPLOYER_PORT": str(_port(self.env, "deployer")),
            "CLAWHUB_REGISTRY_ADDRESS": registry.address, "CLAWHUB_EXECUTOR_ADDRESSES": executor_addresses})
        dispatcher = self._start("dispatcher", "dispatcher", {
            **host, "CLAWHUB_DISPATCHER_PORT": str(_port(self.env, "dispatcher")),
            "CLAWHUB_DEPLOYER_ADDRESS": deployer.address, "CLAWHUB_EXECUTOR_ADDRESSES": executor_addresses})
        gateway_port = self.gateway_port if self.gateway_port is not None else _port(self.env, "gateway")
        self._start("gateway", "gateway", {
            **host, "CLAWHUB_GATEWAY_PORT": str(gateway_port),
            "CLAWHUB_DISPATCHER_ADDRESS": dispatcher.address, "CLAWHUB_REGISTRY_ADDRESS": registry.address,
            "CLAWHUB_DEPLOYER_ADDRESS": deployer.address})
        return {c.label: c.address for c in self.children}

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM in reverse start order, each waited for; SIGKILL whatever outlives `timeout`."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"{child.label} did not stop within {timeout:.0f}s; killing it", file=self.log)
                    child.process.kill()
                    child.process.wait()

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)


def run_up(data_dir: Path, executors: int, host: str, gateway_port: int | None) -> int:
    log = sys.stderr
    suite = Suite(data_dir.resolve(), executors, host, gateway_port, log)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            addresses = suite.start()
        except RuntimeError as exc:
            print(f"clawhub up: {exc}", file=log)
            suite.stop()
            return 1
        rows = {**addresses, "data dir": str(suite.data_dir)}
        width = max(len(label) for label in rows)
        lines = [f"  {label:<{width}}  {value}" for label, value in rows.items()]
        print("\nclawhub is up. Services:\n" + "\n".join(lines) + "\n\n"
              f"Clients talk to the gateway: {addresses['gateway']}\n"
              f"  clawhub publish examples/skills/uppercase\n"
              f"  clawhub deploy com.example.uppercase@1.0.0\n"
              f"  clawhub invoke com.example.uppercase --input '\"hello\"'\n"
              "Press Ctrl-C to stop.\n", file=log, flush=True)
        # Machine-readable lines for scripts and tests, `LABEL ADDRESS`, the gateway last.
        for label, address in sorted(addresses.items(), key=lambda item: item[0] == "gateway"):
            print(f"{label} {address}", flush=True)
        while not stopping.wait(0.2):
            dead = suite.first_exited()
            if dead is not None and not stopping.is_set() and not suite.restart(dead, stopping):
                suite.stop()
                return 1
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
