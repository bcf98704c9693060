"""A clawhub skill in Python (ABI `component-v1`), built into a WebAssembly component with componentize-py.

Input: JSON, a name as a string (`"Ada"`) or an object with one (`{"name": "Ada"}`). Output: JSON, a greeting
(`"Hello, Ada!"`). Anything else fails the call with a message: a component skill reports a failure by raising
`Err` (the `err` case of `run`'s result); any other exception traps, which the platform reports as a crash.

Build (from this directory; needs `pip install componentize-py==0.25.1`):

    componentize-py -d ../../../wit -w skill componentize app -o hello.wasm
"""

import json

import wit_world
from componentize_py_types import Err


class WitWorld(wit_world.WitWorld):
    def run(self, input: bytes) -> bytes:
        try:
            value = json.loads(input)
        except ValueError as exc:
            raise Err(f"the input is not JSON: {exc}") from None
        name = value.get("name") if isinstance(value, dict) else value
        if not isinstance(name, str) or not name.strip():
            raise Err('send a name as a JSON string, such as "Ada", or an object such as {"name": "Ada"}')
        wit_world.log(f"greeting a name of {len(name.strip())} characters")
        return json.dumps(f"Hello, {name.strip()}!", ensure_ascii=False).encode()
