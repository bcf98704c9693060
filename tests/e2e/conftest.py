"""The whole suite as a user runs it: `clawhub up` in a subprocess, driven by the CLI, stubs and grpcurl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Suite:
    process: subprocess.Popen[str]
    addresses: dict[str, str]
    data_dir: Path
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def gateway(self) -> str:
        return self.addresses["gateway"]

    def cli(self, *args: str, input_text: str | None = None, timeout: float = 40) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([str(BIN / "clawhub"), *args, "--gateway", self.gateway], capture_output=True,
                                  text=True, input=input_text, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired as exc:
            # Say what the command and the suite were doing, rather than only that the test timed out.
            raise AssertionError(
                f"clawhub {' '.join(args)} did not finish in {timeout} s\n--- its output:\n{exc.stdout!r}\n"
                f"{exc.stderr!r}\n--- the suite's last log lines:\n" + "".join(self.log[-60:])) from None

    @property
    def admin_key(self) -> str:
        """The admin API key `clawhub up` created, as the CLI finds it (the credentials file)."""
        from services.cli import credentials

        return credentials.lookup(self.gateway)

    def channel(self) -> grpc.Channel:
        """A channel to the gateway whose every call carries the admin key (as the CLI's do)."""
        return grpc.intercept_channel(grpc.insecure_channel(self.gateway), Bearer(self.admin_key))

    def grpcurl(self, *args: str, address: str | None = None, data: object = None,
                timeout: float = 30, anonymous: bool = False) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "grpcurl"), "-plaintext", "-max-time", "20"]
        if address is None and not anonymous:
            # Calls to the gateway carry the admin key, as the CLI's do.
            cmd += ["-H", f"authorization: Bearer {self.admin_key}"]
        if data is not None:
            cmd += ["-d", json.dumps(data)]
        cmd += [address or self.gateway, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), self._entry))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary
    intercept_stream_unary = intercept_unary_unary
    intercept_stream_stream = intercept_unary_unary


def suite_env(**overrides: str) -> dict[str, str]:
    """The environment of a test suite: every service on a free port, short drains, no bake window."""
    env = dict(os.environ)
    # Every service on a free port, so the test never collides with anything on the machine.
    for service in ("gateway", "registry", "deployer", "dispatcher", "executor"):
        env[f"CLAWHUB_{service.upper()}_PORT"] = "0"
    env["CLAWHUB_SHUTDOWN_GRACE"] = "2"
    # No bake window by default, so a deploy goes Active as soon as its route is acknowledged; the release
    # tests ask for bakes and canaries explicitly.
    env["CLAWHUB_DEPLOYER_BAKE"] = "0"
    # Users' authentication as `clawhub up` runs by default: on (tests/conftest.py turns it off for services
    # that tests start from the environment by themselves).
    env.pop("CLAWHUB_USER_AUTH", None)
    env.update(overrides)
    return env


def start_up(data_dir: Path, *, executors: int = 2, env: dict[str, str] | None = None) -> Suite:
    """Run `clawhub up` on `data_dir` and wait until it prints the gateway's address (fails the test if it
    does not start within 60 s)."""
    process = subprocess.Popen([str(BIN / "clawhub"), "up", "--data-dir", str(data_dir), "--executors",
                                str(executors)],
                               env=env or suite_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    addresses: dict[str, str] = {}
    timer = threading.Timer(60, process.kill)
    timer.start()
    for line in process.stdout:
        label, _, address = line.strip().partition(" ")
        addresses[label] = address
        if label == "gateway":
            break
    timer.cancel()
    if "gateway" not in addresses:
        process.kill()
        process.wait()
        reader.join(5)
        process.stdout.close()
        process.stderr.close()
        pytest.fail("clawhub up did not start:\n" + "".join(log))
    return Suite(process=process, addresses=addresses, data_dir=data_dir, log=log, reader=reader)


def stop_up(running: Suite) -> int | None:
    """Ctrl-C the suite and wait for it; its exit code (None when it had to be killed)."""
    process = running.process
    assert process.stdout is not None and process.stderr is not None
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        code: int | None = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None
    finally:
        process.stdout.close()
        if running.reader is not None:
            running.reader.join(5)
        process.stderr.close()
    return code


@pytest.fixture(scope="package")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    running = start_up(tmp_path_factory.mktemp("clawhub-data"))
    yield running
    code = stop_up(running)
    log = running.log
    assert code == 0, "clawhub up did not stop cleanly on Ctrl-C:\n" + "".join(log[-40:])
    assert "all services stopped" in "".join(log[-5:])
