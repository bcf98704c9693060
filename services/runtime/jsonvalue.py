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
    return dump_json(value_to_python(value))


def value_to_python(value: struct_pb2.Value) -> Any:
    """The Python object (dict, list, str, int, float, bool, None) a Value stands for, whole numbers as ints:
    what `json.loads(value_to_json(value))` gives. Raises ValueError for NaN and infinities."""
    try:
        return _python(value, _FAST_DEPTH)
    except _TooDeep:
        # Deep documents take json_format's path (and its limits); the usual shallow ones skip it (~4x faster).
        return _plain(json_format.MessageToDict(value))


def dump_json(obj: Any) -> bytes:
    """`obj` (from value_to_python) as the compact, key-sorted JSON text value_to_json gives."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True).encode()


# Depth up to which Values are converted here; deeper ones go through json_format (its recursion limits).
_FAST_DEPTH = 24


class _TooDeep(Exception):
    pass


def _python(value: struct_pb2.Value, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise ValueError(f"{number} is not JSON")
        return int(number) if number.is_integer() and abs(number) < _MAX_SAFE_INT else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value" or kind == "list_value":
        if depth == 0:
            raise _TooDeep
        if kind == "struct_value":
            return {key: _python(item, depth - 1) for key, item in value.struct_value.fields.items()}
        return [_python(item, depth - 1) for item in value.list_value.values]
    return None  # null_value, or no kind set (as json_format reads it)


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
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return None
    return python_to_value(obj)


def python_to_value(obj: Any) -> struct_pb2.Value | None:
    """A Value holding `obj` (as json.loads gives it), or None when a Value cannot hold it."""
    value = struct_pb2.Value()
    try:
        try:
            _fill(value, obj, _FAST_DEPTH)
        except _TooDeep:
            # Deep documents take json_format's path (and its recursion limit); shallow ones skip it.
            value = struct_pb2.Value()
            json_format.ParseDict(obj, value)
    # Too deep for protobuf (or for Python) is still a valid output: it travels as raw bytes.
    except (ValueError, TypeError, RecursionError, OverflowError, json_format.ParseError):
        return None
    return value


def _fill(value: struct_pb2.Value, obj: Any, depth: int) -> None:
    """As json_format.ParseDict fills a Value, for what json.loads gives."""
    if isinstance(obj, str):
        value.string_value = obj
    elif obj is True or obj is False:
        value.bool_value = obj
    elif isinstance(obj, (int, float)):
        if isinstance(obj, int) and not -_MAX_DOUBLE_INT <= obj <= _MAX_DOUBLE_INT:
            raise OverflowError("an integer too large for a double")
        value.number_value = obj
    elif obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif depth == 0:
        raise _TooDeep
    elif isinstance(obj, dict):
        fields = value.struct_value.fields
        value.struct_value.SetInParent()  # set even when empty
        for key, item in obj.items():
            _fill(fields[key], item, depth - 1)
    elif isinstance(obj, list):
        values = value.list_value.values
        value.list_value.SetInParent()
        for item in obj:
            _fill(values.add(), item, depth - 1)
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON")


# The largest integer a double holds (about 1.8e308): larger ones cannot be a Value's number.
_MAX_DOUBLE_INT = int(1.7976931348623157e308)
