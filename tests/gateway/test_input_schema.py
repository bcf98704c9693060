"""A skill's `input_schema` is enforced by a real gateway before the call goes on: a violation is
INVALID_ARGUMENT / INPUT_SCHEMA_VIOLATION with a BadRequest of JSON pointers into the input; every version the
route could run a call on must accept it; schemas are read once and kept (also "no schema"); an invalid
schema is refused at publish, by the registry and by the CLI, in the same words."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import routing_pb2
from clawhub.gateway.v1 import gateway_service_pb2 as pb
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.protobuf import json_format, struct_pb2

from services.cli import manifest
from services.runtime.errors import bad_request, error_info
from tests.conftest import Starter
from tests.deployer.fakes import eventually
from tests.gateway.support import ECHO, ECHO_SKILL, Chain, publish_dir, start_chain

SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 20},
        "items": {"type": "array", "items": {"type": "object", "required": ["id"],
                                             "properties": {"id": {"type": "integer"}}}},
    },
    "required": ["text"],
}


def skill_dir(tmp_path: Path, version: str, schema: Any, name: str = "echo") -> Path:
    """The echo-memory example as `version`, with `schema` as its input_schema (None: none)."""
    directory = tmp_path / f"{name}-{version}"
    shutil.copytree(ECHO, directory)
    toml = (directory / "skill.toml").read_text().replace('version = "1.0.0"', f'version = "{version}"')
    # The smoke examples are not JSON objects; the schema applies to invocations, not to them.
    toml = toml[:toml.index("[[examples]]")]
    if schema is not None:
        (directory / "schema.json").write_text(json.dumps(schema))
        toml = toml.replace('capabilities = []', 'capabilities = []\ninput_schema = "schema.json"')
    (directory / "skill.toml").write_text(toml)
    return directory


def value(data: Any) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


@pytest.fixture
async def chain(start_service: Starter, tmp_path: Path) -> AsyncIterator[Chain]:
    chain = await start_chain(start_service, tmp_path, skill_dir=skill_dir(tmp_path, "1.0.0", SCHEMA))
    yield chain
    await chain.channel.close()


async def invoke(chain: Chain, timeout: float = 10, **fields: Any) -> pb.InvokeSkillResponse:
    return await chain.stub.InvokeSkill(pb.InvokeSkillRequest(name=ECHO_SKILL, **fields), timeout=timeout)


async def refused(chain: Chain, **fields: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke(chain, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    info = error_info(caught.value)
    assert info is not None and info.reason == "INPUT_SCHEMA_VIOLATION", caught.value.details()
    return caught.value


def fields(err: grpc.aio.AioRpcError) -> dict[str, str]:
    request = bad_request(err)
    assert request is not None
    return {v.field: v.description for v in request.field_violations}


async def test_valid_input_runs_and_a_violation_names_json_pointers(chain: Chain) -> None:
    ok = {"text": "hello", "items": [{"id": 1}]}
    response = await invoke(chain, input=value(ok))
    assert json_format.MessageToDict(response.output) == ok

    err = await refused(chain, input=value({"text": 5, "items": [{"id": 1}, {"name": "x"}]}))
    assert fields(err) == {"/text": "5 is not of type 'string'", "/items/1": "'id' is a required property"}
    info = error_info(err)
    assert info is not None and info.metadata["skill"] == ECHO_SKILL and info.metadata["version"] == "1.0.0"
    assert "input_schema of com.example.echo-memory@1.0.0" in (err.details() or "")

    # The root of the input is the empty pointer.
    assert set(fields(await refused(chain, input=value("just text")))) == {""}


async def test_raw_input_is_validated_as_json_and_no_input_is_refused(chain: Chain) -> None:
    response = await invoke(chain, raw_input=b'{"text": "raw"}')
    assert json.loads(response.raw_output or json_format.MessageToJson(response.output)) == {"text": "raw"}
    assert set(fields(await refused(chain, raw_input=b'{"text": "' + b"x" * 21 + b'"}'))) == {"/text"}
    err = await refused(chain, raw_input=b"not json")
    assert set(fields(err)) == {"raw_input"} and "not JSON" in (err.details() or "")
    assert set(fields(await refused(chain, raw_input=b'{"text": NaN}'))) == {"raw_input"}
    assert set(fields(await refused(chain))) == {"input"}


async def test_at_most_ten_violations_are_reported(chain: Chain) -> None:
    err = await refused(chain, input=value({"text": "t", "items": [{} for _ in range(50)]}))
    assert len(fields(err)) == 10
    assert "more problem(s)" in (err.details() or "")


async def test_schemas_are_read_once_and_kept_when_the_registry_goes_away(chain: Chain) -> None:
    await invoke(chain, input=value({"text": "warm"}))
    await chain.registry.stop(grace=0)
    # Valid inputs still run and invalid ones are still refused: no registry call per invoke.
    await invoke(chain, input=value({"text": "still"}))
    await refused(chain, input=value({"text": 1}))


async def test_a_version_first_seen_while_the_registry_is_down_runs_unchecked(
        start_service: Starter, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A registry outage costs no call: a version whose schema cannot be read is let through, once logged,
    # and checked again once the registry answers. (The executor verifies the version first, as a deploy's
    # preload does in the suite; the gateway has not seen it yet. A gateway that follows the dispatcher's
    # stream reads the schemas of a route's versions as soon as the route arrives; this one polls the route
    # table, as `CLAWHUB_GATEWAY_ROUTING=dispatcher` does, and reads the table only when called.)
    chain = await start_chain(start_service, tmp_path, skill_dir=skill_dir(tmp_path, "1.0.0", SCHEMA),
                              routing="dispatcher")
    from clawhub.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
    from clawhub.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.dispatcher.port}") as direct:
        await dispatcher_grpc.DispatcherServiceStub(direct).Dispatch(
            dispatcher_pb.DispatchRequest(skill="com.example.echo-memory", input=b'{"text": "warm"}'), timeout=10)
    await chain.registry.stop(grace=0)
    await invoke(chain, input=value({"text": 1}))
    await invoke(chain, input=value({"text": "fine"}))
    warnings = [r.getMessage() for r in caplog.records if "go unchecked" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    await chain.channel.close()


async def test_a_schema_carried_in_the_route_is_enforced_without_the_registry(chain: Chain, tmp_path: Path) -> None:
    """A target that carries its version's input_schema (as the deployer's do) needs no registry: a version the
    gateway has never seen is checked even while the registry is down."""
    stricter = json.loads(json.dumps(SCHEMA))
    stricter["required"] = ["text", "items"]
    await invoke(chain, input=value({"text": "warm"}))  # the executor loads 1.0.0 while the registry is up
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.registry.port}") as ch:
        v1 = (await registry_grpc.RegistryServiceStub(ch).GetSkillVersion(
            registry_pb.GetSkillVersionRequest(name=ECHO_SKILL, version="1.0.0"), timeout=5)).skill_version
        v2 = await publish_dir(registry_grpc.RegistryServiceStub(ch), skill_dir(tmp_path, "2.0.0", stricter))
    await chain.registry.stop(grace=0)
    assert chain.routes is not None
    chain.routes.set_table(routing_pb2.RouteTable(generation=2, routes=[routing_pb2.Route(skill=ECHO_SKILL, targets=[
        routing_pb2.RouteTarget(version=v2.version, digest=v2.digest, weight=100, limits=v2.manifest.limits,
                                input_schema=v2.manifest.input_schema)])]))

    async def checked() -> bool:
        try:
            # Short: until the gateway has the new table, a call may reach an executor that cannot load 2.0.0.
            await invoke(chain, timeout=1, input=value({"text": "no items"}))
        except grpc.aio.AioRpcError as err:
            info = error_info(err)
            return info is not None and info.reason == "INPUT_SCHEMA_VIOLATION" and info.metadata["version"] == "2.0.0"
        return False

    await eventually(checked, timeout=5)
    assert set(fields(await refused(chain, input=value({"text": "x"})))) == {""}
    # An empty schema text means "this version has no schema": anything goes, still without the registry (on
    # the version the executor has loaded; 1.0.0 has a schema, but the route says otherwise and is believed).
    chain.routes.set_table(routing_pb2.RouteTable(generation=3, routes=[routing_pb2.Route(skill=ECHO_SKILL, targets=[
        routing_pb2.RouteTarget(version=v1.version, digest=v1.digest, weight=100, limits=v1.manifest.limits,
                                input_schema="")])]))

    async def unchecked() -> bool:
        try:
            await invoke(chain, timeout=1, raw_input=b"not json")
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(unchecked, timeout=5)


async def test_hostile_inputs_take_linear_time(start_service: Starter, tmp_path: Path) -> None:
    """A catastrophic-backtracking pattern and uniqueItems over many objects answer at once: validation runs on
    the gateway's event loop, where a slow check would stall every caller."""
    schema = {"type": "object", "properties": {
        "text": {"type": "string", "pattern": "^(a+)+$"},
        "items": {"type": "array", "uniqueItems": True},
        "tags": {"type": "object", "patternProperties": {"^(x+x+)+y$": {"type": "integer"}}}}}
    chain = await start_chain(start_service, tmp_path, skill_dir=skill_dir(tmp_path, "1.0.0", schema))
    try:
        started = time.monotonic()
        assert set(fields(await refused(chain, input=value({"text": "a" * 30_000 + "!"})))) == {"/text"}
        items = [{"id": i, "v": [i, str(i)]} for i in range(20_000)]
        await invoke(chain, raw_input=json.dumps({"items": items}).encode())
        err = await refused(chain, input=value({"items": [{"a": [1]}, {"b": 2}, {"a": [1.0]}]}))
        assert fields(err) == {"/items": "item 2 repeats an earlier item; the items must be unique"}
        # JSON equality: true is not 1.
        await invoke(chain, input=value({"items": [True, 1, "1", None, 0, False]}))
        await refused(chain, input=value({"tags": {"x" * 5000 + "y": "not an integer"}}))
        assert time.monotonic() - started < 10  # a backtracking engine would not finish the first call
    finally:
        await chain.channel.close()


async def test_a_skill_without_schema_runs_any_input_without_the_registry(start_service: Starter,
                                                                          tmp_path: Path) -> None:
    chain = await start_chain(start_service, tmp_path, skill_dir=skill_dir(tmp_path, "1.0.0", None))
    try:
        await invoke(chain, raw_input=b"not json at all")
        await chain.registry.stop(grace=0)
        for _ in range(3):
            response = await invoke(chain, raw_input=b"still not json")
            assert response.raw_output == b"still not json"
    finally:
        await chain.channel.close()


async def test_every_routed_version_must_accept_the_input(chain: Chain, tmp_path: Path) -> None:
    """A canary whose schema is stricter: an input only the stable version accepts is refused whichever
    version the dispatcher would pick (never at random), until the route holds only versions that accept it."""
    stricter = json.loads(json.dumps(SCHEMA))
    stricter["required"] = ["text", "items"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.registry.port}") as ch:
        v1 = await registry_grpc.RegistryServiceStub(ch).GetSkillVersion(
            registry_pb.GetSkillVersionRequest(name=ECHO_SKILL, version="1.0.0"), timeout=5)
        v2 = await publish_dir(registry_grpc.RegistryServiceStub(ch), skill_dir(tmp_path, "2.0.0", stricter))
    deployer = chain.routes
    assert deployer is not None

    def target(version: registry_pb.SkillVersion, weight: int, role: int) -> routing_pb2.RouteTarget:
        return routing_pb2.RouteTarget(version=version.version, digest=version.digest, weight=weight,
                                       limits=version.manifest.limits, role=role)  # type: ignore[arg-type]

    deployer.set_table(routing_pb2.RouteTable(generation=2, routes=[routing_pb2.Route(skill=ECHO_SKILL, targets=[
        target(v1.skill_version, 99, routing_pb2.ROUTE_TARGET_ROLE_STABLE),
        target(v2, 1, routing_pb2.ROUTE_TARGET_ROLE_CANDIDATE)])]))

    async def canary_checked() -> bool:
        try:
            await invoke(chain, input=value({"text": "no items"}))
        except grpc.aio.AioRpcError as err:
            info = error_info(err)
            return info is not None and info.reason == "INPUT_SCHEMA_VIOLATION"
        return False

    await eventually(canary_checked, timeout=5)  # the gateway reads routes again within a second
    err = await refused(chain, input=value({"text": "no items"}))
    info = error_info(err)
    assert info is not None and info.metadata["version"] == "2.0.0"
    for _ in range(20):  # accepted by both: runs, on either version
        await invoke(chain, input=value({"text": "t", "items": []}))

    deployer.set_table(routing_pb2.RouteTable(generation=3, routes=[routing_pb2.Route(skill=ECHO_SKILL, targets=[
        target(v1.skill_version, 100, routing_pb2.ROUTE_TARGET_ROLE_STABLE)])]))

    async def stable_only() -> bool:
        try:
            await invoke(chain, input=value({"text": "no items"}))
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(stable_only, timeout=5)


BAD_SCHEMAS = [
    ({"type": "strin"}, "at /type:"),
    ({"$ref": "https://schemas.example.com/input.json"}, "nothing is fetched over the network"),
    ({"$ref": "#/$defs/missing"}, "does not resolve inside the schema"),
    ({"$schema": "https://example.com/my-draft", "type": "object"}, "is not a JSON Schema draft"),
    ({"type": "string", "pattern": "(["}, "is not a 'regex'"),
    # Patterns run on RE2 (linear time): lookaround and backreferences cannot be run.
    ({"type": "string", "pattern": "^(?=.*[0-9]).+$"}, "patterns run on RE2"),
    ({"type": "object", "patternProperties": {"^(a)\\1$": {}}}, "patterns run on RE2"),
    ([1, 2], "a schema is a JSON object"),
]


@pytest.mark.parametrize(("schema", "problem"), BAD_SCHEMAS)
async def test_an_invalid_schema_is_refused_at_publish_by_the_registry_and_the_cli(
        chain: Chain, tmp_path: Path, schema: Any, problem: str) -> None:
    directory = skill_dir(tmp_path, "3.0.0", {"type": "object"})
    (directory / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(manifest.ManifestError) as local:
        manifest.load(directory)
    assert problem in str(local.value)

    package = manifest.load(skill_dir(tmp_path, "3.0.1", None, name="raw"))
    package.manifest.version = "3.0.0"
    package.manifest.input_schema = json.dumps(schema)

    async def stream() -> AsyncIterator[registry_pb.PublishSkillRequest]:
        yield registry_pb.PublishSkillRequest(metadata=registry_pb.PublishSkillMetadata(
            manifest=package.manifest, sha256=hashlib.sha256(package.module).hexdigest(),
            size_bytes=len(package.module)))
        yield registry_pb.PublishSkillRequest(chunk=package.module)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.registry.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry_grpc.RegistryServiceStub(ch).PublishSkill(stream(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None and info.reason == "INVALID_MANIFEST"
    assert info.metadata["field"] == "metadata.manifest.input_schema"
    violations = fields(caught.value)
    # The same words as the CLI's.
    assert violations["metadata.manifest.input_schema"] in str(local.value)


def test_a_schema_file_outside_the_skill_directory_is_not_read(tmp_path: Path) -> None:
    directory = skill_dir(tmp_path, "1.0.0", None)
    (tmp_path / "secret.json").write_text("{}")
    toml = (directory / "skill.toml").read_text().replace("capabilities = []",
                                                          'capabilities = []\ninput_schema = "../secret.json"')
    (directory / "skill.toml").write_text(toml)
    with pytest.raises(manifest.ManifestError, match="input_schema"):
        manifest.load(directory)


async def test_an_input_a_schema_accepted_lately_is_not_validated_again() -> None:
    from services.gateway.schemas import MEMO_INPUTS, InputSchemas
    from services.runtime.errors import ServiceError

    schemas = InputSchemas(None, None)  # type: ignore[arg-type]  # nothing is read: the route is set below
    compiled = schemas.compile(json.dumps({"type": "object", "required": ["text"]}))
    looser = schemas.compile(json.dumps({"type": "object"}))
    validated: list[Any] = []
    for schema in (compiled, looser):
        real = schema.validator
        assert real is not None

        class Counting:
            def iter_errors(self, instance: Any, real: Any = real) -> Any:
                validated.append(instance)
                return real.iter_errors(instance)

        object.__setattr__(schema, "validator", Counting())
    schemas._pushed = True
    schemas._resolved["com.example.x"] = (("1.0.0", compiled), ("2.0.0", looser))
    for _ in range(3):
        await schemas.check("com.example.x", b'{"text":"a"}', "raw_input")
    assert len(validated) == 2  # both schemas, once
    for _ in range(2):  # refused inputs are never remembered
        with pytest.raises(ServiceError):
            await schemas.check("com.example.x", b'{"other":1}', "raw_input")
    assert len(validated) == 2 + 2  # the first schema refuses it, each time
    for n in range(MEMO_INPUTS + 5):
        await schemas.check("com.example.x", b'{"text":"%d"}' % n, "raw_input")
    assert len(compiled.valid) == MEMO_INPUTS and b'{"text":"a"}' not in compiled.valid  # bounded, oldest out
    await schemas.check("com.example.x", b'{"text":"%d"}' % 0, "raw_input")  # dropped too: validated again
    assert validated[-1] == {"text": "0"}
