"""Several worker processes of one service (services/runtime/workers.py): two dispatcher workers share one port
and both serve calls on it; services that must run as one process refuse workers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc

from services.runtime.settings import SettingsError
from services.runtime.workers import worker_count

ROOT = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        try:
            held = []
            for port in range(first, first + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise AssertionError("no free ports")


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWHUB_")}
    env.update({"PYTHONUNBUFFERED": "1", "CLAWHUB_INTERNAL_AUTH": "off", "CLAWHUB_RATE_LIMITS": "off",
                "CLAWHUB_DATA_DIR": str(tmp_path), "CLAWHUB_DEPLOYER_ADDRESS": "127.0.0.1:9",
                "CLAWHUB_EXECUTOR_ADDRESSES": "127.0.0.1:9", "CLAWHUB_SHUTDOWN_GRACE": "0.5", **extra})
    return env


@pytest.fixture
def supervisor() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def rpc_count(metrics_port: int, method: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(value) for value in re.findall(
        rf'clawhub_rpc_requests_total{{[^}}]*grpc_method="{method}"[^}}]*}} ([0-9.e+]+)', text))


def test_two_dispatcher_workers_share_one_port_and_both_serve(tmp_path: Path,
                                                              supervisor: list[subprocess.Popen[str]]) -> None:
    port = free_ports(1)
    metrics = free_ports(2)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.dispatcher"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=environment(tmp_path, CLAWHUB_DISPATCHER_PORT=str(port), CLAWHUB_DISPATCHER_WORKERS="2",
                        CLAWHUB_DISPATCHER_METRICS_PORT=str(metrics)))
    supervisor.append(process)
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 60
    while sum(f"listening on 127.0.0.1:{port}" in line for line in lines) < 2:
        assert process.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)

    # Every channel is a connection of its own, which the kernel gives to one of the workers.
    for _ in range(40):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            dispatcher_grpc.DispatcherServiceStub(ch).GetRouteTable(dispatcher_pb.GetRouteTableRequest(), timeout=5)
    counts = [rpc_count(metrics + i, "GetRouteTable") for i in range(2)]
    assert sum(counts) == 40 and all(c > 0 for c in counts), counts

    # A SIGTERM to the supervisor stops both workers gracefully.
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, "".join(lines)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_worker_that_dies_takes_the_service_down_for_its_supervisor(tmp_path: Path,
                                                                     supervisor: list[subprocess.Popen[str]]) -> None:
    port = free_ports(2)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.executor"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=environment(tmp_path, CLAWHUB_EXECUTOR_PORT=str(port), CLAWHUB_EXECUTOR_WORKERS="2",
                        CLAWHUB_EXECUTOR_THREADS="1"))
    supervisor.append(process)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 60
    # Executors: a port each (the deployer preloads and dispatchers check each process by its address).
    while not all(any(f"listening on 127.0.0.1:{p}" in line for line in lines) for p in (port, port + 1)):
        assert process.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    pids = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(pids) == 2, pids
    os.kill(int(pids[0]), signal.SIGKILL)
    assert process.wait(30) != 0
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True).stdout == b""
    assert "exited" in "".join(lines)


def test_services_that_must_run_alone_refuse_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_DEPLOYER_WORKERS", "2")
    with pytest.raises(SettingsError, match="leader"):
        worker_count("deployer")
    monkeypatch.setenv("CLAWHUB_REGISTRY_WORKERS", "3")
    with pytest.raises(SettingsError, match="registry replicas"):
        worker_count("registry")
    # The general setting applies where workers can run.
    monkeypatch.delenv("CLAWHUB_DEPLOYER_WORKERS")
    monkeypatch.delenv("CLAWHUB_REGISTRY_WORKERS")
    monkeypatch.setenv("CLAWHUB_WORKERS", "4")
    assert [worker_count(s) for s in ("gateway", "dispatcher", "executor", "registry", "deployer")] == [4, 4, 4, 1, 1]
    monkeypatch.setenv("CLAWHUB_GATEWAY_WORKERS", "2")
    assert worker_count("gateway") == 2
    result = subprocess.run([sys.executable, "-m", "services.deployer"], cwd=ROOT, capture_output=True, text=True,
                            env=environment(tmp_path, CLAWHUB_DEPLOYER_WORKERS="2"), timeout=60)
    assert result.returncode == 1 and "CLAWHUB_DEPLOYER_WORKERS=2" in result.stderr, result.stderr
