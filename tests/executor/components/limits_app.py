"""A component-v1 test skill in Python (built by tests/executor/test_components.py with componentize-py): one
behaviour per input, for the sandbox's limits and refusals. Not an example: it misbehaves on purpose."""

import os
import socket
import sys

import wit_world
from componentize_py_types import Err


class WitWorld(wit_world.WitWorld):
    def run(self, input: bytes) -> bytes:
        head, _, tail = input.partition(b" ")
        command, arg = head.decode("latin-1"), tail.decode("latin-1")
        if command == "spin":  # never returns: the wall-clock limit (or fuel) stops it
            n = 0
            while True:
                n += 1
        if command == "alloc":  # grows memory until the limit refuses: Python raises MemoryError
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if command == "raise":  # an uncaught exception: not an `Err`, the component traps
            raise ValueError("deliberate failure")
        if command == "exit":
            sys.exit(int(arg or "3"))
        if command == "print":  # stdout and stderr both go to the call's (bounded) stderr
            for i in range(int(arg)):
                print(f"line {i}")
            return b"printed"
        if command == "log":
            for i in range(int(arg)):
                wit_world.log(f"log line {i}")
            return b"logged"
        if command == "big":
            return b"x" * int(arg)
        if command == "err":
            raise Err(arg)
        if command == "env":
            return ",".join(f"{k}={v}" for k, v in sorted(os.environ.items())).encode()
        if command == "file":
            try:
                with open(arg, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise Err(f"{type(exc).__name__}: {exc}") from None
        if command == "net":  # the sandbox has no network: this must fail
            host, _, port = arg.partition(":")
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.connect((host, int(port)))
            except Exception as exc:
                raise Err(f"{type(exc).__name__}: {exc}") from None
            return b"connected"
        return input
