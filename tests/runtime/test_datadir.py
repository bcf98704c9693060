"""One process per data directory: the registry and deployer refuse a directory another live process holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.deployer.server import build_server as build_deployer
from services.deployer.settings import Settings as DeployerSettings
from services.runtime.datadir import LOCK_FILE, DataDirInUse, holder_of, lock_data_dir
from tests.conftest import Starter

ROOT = Path(__file__).resolve().parents[2]


def start_registry(data_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off",
           "CLAWHUB_REGISTRY_DATA_DIR": str(data_dir), "CLAWHUB_REGISTRY_PORT": "0",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "services.registry"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_listening(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    timer = threading.Timer(30, process.kill)
    timer.start()
    try:
        line = process.stdout.readline()
    finally:
        timer.cancel()
    assert "listening on" in line, f"the registry did not start: {line!r}"


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.terminate()
    code = process.wait(15)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    return code


def test_a_second_registry_on_one_data_dir_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = start_registry(tmp_path)
    try:
        wait_listening(first)
        second = start_registry(tmp_path)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 1, (out, err)
        assert "listening" not in out
        # One line, no traceback, naming the holder: pid, command line, since when; and what to do.
        assert "Traceback" not in err
        message = err.strip().splitlines()[-1]
        assert message.startswith(f"clawhub: registry: data directory {tmp_path} is in use by pid {first.pid} (")
        assert "-m services.registry), since 20" in message
        assert "CLAWHUB_REGISTRY_DATA_DIR" in message
        # The first one is untouched.
        assert first.poll() is None
    finally:
        assert stop(first) == 0


def test_the_lock_goes_with_its_holder_even_on_sigkill(tmp_path: Path) -> None:
    first = start_registry(tmp_path)
    try:
        wait_listening(first)
        holder = holder_of(tmp_path)
        assert holder is not None and holder.pid == first.pid
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        stop(first)
    assert holder_of(tmp_path) is None
    again = start_registry(tmp_path)
    try:
        wait_listening(again)
    finally:
        assert stop(again) == 0
    # A clean stop releases it too; the file stays (deleting it would race a process about to lock it).
    assert holder_of(tmp_path) is None
    assert (tmp_path / LOCK_FILE).exists()


async def test_a_deployer_refuses_a_held_directory_and_releases_it_when_stopped(
        start_service: Starter, tmp_path: Path) -> None:
    def settings() -> DeployerSettings:
        return DeployerSettings(host="127.0.0.1", port=0, data_dir=tmp_path, registry_address="127.0.0.1:9",
                                executor_addresses=("127.0.0.1:9",), grace=0.2)

    first = await start_service(build_deployer(settings()))
    with pytest.raises(DataDirInUse) as refused:
        await build_deployer(settings())
    assert refused.value.holder is not None and refused.value.holder.pid == os.getpid()
    assert "deployer: data directory" in str(refused.value) and "CLAWHUB_DEPLOYER_DATA_DIR" in str(refused.value)
    await first.stop(grace=0.2)
    second = await start_service(build_deployer(settings()))
    assert second.port


def test_a_refusal_before_the_holder_recorded_itself_still_reads(tmp_path: Path) -> None:
    import fcntl

    # Someone holds the lock but has written nothing (it is between flock and write, or is not clawhub).
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataDirInUse, match="in use by another process"):
            lock_data_dir(tmp_path, owner="registry", variable="CLAWHUB_REGISTRY_DATA_DIR")
    finally:
        os.close(fd)
    lock = lock_data_dir(tmp_path, owner="registry", variable="CLAWHUB_REGISTRY_DATA_DIR")
    try:
        holder = holder_of(tmp_path)
        assert holder is not None and holder.pid == os.getpid()
    finally:
        lock.release()
