"""GatewayService: validate, then route the call to an executor (services/runtime/routing.py, with the routes
the dispatcher streams: services/gateway/dataplane.py), or through the dispatcher until those arrive."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.gateway.cache import ResultCache
from services.gateway.proxy import forwarded_metadata
from services.gateway.schemas import InputSchemas
from services.gateway.settings import Settings
from services.runtime import logtail, metrics
from services.runtime.auth import REQUEST_ID_METADATA
from services.runtime.channels import ENVELOPE_BYTES, VALUE_INFLATION
from services.runtime.errors import (
    DID_YOU_MEAN,
    MAX_SUGGESTIONS,
    Reason,
    ServiceError,
    did_you_mean,
    error_info,
    invalid,
    upstream_error,
)
from services.runtime.jsonvalue import dump_json, json_to_value, value_to_python
from services.runtime.names import new_request_id, skill_name_problem
from services.runtime.routing import Router, trace_metadata

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpc ships no type information
# request_id travels to every hop and into their logs: an id, not a payload (a UUID is 36 characters).
MAX_REQUEST_ID_CHARS = 128
# GetSkillStats (`clawhub top`, refreshed every second): how long each hop may take, and how many pages of
# deployments (newest first) are read for the skills' deployment states.
STATS_TIMEOUT = 5.0
DEPLOYMENT_PAGE_SIZE = 1000
MAX_DEPLOYMENT_PAGES = 5

class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(self, settings: Settings, dispatcher: grpc.aio.Channel, registry: grpc.aio.Channel,
                 deployer: grpc.aio.Channel | None = None, *, router: Router | None = None,
                 ready: Callable[[], bool] = lambda: False) -> None:
        self._settings = settings
        # Calls are routed here once `ready()` (the dispatcher's routes arrived); through Dispatch before.
        self._router = router
        self._ready = ready
        # Only for the deployment states GetSkillStats shows (the DeployerService itself is relayed as bytes).
        self._deployer = deployer_grpc.DeployerServiceStub(deployer) if deployer is not None else None
        self._dispatcher = dispatcher_grpc.DispatcherServiceStub(dispatcher)
        self._registry = registry_grpc.RegistryServiceStub(registry)
        # Inputs are validated against the input_schema of every version the skill's route could run them on.
        self.schemas = InputSchemas(self._dispatcher, self._registry, dispatcher_address=settings.dispatcher_address)
        # Results of skills that declare a cache TTL, after validation (docs/cache.md).
        self.cache = ResultCache(settings.cache_max_bytes, settings.cache_redis_url, settings.cache_redis_prefix)
        # Largest `output` Value a response can carry within the port's send limit.
        self._max_value_bytes = settings.max_response_bytes - ENVELOPE_BYTES
        # Sends this gateway's calls not reported yet (services/gateway/dataplane.py), so that GetSkillStats
        # shows them too.
        self.report_calls: Callable[[], Awaitable[None]] | None = None
        # Open TailSkillLogs relays, ended when the gateway stops (before its drain).
        self.log_follows: logtail.Follows[object] = logtail.Follows()

    async def InvokeSkill(self, request: pb.InvokeSkillRequest, context: Context) -> pb.InvokeSkillResponse:
        problem = skill_name_problem(request.name)
        if problem:
            raise invalid(Reason.INVALID_NAME, "name", problem)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise invalid(Reason.INVALID_ARGUMENT, "request_id",
                          f"request_id is {len(request.request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
        payload = request.WhichOneof("payload")
        data, instance = self._input_bytes(request, payload)
        limit = self._settings.max_input_bytes
        if len(data) > limit:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, Reason.INPUT_TOO_LARGE,
                f"the input is {len(data)} bytes; the gateway accepts at most {limit} bytes",
                metadata={"limit_bytes": str(limit)}, field_violations=[(payload or "input", "too large")])
        await self.schemas.check(request.name, data, payload, instance)
        # The cache comes after authorization (interceptors) and validation (above): docs/cache.md.
        targets = self.schemas.route_targets.get(request.name)
        plan = self.cache.plan(request.name, targets, data, request.no_cache)
        if plan is None:
            result = await self._dispatch(request, data, context)
            # BYPASS only for a skill that declares a cache; an ordinary skill's response says nothing of it.
            declared = any(t.HasField("cache_ttl") for t in targets or ())
            status = pb.CACHE_STATUS_BYPASS if declared else pb.CACHE_STATUS_UNSPECIFIED
            response = self._present(result, status)
        else:
            # An L1 hit answers the response its entry made on its first hit (nobody changes a response).
            response = await self.cache.fetch(plan, lambda: self._dispatch(request, data, context),
                                              refresh=lambda: self._detached_dispatch(request, data, context),
                                              present=self._present)
        if response.cache_status != pb.CACHE_STATUS_UNSPECIFIED:
            metrics.cache_lookup(_CACHE_LABELS[response.cache_status])
        return response

    def _present(self, result: dispatcher_pb.DispatchResponse, status: pb.CacheStatus.ValueType,
                 ) -> pb.InvokeSkillResponse:
        """The response to a call `result` answers: its output as a Value when it is JSON that fits one."""
        response = pb.InvokeSkillResponse(version=result.version, usage=result.usage, cache_status=status)
        value = json_to_value(result.output)
        # JSON can grow as a Value (see VALUE_INFLATION); only an output big enough to is measured, so the
        # usual call pays nothing for the check.
        if value is None or (len(result.output) * VALUE_INFLATION > self._max_value_bytes
                             and value.ByteSize() > self._max_value_bytes):
            response.raw_output = result.output
        else:
            response.output.CopyFrom(value)
        return response

    async def _dispatch(self, request: pb.InvokeSkillRequest, data: bytes,
                        context: Context) -> dispatcher_pb.DispatchResponse:
        if self._router is not None and self._ready():
            try:
                routed = await self._router.invoke(request.name, data, _request_id(request, context),
                                                   time_remaining=context.time_remaining,
                                                   metadata=trace_metadata(context))
            except ServiceError as err:
                if err.reason == Reason.SKILL_NOT_DEPLOYED:
                    raise await self._explain_not_deployed(request.name, err, context) from None
                raise
            return dispatcher_pb.DispatchResponse(output=routed.output, version=routed.version,
                                                  digest=routed.digest, usage=routed.usage,
                                                  executor=routed.executor)
        remaining = context.time_remaining()
        timeout = self._settings.invoke_timeout if remaining is None else max(remaining, 0.0)
        try:
            result: dispatcher_pb.DispatchResponse = await self._dispatcher.Dispatch(
                dispatcher_pb.DispatchRequest(skill=request.name, input=data, request_id=_request_id(request, context)),
                timeout=timeout, metadata=forwarded_metadata(context))
        except grpc.aio.AioRpcError as err:
            info = error_info(err)
            if info is not None and info.reason == Reason.SKILL_NOT_DEPLOYED:
                raise await self._explain_not_deployed(request.name, err, context) from None
            raise upstream_error(err, "dispatcher", self._settings.dispatcher_address) from None
        return result

    def _detached_dispatch(self, request: pb.InvokeSkillRequest, data: bytes,
                           context: Context) -> Awaitable[dispatcher_pb.DispatchResponse]:
        """This call's dispatch for a background cache refresh (docs/cache.md), awaited after the call may have
        ended: all it needs of the call is read now (grpc.aio crashes on `context.peer()` of an ended call),
        and it has a deadline of its own (the gateway's default)."""
        request_id, traced = _request_id(request, context), trace_metadata(context)
        forwarded = forwarded_metadata(context)
        timeout = self._settings.invoke_timeout

        async def dispatch() -> dispatcher_pb.DispatchResponse:
            if self._router is not None and self._ready():
                deadline = time.monotonic() + timeout
                routed = await self._router.invoke(request.name, data, request_id, metadata=traced,
                                                   time_remaining=lambda: deadline - time.monotonic())
                return dispatcher_pb.DispatchResponse(output=routed.output, version=routed.version,
                                                      digest=routed.digest, usage=routed.usage,
                                                      executor=routed.executor)
            try:
                response: dispatcher_pb.DispatchResponse = await self._dispatcher.Dispatch(
                    dispatcher_pb.DispatchRequest(skill=request.name, input=data, request_id=request_id),
                    timeout=timeout, metadata=forwarded)
            except grpc.aio.AioRpcError as err:
                raise upstream_error(err, "dispatcher", self._settings.dispatcher_address) from None
            return response

        return dispatch()

    async def GetSkillStats(self, request: pb.GetSkillStatsRequest, context: Context) -> pb.GetSkillStatsResponse:
        """The dispatcher's rolling stats, each skill with the state of its latest deployment (left empty
        when the deployer cannot say: the numbers matter more than the state)."""
        metadata = forwarded_metadata(context)
        if self.report_calls is not None:
            await self.report_calls()
        remaining = context.time_remaining()
        timeout = STATS_TIMEOUT if remaining is None else max(min(remaining, STATS_TIMEOUT), 0.0)
        try:
            stats = await self._dispatcher.GetSkillStats(
                dispatcher_pb.GetSkillStatsRequest(skill=request.skill), timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err, "dispatcher", self._settings.dispatcher_address) from None
        states = await self._deployment_states(request.skill, {s.skill for s in stats.skills}, metadata, timeout)
        for skill in stats.skills:
            skill.deployment_state = states.get(skill.skill, "")
        return pb.GetSkillStatsResponse(skills=stats.skills, executors=stats.executors)

    async def _deployment_states(self, only: str, wanted: set[str], metadata: Any, timeout: float) -> dict[str, str]:
        """The state of each wanted skill's latest deployment, from as few ListDeployments pages as it takes
        (one, unless there are more than DEPLOYMENT_PAGE_SIZE deployments); what the deployer does not answer
        is left out. Asked with the caller's credentials, which the deployer checks again."""
        states: dict[str, str] = {}
        if self._deployer is None or not wanted:
            return states
        token = ""
        for _ in range(MAX_DEPLOYMENT_PAGES):
            try:
                page = await self._deployer.ListDeployments(
                    deployer_pb.ListDeploymentsRequest(skill=only, page_size=DEPLOYMENT_PAGE_SIZE, page_token=token),
                    timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError:
                break
            for deployment in page.deployments:  # newest first: the first one of a skill is its latest
                if deployment.skill in wanted and deployment.skill not in states:
                    states[deployment.skill] = release_pb2.ReleaseState.Name(
                        deployment.state).removeprefix("RELEASE_STATE_")
            token = page.next_page_token
            if not token or wanted <= states.keys():
                break
        return states

    async def TailSkillLogs(self, request: pb.TailSkillLogsRequest,
                            context: Context) -> AsyncIterator[pb.TailSkillLogsResponse]:
        """The dispatcher's stream of every executor's lines, relayed as is; `tail` 0 asks for the default."""
        logtail.check_request(request.skill, request.version)
        upstream = dispatcher_pb.TailSkillLogsRequest(
            skill=request.skill, version=request.version, follow=request.follow,
            tail=min(request.tail or logtail.DEFAULT_TAIL, logtail.MAX_TAIL))
        remaining = context.time_remaining()
        call = self._dispatcher.TailSkillLogs(upstream, timeout=remaining, metadata=forwarded_metadata(context))
        address = self._settings.dispatcher_address
        async for response in logtail.relay(call, self.log_follows, "gateway",
                                            lambda err: upstream_error(err, "dispatcher", address)):
            yield pb.TailSkillLogsResponse(lines=response.lines)

    @staticmethod
    def _input_bytes(request: pb.InvokeSkillRequest, payload: str | None) -> tuple[bytes, Any]:
        """What the skill gets on stdin, and for an `input` Value the objects it holds (validated as they are,
        not read back from the JSON text); None for the objects of raw bytes (read when a schema needs them)."""
        if payload == "raw_input":
            return request.raw_input, None
        if payload != "input":
            # No input at all: the skill gets empty stdin, so one that needs none is called with just a name.
            return b"", None
        try:
            instance = value_to_python(request.input)
            return dump_json(instance), instance
        except (ValueError, RecursionError) as exc:
            raise invalid(Reason.INVALID_INPUT, "input", f"the input cannot be written as JSON: {exc}") from None

    async def _explain_not_deployed(self, name: str, err: grpc.aio.AioRpcError | ServiceError,
                                    context: Context) -> Exception:
        """Tell "no such skill" from "published but not deployed" (only on this error path). An unknown name
        gets the close names the dispatcher (deployed skills) and the registry (published ones) suggest."""
        try:
            # With the caller's credentials: the registry checks them too (an invoker may read the catalogue).
            found = await self._registry.GetSkill(registry_pb.GetSkillRequest(name=name), timeout=5,
                                                  metadata=forwarded_metadata(context))
        except grpc.aio.AioRpcError as lookup:
            if lookup.code() == grpc.StatusCode.NOT_FOUND:
                suggestions = list(dict.fromkeys(_suggested(err) + _suggested(lookup)))[:MAX_SUGGESTIONS]
                return ServiceError(grpc.StatusCode.NOT_FOUND, Reason.SKILL_NOT_FOUND,
                                    f"no skill named {name!r} is published{did_you_mean(suggestions)}",
                                    metadata={"skill": name, DID_YOU_MEAN: ",".join(suggestions)})
            return cast(Exception, err)
        latest = found.skill.latest_version
        hint = (f"; deploy it with `clawhub deploy {name}@{latest}`" if latest
                else "; it has no Ready version to deploy yet (publish one that passes verification)")
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, Reason.SKILL_NOT_DEPLOYED,
                            f"skill {name!r} is published but not deployed{hint}",
                            metadata={"skill": name, "latest_version": latest}, domain="dispatcher.clawhub")


_CACHE_LABELS = {status: pb.CacheStatus.Name(status).removeprefix("CACHE_STATUS_").lower()
                 for status in pb.CacheStatus.values()}


def _request_id(request: pb.InvokeSkillRequest, context: Context) -> str:
    """The call's id in every hop's logs and in its skill log lines: the caller's `request_id`, else its
    `x-request-id` metadata (when it is short enough), else one made up here."""
    if request.request_id:
        return request.request_id
    given = next((str(v) for k, v in context.invocation_metadata() or () if k == REQUEST_ID_METADATA), "")
    return given if 0 < len(given) <= MAX_REQUEST_ID_CHARS else new_request_id()


def _suggested(err: grpc.aio.AioRpcError | ServiceError) -> list[str]:
    """The close names an error's ErrorInfo suggests (`did_you_mean`)."""
    if isinstance(err, ServiceError):
        listed = err.metadata.get(DID_YOU_MEAN, "")
    else:
        info = error_info(err)
        listed = info.metadata.get(DID_YOU_MEAN, "") if info is not None else ""
    return [name for name in listed.split(",") if name]
