"""A multi-node clawhub on one machine: every node its own process and port, the metadata on PostgreSQL, the
shared state in Redis (issue 15's acceptance topology; also used by bench/topology.py).

    topology = Topology(tmp_path, database_url=..., redis_url=..., redis_prefix=...)
    topology.start(gateways=2, dispatchers=2, executors=3, registries=2, deployers=2)
    topology.cli("publish", ...)            # through every gateway (IP:PORT,IP:PORT)
    topology.kill(topology.nodes["executor-1"])
    topology.stop()

Nodes find each other by lists of addresses (`CLAWHUB_REGISTRY_ADDRESS=IP:PORT,IP:PORT`, balanced by gRPC over
the replicas that are up; services/runtime/channels.py); executors started later register with the deployers
(`CLAWHUB_EXECUTOR_REGISTER_WITH`). Internal and user authentication are off: the topology tests what crosses
nodes, the security suites test the credentials.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ORDER = ("registry", "executor", "deployer", "dispatcher", "gateway")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Node:
    name: str
    service: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", f"services.{self.service}"], env=self.env, cwd=ROOT,
                                        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def serving(self) -> bool:
        """Whether the node answers its health check with SERVING."""
        with grpc.insecure_channel(self.address) as ch:
            try:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                return False
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.process and self.process.returncode}):\n"
                                     f"{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not serve within {timeout:g}s:\n{self.tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Topology:
    """Nodes of every service on 127.0.0.1, their addresses fixed up front (a node restarted keeps its port)."""

    def __init__(self, root: Path, *, database_url: str, redis_url: str, redis_prefix: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.database_url = database_url
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.extra_env = extra_env or {}
        self.nodes: dict[str, Node] = {}
        self.ports: dict[str, list[int]] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.key_file = root / "deployer-secrets.key"

    def addresses(self, service: str) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports.get(service, []))

    @property
    def gateway(self) -> str:
        return self.addresses("gateway")

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWHUB_")}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "CLAWHUB_INTERNAL_AUTH": "off",
            "CLAWHUB_USER_AUTH": "off",
            "CLAWHUB_RATE_LIMITS": "off",
            "CLAWHUB_SHUTDOWN_GRACE": "1",
            "CLAWHUB_DEPLOYER_BAKE": "0",
            "CLAWHUB_DATABASE_URL": self.database_url,
            "CLAWHUB_KV_REDIS_URL": self.redis_url,
            "CLAWHUB_DEPLOYER_SECRETS_KEY_FILE": str(self.key_file),
            "CLAWHUB_REGISTRY_ADDRESS": self.addresses("registry"),
            "CLAWHUB_DEPLOYER_ADDRESS": self.addresses("deployer"),
            "CLAWHUB_DISPATCHER_ADDRESS": self.addresses("dispatcher"),
            "CLAWHUB_EXECUTOR_ADDRESSES": self.addresses("executor"),
        })
        for service in ORDER:
            env[f"CLAWHUB_{service.upper()}_METRICS_PORT"] = "off"
        env.update(self.extra_env)
        return env

    def _node(self, service: str, index: int, port: int) -> Node:
        name = f"{service}-{index}"
        env = self.base_env()
        env[f"CLAWHUB_{service.upper()}_PORT"] = str(port)
        env["CLAWHUB_DATA_DIR"] = str(self.root / name)
        if service == "deployer":
            env["CLAWHUB_DEPLOYER_ID"] = name
            env["CLAWHUB_DEPLOYER_ADVERTISE_ADDRESS"] = f"127.0.0.1:{port}"
        if service == "executor":
            env["CLAWHUB_EXECUTOR_ADVERTISE_ADDRESS"] = f"127.0.0.1:{port}"
        if service == "gateway":
            env["CLAWHUB_GATEWAY_ID"] = name
        node = Node(name, service, port, env, self.root / "logs" / f"{name}.log")
        self.nodes[name] = node
        return node

    def start(self, *, gateways: int = 2, dispatchers: int = 2, executors: int = 3, registries: int = 2,
              deployers: int = 2) -> None:
        counts = {"gateway": gateways, "dispatcher": dispatchers, "executor": executors, "registry": registries,
                  "deployer": deployers}
        for service in ORDER:
            self.ports[service] = [free_port() for _ in range(counts[service])]
        for service in ORDER:
            started = [self._node(service, i + 1, port) for i, port in enumerate(self.ports[service])]
            for node in started:
                node.start()
            for node in started:
                node.wait_serving()

    def add_executor(self) -> Node:
        """A new executor that registers with the deployers (it is not in anyone's static list)."""
        index = 1 + sum(1 for n in self.nodes.values() if n.service == "executor")
        node = self._node("executor", index, free_port())
        node.env["CLAWHUB_EXECUTOR_REGISTER_WITH"] = self.addresses("deployer")
        node.start()
        node.wait_serving()
        return node

    def restart(self) -> None:
        """Stop every node, then start them again on the same ports and data."""
        for node in self.nodes.values():
            node.stop()
        for service in ORDER:
            started = [n for n in self.nodes.values() if n.service == service]
            for node in started:
                node.start()
            for node in started:
                node.wait_serving()

    def stop(self) -> None:
        for service in reversed(ORDER):
            for node in self.nodes.values():
                if node.service == service:
                    node.stop()

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWHUB_")}
        env["CLAWHUB_GATEWAY"] = self.gateway
        env["XDG_CONFIG_HOME"] = str(self.root / "config")
        return subprocess.run([str(BIN / "clawhub"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- {n.name}\n{n.tail(lines)}" for n in self.nodes.values())
