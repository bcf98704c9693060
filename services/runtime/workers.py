"""Several worker processes of one service on one host (`CLAWHUB_<SERVICE>_WORKERS`, else `CLAWHUB_WORKERS`).

One Python process runs its gRPC handlers on one core; a host with more cores runs more processes. With N > 1,
`python -m services.<name>` becomes a small supervisor that starts N workers (the same command, each told its
index in `CLAWHUB_WORKER_INDEX`), forwards SIGTERM/SIGINT to them, and stops them all and exits when one of them
exits on its own (a supervisor above it, Kubernetes or `clawhub up`, restarts the whole service).

Which services, and why (docs/routing.md, "Worker processes"):

- **gateway, dispatcher**: stateless, so the workers share the port (`grpc.so_reuseport`): the kernel spreads
  incoming connections over them. Each is a full replica: a dispatcher worker follows the deployer and
  acknowledges route generations under its own id, a gateway worker follows a dispatcher.
- **executor**: worker i listens on the configured port + i. The deployer preloads, and dispatchers health-check,
  each executor process by its address; behind one shared port a preload would reach one worker only, and the
  others would be called for versions they never loaded. Each worker registers itself
  (`CLAWHUB_EXECUTOR_REGISTER_WITH`) or is listed in `CLAWHUB_EXECUTOR_ADDRESSES`.
- **registry**: no: on sqlite it is the one writer of its data directory; on PostgreSQL run more registry
  replicas (each with its own data directory, which holds its lock and its upload staging) instead.
- **deployer**: no: one leader drives releases; run more replicas (leader election) for availability.

`CLAWHUB_WORKERS` is a default for the services that can run workers; the others ignore it. A service's own
variable above 1 where it cannot is refused with a SettingsError.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from services.runtime.lifeline import LIFELINE_VARIABLE, follow_supervisor
from services.runtime.settings import SettingsError, env_int

WORKER_INDEX_VARIABLE = "CLAWHUB_WORKER_INDEX"
SHARED_PORT = frozenset({"gateway", "dispatcher"})
PORT_PER_WORKER = frozenset({"executor"})
_REFUSED = {
    "deployer": "the deployer runs as one process (one leader drives releases); run more deployer replicas instead",
    "registry": "the registry runs as one process per data directory (on sqlite the one writer of its database); "
                "run more registry replicas on PostgreSQL instead",
}
STOP_TIMEOUT = 30.0


def worker_index() -> int | None:
    """This process's index among its service's workers; None when it is not a worker."""
    raw = os.environ.get(WORKER_INDEX_VARIABLE, "")
    return int(raw) if raw.isdigit() else None


def worker_count(name: str) -> int:
    """How many worker processes `name` runs (1: no supervisor). Raises SettingsError."""
    own = f"CLAWHUB_{name.upper()}_WORKERS"
    count = env_int(own, 0, minimum=0)
    if count == 0:
        count = env_int("CLAWHUB_WORKERS", 1, minimum=1)
        if name not in SHARED_PORT | PORT_PER_WORKER:
            return 1
    if count > 1 and name not in SHARED_PORT | PORT_PER_WORKER:
        raise SettingsError(f"{own}={count}: {_REFUSED.get(name, f'{name} runs as one process')}")
    return max(count, 1)


def shares_port(name: str) -> bool:
    """Whether this process is a worker whose service shares its port with the other workers."""
    return worker_index() is not None and name in SHARED_PORT


def _reserve(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound to host:port with SO_REUSEPORT (not listening, so it takes no connection): it picks the port
    when `port` is 0, and holds it for the workers until they listen."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((host.strip("[]"), port))
    return held, int(held.getsockname()[1])


def supervise(name: str, count: int, *, host: str, port: int) -> int:
    """Run `count` workers of `name` until SIGTERM/SIGINT (or one of them exits); the exit code."""
    from services.runtime.server import PortInUse, _refuse_taken_port, host_port

    lifeline = follow_supervisor()
    if lifeline is not None:
        lifeline.shutdown_budget = STOP_TIMEOUT + 5.0
    port_variable = f"CLAWHUB_{name.upper()}_PORT"
    held: socket.socket | None = None
    try:
        if name in SHARED_PORT:
            if port:
                # Another suite on the port (its sockets without SO_REUSEPORT, or ours) is refused as without workers.
                _refuse_taken_port(name, host, port, port_variable)
            held, port = _reserve(host, port)
            ports = [port] * count
        else:
            ports = [port + i if port else 0 for i in range(count)]
            for each in ports:
                if each:
                    _refuse_taken_port(name, host, each, port_variable)
    except PortInUse as exc:
        print(f"clawhub: {exc}", file=sys.stderr, flush=True)
        return 1
    # The workers stop when this process goes, however it goes: they read EOF on this pipe (services/runtime/
    # lifeline.py).
    read_end, write_end = os.pipe()
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    shown = host_port(host, port) if name in SHARED_PORT else f"{host}:{ports[0]}..{ports[-1]}"
    print(f"clawhub {name}: starting {count} workers on {shown}", file=sys.stderr, flush=True)
    for index, worker_port in enumerate(ports):
        env = dict(os.environ)
        env.update({WORKER_INDEX_VARIABLE: str(index), port_variable: str(worker_port),
                    LIFELINE_VARIABLE: str(read_end)})
        env.update(_per_worker(name, index, env))
        workers.append(subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, pass_fds=(read_end,)))
    os.close(read_end)
    code = 0
    try:
        while not stopping:
            ended = [w for w in workers if w.poll() is not None]
            if ended:
                code = ended[0].returncode or 1
                print(f"clawhub {name}: worker {workers.index(ended[0])} exited ({ended[0].returncode}); stopping "
                      "the others", file=sys.stderr, flush=True)
                stop(signal.SIGTERM, None)
                break
            time.sleep(0.2)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in workers:
            try:
                worker.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    finally:
        os.close(write_end)
        if held is not None:
            held.close()
    return code


def _per_worker(name: str, index: int, env: dict[str, str]) -> dict[str, str]:
    """Settings that must differ between workers: ids that name one process, advertised addresses of ports that
    differ, metrics ports (worker i serves its metrics on the configured port + i)."""
    changes: dict[str, str] = {}
    own_id = f"CLAWHUB_{name.upper()}_ID"
    if env.get(own_id):
        changes[own_id] = f"{env[own_id]}-{index}"
    advertised = env.get("CLAWHUB_EXECUTOR_ADVERTISE_ADDRESS", "")
    if name in PORT_PER_WORKER and advertised:
        host, _, port = advertised.rpartition(":")
        if port.isdigit():
            changes["CLAWHUB_EXECUTOR_ADVERTISE_ADDRESS"] = f"{host}:{int(port) + index}"
    metrics = env.get(f"CLAWHUB_{name.upper()}_METRICS_PORT", "")
    if metrics.isdigit() and int(metrics):
        changes[f"CLAWHUB_{name.upper()}_METRICS_PORT"] = str(int(metrics) + index)
    return changes
