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
