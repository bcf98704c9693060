"""A clawhub skill in Python (ABI `component-v1`) that uses host capabilities: a counter in the skill's key-value
store (`kv`) and an outbound HTTP request (`http:HOST`), through the interfaces `clawhub:skill/kv` and
`clawhub:skill/http` of wit/skill.wit (world `skill-kv-http`).

Input: a JSON object. Each call adds one to the counter; with `"url"`, it also GETs that URL (only hosts the
manifest's `http:` capabilities name are reachable; a call whose request fails does not count). Output:
`{"count": N}`, plus `"status"` and `"body"` (the response body as text) when a URL was given.
`{"reset": true}` sets the counter back to 0 instead.

A refusal by the host (`HTTP_HOST_NOT_ALLOWED: ...`, `KV_VALUE_TOO_LARGE: ...`) reaches Python as
`componentize_py_types.Err` whose `value` is that text; this skill fails the call with it.

Build (from this directory; needs `pip install componentize-py==0.25.1`):

    componentize-py -d ../../../wit -w skill-kv-http componentize app -o counter.wasm
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import http, kv

COUNTER_KEY = b"count"


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class WitWorld(wit_world.WitWorld):
    def run(self, input: bytes) -> bytes:
        try:
            request = json.loads(input)
        except ValueError as exc:
            raise Err(f"the input is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise Err('send a JSON object: {} counts, {"url": "http://..."} counts and fetches, '
                      '{"reset": true} resets')
        if request.get("reset") is True:
            kv.put(COUNTER_KEY, b"0", 0)
            return _compact({"count": 0})
        stored = kv.get(COUNTER_KEY)  # a host refusal raises Err(reason text): it fails the call as is
        count = (int(stored) if stored else 0) + 1
        result: dict[str, object] = {"count": count}
        url = request.get("url")
        if url is not None:
            if not isinstance(url, str):
                raise Err('"url" must be a string')
            response = http.request("GET", url, [("accept", "text/plain, application/json")], b"")
            wit_world.log(f"GET {url}: {response.status}, {len(response.body)} bytes")
            result["status"] = response.status
            result["body"] = response.body.decode("utf-8", "replace")
        # Stored last: a call that fails (a refused URL) does not count.
        kv.put(COUNTER_KEY, str(count).encode(), 0)
        return _compact(result)
