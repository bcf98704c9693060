"""errors.fuse: consecutive per-method interceptors run as one, with the handlers the chain would give."""

from __future__ import annotations

from typing import Any

import grpc

from services.runtime.errors import FusedInterceptors, HandlerWrappingInterceptor, fuse


class Tagging(HandlerWrappingInterceptor):
    """Wraps each handler so that the response records the wrapper (outermost first); counts its builds."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.builds = 0

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        self.builds += 1
        inner = handler.unary_unary
        tag = self.tag

        async def wrapped(request: bytes, context: Any) -> bytes:
            return tag.encode() + await inner(request, context)

        return handler._replace(unary_unary=wrapped)


class PerCall(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Does work on every call (as the platform authentication does): never fused."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.calls += 1
        return await continuation(details)


def test_only_runs_of_per_method_interceptors_are_fused() -> None:
    a, b, c = Tagging("a"), Tagging("b"), Tagging("c")
    per_call = PerCall()
    chain = fuse([a, b, per_call, c])
    assert isinstance(chain[0], FusedInterceptors) and chain[1:] == [per_call, c]
    assert fuse([per_call]) == [per_call]
    assert fuse([]) == []


async def test_a_fused_chain_answers_as_the_chain_and_builds_once_per_method() -> None:
    a, b, c = Tagging("a"), Tagging("b"), Tagging("c")
    per_call = PerCall()

    async def echo(request: bytes, context: Any) -> bytes:
        return b":" + request

    server = grpc.aio.server(interceptors=fuse([a, b, per_call, c]))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Echo/Call")
            for _ in range(5):
                assert await call(b"x", timeout=5) == b"abc:x"
        assert (a.builds, b.builds, c.builds) == (1, 1, 1)
        assert per_call.calls == 5
    finally:
        await server.stop(None)
