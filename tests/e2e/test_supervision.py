"""One suite per data directory, services that die with `up`, and a crash-looping service that takes nothing
else down: `clawhub up` run as a user runs it, attacked as the reliability report did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.datadir import DataDirInUse, DataDirLock, lock_data_dir
from tests.e2e.conftest import BIN, ROOT, Suite, start_up, stop_up, suite_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

UPPERCASE = ROOT / "examples" / "skills" / "uppercase"
REGISTRY = "clawhub.registry.v1.RegistryService"
SERVING = health_pb2.HealthCheckResponse.SERVING
T = TypeVar("T")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first, then ppid); None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited; nobody reaped it yet


def services_of(pid: int) -> dict[int, str]:
    """pid → command line of the live processes `pid` started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[1] == str(pid) and fields[0] != "Z":
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                pass
    return found


def wait_for(condition: Callable[[], object], seconds: float, what: str, suite: Suite | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            log = "\n--- the suite's last log lines:\n" + "".join(suite.log[-40:]) if suite else ""
            raise AssertionError(f"not within {seconds}s: {what}{log}")
        time.sleep(0.05)


def wait_for_value(get: Callable[[], T | None], seconds: float, what: str, suite: Suite | None = None) -> T:
    found: list[T] = []
    wait_for(lambda: (value := get()) is not None and not found.append(value), seconds, what, suite)
    return found[0]


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def started() -> Iterator[list[Suite]]:
    """Suites a test started: stopped after it, and any service they left behind killed."""
    suites: list[Suite] = []
    yield suites
    for suite in suites:
        leftovers = services_of(suite.process.pid)
        stop_up(suite)
        kill_all(leftovers)


def up_refused(data_dir: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `clawhub up` on `data_dir`, expecting it to give up; fail (and kill it) if it is still up later."""
    process = subprocess.Popen([str(BIN / "clawhub"), "up", "--data-dir", str(data_dir), "--executors", "1"],
                               env=suite_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        leftovers = services_of(process.pid)
        process.kill()
        out, err = process.communicate()
        kill_all(leftovers)
        raise AssertionError(f"a second clawhub up started on a held data directory:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_services_die_with_up_even_when_it_is_killed(data_dir: Path, started: list[Suite]) -> None:
    suite = start_up(data_dir)
    started.append(suite)
    services = services_of(suite.process.pid)
    assert sorted(c.rsplit(" ", 1)[-1] for c in services.values()) == [
        "services.deployer", "services.dispatcher", "services.executor", "services.executor", "services.gateway",
        "services.registry"]
    # kill -9 of `up` alone (the leader of the process group; each service runs in a session of its own).
    os.kill(suite.process.pid, signal.SIGKILL)
    suite.process.wait(5)
    try:
        wait_for(lambda: not any(alive(pid) for pid in services), 10, "every service exits after up was killed")
    finally:
        kill_all(services)
    # Nothing holds the data directory any more: a new suite starts on it.
    again = start_up(data_dir, executors=1)
    started.append(again)
    assert stop_up(again) == 0


def test_a_second_up_on_the_same_data_dir_is_refused_naming_the_first(data_dir: Path, started: list[Suite]) -> None:
    first = start_up(data_dir, executors=1)
    started.append(first)
    second = up_refused(data_dir)
    assert second.returncode == 1
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith(f"clawhub up: data directory {data_dir.resolve()} is in use by pid {first.process.pid} (")
    assert f"up --data-dir {data_dir}" in message and ", since " in message
    assert "--data-dir (or CLAWHUB_DATA_DIR)" in message
    assert second.stdout == ""  # no service was started
    # The first suite is untouched.
    assert first.process.poll() is None
    assert first.cli("status").returncode == 0


def test_up_refuses_a_data_dir_a_leftover_service_holds(data_dir: Path, started: list[Suite]) -> None:
    # A registry left running on this data directory by an earlier suite (or started by hand).
    env = suite_env(CLAWHUB_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", CLAWHUB_INTERNAL_AUTH="off")
    leftover = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        assert leftover.stdout is not None
        assert "listening on" in leftover.stdout.readline()
        refused = up_refused(data_dir)
        assert refused.returncode == 1
        assert (f"registry exited with code 1 while starting: registry: data directory {data_dir.resolve()}/registry "
                f"is in use by pid {leftover.pid} (") in refused.stderr
        assert "-m services.registry), since " in refused.stderr
        # `up` stopped there: nothing else was started.
        assert "executor   |" not in refused.stderr
        assert leftover.poll() is None
    finally:
        leftover.terminate()
        leftover.wait(15)
        leftover.stdout.close()  # type: ignore[union-attr]


def invoke(channel: grpc.Channel, text: str) -> object:
    request = gateway_pb.InvokeSkillRequest(name="com.example.uppercase")
    json_format.ParseDict(text, request.input)
    response = gateway_grpc.GatewayServiceStub(channel).InvokeSkill(request, timeout=10)
    return json_format.MessageToDict(response.output)


def health_of(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def test_a_crash_looping_registry_takes_nothing_else_down(data_dir: Path, started: list[Suite]) -> None:
    # Restarts come quickly here, so that six deaths fit in seconds.
    suite = start_up(data_dir, executors=1,
                     env=suite_env(CLAWHUB_UP_RESTART_DELAY="0.1", CLAWHUB_UP_RESTART_MAX_DELAY="0.5"))
    started.append(suite)
    for args in (("publish", str(UPPERCASE)), ("deploy", "com.example.uppercase@1.0.0")):
        result = suite.cli(*args)
        assert result.returncode == 0, result.stderr + "".join(suite.log[-30:])
    registry_address = suite.addresses["registry"]

    def serving_registry(killed: set[int]) -> int | None:
        pids = [pid for pid, command in services_of(suite.process.pid).items()
                if command.endswith("services.registry") and pid not in killed]
        if not pids:
            return None
        try:
            with grpc.insecure_channel(registry_address) as direct:
                return pids[0] if health_of(direct, "") == SERVING else None
        except grpc.RpcError:
            return None

    lock: DataDirLock | None = None
    killed: set[int] = set()
    with suite.channel() as channel:
        try:
            # Six deaths within a minute: the registry is killed each time it serves again (five times), then
            # once more, and then its data directory is held so that it cannot come back.
            for death in range(6):
                pid = wait_for_value(lambda: serving_registry(killed), 20,
                                     f"a registry serves again after {death} kill(s)", suite)
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                assert invoke(channel, "still here") == "STILL HERE"

            def hold() -> bool:
                nonlocal lock
                try:
                    lock = lock_data_dir(data_dir / "registry", owner="test", variable="-")
                except DataDirInUse:
                    return False
                return True

            wait_for(hold, 10, "the test holds the registry's data directory", suite)
            wait_for(lambda: any("registry keeps dying" in line for line in suite.log), 20,
                     "up reports the crash loop", suite)
            wait_for(lambda: any("registry is still down: restart attempt" in line and f"pid {os.getpid()} ("
                                 in line for line in suite.log), 20, "up reports who holds the directory", suite)

            # `up` is still up, invoking works, and health tells the registry is down but the gateway is not.
            assert suite.process.poll() is None
            assert any("registry is DOWN" in line for line in suite.log)
            assert invoke(channel, "no registry") == "NO REGISTRY"
            wait_for(lambda: health_of(channel, REGISTRY) == NOT_SERVING, 10, "the gateway reports the registry down")
            assert health_of(channel, "") == SERVING
            assert health_of(channel, "clawhub.gateway.v1.GatewayService") == SERVING
            assert health_of(channel, "clawhub.deployer.v1.DeployerService") == SERVING
            checked = subprocess.run([str(BIN / "clawhub"), "health", "--all"], capture_output=True, text=True,
                                     timeout=30, env={**os.environ, "CLAWHUB_GATEWAY": suite.gateway})
            assert checked.returncode == 1
            assert f"{suite.gateway}/{REGISTRY}: NOT_SERVING" in checked.stdout.splitlines()
            assert f"{suite.gateway}/clawhub.gateway.v1.GatewayService: SERVING" in checked.stdout.splitlines()
        finally:
            if lock is not None:
                lock.release()
        # Let go: the next attempt succeeds, `up` says so, and the gateway's health follows.
        wait_for(lambda: any("registry is back on" in line for line in suite.log), 20, "up reports it back", suite)
        wait_for(lambda: health_of(channel, REGISTRY) == SERVING, 10, "the gateway reports the registry back")
        assert invoke(channel, "all back") == "ALL BACK"
    assert suite.cli("status").returncode == 0
