"""An address setting may name several replicas (`IP:PORT,IP:PORT` or `dns:///NAME:PORT`): calls are balanced
over the ones that are up, and one going away costs no call (services/runtime/channels.py)."""

from __future__ import annotations

import collections

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.runtime.channels import AddressError, channel, grpc_target


def test_targets() -> None:
    assert grpc_target("127.0.0.1:50052") == ("127.0.0.1:50052", ())
    assert grpc_target("registry:50052")[0] == "registry:50052"
    target, options = grpc_target("127.0.0.1:1, localhost:2")
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2" and ("grpc.lb_policy_name", "round_robin") in options
    assert grpc_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    assert grpc_target("127.0.0.1:1,127.0.0.1:2", policy="pick_first")[1] == (("grpc.lb_policy_name", "pick_first"),)
    assert grpc_target("dns:///registry.clawhub.svc:50052")[1] == (("grpc.lb_policy_name", "round_robin"),)
    with pytest.raises(AddressError, match="dns:///NAME:PORT"):
        grpc_target("registry-a:1,registry-b:2")
    with pytest.raises(AddressError, match="no port"):
        grpc_target("127.0.0.1,127.0.0.2:5")
    with pytest.raises(AddressError, match="all IPv4 or all IPv6"):
        grpc_target("127.0.0.1:1,[::1]:2")


async def _replica(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("replica", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_calls_spread_over_replicas_and_survive_one_stopping() -> None:
    # The two replicas answer differently, so the answers tell which one served.
    a, port_a = await _replica(health_pb2.HealthCheckResponse.SERVING)
    b, port_b = await _replica(health_pb2.HealthCheckResponse.NOT_SERVING)
    ch = channel(f"127.0.0.1:{port_a},127.0.0.1:{port_b}", traced=False)
    stub = health_pb2_grpc.HealthStub(ch)
    try:
        seen = collections.Counter()
        for _ in range(40):
            seen[(await stub.Check(health_pb2.HealthCheckRequest(service="replica"), timeout=5)).status] += 1
        assert seen[health_pb2.HealthCheckResponse.SERVING] >= 5, seen
        assert seen[health_pb2.HealthCheckResponse.NOT_SERVING] >= 5, seen
        await a.stop(None)
        # Every later call reaches the other replica, none fails.
        after = collections.Counter()
        for _ in range(40):
            after[(await stub.Check(health_pb2.HealthCheckRequest(service="replica"), timeout=5,
                                    wait_for_ready=True)).status] += 1
        assert after[health_pb2.HealthCheckResponse.NOT_SERVING] >= 39, after
    finally:
        await ch.close()
        await a.stop(None)
        await b.stop(None)


def test_a_bad_replica_list_stops_a_service_with_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Host names in a list (not IP:PORT) are a settings mistake: one stderr line and exit 1, no traceback; and
    the process exits (the deployer's sqlite store, opened before the address is read, is closed again)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off", "CLAWHUB_USER_AUTH": "off", "CLAWHUB_DATA_DIR": str(tmp_path),
           "CLAWHUB_DEPLOYER_HOST": "127.0.0.1", "CLAWHUB_DEPLOYER_PORT": "0",
           "CLAWHUB_REGISTRY_ADDRESS": "registry-a:50052,registry-b:50052"}
    for name in ("CLAWHUB_DATABASE_URL", "CLAWHUB_DEPLOYER_DATABASE_URL", "CLAWHUB_SUPERVISOR_FD"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "services.deployer"], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "a list of replicas takes IP:PORT entries" in done.stderr


async def test_a_former_leaders_channel_is_closed_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failover retires the former leader's channel; it is closed once its calls had time to end, so a
    long-lived gateway does not collect one open channel per failover."""
    import asyncio

    from services.runtime import leaderchannel

    monkeypatch.setattr(leaderchannel, "RETIRED_CLOSE_SECONDS", 0.05)
    opened: list[grpc.aio.Channel] = []

    def connect(address: str) -> grpc.aio.Channel:
        opened.append(grpc.aio.insecure_channel(address))
        return opened[-1]

    following = leaderchannel.LeaderChannel(grpc.aio.insecure_channel("127.0.0.1:1"), connect)
    try:
        for port in (2, 3, 4):
            following._follow(f"127.0.0.1:{port}")
        await asyncio.sleep(0.3)
        assert len(following._retired) == 0
        # Closed: a call on a former leader's channel fails at once as closed.
        with pytest.raises(Exception, match="(?i)closed"):
            await opened[0].unary_unary("/x.Y/Z")(b"", timeout=1)
    finally:
        await following.close()
