"""Input schemas through the real suite: published with the skill, carried by the deployer in its route target,
enforced by the gateway before any hop, also by a gateway that has never seen the version and cannot reach the
registry (docs/validation.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from google.protobuf import json_format, struct_pb2

from services.runtime.errors import bad_request, error_info
from tests.e2e.conftest import ROOT, Suite
from tests.e2e.test_suite import _child_pids
from tests.e2e.test_users import _second_gateway, run

SKILL = "com.example.schema-checked"
SCHEMA = {"type": "object", "required": ["text"],
          "properties": {"text": {"type": "string", "pattern": "^(a+)+$"}, "n": {"type": "integer"}}}


def shout_dir(tmp_path: Path) -> Path:
    """The uppercase example as another skill, whose input_schema wants {"text": "aaa…"}: a pattern that makes a
    backtracking regex engine take exponential time on "aaaa…!"."""
    directory = tmp_path / "shout"
    directory.mkdir()
    shutil.copy(ROOT / "examples" / "skills" / "uppercase" / "uppercase.wat", directory)
    (directory / "schema.json").write_text(json.dumps(SCHEMA))
    (directory / "skill.toml").write_text(f'''name = "{SKILL}"
version = "1.0.0"
description = "Shouts its input back"
abi = "wasi-command-v1"
module = "uppercase.wat"
capabilities = []
input_schema = "schema.json"

[limits]
memory = "16MiB"
timeout_ms = 2000

[[examples]]
input = "{{\\"text\\": \\"aa\\"}}"
output = "{{\\"TEXT\\": \\"AA\\"}}"
''')
    return directory


def invoke(address: str, data: object, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    """The output of one call, or its error."""
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb.InvokeSkillRequest(name=SKILL, input=json_format.ParseDict(data, struct_pb2.Value()))
        try:
            response = gateway_grpc.GatewayServiceStub(channel).InvokeSkill(request, timeout=15, metadata=metadata)
        except grpc.RpcError as err:
            return err
    return json_format.MessageToDict(response.output)


def violation(result: object) -> dict[str, str]:
    """The BadRequest field paths of an INPUT_SCHEMA_VIOLATION (fails the test for anything else)."""
    assert isinstance(result, grpc.RpcError), result
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, result.details()
    info = error_info(result)
    assert info is not None and info.reason == "INPUT_SCHEMA_VIOLATION", result.details()
    request = bad_request(result)
    assert request is not None
    return {v.field: v.description for v in request.field_violations}


def test_the_schema_travels_with_the_route_and_holds_without_the_registry(suite: Suite, tmp_path: Path) -> None:
    for args in (("publish", str(shout_dir(tmp_path))), ("deploy", f"{SKILL}@1.0.0", "--plain")):
        done = run(suite, *args)
        assert done.returncode == 0, done.stderr
    admin = (("authorization", f"Bearer {suite.admin_key}"),)
    assert invoke(suite.gateway, {"text": "aaa"}, admin) == {"TEXT": "AAA"}
    assert set(violation(invoke(suite.gateway, {"text": 5, "n": "x"}, admin))) == {"/text", "/n"}
    # A hostile input for that pattern is answered at once (RE2 runs in linear time; Python's re would take
    # longer than the age of the universe on it).
    started = time.monotonic()
    assert set(violation(invoke(suite.gateway, {"text": "a" * 50_000 + "!"}, admin))) == {"/text"}
    assert time.monotonic() - started < 5

    # A second gateway that has never seen the skill, started while the registry is frozen: the schema comes
    # with the route from the dispatcher, so the input is still checked (before, such a gateway let calls of a
    # version it could not read the schema of through unchecked). Anonymous invokers, so that authenticating
    # needs no registry either.
    (registry,) = _child_pids(suite.process.pid, "services.registry")
    os.kill(registry, signal.SIGSTOP)
    try:
        second, address = _second_gateway(suite, CLAWHUB_ANONYMOUS_ROLES="invoker")
        try:
            assert set(violation(invoke(address, {"n": 1}))) == {""}
            assert invoke(address, {"text": "aa"}) == {"TEXT": "AA"}
        finally:
            second.terminate()
            second.wait(10)
            if second.stdout is not None:
                second.stdout.close()
    finally:
        os.kill(registry, signal.SIGCONT)
    assert invoke(suite.gateway, {"text": "a"}, admin) == {"TEXT": "A"}
