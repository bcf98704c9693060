from __future__ import annotations

import json

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
