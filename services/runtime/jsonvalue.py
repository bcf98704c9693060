"""JSON text <-> google.protobuf.Value, as the gateway and the CLI exchange skill input and output."""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import json_format, struct_pb2

# Integers beyond this lose precision as JSON doubles; keep them as floats.
_MAX_SAFE_INT = 2**53


def value_to_json(value: struct_pb2.Value) -> bytes:
    """JSON text for a protobuf Value, keeping whole numbers whole (`3`, not `3.0`).

    Object keys are sorted: a Struct is a protobuf map, whose order is not kept on the wire and differs
    between processes, so sorting is what makes a skill's stdin (and anything keyed by it) the same for the
    same input. Raises ValueError for what JSON cannot express (NaN, Infinity)."""
    return json.dumps(_plain(json_format.MessageToDict(value)), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":"), sort_keys=True).encode()


def _plain(obj: Any) -> Any:
    if isinstance(obj, float) and math.isfinite(obj) and obj.is_integer() and abs(obj) < _MAX_SAFE_INT:
        return int(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _not_json(token: str) -> float:
    raise ValueError(f"{token} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} does not fit a double")
    return number


# One decoder for every call: json.loads with hooks would build a new one (and its scanner) each time.
_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


def json_to_value(output: bytes) -> struct_pb2.Value | None:
    """The output as a protobuf Value when it is one valid JSON document a Value can hold, else None.

    Python's json module accepts `NaN`, `Infinity` and `-Infinity`, which are not JSON, and reads `1e999` as
    infinity: all are refused here (a Value holding them could not be written back as JSON), as are integers
    too large for a double."""
    try:
        # As json.loads reads bytes (UTF-8, or UTF-16/32 when the text says so).
        obj = _DECODER.decode(output.decode(json.detect_encoding(output), "surrogatepass"))
        value = struct_pb2.Value()
        json_format.ParseDict(obj, value)
    # Too deep for protobuf (or for Python) is still a valid output: it travels as raw bytes.
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError, OverflowError, json_format.ParseError):
        return None
    return value
