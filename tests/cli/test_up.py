"""`clawhub up`'s banner and restart policy, and `clawhub health` (the suite itself runs in
tests/e2e/test_supervision.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.main import main
from services.cli.up import RestartPolicy, banner, clients_find
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.registry.server import build_server as build_registry
from services.registry.settings import Settings as RegistrySettings
from services.runtime.settings import SettingsError
from tests.conftest import Starter

DEFAULT_ADDRESSES = {"registry": "127.0.0.1:50052", "executor": "127.0.0.1:50055", "deployer": "127.0.0.1:50053",
                     "dispatcher": "127.0.0.1:50054", "gateway": "127.0.0.1:50051"}


def test_the_banner_labels_every_address_with_its_service_and_role() -> None:
    text = banner(DEFAULT_ADDRESSES, Path("/data"))
    for label, address in DEFAULT_ADDRESSES.items():
        [line] = [line for line in text.splitlines() if address in line]
        role = "public: clients talk to this one" if label == "gateway" else "internal"
        assert line.split() == [label, address, *role.split()]
    assert "  data dir    /data" in text.splitlines()
    assert "clawhub up --help" in text  # how to move a port
    # On the default address the clients find the gateway by themselves: the commands to try need nothing more.
    assert "CLAWHUB_GATEWAY" not in text and "--gateway" not in text
    assert "  clawhub publish examples/skills/uppercase" in text.splitlines()


def test_the_banner_tells_the_clients_where_a_moved_gateway_is() -> None:
    for gateway in ("127.0.0.1:41901", "10.0.0.7:50051"):
        text = banner({**DEFAULT_ADDRESSES, "gateway": gateway}, Path("/data"))
        lines = text.splitlines()
        tries = lines[lines.index("Try it in another terminal:") + 1:]
        # Before the commands that need it.
        assert tries[0].startswith(f"  export CLAWHUB_GATEWAY={gateway}   # clients look at 127.0.0.1:50051 "
                                   "otherwise (or give --gateway)"), text
        assert tries[1] == "  clawhub publish examples/skills/uppercase"
    assert clients_find("0.0.0.0:50051") and clients_find("127.0.0.1:50051")
    assert not clients_find("127.0.0.1:50061") and not clients_find("192.168.1.2:50051")


def test_the_restart_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(10_000) == 30


def test_the_restart_backoff_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_UP_RESTART_DELAY", "0.2")
    monkeypatch.setenv("CLAWHUB_UP_RESTART_MAX_DELAY", "1")
    assert RestartPolicy.from_env() == RestartPolicy(first_delay=0.2, max_delay=1.0)
    monkeypatch.setenv("CLAWHUB_UP_RESTART_MAX_DELAY", "0.1")
    with pytest.raises(SettingsError, match="less than CLAWHUB_UP_RESTART_DELAY"):
        RestartPolicy.from_env()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_health_checks_the_gateway_by_default_and_every_name_with_all(
        start_service: Starter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = await start_service(build_registry(RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "registry", shutdown_grace_seconds=0.2)))
    # No deployer (nor dispatcher) where the gateway expects one: its name is NOT_SERVING at the gateway.
    gateway = await start_service(build_gateway(GatewaySettings(
        host="127.0.0.1", port=0, registry_address=f"127.0.0.1:{registry.port}",
        deployer_address=f"127.0.0.1:{free_port()}", dispatcher_address=f"127.0.0.1:{free_port()}",
        grace_seconds=0.2)))
    address = f"127.0.0.1:{gateway.port}"
    monkeypatch.setenv("CLAWHUB_GATEWAY", address)
    # The deployer's (and the dispatcher's, as GatewayService) name turns NOT_SERVING after the gateway's first
    # check of it.
    deadline = time.monotonic() + 10
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("clawhub.deployer.v1.DeployerService", "clawhub.gateway.v1.GatewayService"):
            while (await stub.Check(health_pb2.HealthCheckRequest(service=name),
                                    timeout=5)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

    assert await asyncio.to_thread(main, ["health"]) == 0
    assert capsys.readouterr().out == f"{address}: SERVING\n"

    assert await asyncio.to_thread(main, ["health", "--all"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{address}: SERVING",
        f"{address}/clawhub.deployer.v1.DeployerService: NOT_SERVING",
        f"{address}/clawhub.gateway.v1.GatewayService: NOT_SERVING",
        f"{address}/clawhub.registry.v1.AccessService: SERVING",
        f"{address}/clawhub.registry.v1.RegistryService: SERVING",
    ]

    # Any service's own address still works, with or without a name.
    registry_address = f"127.0.0.1:{registry.port}"
    assert await asyncio.to_thread(main, ["health", registry_address, "clawhub.registry.v1.RegistryService"]) == 0
    assert capsys.readouterr().out == f"{registry_address}/clawhub.registry.v1.RegistryService: SERVING\n"
    assert await asyncio.to_thread(main, ["health", registry_address, "--all"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("/clawhub.registry.v1.RegistryService: SERVING")

    assert await asyncio.to_thread(main, ["health", "--all", address, "x"]) == 2
    assert "give no SERVICE" in capsys.readouterr().err
