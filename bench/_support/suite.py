"""Start and stop a whole suite (`clawhub up`) for the benchmarks that measure it end to end (edge_cost.py,
observability_cost.py, hot_path.py): one place that launches it, waits for the gateway's address, and finds the
admin key `up` recorded in the credentials file (the caller points XDG_CONFIG_HOME at a directory of its own)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from services.cli import credentials

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_SECONDS = 90


def launch_up(data_dir: Path, env: dict[str, str], log: list[str], *, executors: int = 1,
              name: str = "") -> tuple[subprocess.Popen[str], str, str]:
    """Run `clawhub up` on `data_dir` with `env`, its stderr collected into `log` (by a thread); returns (the
    process, the gateway's address, the admin key). Raises RuntimeError (with the log's tail) when it does not
    start within START_TIMEOUT_SECONDS or records no key; `name` prefixes the message."""
    prefix = f"{name}: " if name else ""
    process = subprocess.Popen([str(BIN / "clawhub"), "up", "--data-dir", str(data_dir), "--executors",
                                str(executors)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    stderr = process.stderr
    threading.Thread(target=lambda: log.extend(iter(stderr.readline, "")), daemon=True).start()
    timer = threading.Timer(START_TIMEOUT_SECONDS, process.kill)
    timer.start()
    address = ""
    for line in process.stdout:
        label, _, value = line.strip().partition(" ")
        if label == "gateway":
            address = value
            break
    timer.cancel()
    if not address:
        raise RuntimeError(f"{prefix}clawhub up did not start:\n" + "".join(log[-30:]))
    key = credentials.lookup(address) or ""
    if not key:
        raise RuntimeError(f"{prefix}no admin key recorded for {address}")
    return process, address, key


def stop_all(processes: Iterable[subprocess.Popen[str] | None]) -> None:
    """Ctrl-C every suite still running, then wait for each (killed after 30 s)."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGINT)
    for process in running:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
