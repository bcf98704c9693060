"""One load-generating process for bench/hot_path.py: `python -m bench._support.loadgen SPEC_JSON`.

The benchmark starts several of these so that the load does not share a process (or a GIL) with the code it
measures, nor with each other. Each opens one grpc.aio channel to its target and keeps `concurrency` calls in
flight: `kind` "echo" calls the raw-bytes `/bench.Echo/Call` of bench/_support/echo_server.py, "invoke" calls
`GatewayService.InvokeSkill` (the admin key as `authorization: Bearer`). Every answer is checked against
`expect` when one is given.

Protocol: after `warmup` calls it prints `ready` and waits for a `go` line on stdin, so that the processes of
one run start measuring together; then it makes `calls` calls (or calls for `seconds`) and prints one JSON
line: the latency of every successful call (ms), errors counted by ErrorInfo reason (or status code when
there is none), the cache status of the answers, the seconds the run took, and the CPU seconds this process
spent in that time (what shows the generator is not the bottleneck).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

import grpc
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from google.rpc import error_details_pb2

from services.runtime.errors import error_info, status_of

ECHO_METHOD = "/bench.Echo/Call"


def _identity(data: bytes) -> bytes:
    return data


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reason_of(err: grpc.aio.AioRpcError) -> str:
    """`CODE REASON` (ErrorInfo's reason), with ` +RetryInfo` when the refusal says when to retry (deliberate
    shedding carries one)."""
    info = error_info(err)
    status = status_of(err)
    retry = any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in (status.details if status else ()))
    name = f"{err.code().name} {info.reason}" if info and info.reason else err.code().name
    return name + (" +RetryInfo" if retry else "")


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    timeout = float(spec.get("timeout", 30))
    expect = spec.get("expect")
    cache: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        if spec["kind"] == "echo":
            method = channel.unary_unary(ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity)
            payload = spec["payload"].encode()

            async def call() -> None:
                answer = await method(payload, timeout=timeout)
                if expect is not None and answer != payload:
                    raise RuntimeError(f"echo answered {answer!r}")
        else:
            stub = gateway_grpc.GatewayServiceStub(channel)
            request = gateway_pb.InvokeSkillRequest(name=spec["skill"])
            request.input.string_value = spec["payload"]
            metadata = (("authorization", f"Bearer {spec['key']}"),)

            async def call() -> None:
                response = await stub.InvokeSkill(request, timeout=timeout, metadata=metadata)
                cache[gateway_pb.CacheStatus.Name(response.cache_status)] += 1
                if expect is not None and response.output.string_value != expect:
                    raise RuntimeError(f"{spec['skill']} answered {response.output} {response.raw_output!r}")

        latencies: list[float] = []
        errors: Counter[str] = Counter()
        left = int(spec.get("calls", 0))
        until = 0.0

        async def worker(measure: bool) -> None:
            nonlocal left
            while (left > 0) if not until else (time.perf_counter() < until):
                left -= 1
                started = time.perf_counter()
                try:
                    await call()
                except grpc.aio.AioRpcError as err:
                    if measure:
                        errors[reason_of(err)] += 1
                    continue
                if measure:
                    latencies.append((time.perf_counter() - started) * 1e3)

        left = int(spec.get("warmup", 0))
        await asyncio.gather(*(worker(False) for _ in range(min(16, int(spec["concurrency"])))))
        cache.clear()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        left = int(spec.get("calls", 0))
        cpu, started = cpu_seconds(), time.perf_counter()
        if spec.get("seconds"):
            until = started + float(spec["seconds"])
        await asyncio.gather(*(worker(True) for _ in range(int(spec["concurrency"]))))
        elapsed = time.perf_counter() - started
        return {"latencies_ms": [round(x, 3) for x in latencies], "errors": dict(errors), "cache": dict(cache),
                "elapsed": elapsed, "cpu": cpu_seconds() - cpu}


def main() -> None:
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
