from __future__ import annotations

import json
import math
import random

import pytest
from google.protobuf import json_format, struct_pb2

from services.runtime.jsonvalue import json_to_value, value_to_json


def test_whole_numbers_stay_whole() -> None:
    value = json_format.ParseDict({"n": 3, "f": 2.5, "big": 2**60, "list": [1, "a", None, True]}, struct_pb2.Value())
    assert json.loads(value_to_json(value)) == {"n": 3, "f": 2.5, "big": float(2**60), "list": [1, "a", None, True]}
    assert value_to_json(json_format.ParseDict("hi", struct_pb2.Value())) == b'"hi"'


def test_output_that_is_json_becomes_a_value() -> None:
    value = json_to_value(b'{"words": 4}')
    assert value is not None and json_format.MessageToDict(value) == {"words": 4.0}


def test_output_that_is_not_json_stays_bytes() -> None:
    assert json_to_value(b"HELLO") is None
    assert json_to_value(b"\xff\xfe") is None
    assert json_to_value(b'{"a": 1} trailing') is None


def test_object_keys_come_out_sorted_whatever_order_the_map_holds() -> None:
    # A Struct is a protobuf map: its order is not kept on the wire and differs between processes, so the
    # JSON a skill reads (and the CLI prints) must not depend on it.
    from google.protobuf import struct_pb2

    from services.runtime.jsonvalue import value_to_json
    value = struct_pb2.Value()
    for key in ("words", "bytes", "lines"):
        value.struct_value.fields[key].number_value = 1
    nested = value.struct_value.fields["a"].struct_value.fields
    nested["z"].bool_value = True
    nested["m"].null_value = struct_pb2.NULL_VALUE
    assert value_to_json(value) == b'{"a":{"m":null,"z":true},"bytes":1,"lines":1,"words":1}'


def _reference_value_to_json(value: struct_pb2.Value) -> bytes:
    """The conversion as json_format does it (what the fast path in jsonvalue must match)."""
    from services.runtime.jsonvalue import _plain
    return json.dumps(_plain(json_format.MessageToDict(value)), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":"), sort_keys=True).encode()


def _reference_json_to_value(output: bytes) -> struct_pb2.Value | None:
    from services.runtime.jsonvalue import _DECODER
    try:
        obj = _DECODER.decode(output.decode(json.detect_encoding(output), "surrogatepass"))
        value = struct_pb2.Value()
        json_format.ParseDict(obj, value)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError, OverflowError, json_format.ParseError):
        return None
    return value


def _random_doc(rng: random.Random, depth: int) -> object:
    choice = rng.randrange(9 if depth < 6 else 6)
    if choice == 0:
        return rng.choice(["", "a", "é☃", "\u0000\n\"\\", "x" * 40])
    if choice == 1:
        return rng.choice([0, 1, -1, 2**53 - 1, 2**53, 2**53 + 1, -(2**60), 10**30, 2**1023])
    if choice == 2:
        return rng.choice([0.5, -2.25, 1e-300, 1e300, 3.0, -0.0, 1.7976931348623157e308])
    if choice == 3:
        return rng.choice([True, False])
    if choice in (4, 5):
        return None
    if choice == 6:
        return {}
    if choice == 7:
        return {rng.choice(["k", "b", "a", "é", ""]) + str(i): _random_doc(rng, depth + 1)
                for i in range(rng.randrange(4))}
    return [_random_doc(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_fast_conversions_match_json_format_on_random_documents() -> None:
    # value_to_json / json_to_value walk shallow documents themselves (several times faster than json_format on
    # the invoke path); on any document they must give exactly what json_format's conversion gives.
    rng = random.Random(1313)
    for _ in range(3000):
        doc = _random_doc(rng, 0)
        text = json.dumps(doc).encode()
        fast, reference = json_to_value(text), _reference_json_to_value(text)
        assert (fast is None) == (reference is None), text
        if fast is None or reference is None:
            continue
        assert fast == reference, text
        assert value_to_json(fast) == _reference_value_to_json(reference), text


def test_fast_conversions_match_json_format_at_the_edges() -> None:
    deep = b"[" * 200 + b"1" + b"]" * 200      # deeper than the fast walk: json_format's path (and its limit)
    for text in (deep, b"[" * 30 + b"{}" + b"]" * 30, b"NaN", b"1e999", b"-Infinity", str(2**1030).encode(),
                 b"{}", b"[]", b'{"a":{}}', b'{"a":[]}', b"null", b'"\\ud800"', "\ufeff1".encode("utf-16")):
        fast, reference = json_to_value(text), _reference_json_to_value(text)
        assert (fast is None) == (reference is None), text
        if fast is not None and reference is not None:
            assert fast == reference and value_to_json(fast) == _reference_value_to_json(reference), text
    for number in (math.nan, math.inf, -math.inf):
        value = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(number_value=number)]))
        with pytest.raises(ValueError):
            value_to_json(value)
    unset = struct_pb2.Value()                  # no kind set: json_format reads it as null
    assert value_to_json(unset) == _reference_value_to_json(unset) == b"null"
    nested = struct_pb2.Value()
    inner = nested
    for _ in range(40):                         # deeper than the fast walk on the Value side too
        inner = inner.list_value.values.add()
    inner.number_value = 2.0
    assert value_to_json(nested) == _reference_value_to_json(nested)
