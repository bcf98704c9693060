"""The public port never tells a caller where the platform's services live: a relayed service that is down,
a dispatcher that is down, and a dispatcher's own status naming executors all reach the caller without an
address; the gateway's log has it instead."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from clawhub.common.v1 import routing_pb2
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.rpc import error_details_pb2, status_pb2

from services.dispatcher.server import build_server as build_dispatcher
from services.dispatcher.settings import Settings as DispatcherSettings
from services.gateway.server import build_server as build_gateway
from services.gateway.settings import Settings as GatewaySettings
from services.runtime import errors
from services.runtime.errors import (
    HIDDEN_ADDRESS,
    RateLimitedLog,
    Reason,
    ServiceError,
    error_info,
    redact_addresses,
    redact_status,
    upstream_error,
)
from services.runtime.server import ServiceHost, create_server
from tests.conftest import Starter
from tests.deployer.fakes import FakeDeployer, Fakes
from tests.gateway.support import assert_no_address, start_chain

SKILL = "com.example.gone"


def dead_address() -> str:
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def no_routes(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """GetRouteTable of a dispatcher stand-in: an empty GetRouteTableResponse."""
    return b""


GatewayTo = Callable[..., Awaitable[tuple[ServiceHost, grpc.aio.Channel]]]


@pytest.fixture
async def gateway_to(start_service: Starter) -> AsyncIterator[GatewayTo]:
    channels: list[grpc.aio.Channel] = []

    async def start(**addresses: str) -> tuple[ServiceHost, grpc.aio.Channel]:
        host = await start_service(build_gateway(GatewaySettings(**{
            "host": "127.0.0.1", "port": 0, "grace_seconds": 0.5, "invoke_timeout": 5.0, "forward_timeout": 5.0,
            **addresses})))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        channels.append(channel)
        return host, channel

    yield start
    for channel in channels:
        await channel.close()


async def test_a_relayed_service_that_is_down(gateway_to: GatewayTo, caplog: pytest.LogCaptureFixture) -> None:
    registry = dead_address()
    _, channel = await gateway_to(registry_address=registry)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_grpc.RegistryServiceStub(channel).GetSkill(registry_pb.GetSkillRequest(name=SKILL), timeout=5)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(err)
    assert info is not None and info.reason == Reason.UPSTREAM_UNAVAILABLE and info.metadata["upstream"] == "registry"
    assert_no_address(err, [registry])
    assert any(registry in r.getMessage() for r in caplog.records), "the gateway logs the address instead"


async def test_a_dispatcher_that_is_down(gateway_to: GatewayTo, caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = dead_address()
    _, channel = await gateway_to(dispatcher_address=dispatcher)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.GatewayServiceStub(channel).InvokeSkill(pb.InvokeSkillRequest(name=SKILL), timeout=5)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(err)
    assert info is not None and info.reason == Reason.UPSTREAM_UNAVAILABLE and info.metadata["upstream"] == "dispatcher"
    assert_no_address(err, [dispatcher])
    assert any(dispatcher in r.getMessage() for r in caplog.records)


async def test_a_failed_upstream_call_is_logged_on_one_line_with_code_and_details(
        gateway_to: GatewayTo, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # The log is rate-limited per process: earlier tests must not have used up this test's lines.
    monkeypatch.setattr(errors, "_upstream_log", RateLimitedLog(logging.getLogger("clawhub.upstream")))
    # A dispatcher that is down: the gateway's log says which call failed, with gRPC's code and details.
    dispatcher = dead_address()
    _, channel = await gateway_to(dispatcher_address=dispatcher)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError):
        await pb_grpc.GatewayServiceStub(channel).InvokeSkill(pb.InvokeSkillRequest(name=SKILL), timeout=5)
    [line] = [r.getMessage() for r in caplog.records if r.name == "clawhub.upstream"]
    assert line.startswith(f"call to dispatcher at {dispatcher} failed: UNAVAILABLE: ") and "\n" not in line
    assert len(line) > len(f"call to dispatcher at {dispatcher} failed: UNAVAILABLE: ") + 10, "details missing"

    # Something in between (a proxy) answering with details over several lines: still one line, escaped.
    server = grpc.aio.server()

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "upstream connect error\nreset reason: overflow")

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "clawhub.dispatcher.v1.DispatcherService",
        {"Dispatch": grpc.unary_unary_rpc_method_handler(refuse),
         # An empty route table (the gateway reads it for input schemas).
         "GetRouteTable": grpc.unary_unary_rpc_method_handler(no_routes)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        _, channel = await gateway_to(dispatcher_address=f"127.0.0.1:{port}")
        caplog.clear()
        with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.GatewayServiceStub(channel).InvokeSkill(pb.InvokeSkillRequest(name=SKILL), timeout=5)
    finally:
        await server.stop(None)
    [line] = [r.getMessage() for r in caplog.records if r.name == "clawhub.upstream"]
    assert line == (f"call to dispatcher at 127.0.0.1:{port} failed: UNAVAILABLE: upstream connect error\\n"
                    "reset reason: overflow")


async def test_a_dispatcher_status_naming_executors(gateway_to: GatewayTo, start_service: Starter) -> None:
    """The dispatcher's NO_EXECUTOR_AVAILABLE names the executors it tried (for its operators); the gateway
    passes the status on without them."""
    executor = dead_address()
    table = routing_pb2.RouteTable(generation=1, routes=[routing_pb2.Route(skill=SKILL, targets=[
        routing_pb2.RouteTarget(version="1.0.0", digest="sha256:" + "ab" * 32, weight=100)])])
    fakes = Fakes(start_service)
    deployer = await fakes.deployer(FakeDeployer(table))
    # The gateway reads the version's manifest (its input_schema: none) before it dispatches.
    registry, registry_address = await fakes.registry()
    registry.add(SKILL, "1.0.0")
    dispatcher = await start_service(build_dispatcher(DispatcherSettings(
        host="127.0.0.1", port=0, deployer_address=f"127.0.0.1:{deployer.port}", executor_addresses=(executor,),
        dispatcher_id="public-errors", retries=1, dispatch_timeout=5.0, grace=0.2)))
    _, channel = await gateway_to(dispatcher_address=f"127.0.0.1:{dispatcher.port}", registry_address=registry_address)
    stub = pb_grpc.GatewayServiceStub(channel)
    err: grpc.aio.AioRpcError | None = None
    for _ in range(100):  # until the dispatcher has its route table
        try:
            await stub.InvokeSkill(pb.InvokeSkillRequest(name=SKILL), timeout=5)
        except grpc.aio.AioRpcError as caught:
            err = caught
            info = error_info(caught)
            if info is not None and info.reason == Reason.NO_EXECUTOR_AVAILABLE:
                break
    assert err is not None
    info = error_info(err)
    assert info is not None and info.reason == Reason.NO_EXECUTOR_AVAILABLE, err.details()
    assert info.metadata["skill"] == SKILL and "executors" not in info.metadata
    assert HIDDEN_ADDRESS in (err.details() or "")
    assert_no_address(err, [executor, f"127.0.0.1:{dispatcher.port}", f"127.0.0.1:{deployer.port}"])


@pytest.mark.parametrize(("text", "public"), [
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50052: Connection refused",
     f"failed to connect to all addresses; last error: UNKNOWN: {HIDDEN_ADDRESS}: Connection refused"),
    ("executors (10.0.0.7:50055, [::1]:50056, localhost:50053, [fe80::1%eth0]:50057)",
     f"executors ({HIDDEN_ADDRESS}, {HIDDEN_ADDRESS}, {HIDDEN_ADDRESS}, {HIDDEN_ADDRESS})"),
    # gRPC 1.85 writes IPv6 peers URL-encoded.
    ("peer ipv6:%5B::1%5D:50536 went away", f"peer {HIDDEN_ADDRESS} went away"),
    ("dns:///registry:50052 is down", f"{HIDDEN_ADDRESS} is down"),
    ("connect to 127.0.0.1:50052.", f"connect to {HIDDEN_ADDRESS}."),
    # What must stay: digests, times, versions, field names, and what a skill's author writes (file positions,
    # `word:number`), which is not an address however it looks.
    ("module sha256:12345abcdef… at 10:30, com.acme.x@1.0.0, env:NAME, limits.timeout_ms:2000",
     "module sha256:12345abcdef… at 10:30, com.acme.x@1.0.0, env:NAME, limits.timeout_ms:2000"),
    ("thread 'main' panicked at src/main.rs:10:5, main.c:42: Error:404, executor-2.svc.cluster.local:50055",
     "thread 'main' panicked at src/main.rs:10:5, main.c:42: Error:404, executor-2.svc.cluster.local:50055"),
])
def test_redaction(text: str, public: str) -> None:
    assert redact_addresses(text) == public


def test_known_addresses_are_redacted_by_name() -> None:
    """A host name is an address where the gateway knows it is: its configured upstreams."""
    known = ("registry.internal:50052", "deployer:50053")
    assert redact_addresses("DNS resolution failed for registry.internal:50052: not found; deployer:50053 and "
                            "deployer:500530 and my-deployer:50053", known) == (
        f"DNS resolution failed for {HIDDEN_ADDRESS}: not found; {HIDDEN_ADDRESS} and deployer:500530 and "
        "my-deployer:50053")


def _status(reason: Reason, message: str, metadata: dict[str, str]) -> status_pb2.Status:
    return ServiceError(grpc.StatusCode.ABORTED, reason, message, metadata=metadata).to_status("executor.clawhub")


def _metadata(status: status_pb2.Status) -> dict[str, str]:
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return dict(info.metadata)


def test_a_skills_own_text_is_never_rewritten() -> None:
    """stderr_tail, trap and the message of a skill's failure are the skill's words, passed on verbatim."""
    words = "panicked at src/main.rs:10:5\nmain.c:42: Error:404 (tried 10.0.0.9:8080)\n"
    for reason in (Reason.SKILL_EXIT_NONZERO, Reason.SKILL_TRAPPED):
        status = _status(reason, f"the skill trapped: {words}", {"stderr_tail": words, "trap": words})
        public = redact_status(status, ("127.0.0.1:50054",))
        assert public.message == status.message
        assert _metadata(public) == {"stderr_tail": words, "trap": words}


def test_address_metadata_values_are_redacted_from_the_message() -> None:
    """The dispatcher names the executors it tried in `executors` (dropped) and in its message: host names
    there are addresses too."""
    status = _status(Reason.NO_EXECUTOR_AVAILABLE, "no executor could run x after 2 attempt(s); last: "
                     "executor-2.svc:50055: unavailable (also tried executor-1.svc:50055)",
                     {"skill": "x", "executors": "executor-1.svc:50055,executor-2.svc:50055"})
    public = redact_status(status)
    assert public.message == (f"no executor could run x after 2 attempt(s); last: {HIDDEN_ADDRESS}: unavailable "
                              f"(also tried {HIDDEN_ADDRESS})")
    assert _metadata(public) == {"skill": "x"}


async def test_upstream_errors_name_the_service_not_its_address() -> None:
    """upstream_error puts no address in message or metadata (the deployer and dispatcher use it too, and
    their statuses reach callers through the gateway)."""
    async with grpc.aio.insecure_channel(dead_address()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/x.Y/Z")(b"", timeout=2)
    translated = upstream_error(caught.value, "registry", "127.0.0.1:1")
    assert "127.0.0.1" not in str(translated)
    assert "address" not in getattr(translated, "metadata", {})


PANIC = "thread 'main' panicked at src/main.rs:10:5:\nmain.c:42: Error:404\n"
PANIC_WAT = PANIC.replace("\n", "\\n").replace("'", "\\27")


async def test_a_failed_skills_stderr_reaches_the_caller_verbatim(start_service: Starter, tmp_path: Path) -> None:
    """Through the gateway, `stderr_tail` is what the skill wrote: file positions are not addresses."""
    skill = tmp_path / "skill"
    skill.mkdir()
    (skill / "skill.toml").write_text('name = "com.example.panics"\nversion = "1.0.0"\nabi = "wasi-command-v1"\n'
                                      'module = "panics.wat"\ncapabilities = []\n')
    (skill / "panics.wat").write_text(f"""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "{PANIC_WAT}")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const {len(PANIC)}))
        (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
        (call $proc_exit (i32.const 101))))""")
    chain = await start_chain(start_service, tmp_path, skill_dir=skill)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name="com.example.panics"), timeout=10)
    finally:
        await chain.channel.close()
    info = error_info(caught.value)
    assert info is not None and info.reason == Reason.SKILL_EXIT_NONZERO, caught.value.details()
    assert info.metadata["stderr_tail"] == PANIC
    assert_no_address(caught.value, chain.internal_addresses())


async def test_configured_host_names_are_redacted(gateway_to: GatewayTo, start_service: Starter) -> None:
    """Host names are not recognisable as addresses by their form; the gateway's own upstreams are known."""
    registry = "clawhub-registry.invalid:50052"

    async def dispatch(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE,
                           f"the registry at {registry} is down")

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "clawhub.dispatcher.v1.DispatcherService",
            {"Dispatch": grpc.unary_unary_rpc_method_handler(dispatch),
             "GetRouteTable": grpc.unary_unary_rpc_method_handler(no_routes)}),))

    async def build() -> ServiceHost:
        return create_server("dispatcher", [], host="127.0.0.1", port=0, register=register)

    dispatcher = await start_service(build())
    _, channel = await gateway_to(registry_address=registry, dispatcher_address=f"127.0.0.1:{dispatcher.port}")
    # Passed on from a service behind the gateway...
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.GatewayServiceStub(channel).InvokeSkill(pb.InvokeSkillRequest(name=SKILL), timeout=5)
    assert caught.value.details() == f"the registry at {HIDDEN_ADDRESS} is down"
    # ...and the gateway's own failure to reach it ("errors resolving clawhub-registry.invalid:50052: ...").
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_grpc.RegistryServiceStub(channel).GetSkill(registry_pb.GetSkillRequest(name=SKILL), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert registry not in (caught.value.details() or "") and HIDDEN_ADDRESS in (caught.value.details() or "")
