"""Input schemas at the gateway: every invocation input is validated against the `input_schema` of every
version that could run it, before the call leaves the gateway (docs/validation.md).

Which versions could run a call: the dispatcher picks one by weight (and retries a failed candidate call on the
stable version), so the gateway validates against every target of the skill's route, as the dispatcher's
`GetRouteTable` lists them. The table is read again in the background once it is ROUTES_REFRESH_SECONDS old
and before any call once it is ROUTES_MAX_AGE_SECONDS old, so a route change (a deploy, a canary step, a
rollback) reaches the check within ROUTES_MAX_AGE_SECONDS. When every target has the same schema (the usual
case) the input is validated once.

Schemas: a route target carries its version's `input_schema` (the deployer copies it from the manifest when
the version is deployed), so the gateway needs no other service to check an input, whichever version is new
to it and whether or not the registry answers. Only a target of a route stored before targets carried the
schema (field unset) sends the gateway to the registry (`GetSkillVersion`), once per version, the answer kept
(versions are immutable), including "this version has no schema". Such a version whose schema cannot be read
(the registry down before the gateway ever saw it) is let through unchecked, with one WARNING line per
version, and read again after UNREADABLE_RETRY_SECONDS; redeploying the version closes that window for good.
Compiled validators are kept by the sha256 of the schema text; both caches are bounded LRUs. Once a skill's
versions are known, a call costs a dict lookup plus the validation itself (none for a skill without a
schema): no registry or dispatcher call. Validation takes time linear in the input (RE2 patterns; see
services/runtime/inputschema.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from jsonschema.protocols import Validator

from services.runtime.errors import RateLimitedLog, Reason, ServiceError, clip, describe_error, upstream_error
from services.runtime.inputschema import SchemaProblem, compile_schema, pointer

log = logging.getLogger("clawhub.gateway.schemas")

ROUTES_REFRESH_SECONDS = 0.5
ROUTES_MAX_AGE_SECONDS = 1.0
LOOKUP_TIMEOUT_SECONDS = 5.0
MAX_VERSIONS = 4096
MAX_COMPILED = 1024
# At most this many violations are reported for one input.
MAX_INPUT_VIOLATIONS = 10
# Valid inputs remembered per schema (Compiled.valid), each at most this long.
MEMO_INPUTS, MEMO_INPUT_BYTES = 512, 1024
# Schemas of newly routed versions read at once in the background.
PREFETCH_PARALLEL = 4

Target = tuple[str, str, str | None]  # (version, module digest, input_schema: '' none, None not carried)


# How long a version whose schema could not be read goes unchecked before the registry is asked again.
UNREADABLE_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Compiled:
    """A version's schema: its validator, or why it cannot be compiled (a version stored before the registry
    checked schemas)."""

    digest: str
    validator: Validator | None
    problem: str = ""
    # Inputs (up to MEMO_INPUT_BYTES) this schema accepted lately: validation is a pure function of schema and
    # input, and repeated inputs (what a cached skill sees) are not validated again.
    valid: OrderedDict[bytes, None] = field(default_factory=OrderedDict, compare=False, repr=False)

    def accepted(self, data: bytes) -> None:
        if len(data) <= MEMO_INPUT_BYTES:
            self.valid[data] = None
            if len(self.valid) > MEMO_INPUTS:
                self.valid.popitem(last=False)


class LRU:
    """A bounded mapping that forgets the least recently used entry."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            self._items.move_to_end(key)
        except KeyError:
            return default
        return self._items[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class InputSchemas:
    """Validates inputs against the schemas of the versions a skill's route could run them on."""

    def __init__(self, dispatcher: dispatcher_grpc.DispatcherServiceStub, registry: registry_grpc.RegistryServiceStub,
                 *, dispatcher_address: str = "", refresh_seconds: float = ROUTES_REFRESH_SECONDS,
                 max_age_seconds: float = ROUTES_MAX_AGE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._dispatcher = dispatcher
        self._registry = registry
        self._dispatcher_address = dispatcher_address
        self._prefetching = asyncio.Semaphore(PREFETCH_PARALLEL)
        self._refresh_seconds = refresh_seconds
        self._max_age = max_age_seconds
        self._clock = clock
        self._routes: dict[str, tuple[Target, ...]] = {}
        # skill → its route's targets as read, for the result cache (services/gateway/cache.py).
        self.route_targets: dict[str, tuple[Any, ...]] = {}
        self._generation: int | None = None
        self._fetched_at = -float("inf")
        self._refreshing: asyncio.Task[None] | None = None
        # (skill, version, digest) → Compiled, None for "no schema".
        self._versions = LRU(MAX_VERSIONS)
        # sha256 of the schema text → Compiled.
        self._compiled = LRU(MAX_COMPILED)
        self._lookups: dict[tuple[str, str, str], asyncio.Future[Compiled | None]] = {}
        # (skill, version, digest) → when its schema could not be read: unchecked until then + the retry delay.
        self._unreadable: dict[tuple[str, str, str], float] = {}
        self.unchecked_calls = 0
        # skill → the distinct schemas of its targets as (version, Compiled), for the current table.
        self._resolved: dict[str, tuple[tuple[str, Compiled], ...]] = {}
        self._log = RateLimitedLog(log)
        self.route_reads = 0
        self.registry_reads = 0
        # Whether tables are pushed (`follow`, from the dispatcher's data-plane stream) instead of polled.
        self._pushed = False

    def follow(self, table: Any) -> None:
        """A route table pushed by the dispatcher (services/gateway/dataplane.py): from now on the tables come
        this way, and GetRouteTable is no longer polled (the last table pushed stays while the stream is down,
        as the routes do)."""
        self._pushed = True
        self._apply(table)
        self._fetched_at = self._clock()

    async def check(self, skill: str, data: bytes, payload: str | None, instance: Any = None) -> None:
        """Raise INVALID_ARGUMENT / INPUT_SCHEMA_VIOLATION unless `data` (what the skill would get on stdin;
        `payload` is the request field it came from) is valid under every schema the skill's route has.
        `instance`, when given, is `data` already read as JSON (an `input` Value's objects: not read again)."""
        schemas = await self._schemas(skill)
        if not schemas:
            return
        field_name = payload or "input"
        if not data:
            raise _violation(skill, schemas[0][0], "the skill declares an input_schema: send an input (JSON)",
                             [(field_name, "no input; the skill's input_schema needs a JSON input")])
        if all(data in compiled.valid for _, compiled in schemas):
            return  # each of these schemas accepted this very input lately
        try:
            if instance is None:
                instance = _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
        except (ValueError, RecursionError) as exc:
            problem = (f"the input is not JSON ({clip(str(exc), 120)}), and the skill declares an input_schema"
                       if not isinstance(exc, RecursionError) else "the input is nested too deeply to validate")
            raise _violation(skill, schemas[0][0], problem, [(field_name, problem)]) from None
        for version, compiled in schemas:
            if compiled.validator is None:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, Reason.INPUT_SCHEMA_INVALID,
                    f"{skill}@{version} declares an input_schema that cannot be used ({compiled.problem}); "
                    "publish a version with a valid schema and deploy it",
                    metadata={"skill": skill, "version": version, "schema_digest": compiled.digest})
            try:
                errors = list(itertools.islice(compiled.validator.iter_errors(instance), MAX_INPUT_VIOLATIONS + 1))
            except RecursionError:
                problem = "the input is nested too deeply to validate"
                raise _violation(skill, version, problem, [(field_name, problem)]) from None
            if errors:
                shown = errors[:MAX_INPUT_VIOLATIONS]
                more = len(errors) > MAX_INPUT_VIOLATIONS
                first = shown[0]
                where = pointer(first.absolute_path)
                count = f"{len(shown)}{'+' if more else ''}"
                rest = f" (and {'more' if more else len(shown) - 1} more problem(s))" if len(shown) > 1 or more else ""
                raise _violation(
                    skill, version,
                    f"the input does not match the input_schema of {skill}@{version}: "
                    f"{where or 'the input'}: {clip(first.message, 300)}{rest}",
                    [(pointer(e.absolute_path), clip(e.message, 300)) for e in shown], violations=count)
            compiled.accepted(data)

    # Which schemas apply.

    async def _schemas(self, skill: str) -> tuple[tuple[str, Compiled], ...]:
        if not self._pushed:
            age = self._clock() - self._fetched_at
            if age > self._max_age:
                await self._refresh()
            elif age > self._refresh_seconds:
                self._refresh_soon()
        resolved = self._resolved.get(skill)
        if resolved is not None:
            return resolved
        targets = self._routes.get(skill, ())
        generation = self._generation
        distinct: dict[str, tuple[str, Compiled]] = {}
        for version, digest, schema in targets:
            key = (skill, version, digest)
            if schema is not None:
                compiled = self.compile(schema) if schema else None
            elif key in self._versions:
                compiled = self._versions.get(key)
            else:
                compiled = await self._lookup(key)
            if compiled is not None:
                distinct.setdefault(compiled.digest, (version, compiled))
        result = tuple(distinct.values())
        if generation == self._generation and skill in self._routes:
            self._resolved[skill] = result
        return result

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._read_routes())
            self._refreshing.add_done_callback(_quiet)

    async def _refresh(self) -> None:
        """Read the route table now (sharing a read already under way); UNAVAILABLE when it cannot be read."""
        self._refresh_soon()
        assert self._refreshing is not None
        try:
            await asyncio.shield(self._refreshing)
        except grpc.aio.AioRpcError as err:
            if self._clock() - self._fetched_at <= self._max_age:
                return  # another read succeeded meanwhile
            # The dispatcher's own status, or UPSTREAM_UNAVAILABLE naming it (logged with its address), as the
            # Dispatch call it precedes would have failed.
            raise upstream_error(err, "dispatcher", self._dispatcher_address) from None

    async def _read_routes(self) -> None:
        started = self._clock()
        self.route_reads += 1
        try:
            response = await self._dispatcher.GetRouteTable(dispatcher_pb.GetRouteTableRequest(),
                                                            timeout=LOOKUP_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError:
            raise  # logged by the caller that needed it (upstream_error)
        if not self._pushed:
            self._apply(response.route_table)
        self._fetched_at = started

    def _apply(self, table: Any) -> None:
        if table.generation != self._generation:
            self._routes = {route.skill: tuple(dict.fromkeys(
                (t.version, t.digest, t.input_schema if t.HasField("input_schema") else None) for t in route.targets))
                for route in table.routes}
            self.route_targets = {route.skill: tuple(route.targets) for route in table.routes}
            self._generation = table.generation
            self._resolved = {}
            self._prefetch()

    def _prefetch(self) -> None:
        """Read the schemas of routed versions not known yet, in the background: the calls that follow find
        them cached, and a registry outage later does not fail them."""
        wanted = [(skill, version, digest) for skill, targets in self._routes.items()
                  for version, digest, schema in targets if schema is None]
        for key in wanted[:MAX_VERSIONS]:
            if key not in self._versions and key not in self._lookups:
                task = asyncio.ensure_future(self._prefetch_one(key))
                task.add_done_callback(_quiet)

    async def _prefetch_one(self, key: tuple[str, str, str]) -> None:
        async with self._prefetching:
            if key not in self._versions:
                with contextlib.suppress(ServiceError):
                    await self._lookup(key)

    async def _lookup(self, key: tuple[str, str, str]) -> Compiled | None:
        failed_at = self._unreadable.get(key)
        if failed_at is not None and self._clock() - failed_at < UNREADABLE_RETRY_SECONDS:
            self.unchecked_calls += 1
            return None
        pending = self._lookups.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._read_version(key))
            self._lookups[key] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(key, None))
        return await asyncio.shield(pending)

    async def _read_version(self, key: tuple[str, str, str]) -> Compiled | None:
        skill, version, _digest = key
        self.registry_reads += 1
        try:
            response = await self._registry.GetSkillVersion(
                registry_pb.GetSkillVersionRequest(name=skill, version=version), timeout=LOOKUP_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as err:
            if key not in self._unreadable:
                self._log.warning("cannot read the input schema of %s@%s, so its calls go unchecked until the "
                                  "registry answers: %s", skill, version, describe_error(err))
            if len(self._unreadable) >= MAX_VERSIONS:
                self._unreadable.clear()
            self._unreadable[key] = self._clock()
            self.unchecked_calls += 1
            return None
        self._unreadable.pop(key, None)
        text = response.skill_version.manifest.input_schema
        compiled = self.compile(text) if text else None
        self._versions.put(key, compiled)
        return compiled

    def compile(self, text: str) -> Compiled:
        """The compiled schema `text`, from the cache by its sha256."""
        digest = "sha256:" + hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        compiled: Compiled | None = self._compiled.get(digest)
        if compiled is None:
            try:
                compiled = Compiled(digest, compile_schema(text))
            except SchemaProblem as exc:
                compiled = Compiled(digest, None, clip(str(exc), 300))
            self._compiled.put(digest, compiled)
        return compiled


def _violation(skill: str, version: str, message: str, field_violations: list[tuple[str, str]],
               **extra: str) -> ServiceError:
    """INVALID_ARGUMENT / INPUT_SCHEMA_VIOLATION; the BadRequest's fields are JSON pointers into the input."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.INPUT_SCHEMA_VIOLATION, message,
                        metadata={"skill": skill, "version": version, **extra}, field_violations=field_violations)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every call (json.loads with a hook builds one each time); reads bytes as json.loads does.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _quiet(task: asyncio.Future[None]) -> None:
    """Retrieve a background read's exception (logged where it happened)."""
    if not task.cancelled():
        task.exception()
