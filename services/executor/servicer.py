"""ExecutorService: load modules by digest and run them, one fresh sandbox per call."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeAlias

import grpc
from clawhub.common.v1 import observability_pb2, skill_pb2
from clawhub.executor.v1 import executor_service_pb2 as pb
from clawhub.executor.v1 import executor_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from services.executor.bundles import BundleCache
from services.executor.dependencies import DependencyLinker
from services.executor.hostapi import HostGrant
from services.executor.kvstore import KvNamespace, KvStore, scratch_store
from services.executor.modules import ModuleLoader
from services.executor.outbound import OutboundHttp
from services.executor.provenance import Provenance, unchecked
from services.executor.sandbox import (
    NO_GRANT,
    CompiledModule,
    Grant,
    RunControl,
    RunLimits,
    RunResult,
    Sandbox,
    Verdict,
)
from services.executor.scheduling import Overloaded, WorkerPool
from services.executor.settings import Settings
from services.executor.skilllogs import SkillLogs
from services.runtime import logs, logtail, metrics, tracing
from services.runtime.errors import MAX_DETAIL_CHARS, Reason, ServiceError, invalid, show_bytes
from services.runtime.mux import MuxServer
from services.runtime.names import digest_problem
from services.runtime.wasm import FILES_CAPABILITY, KV_CAPABILITY

log = logging.getLogger("clawhub.executor")
# The scratch key-value store of the LoadSkill whose smoke examples are running (`_smoke_test`), if any.
_SMOKE_KV: contextvars.ContextVar[KvStore | None] = contextvars.ContextVar("clawhub_smoke_kv", default=None)

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpc ships no type information

STDERR_TAIL_BYTES = 1024
# wasmtime keeps fuel in a signed 64-bit counter.
MAX_FUEL = (1 << 63) - 1


class Health(Protocol):
    """The part of the grpc health servicer the executor uses for per-digest health."""

    async def set(self, service: str, status: Any) -> None: ...


def _check_digest(digest: str, field_name: str = "digest") -> None:
    problem = digest_problem(digest)
    if problem:
        raise invalid(Reason.INVALID_DIGEST, field_name, problem)


def _check_strings(request: pb.ExecuteRequest) -> None:
    # WASI hands argv and the environment to the guest as C strings: a NUL would silently cut them.
    for i, arg in enumerate(request.args):
        if "\0" in arg:
            raise invalid(Reason.INVALID_ARGUMENT, f"args[{i}]", "arguments cannot contain NUL characters")
    for name, value in request.env.items():
        if "\0" in name or "\0" in value or "=" in name:
            raise invalid(Reason.INVALID_ARGUMENT, f"env[{name!r}]",
                          "environment names cannot contain NUL or `=`, values cannot contain NUL")


def _tail(stderr: bytes) -> str:
    """The end of a failed call's stderr: the lines just before a failure are what explains it. ErrorInfo
    metadata values are clipped to their first MAX_DETAIL_CHARS characters, so cut from the front here."""
    text = stderr[-STDERR_TAIL_BYTES:].decode("utf-8", errors="replace")
    return text if len(text) <= MAX_DETAIL_CHARS else "…" + text[-(MAX_DETAIL_CHARS - 1):]


# A call running on the event loop (`ExecutorServicer._run_inline`) is stopped after this long (one epoch tick
# of the sandbox, so 10-20 ms at worst) and run again on the worker pool.
INLINE_CAP_SECONDS = 0.01
# Calls over the `inline` setting (CPU time) after which a module's calls go to the worker pool.
INLINE_STRIKES = 3


class ExecutorServicer(pb_grpc.ExecutorServiceServicer):
    def __init__(self, settings: Settings, loader: ModuleLoader, sandbox: Sandbox, pool: WorkerPool,
                 health: Health | None = None, bundles: BundleCache | None = None,
                 provenance: Provenance | None = None, links: DependencyLinker | None = None,
                 skill_logs: SkillLogs | None = None, kv: KvStore | None = None,
                 http: OutboundHttp | None = None) -> None:
        self._settings = settings
        # The `kv` capability's store (services/executor/kvstore.py); None: kv calls get E_DENIED.
        self._kv = kv
        # Skills' outbound HTTP, for calls of skills with `http:HOST` capabilities.
        self._http = http
        # Every call's stderr, kept per skill version for TailSkillLogs (services/executor/skilllogs.py).
        self.skill_logs = skill_logs or SkillLogs()
        # Links modules that import from dependency packages with the resolution their call carries.
        self._links = links or DependencyLinker(loader.source, sandbox)
        # Without a registry to ask, every request is refused, never run unchecked.
        self._provenance = provenance or unchecked()
        self._loader = loader
        self._sandbox = sandbox
        self._pool = pool
        self._bundles = bundles
        # Set by the composition root once the server (and its health servicer) exists.
        self.health = health
        # Serves ExecuteStream (services/runtime/mux.py); set by the composition root, which builds it with the
        # server's interceptors.
        self.execute_stream: MuxServer | None = None
        self._health_names: set[str] = set()
        # Digests whose calls no longer run inline (`_run_inline`): stopped at the cap, or too slow too often.
        self._pooled: set[str] = set()
        self._slow_inline: dict[str, int] = {}  # digest: its inline calls over the `inline` setting so far

    def _limits(self, requested: skill_pb2.Limits, deadline: float | None) -> tuple[RunLimits, int]:
        """Resolve the call's limits: zero takes the default, anything above the ceiling is capped.
        Returns the run limits and the input limit."""
        s = self._settings

        def pick(value: int, default: int, ceiling: int) -> int:
            return min(value or default, ceiling)

        timeout = s.default_timeout
        if requested.HasField("timeout") and requested.timeout.ToNanoseconds() > 0:
            timeout = requested.timeout.ToNanoseconds() / 1e9
        run = RunLimits(
            memory_bytes=pick(requested.memory_bytes, s.default_memory, s.max_memory),
            timeout_seconds=min(timeout, s.max_timeout),
            max_output_bytes=pick(requested.max_output_bytes, s.max_output, s.max_output),
            max_stderr_bytes=pick(requested.max_stderr_bytes, s.max_stderr, s.max_stderr),
            deadline=deadline,
            fuel=min(requested.fuel, MAX_FUEL),
        )
        return run, pick(requested.max_input_bytes, s.max_input, s.max_input)

    async def _mark_serving(self, digest: str) -> None:
        if self.health is not None:
            self._health_names.add(digest)
            await self.health.set(digest, health_pb2.HealthCheckResponse.SERVING)

    async def trust_changed(self, digest: str, runnable: bool, why: str) -> None:
        """A loaded digest's provenance re-check revoked or restored it: its per-digest health follows, so
        a release watching it (and an operator) sees that it cannot run."""
        if self.health is not None and digest in self._health_names:
            await self.health.set(digest, health_pb2.HealthCheckResponse.SERVING if runnable
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    @metrics.observe_execute  # per skill version: calls, failures by reason, time, fuel (docs/metrics.md)
    async def Execute(self, request: pb.ExecuteRequest, context: Context) -> pb.ExecuteResponse:
        digest = request.digest
        _check_digest(digest)
        await self._provenance.check(request.skill, request.version, digest, request.bundle_digest,
                                     request.capabilities, request.dependencies)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        limits, max_input = self._limits(request.limits, deadline)
        if len(request.input) > max_input:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, Reason.INPUT_TOO_LARGE,
                f"the input is {len(request.input)} bytes; this call accepts at most {max_input} bytes",
                metadata={"field": "input", "input_bytes": str(len(request.input)),
                          "max_input_bytes": str(max_input)},
                field_violations=[("input", f"at most {max_input} bytes")])
        _check_strings(request)
        capabilities = list(request.capabilities)
        if self._loader.is_hot(digest, metered=limits.fuel > 0):
            # Hot: a dict lookup, an attribute of the Execute span rather than a span of its own.
            compiled, _ = await self._loader.get(digest, capabilities, metered=limits.fuel > 0)
            tracing.annotate({"clawhub.module.tier": "hot"})
        else:
            with tracing.span("executor.module_load") as span:
                # The tier (warm or cold) is set by the loader when it loads.
                compiled, hot = await self._loader.get(digest, capabilities, metered=limits.fuel > 0)
                if hot and span.is_recording():  # another call loaded it meanwhile
                    span.set_attributes({"clawhub.module.tier": "hot", "clawhub.skill.digest": digest})
        compiled = await self._links.link(compiled, request.dependencies)
        bundle_dir = await self._bundle_dir(request.bundle_digest, capabilities)
        grant = Grant.of(capabilities, env=request.env, args=request.args, bundle_dir=bundle_dir,
                         kv=self._kv_namespace(request, capabilities), http=self._http)
        stdin = bytes(request.input)
        control = RunControl()
        # The worker thread does not inherit the event loop's context: the trace's is passed along.
        parent = tracing.current_context()
        result = self._run_inline(request, compiled, stdin, limits, parent) if self._inlines(compiled, limits) \
            else None
        # No free thread: the call waits (no thread held) for its skill's fair turn, and is shed only when its
        # deadline cannot be met or the waiting calls are at their bound (services/executor/scheduling.py).
        try:
            if result is None:
                result = await self._pool.run(
                    (lambda: self._sandbox.run(compiled, stdin, limits, grant, control)) if parent is None
                    else (lambda: _traced_run(self._sandbox, parent, request, compiled, stdin, limits, grant,
                                              control)),
                    key=request.skill or digest, cost_key=digest, deadline=deadline, timeout=limits.timeout_seconds)
        except Overloaded as exc:
            log.info("%s: shed (%s): %s", digest[:19], exc.cause, exc.message)
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.EXECUTOR_OVERLOADED, exc.message,
                metadata={"capacity": str(self._pool.capacity), "cause": exc.cause},
                retry_after_seconds=exc.retry_after) from None
        except asyncio.CancelledError:
            # The caller went away (cancelled, or its deadline passed): stop the sandbox so its worker
            # thread is free again within one epoch slice, instead of at the skill's own timeout.
            control.cancel()
            raise
        if grant.host is not None and grant.host.usage:
            tracing.annotate({"clawhub.kv.operations": grant.host.kv_operations})
        if request.skill and result.stderr:  # nothing to keep (and no metadata to read) for most calls
            self.skill_logs.record(request.skill, request.version, digest, result.stderr,
                                   request_id=request.request_id, trace_id=_trace_id(context),
                                   cut=result.verdict is Verdict.STDERR_LIMIT)
        return self._respond(digest, request.request_id, limits, result, grant.host)

    async def ExecuteStream(  # type: ignore[override]  # writes with context.write, as grpc.aio allows
            self, requests: AsyncIterator[pb.ExecuteStreamRequest], context: Context) -> None:
        """Execute calls multiplexed on one stream: each runs as an Execute (checks, span, metrics, status)."""
        if self.execute_stream is None:
            raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, Reason.METHOD_NOT_EXPOSED,
                               "this executor serves Execute calls one RPC each (no ExecuteStream)")
        await self.execute_stream.serve(requests, context)

    def _inlines(self, compiled: CompiledModule, limits: RunLimits) -> bool:
        """Whether this call runs on the event loop: its module imports nothing (memory-v1 on the raw path: it
        cannot see or change anything outside its fresh instance, so a run stopped early can simply be run
        again), has not been sent to the pool, and the call's budget is well above the inline cap."""
        if not (self._settings.inline and compiled.raw_pre) or compiled.digest in self._pooled:
            return False
        budget = limits.timeout_seconds
        if limits.deadline is not None:
            budget = min(budget, limits.deadline - time.monotonic())
        return budget > 4 * INLINE_CAP_SECONDS

    def _run_inline(self, request: pb.ExecuteRequest, compiled: CompiledModule, stdin: bytes, limits: RunLimits,
                    parent: Any) -> RunResult | None:
        """The call run right here, with no thread handoff (a quick call costs microseconds; a handoff to a
        worker thread and back costs far more, and more again when the GIL is contended), within
        INLINE_CAP_SECONDS. A call stopped at the cap returns None, to be run again on the pool with the call's
        limits, and its module goes to the pool from now on; so does a module whose calls took more CPU time
        than the `inline` setting INLINE_STRIKES times (CPU time of this thread, which a busy machine's
        preemption does not inflate, unlike wall time)."""
        capped = dataclasses.replace(limits, timeout_seconds=INLINE_CAP_SECONDS, deadline=None)
        cpu = time.thread_time()
        result = (self._sandbox.run(compiled, stdin, capped) if parent is None
                  else _traced_run(self._sandbox, parent, request, compiled, stdin, capped, NO_GRANT, RunControl()))
        cpu = time.thread_time() - cpu
        if result.verdict is Verdict.TIMEOUT:
            self._to_pool(compiled.digest, f"a call ran past {INLINE_CAP_SECONDS * 1e3:.0f} ms")
            return None
        if cpu > self._settings.inline:
            strikes = self._slow_inline[compiled.digest] = self._slow_inline.get(compiled.digest, 0) + 1
            if strikes >= INLINE_STRIKES:
                self._to_pool(compiled.digest, f"{strikes} calls took over {self._settings.inline * 1e3:g} ms "
                                               f"(the last {cpu * 1e3:.1f} ms)")
        return result

    def _to_pool(self, digest: str, why: str) -> None:
        self._pooled.add(digest)
        self._slow_inline.pop(digest, None)
        log.info("%s: runs on the worker pool from now on (%s)", digest[:19], why)

    def _kv_namespace(self, request: pb.ExecuteRequest, capabilities: list[str]) -> KvNamespace | None:
        """The call's key-value namespace with `kv`: its skill's (by name, so shared by every version), or,
        for a smoke example, the LoadSkill's scratch store's, so that examples never touch real state."""
        if KV_CAPABILITY not in capabilities:
            return None
        store = _SMOKE_KV.get() or self._kv
        return None if store is None else store.namespace(request.skill or request.digest)

    async def _bundle_dir(self, bundle_digest: str, capabilities: list[str]) -> str | None:
        """The host directory to preopen at /skill: the bundle's, an empty one when the skill declares
        `files` without a bundle, none without `files` (its bundle, if any, is not even fetched)."""
        if FILES_CAPABILITY not in capabilities:
            return None
        if self._bundles is None:  # the composition root always gives one; a bug, so INTERNAL
            raise RuntimeError("the executor was built without bundle storage")
        if not bundle_digest:
            return str(await self._bundles.empty())
        _check_digest(bundle_digest, "bundle_digest")
        return str(await self._bundles.get(bundle_digest))

    def _respond(self, digest: str, request_id: str, limits: RunLimits,
                 result: RunResult, host: HostGrant | None = None) -> pb.ExecuteResponse:
        short = digest[:19]
        log.debug("%s: %s in %.1f ms (request %s)", short, result.verdict.value, result.wall_seconds * 1e3,
                  request_id or "-")
        if result.verdict is Verdict.OK:
            usage = skill_pb2.Usage(peak_memory_bytes=result.peak_memory_bytes,
                                    fuel_consumed=result.fuel_consumed)
            usage.wall_time.FromNanoseconds(int(result.wall_seconds * 1e9))
            if host is not None:  # what the host functions did (kv, http)
                usage.kv_operations = host.kv_operations
                if host.http is not None:
                    usage.http_requests = host.http.usage.requests
                    usage.http_bytes_sent = host.http.usage.bytes_sent
                    usage.http_bytes_received = host.http.usage.bytes_received
            return pb.ExecuteResponse(output=result.output, stderr=result.stderr, usage=usage)
        error = self._failure(digest, limits, result)
        log.info("%s: %s (%s) request %s", short, error.reason, error.message, request_id or "-")
        raise error

    def _failure(self, digest: str, limits: RunLimits, result: RunResult) -> ServiceError:
        meta = {"digest": digest}
        v = result.verdict
        if v is Verdict.EXIT_NONZERO:
            return ServiceError(
                grpc.StatusCode.ABORTED, Reason.SKILL_EXIT_NONZERO,
                f"the skill exited with code {result.exit_code}",
                metadata={**meta, "exit_code": str(result.exit_code), "stderr_tail": _tail(result.stderr)})
        if v is Verdict.TRAPPED:
            return ServiceError(
                grpc.StatusCode.ABORTED, Reason.SKILL_TRAPPED, f"the skill trapped: {result.detail}",
                metadata={**meta, "trap": result.detail, "stderr_tail": _tail(result.stderr)})
        if v is Verdict.TIMEOUT:
            timeout_ms = round(result.budget_seconds * 1000)
            return ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, Reason.SKILL_TIMEOUT,
                f"the skill did not finish within its {timeout_ms} ms wall-clock limit",
                metadata={**meta, "timeout_ms": str(timeout_ms), "stderr_tail": _tail(result.stderr)})
        if v is Verdict.MEMORY_LIMIT:
            return ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.MEMORY_LIMIT_EXCEEDED,
                f"the skill needed more than its {limits.memory_bytes} bytes of memory",
                metadata={**meta, "memory_limit_bytes": str(limits.memory_bytes),
                          "peak_memory_bytes": str(result.peak_memory_bytes),
                          **({"trap": result.detail} if result.detail else {})})
        if v is Verdict.OUTPUT_LIMIT:
            return ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OUTPUT_LIMIT_EXCEEDED,
                f"the skill wrote more than its {limits.max_output_bytes} bytes of output",
                metadata={**meta, "max_output_bytes": str(limits.max_output_bytes)})
        if v is Verdict.STDERR_LIMIT:
            return ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.STDERR_LIMIT_EXCEEDED,
                f"the skill wrote more than its {limits.max_stderr_bytes} bytes of stderr",
                metadata={**meta, "max_stderr_bytes": str(limits.max_stderr_bytes),
                          "stderr_tail": _tail(result.stderr)})
        if v is Verdict.CANCELLED:  # only seen if the cancellation raced with the end of the run
            return ServiceError(grpc.StatusCode.CANCELLED, Reason.DEADLINE_EXCEEDED,
                                "the call was cancelled while the skill ran", metadata=meta)
        if v is Verdict.FUEL_EXHAUSTED:
            return ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.FUEL_EXHAUSTED,
                f"the skill used up its budget of {limits.fuel} fuel units",
                metadata={**meta, "fuel": str(limits.fuel)})
        raise AssertionError(f"unhandled verdict {v}")

    async def LoadSkill(self, request: pb.LoadSkillRequest, context: Context) -> pb.LoadSkillResponse:
        _check_digest(request.digest)
        await self._provenance.check(request.skill, request.version, request.digest, request.bundle_digest,
                                     request.capabilities, request.dependencies)
        capabilities = list(request.capabilities)
        compiled, was_hot = await self._loader.get(request.digest, capabilities)
        await self._links.link(compiled, request.dependencies)
        await self._bundle_dir(request.bundle_digest, capabilities)
        if request.examples:
            with tracing.span("executor.smoke") as span:
                if span.is_recording():
                    span.set_attributes({"clawhub.skill": request.skill, "clawhub.skill.version": request.version,
                                         "clawhub.smoke.examples": len(request.examples)})
                await self._smoke_test(request, context)
        await self._mark_serving(request.digest)
        return pb.LoadSkillResponse(digest=request.digest, already_loaded=was_hot)

    async def _smoke_test(self, request: pb.LoadSkillRequest, context: Context) -> None:
        """`_smoke_examples`, with `kv` calls on one empty scratch store for all the examples, in order: a
        counter's examples can say 1, 2, 3, and a deploy never changes (or depends on) the skill's real state."""
        token = _SMOKE_KV.set(scratch_store(self._kv.limits if self._kv is not None else None))
        try:
            await self._smoke_examples(request, context)
        finally:
            _SMOKE_KV.reset(token)

    async def _smoke_examples(self, request: pb.LoadSkillRequest, context: Context) -> None:
        """Run the manifest's examples exactly as calls would run (same limits and grants); any failure or
        output that differs by one byte keeps the digest from reporting SERVING."""
        for index, example in enumerate(request.examples):
            call = pb.ExecuteRequest(digest=request.digest, input=example.input, limits=request.limits,
                                     env=request.env, args=request.args, bundle_digest=request.bundle_digest,
                                     capabilities=request.capabilities, request_id=f"smoke-{index}",
                                     dependencies=request.dependencies, skill=request.skill,
                                     version=request.version)
            meta = {"digest": request.digest, "example": str(index)}
            try:
                output = (await self.Execute(call, context)).output
            except ServiceError as exc:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, Reason.SMOKE_TEST_FAILED,
                    f"smoke example {index} failed: {exc.message}",
                    metadata={**meta, "cause": str(exc.reason)}) from None
            if output != example.expected_output:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, Reason.SMOKE_TEST_FAILED,
                    f"smoke example {index} printed {_show(output)} instead of {_show(example.expected_output)}",
                    metadata={**meta, "expected": _show(example.expected_output), "actual": _show(output)})
        if request.examples:
            log.info("%s: %d smoke example(s) passed", request.digest[:19], len(request.examples))

    async def UnloadSkill(self, request: pb.UnloadSkillRequest, context: Context) -> pb.UnloadSkillResponse:
        _check_digest(request.digest)
        was_loaded = self._loader.drop(request.digest)
        self._links.drop(request.digest)
        if self.health is not None and (was_loaded or request.digest in self._health_names):
            self._health_names.discard(request.digest)
            await self.health.set(request.digest, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("%s: unloaded (was loaded: %s)", request.digest[:19], was_loaded)
        return pb.UnloadSkillResponse(was_loaded=was_loaded)

    async def GetLoad(self, request: pb.GetLoadRequest, context: Context) -> pb.GetLoadResponse:
        """The worker pool's use now, for `clawhub top` (through the dispatcher, which names executors)."""
        busy, queued = self._pool.load()
        return pb.GetLoadResponse(load=observability_pb2.ExecutorLoad(
            reachable=True, busy_threads=busy, threads=self._pool.threads, queued=queued,
            queue_capacity=self._pool.queue))


    async def TailSkillLogs(self, request: pb.TailSkillLogsRequest,
                            context: Context) -> AsyncIterator[pb.TailSkillLogsResponse]:
        """The skill's kept stderr lines (the newest `tail`), then with `follow` an empty response (the kept
        lines are all sent: the dispatcher waits for it) and each new line as calls end, until the caller
        cancels or the executor stops (UNAVAILABLE)."""
        logtail.check_request(request.skill, request.version)
        lines, follower = self.skill_logs.open(request.skill, request.version,
                                               min(request.tail, logtail.MAX_TAIL), request.follow)
        try:
            for batch in logtail.batches(lines):
                yield pb.TailSkillLogsResponse(lines=batch)
            if follower is None:
                return
            yield pb.TailSkillLogsResponse()
            while (new := await follower.next_batch()) is not None:
                for batch in logtail.batches(new):
                    yield pb.TailSkillLogsResponse(lines=batch)
            raise logtail.shutting_down("executor")
        finally:
            if follower is not None:
                self.skill_logs.unfollow(follower)


def _trace_id(context: Context) -> str:
    """The call's trace id: its `traceparent`'s, else the current span's (empty when it is not traced)."""
    return logtail.trace_id_of(context.invocation_metadata()) or logs.current_ids()[0]


def _traced_run(sandbox: Sandbox, parent: Any, request: pb.ExecuteRequest, compiled: CompiledModule,
                stdin: bytes, limits: RunLimits, grant: Grant, control: RunControl) -> RunResult:
    """`sandbox.run` inside a `sandbox.run` span, on the worker thread, as a child of `parent` (the Execute
    call's context); the span says what ran and how it ended."""
    with tracing.span("sandbox.run", context=parent) as span:
        result = sandbox.run(compiled, stdin, limits, grant, control)
        if span.is_recording():
            span.set_attributes({
                "clawhub.skill": request.skill, "clawhub.skill.version": request.version,
                "clawhub.skill.digest": compiled.digest, "clawhub.skill.abi": compiled.abi.name,
                "clawhub.sandbox.verdict": result.verdict.value, "clawhub.sandbox.exit_code": result.exit_code,
                "clawhub.sandbox.peak_memory_bytes": result.peak_memory_bytes,
                "clawhub.sandbox.memory_limit_bytes": limits.memory_bytes,
                "clawhub.sandbox.fuel": limits.fuel, "clawhub.sandbox.fuel_consumed": result.fuel_consumed,
                "clawhub.sandbox.wall_ms": round(result.wall_seconds * 1e3, 3),
                "clawhub.sandbox.input_bytes": len(stdin), "clawhub.sandbox.output_bytes": len(result.output)})
            if result.detail:
                span.set_attribute("clawhub.sandbox.detail", result.detail)
            if result.verdict is not Verdict.OK:
                tracing.fail(span, result.verdict.value)
        return result


def _show(data: bytes, limit: int = 200) -> str:
    return show_bytes(data, limit)  # text in quotes, not a Python bytes repr
