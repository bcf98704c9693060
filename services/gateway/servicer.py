"""GatewayService: validate, then invoke through the dispatcher."""

from __future__ import annotations

from typing import Any, TypeAlias, cast

import grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc

from services.gateway.proxy import forwarded_metadata
from services.gateway.schemas import InputSchemas
from services.gateway.settings import Settings
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
from services.runtime.jsonvalue import json_to_value, value_to_json
from services.runtime.names import skill_name_problem

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpc ships no type information
# request_id travels to every hop and into their logs: an id, not a payload (a UUID is 36 characters).
MAX_REQUEST_ID_CHARS = 128

class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(self, settings: Settings, dispatcher: grpc.aio.Channel, registry: grpc.aio.Channel) -> None:
        self._settings = settings
        self._dispatcher = dispatcher_grpc.DispatcherServiceStub(dispatcher)
        self._registry = registry_grpc.RegistryServiceStub(registry)
        # Inputs are validated against the input_schema of every version the skill's route could run them on.
        self.schemas = InputSchemas(self._dispatcher, self._registry, dispatcher_address=settings.dispatcher_address)
        # Largest `output` Value a response can carry within the port's send limit.
        self._max_value_bytes = settings.max_response_bytes - ENVELOPE_BYTES

    async def InvokeSkill(self, request: pb.InvokeSkillRequest, context: Context) -> pb.InvokeSkillResponse:
        problem = skill_name_problem(request.name)
        if problem:
            raise invalid(Reason.INVALID_NAME, "name", problem)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise invalid(Reason.INVALID_ARGUMENT, "request_id",
                          f"request_id is {len(request.request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
        payload = request.WhichOneof("payload")
        data = self._input_bytes(request, payload)
        limit = self._settings.max_input_bytes
        if len(data) > limit:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, Reason.INPUT_TOO_LARGE,
                f"the input is {len(data)} bytes; the gateway accepts at most {limit} bytes",
                metadata={"limit_bytes": str(limit)}, field_violations=[(payload or "input", "too large")])
        await self.schemas.check(request.name, data, payload)
        remaining = context.time_remaining()
        timeout = self._settings.invoke_timeout if remaining is None else max(remaining, 0.0)
        try:
            result = await self._dispatcher.Dispatch(
                dispatcher_pb.DispatchRequest(skill=request.name, input=data, request_id=request.request_id),
                timeout=timeout, metadata=forwarded_metadata(context))
        except grpc.aio.AioRpcError as err:
            info = error_info(err)
            if info is not None and info.reason == Reason.SKILL_NOT_DEPLOYED:
                raise await self._explain_not_deployed(request.name, err, context) from None
            raise upstream_error(err, "dispatcher", self._settings.dispatcher_address) from None
        response = pb.InvokeSkillResponse(version=result.version, usage=result.usage)
        value = json_to_value(result.output)
        # JSON can grow as a Value (see VALUE_INFLATION); only an output big enough to is measured, so the
        # usual call pays nothing for the check.
        if value is None or (len(result.output) * VALUE_INFLATION > self._max_value_bytes
                             and value.ByteSize() > self._max_value_bytes):
            response.raw_output = result.output
        else:
            response.output.CopyFrom(value)
        return response

    @staticmethod
    def _input_bytes(request: pb.InvokeSkillRequest, payload: str | None) -> bytes:
        if payload == "raw_input":
            return request.raw_input
        if payload != "input":
            # No input at all: the skill gets empty stdin, so one that needs none is called with just a name.
            return b""
        try:
            return value_to_json(request.input)
        except (ValueError, RecursionError) as exc:
            raise invalid(Reason.INVALID_INPUT, "input", f"the input cannot be written as JSON: {exc}") from None

    async def _explain_not_deployed(self, name: str, err: grpc.aio.AioRpcError, context: Context) -> Exception:
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


def _suggested(err: grpc.aio.AioRpcError) -> list[str]:
    """The close names an error's ErrorInfo suggests (`did_you_mean`)."""
    info = error_info(err)
    listed = info.metadata.get(DID_YOU_MEAN, "") if info is not None else ""
    return [name for name in listed.split(",") if name]
