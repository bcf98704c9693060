"""One load-generating process for bench/hot_path.py: `python -m bench._support.loadgen SPEC_JSON`.

The benchmark starts several of these so that the load does not share a process (or a GIL) with the code it
measures, nor with each other. Each opens one grpc.aio channel to its target and keeps `concurrency` calls in
flight: `kind` "echo" calls the raw-bytes `/bench.Echo/Call` of bench/_support/echo_server.py, "invoke" calls
`GatewayService.InvokeSkill` (the admin key as `authorization: Bearer`). Every answer is checked against
`expect` when one is given.

Protocol: after `warmup` calls it prints `ready` (or, when every one of them failed, a line saying so, and
stops) and waits for a `go` line on stdin, so that the processes of one run start measuring together; then it
makes `calls` calls (or calls for `seconds`) and prints one JSON line: the latency of every successful call
(ms), errors counted by ErrorInfo reason (or status code when there is none), the cache status of the answers,
the seconds the run took, and the CPU seconds this process spent in that time (what shows the generator is not
the bottleneck).

With `rate` (calls/s) it is an open loop instead: calls are *scheduled* one every 1/rate s and `concurrency`
workers take the next slot, wait for its time and send (a slot taken more than one interval late is counted
in `late_slots`: the target, not the generator, set the pace then). `until_stdin` ends the run at the next
line (or end) on stdin instead of after `calls` or `seconds`. `timeline` adds every measured call as
`[sent, done, reason]` (`time.monotonic()` seconds, system-wide on Linux so the parent can compare them with
its own readings; reason "" for a success), and `bucket_seconds` adds `[ok, failed]` per interval of that
many seconds since the start (what shows whether a long run stayed steady).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
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
    # Each connection is a channel of its own (a local subchannel pool: channels of one process to one target
    # would otherwise share one TCP connection); the calls in flight are spread over them.
    channels = [grpc.aio.insecure_channel(spec["target"], options=(("grpc.use_local_subchannel_pool", 1),))
                for _ in range(max(1, int(spec.get("connections", 1))))]
    try:
        calls = [_caller(spec, channel, expect, timeout, cache) for channel in channels]
        return await _drive(spec, [_least_busy(calls)] if len(calls) > 1 else calls, cache)
    finally:
        for channel in channels:
            await channel.close()


def _least_busy(calls: list[Callable[[], Awaitable[None]]]) -> Callable[[], Awaitable[None]]:
    """One call over the connection with the fewest calls in flight (as an L7 balancer's least-request policy
    does in front of a service's processes): a connection that reached a busier process gets fewer calls."""
    in_flight = [0] * len(calls)

    async def call() -> None:
        index = min(range(len(calls)), key=in_flight.__getitem__)
        in_flight[index] += 1
        try:
            await calls[index]()
        finally:
            in_flight[index] -= 1

    return call


def _caller(spec: dict[str, Any], channel: grpc.aio.Channel, expect: Any, timeout: float,
            cache: Counter[str]) -> Callable[[], Awaitable[None]]:
    """One call of the spec's kind over `channel`, its answer checked."""
    if spec["kind"] == "echo":
        method = channel.unary_unary(ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity)
        payload = spec["payload"].encode()

        async def echo() -> None:
            answer = await method(payload, timeout=timeout)
            if expect is not None and answer != payload:
                raise RuntimeError(f"echo answered {answer!r}")

        return echo
    stub = gateway_grpc.GatewayServiceStub(channel)
    request = gateway_pb.InvokeSkillRequest(name=spec["skill"])
    request.input.string_value = spec["payload"]
    metadata = (("authorization", f"Bearer {spec['key']}"),)

    async def invoke() -> None:
        response = await stub.InvokeSkill(request, timeout=timeout, metadata=metadata)
        cache[gateway_pb.CacheStatus.Name(response.cache_status)] += 1
        if expect is not None and response.output.string_value != expect:
            raise RuntimeError(f"{spec['skill']} answered {response.output} {response.raw_output!r}")

    return invoke


async def _drive(spec: dict[str, Any], calls: list[Callable[[], Awaitable[None]]],
                 cache: Counter[str]) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    left = int(spec.get("calls", 0))
    until = 0.0
    rate = float(spec.get("rate", 0.0))
    until_stdin = bool(spec.get("until_stdin"))
    timeline: list[list[Any]] | None = [] if spec.get("timeline") else None
    bucket = float(spec.get("bucket_seconds", 0.0))
    buckets: list[list[int]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    next_slot, late_slots, origin = 0.0, 0, 0.0

    def record(sent: float, reason: str) -> None:
        """A measured call of the paced mode: its latency or its error, its timeline entry, its bucket."""
        done = time.monotonic()
        if reason:
            errors[reason] += 1
        else:
            latencies.append((done - sent) * 1e3)
        if timeline is not None:
            timeline.append([round(sent, 6), round(done, 6), reason])
        if bucket:
            index = int((sent - origin) / bucket)
            while len(buckets) <= index:
                buckets.append([0, 0])
            buckets[index][1 if reason else 0] += 1

    def more() -> bool:
        """Whether the paced run goes on: until its `seconds`, or the line on stdin, or `calls` are made."""
        if stop.is_set():
            return False
        if until:
            return time.perf_counter() < until
        return until_stdin or left > 0

    async def paced(call: Callable[[], Awaitable[None]]) -> None:
        """Open loop: take the next slot of the schedule, wait for its time, send (one event loop, no lock)."""
        nonlocal left, next_slot, late_slots
        interval = 1.0 / rate
        while more():
            left -= 1
            slot = next_slot
            next_slot += interval
            delay = slot - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                if stop.is_set() or (until and time.perf_counter() >= until):
                    return
            elif delay < -interval:
                late_slots += 1
            sent = time.monotonic()
            try:
                await call()
            except grpc.aio.AioRpcError as err:
                record(sent, reason_of(err))
                continue
            record(sent, "")

    warmup_answers, warmup_errors = 0, Counter[str]()

    async def worker(measure: bool, call: Callable[[], Awaitable[None]]) -> None:
        nonlocal left, warmup_answers
        while (left > 0) if not until else (time.perf_counter() < until):
            left -= 1
            started = time.perf_counter()
            try:
                await call()
            except grpc.aio.AioRpcError as err:
                if measure:
                    errors[reason_of(err)] += 1
                else:
                    warmup_errors[reason_of(err)] += 1
                continue
            warmup_answers += not measure
            if measure:
                ended = time.perf_counter()
                latencies.append((ended - started) * 1e3)
                if timeline is not None:
                    timeline.append([round(started, 6), round(ended, 6), ""])

    left = int(spec.get("warmup", 0))
    await asyncio.gather(*(worker(False, calls[i % len(calls)]) for i in range(min(16, int(spec["concurrency"])))))
    cache.clear()
    if warmup_errors and not warmup_answers:
        # Not one call of the warm-up succeeded: measuring would only count refusals of a broken target.
        print(f"every warm-up call failed: {dict(warmup_errors)}", flush=True)
        return {}
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    left = int(spec.get("calls", 0))
    cpu, started = cpu_seconds(), time.perf_counter()
    if spec.get("seconds"):
        until = started + float(spec["seconds"])
    if rate:
        if until_stdin:
            # The next line (or the end of stdin) stops the run; the calls in flight finish.
            loop.run_in_executor(None, sys.stdin.readline).add_done_callback(lambda _: stop.set())
        next_slot, origin = loop.time(), time.monotonic()
        await asyncio.gather(*(paced(calls[i % len(calls)]) for i in range(int(spec["concurrency"]))))
    else:
        await asyncio.gather(*(worker(True, calls[i % len(calls)]) for i in range(int(spec["concurrency"]))))
    elapsed = time.perf_counter() - started
    out: dict[str, Any] = {"latencies_ms": [round(x, 3) for x in latencies], "errors": dict(errors),
                           "cache": dict(cache), "elapsed": elapsed, "cpu": cpu_seconds() - cpu}
    if rate:
        out.update(rate=rate, late_slots=late_slots, origin=origin)
    if timeline is not None:
        out["timeline"] = timeline
    if bucket:
        out.update(buckets=buckets, bucket_seconds=bucket)
    return out


def main() -> None:
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
