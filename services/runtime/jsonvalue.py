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

    Raises ValueError for what JSON cannot express (NaN, Infinity)."""
    return json.dumps(_plain(json_format.MessageToDict(value)), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()


def _plain(obj: Any) -> Any:
    if isinstance(obj, float) and math.isfinite(obj) and obj.is_integer() and abs(obj) < _MAX_SAFE_INT:
        return int(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def json_to_value(output: bytes) -> struct_pb2.Value | None:
    """The output as a protobuf Value when it is one valid JSON document, else None."""
    try:
        obj = json.loads(output)
        value = struct_pb2.Value()
        json_format.ParseDict(obj, value)
    # Too deep for protobuf (or for Python) is still a valid output: it travels as raw bytes.
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError, json_format.ParseError):
        return None
    return value
