"""Generic request checks, run by the ErrorInterceptor on every decoded request of every service (before the
handler sees it): enum fields hold values their enum defines, required enum fields are set (not
`*_UNSPECIFIED`), and string fields are bounded in size.

- Enums: proto3 enums are open, so a client can send any number; one the enum does not define is refused
  everywhere (INVALID_ARGUMENT / INVALID_ENUM_VALUE). Proto3 cannot tell an unset enum from one set to 0, so
  whether `*_UNSPECIFIED` is allowed is decided per field in ENUM_FIELDS: True, required (0 is refused), or
  False, optional (0 means "not set" and the handler gives it its meaning). tests/runtime/test_fieldcheck.py
  walks every request type of every service and fails for an enum field missing from this table.
- Strings: at most MAX_STRING_CHARS characters each (a map's keys and values too), unless STRING_LIMITS gives
  the field another bound (INVALID_ARGUMENT / FIELD_TOO_LONG, saying the limit). Services keep their own,
  tighter checks (a request id is at most 128 characters); this bound is the floor under every field,
  including fields a handler never looks at. The strings inside a `google.protobuf.Value` (an invocation's
  JSON input) are not bounded one by one: the input as a whole is (CLAWHUB_GATEWAY_MAX_INPUT).

Field paths name the field from the request's root as the services' own errors do: `metadata.manifest.abi`,
`args[3]`, `env[NAME]`.

Cost: a plan per message type, built once, lists only the fields that need a look (strings, enums, and
messages that contain some); a type with nothing to check costs a dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.runtime.errors import MAX_VIOLATIONS, Reason, ServiceError
from services.runtime.inputschema import MAX_SCHEMA_BYTES

MAX_STRING_CHARS = 4096

# Every enum field of every request message (full field name → required). A new enum field needs an entry.
ENUM_FIELDS: Mapping[str, bool] = {
    # A manifest must say which ABI its module implements.
    "clawhub.common.v1.Manifest.abi": True,
    # An API key has exactly one role.
    "clawhub.registry.v1.CreateApiKeyRequest.role": True,
}
# The reason for a required enum that is unset or unknown, where a service already answered another one.
ENUM_REASONS: Mapping[str, Reason] = {
    "clawhub.common.v1.Manifest.abi": Reason.INVALID_MANIFEST,
    "clawhub.registry.v1.CreateApiKeyRequest.role": Reason.INVALID_ARGUMENT,
}

# Strings allowed to be longer than MAX_STRING_CHARS (full field name → characters).
STRING_LIMITS: Mapping[str, int] = {
    # The JSON Schema text (the registry bounds it to MAX_SCHEMA_BYTES of UTF-8).
    "clawhub.common.v1.Manifest.input_schema": MAX_SCHEMA_BYTES,
    "clawhub.common.v1.RouteTarget.input_schema": MAX_SCHEMA_BYTES,
    "clawhub.common.v1.Manifest.description": 16 * 1024,
    # Deploy-time env values: certificates, JSON configuration (the deployer bounds them to 32 KiB of UTF-8).
    "clawhub.deployer.v1.CreateDeploymentRequest.EnvEntry.value": 32 * 1024,
    "clawhub.executor.v1.ExecuteRequest.EnvEntry.value": 32 * 1024,
    "clawhub.executor.v1.LoadSkillRequest.EnvEntry.value": 32 * 1024,
}

# Message types whose contents are not walked: a google.protobuf.Value/Struct is JSON data, bounded as a whole.
SKIPPED_PACKAGES = ("google.protobuf.",)


@dataclass(frozen=True)
class _Field:
    name: str
    full_name: str
    kind: str  # "string", "enum", "message"
    repeated: bool
    map_value: bool  # a map: keys (strings) and values (of `kind`)
    limit: int = 0
    valid: frozenset[int] = frozenset()
    type_name: str = ""  # the enum's or the message's full name
    names: tuple[str, ...] = ()  # the enum's value names
    required: bool = False
    plan: tuple[_Field, ...] | None = None  # for messages, filled in once the plan is built


Plan = tuple[_Field, ...]
_plans: dict[str, Plan] = {}
_building: dict[str, list[_Field]] = {}


def plan_for(descriptor: Descriptor) -> Plan:
    """The fields of `descriptor` that need a look (recursively), built once per type."""
    cached = _plans.get(descriptor.full_name)
    if cached is not None:
        return cached
    return _build(descriptor)


def _build(descriptor: Descriptor) -> Plan:
    if descriptor.full_name in _building:  # a recursive type: filled in when its plan is done
        return ()
    fields: list[_Field] = []
    _building[descriptor.full_name] = fields
    try:
        for fd in descriptor.fields:
            entry = _field(fd)
            if entry is not None:
                fields.append(entry)
    finally:
        del _building[descriptor.full_name]
    plan = tuple(fields)
    _plans[descriptor.full_name] = plan
    return plan


def _field(fd: FieldDescriptor) -> _Field | None:
    repeated = fd.is_repeated
    target = fd
    is_map = False
    entry = fd.message_type if fd.type == FieldDescriptor.TYPE_MESSAGE else None
    if entry is not None and entry.GetOptions().map_entry:
        is_map = True
        target = entry.fields_by_name["value"]
    if target.type == FieldDescriptor.TYPE_STRING:
        return _Field(fd.name, target.full_name, "string", repeated, is_map,
                      limit=STRING_LIMITS.get(target.full_name, MAX_STRING_CHARS))
    if target.type == FieldDescriptor.TYPE_ENUM:
        enum = target.enum_type
        assert enum is not None
        return _Field(fd.name, target.full_name, "enum", repeated, is_map,
                      limit=MAX_STRING_CHARS, valid=frozenset(v.number for v in enum.values),
                      type_name=enum.full_name, names=tuple(v.name for v in enum.values),
                      required=ENUM_FIELDS.get(target.full_name, False))
    if target.type == FieldDescriptor.TYPE_MESSAGE:
        message_type = target.message_type
        assert message_type is not None
        if message_type.full_name.startswith(SKIPPED_PACKAGES):
            return None if not is_map else _Field(fd.name, target.full_name, "keys", repeated, True,
                                                  limit=MAX_STRING_CHARS)
        plan = plan_for(message_type)
        if not plan and message_type.full_name not in _building and not is_map:
            return None
        return _Field(fd.name, target.full_name, "message", repeated, is_map, limit=MAX_STRING_CHARS,
                      plan=plan if message_type.full_name not in _building else None,
                      type_name=message_type.full_name)
    if entry is not None and is_map and entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING:
        return _Field(fd.name, target.full_name, "keys", repeated, True, limit=MAX_STRING_CHARS)
    return None


Violation = tuple[Reason, str, str]


def _check(message: Any, plan: Plan, prefix: str, out: list[Violation]) -> None:
    for f in plan:
        value = getattr(message, f.name)
        path = prefix + f.name
        if f.map_value:
            for key in value:
                item_path = f"{path}[{key[:40] if isinstance(key, str) else key}]"
                if isinstance(key, str) and len(key) > MAX_STRING_CHARS:
                    out.append((Reason.FIELD_TOO_LONG, path,
                                f"a key of {path} is {len(key)} characters; at most {MAX_STRING_CHARS}"))
                if f.kind != "keys":
                    _one(f, value[key], item_path, out)
        elif f.repeated:
            for i, item in enumerate(value):
                _one(f, item, f"{path}[{i}]", out)
        elif f.kind == "message":
            if message.HasField(f.name):
                _one(f, value, path, out)
        else:
            _one(f, value, path, out)
        if len(out) > MAX_VIOLATIONS:
            return


def _one(f: _Field, value: Any, path: str, out: list[Violation]) -> None:
    if f.kind == "string":
        if len(value) > f.limit:
            out.append((Reason.FIELD_TOO_LONG, path, f"{path} is {len(value)} characters; at most {f.limit}"))
    elif f.kind == "enum":
        if value not in f.valid:
            known = ", ".join(f.names)
            out.append((ENUM_REASONS.get(f.full_name, Reason.INVALID_ENUM_VALUE), path,
                        f"{path}: {value} is not a value of {f.type_name} (known: {known})"))
        elif value == 0 and f.required:
            known = ", ".join(n for n in f.names if not n.endswith("_UNSPECIFIED"))
            out.append((ENUM_REASONS.get(f.full_name, Reason.INVALID_ENUM_VALUE), path,
                        f"{path} is required: set one of {known} (the unspecified value 0 is refused)"))
    elif f.kind == "message":
        plan = f.plan if f.plan is not None else _plans.get(f.type_name, ())
        if plan:
            _check(value, plan, path + ".", out)


def checker(descriptor: Descriptor | None) -> Callable[[Any], None] | None:
    """A function that raises INVALID_ARGUMENT for a decoded message of `descriptor` with an unknown enum
    value, an unset required enum or an oversize string; None when the type has nothing to check."""
    if descriptor is None:
        return None
    plan = plan_for(descriptor)
    if not plan:
        return None

    def check(message: Any) -> None:
        out: list[Violation] = []
        _check(message, plan, "", out)
        if out:
            raise request_error(out)

    return check


def problems(message: Any) -> list[Violation]:
    """The violations of a message (for tests and callers that check a message they built)."""
    out: list[Violation] = []
    _check(message, plan_for(message.DESCRIPTOR), "", out)
    return out


def request_error(violations: list[Violation]) -> ServiceError:
    reason, path, problem = violations[0]
    more = f" (and {len(violations) - 1} more problem(s))" if len(violations) > 1 else ""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, problem + more,
                        metadata={"field": path}, field_violations=[(p, d) for _, p, d in violations])
