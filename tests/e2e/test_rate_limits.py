"""Token-bucket rate limits in the real suite: keyed by the authenticated principal, refused with the details a
client needs to back off, and admitted again after the refill (docs/ratelimits.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.conftest import ROOT, Bearer, Suite, start_up, stop_up, suite_env
from tests.e2e.test_users import _second_gateway, create_key, run

UPPERCASE = ROOT / "examples" / "skills" / "uppercase"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    # Invocations: 3 a second with a burst of 3, per principal and skill; reads stay at their defaults.
    running = start_up(tmp_path_factory.mktemp("ratelimits") / "data", executors=1,
                       env=suite_env(CLAWHUB_RATE_INVOKE="3/3"))
    try:
        for args in (("publish", str(UPPERCASE)), ("deploy", "com.example.uppercase@1.0.0", "--plain")):
            done = run(running, *args)
            assert done.returncode == 0, done.stderr
        yield running
    finally:
        stop_up(running)


def invoke(suite: Suite, key: str) -> grpc.RpcError | gateway_pb.InvokeSkillResponse:
    channel = grpc.intercept_channel(grpc.insecure_channel(suite.gateway), Bearer(key))
    try:
        stub = gateway_grpc.GatewayServiceStub(channel)
        return stub.InvokeSkill(gateway_pb.InvokeSkillRequest(name="com.example.uppercase", raw_input=b"hi"),
                                timeout=10)
    except grpc.RpcError as err:
        return err
    finally:
        channel.close()


def test_a_burst_over_the_bucket_is_refused_with_details_then_admitted_after_the_refill(suite: Suite,
                                                                                     tmp_path: Path) -> None:
    key = create_key(suite, "burst", "invoker")
    other = create_key(suite, "bystander", "invoker")
    results = [invoke(suite, key) for _ in range(6)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert 1 <= len(refused) <= 3, [r.details() if isinstance(r, grpc.RpcError) else r for r in results]
    assert all(not isinstance(r, grpc.RpcError) for r in results[:3])
    err = refused[0]
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    status = rpc_status.from_call(err)
    assert status is not None
    kinds = {detail.type_url.rsplit("/", 1)[-1]: detail for detail in status.details}
    info = error_details_pb2.ErrorInfo()
    kinds["google.rpc.ErrorInfo"].Unpack(info)
    assert info.reason == "RATE_LIMITED" and info.metadata["class"] == "invoke"
    assert info.metadata["skill"] == "com.example.uppercase"
    # The bucket is the key's, named by its id (never the secret).
    key_id = key.split("_")[1]
    assert info.metadata["key"].endswith(f"chk_{key_id}") or f"chk_{key_id}" in info.metadata["key"]
    assert key not in str(status)
    retry = error_details_pb2.RetryInfo()
    kinds["google.rpc.RetryInfo"].Unpack(retry)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 1
    assert "google.rpc.QuotaFailure" in kinds
    trailers = dict(err.trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1

    # Another principal has its own bucket: not refused while the first one is empty.
    assert not isinstance(invoke(suite, other), grpc.RpcError)
    # After the refill the first key is admitted again.
    time.sleep(retry.retry_delay.ToTimedelta().total_seconds() + 0.4)
    assert not isinstance(invoke(suite, key), grpc.RpcError)


def test_two_gateway_processes_against_one_redis_hold_one_limit_together(
        tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_prefix: str) -> None:
    rate, burst, seconds = 20, 20, 2.0
    limits = dict(CLAWHUB_RATE_INVOKE=f"{rate}/{burst}", CLAWHUB_RATE_BACKEND="redis",
                  CLAWHUB_RATE_REDIS_URL=redis_url, CLAWHUB_RATE_REDIS_PREFIX=redis_prefix)
    running = start_up(tmp_path_factory.mktemp("ratelimits-redis") / "data", executors=1, env=suite_env(**limits))
    second = None
    try:
        for args in (("publish", str(UPPERCASE)), ("deploy", "com.example.uppercase@1.0.0", "--plain")):
            done = run(running, *args)
            assert done.returncode == 0, done.stderr
        key = create_key(running, "shared", "invoker")
        second, address = _second_gateway(running, **limits)
        admitted: list[int] = []
        refused: list[int] = []

        def hammer(gateway: str) -> None:
            channel = grpc.intercept_channel(grpc.insecure_channel(gateway), Bearer(key))
            stub = gateway_grpc.GatewayServiceStub(channel)
            request = gateway_pb.InvokeSkillRequest(name="com.example.uppercase", raw_input=b"hi")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    stub.InvokeSkill(request, timeout=10)
                    admitted.append(1)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                    refused.append(1)
            channel.close()

        workers = [threading.Thread(target=hammer, args=(g,)) for g in (running.gateway, address) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        # One bucket for both: the burst plus what it refills over the window, not twice that.
        limit = burst + rate * seconds
        assert refused, "the load never reached the limit"
        assert abs(len(admitted) - limit) <= 0.1 * limit + 2, (len(admitted), limit, len(refused))
    finally:
        if second is not None:
            second.terminate()
            second.wait(10)
            if second.stdout is not None:
                second.stdout.close()
        stop_up(running)
