"""A test skill (world `skill-kv-http` of wit/skill.wit) that does what its input says with the `kv` and `http`
interfaces, and answers `{"ok": value}` or `{"err": "REASON: message"}` (a refusal, as Python sees it).

Input: `{"op": "get" | "put" | "delete" | "keys" | "http", ...}`; byte strings are latin-1 text, repeated
`<name>_times` times (`{"op": "put", "key": "k", "value": "v", "value_times": 70000}`)."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import http, kv


def _blob(request: dict, name: str) -> bytes:
    return request.get(name, "").encode("latin-1") * request.get(name + "_times", 1)


def _text(data: bytes) -> str:
    return data.decode("latin-1")


class WitWorld(wit_world.WitWorld):
    def run(self, input: bytes) -> bytes:
        request = json.loads(input)
        op = request["op"]
        try:
            if op == "get":
                value = kv.get(_blob(request, "key"))
                out: object = None if value is None else _text(value)
            elif op == "put":
                kv.put(_blob(request, "key"), _blob(request, "value"), request.get("ttl_ms", 0))
                out = None
            elif op == "delete":
                out = kv.delete(_blob(request, "key"))
            elif op == "keys":
                out = [_text(k) for k in kv.keys(_blob(request, "prefix"))]
            elif op == "http":
                response = http.request(request.get("method", "GET"), request["url"],
                                        [(n, v) for n, v in request.get("headers", [])], _blob(request, "body"))
                out = {"status": response.status, "headers": [list(h) for h in response.headers],
                       "body": _text(response.body)}
            else:
                raise Err(f"unknown op {op!r}")
        except Err as exc:
            if op not in ("get", "put", "delete", "keys", "http"):
                raise
            return json.dumps({"err": exc.value}).encode()
        return json.dumps({"ok": out}).encode()
