"""A service `clawhub up` started stops when `up` is gone: by its lifeline pipe, or by the parent-death signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from services.runtime.lifeline import LIFELINE_VARIABLE

ROOT = Path(__file__).resolve().parents[2]


def registry_env(tmp_path: Path, lifeline: int) -> dict[str, str]:
    return {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off",
            "CLAWHUB_REGISTRY_DATA_DIR": str(tmp_path), "CLAWHUB_REGISTRY_PORT": "0",
            "CLAWHUB_SHUTDOWN_GRACE": "1", "PYTHONUNBUFFERED": "1", LIFELINE_VARIABLE: str(lifeline)}


def exited_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_service_stops_gracefully_when_its_lifeline_breaks(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen([sys.executable, "-m", "services.registry"], env=registry_env(tmp_path, read_end),
                                   pass_fds=(read_end,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=ROOT, start_new_session=True)
    finally:
        os.close(read_end)
    try:
        assert process.stdout is not None
        timer = threading.Timer(30, process.kill)
        timer.start()
        assert "listening on" in process.stdout.readline()
        timer.cancel()
        os.close(write_end)  # what the kernel does when `up` dies, however it dies
        write_end = -1
        out, err = process.communicate(timeout=15)
        # A graceful stop (exit 0, "stopped"), not a kill.
        assert process.returncode == 0, err
        assert "the supervisor (clawhub up) is gone; shutting down" in err
        assert "registry: stopped" in err
    finally:
        if write_end >= 0:
            os.close(write_end)
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_parent_death_signal_stops_a_service_whose_lifeline_someone_else_keeps_open(tmp_path: Path) -> None:
    # A parent that starts a registry with a lifeline but lets a third process hold the pipe's write end too:
    # when the parent dies, only the parent-death signal can stop the registry.
    parent_script = textwrap.dedent(f"""
        import os, subprocess, sys
        read_end, write_end = os.pipe()
        holder = subprocess.Popen(["sleep", "60"], pass_fds=(write_end,))
        env = dict(os.environ, {LIFELINE_VARIABLE}=str(read_end), CLAWHUB_INTERNAL_AUTH="off")
        child = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env, pass_fds=(read_end,),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        line = child.stdout.readline().decode()
        print(child.pid, holder.pid, line.strip(), flush=True)
        child.stdout.close()
        import time; time.sleep(60)
    """)
    env = registry_env(tmp_path, 0)
    env.pop(LIFELINE_VARIABLE)
    parent = subprocess.Popen([sys.executable, "-c", parent_script], env=env, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    assert parent.stdout is not None
    timer = threading.Timer(30, parent.kill)
    timer.start()
    child_pid, holder_pid, line = parent.stdout.readline().split(" ", 2)
    timer.cancel()
    try:
        assert "listening on" in line
        parent.kill()
        parent.wait()
        assert exited_within(int(child_pid), 10), "the registry outlived its parent"
    finally:
        parent.stdout.close()
        for pid in (int(child_pid), int(holder_pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
