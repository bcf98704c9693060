"""com.example.hello-python: answers {"hello":INPUT}, its input (JSON text) wrapped in a JSON object.

ABI component-v1: a WebAssembly component of the world in wit/skill.wit, built by `clawhub build` with
componentize-py (`pip install componentize-py`). See docs/skills/python.md.
"""

import wit_world  # the bindings componentize-py generates for the `skill` world
from componentize_py_types import Err


class WitWorld(wit_world.WitWorld):
    def run(self, input: bytes) -> bytes:
        if not input:
            # `Err` fails the call with this message; any other exception traps (SKILL_TRAPPED).
            raise Err("send some JSON, such as \"world\"")
        wit_world.log(f"wrapping {len(input)} bytes")
        return b'{"hello":' + input + b'}'
