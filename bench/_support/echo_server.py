"""A bare gRPC echo server, or a relay in front of one, for bench/hot_path.py's baselines.

`python -m bench._support.echo_server` serves one generic unary method, `/bench.Echo/Call`, whose request and
response are raw bytes (no protobuf message, no parsing): the echo returns the request as the response. With
`--upstream HOST:PORT` it is a relay instead: each call is forwarded, unchanged, to the same method upstream
over one shared channel, and the upstream's answer returned. One grpc.aio process each, like a clawhub
service: client → echo is "one hop", client → relay → echo what a proxy in the data path costs, and
client → relay → relay → echo what two proxies cost (the gateway → dispatcher → executor shape of today).

Protocol on stdio: prints `listening PORT` once it serves on 127.0.0.1 (a free port); end of stdin stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

METHOD = "/bench.Echo/Call"


def _identity(data: bytes) -> bytes:
    return data


async def serve(upstream: str | None) -> None:
    if upstream:
        channel = grpc.aio.insecure_channel(upstream)
        forward = channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            response: bytes = await forward(request, timeout=context.time_remaining())
            return response
    else:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(call, request_deserializer=_identity,
                                                    response_serializer=_identity)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening {port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", help="relay every call to this echo server (HOST:PORT)")
    asyncio.run(serve(parser.parse_args().upstream))


if __name__ == "__main__":
    main()
