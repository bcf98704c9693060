"""OTLP span encoding for the exporter thread, in a fraction of the SDK's time (tracing.py uses it).

The OpenTelemetry SDK's OTLP encoder builds a protobuf object per span, per attribute and per attribute value
(about 35 µs a span with a dozen attributes in CPython), on the exporter thread, which shares the GIL with the
service's event loop: at 100% sampling that was about a fifth of what tracing cost an invocation
(bench/observability_cost.py). Here the same `ExportTraceServiceRequest` is written directly in protobuf's wire
format: a span's fixed fields with `struct`, and each attribute from a cache of its encoded bytes (most are the
same for every call of a method: `rpc.service`, `clawhub.service`, a skill's name and version, …), so a span
costs a few µs. The bytes are then parsed into the request message (in C), and the SDK's exporter sends it as it
always does: same endpoint, headers, TLS, timeout, retries and compression (`OTEL_EXPORTER_OTLP_*`); what the
collector receives is message for message what the SDK's encoder makes (tests/runtime/test_tracing_export.py
compares them).

Anything unusual (events, links, array or mapping attribute values) is encoded by the SDK's own functions, so
nothing is lost, only not made faster.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_key_value,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_events, _encode_links
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

log = logging.getLogger("clawhub.tracing")

_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_KIND_FIELD = {kind: b"\x30" + bytes((number,)) for kind, number in _KIND.items()}  # Span.kind (6), a varint
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", 0x100)  # Span.flags (16, fixed32): HAS_IS_REMOTE
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", 0x300)  # HAS_IS_REMOTE | IS_REMOTE (the parent came by gRPC)
_STATUS_UNSET = b"\x7a\x00"  # Span.status (15), empty: the SDK's encoder always writes one
_PACK_TIMES = struct.Struct("<BQBQ").pack  # start_time_unix_nano (7) and end_time_unix_nano (8), fixed64
_PACK_DOUBLE = struct.Struct("<d").pack
_INT64 = (1 << 64) - 1

# Encoded KeyValues of string and boolean attributes, by (key, value): bounded (cleared when full), since a
# value could be anything a caller sets (a skill's name, a refusal reason): the cache only has to hold the
# common ones.
_CACHE_LIMIT = 4096
_kv_cache: dict[tuple[str, Any, type], bytes] = {}
# Encoded names (Span.name, field 5) and resource / scope messages, by value and by identity.
_name_cache: dict[str, bytes] = {}
_resource_cache: dict[int, tuple[Any, bytes]] = {}
_scope_cache: dict[int, tuple[Any, bytes]] = {}


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(tag: bytes, data: bytes) -> bytes:
    size = len(data)
    return tag + (bytes((size,)) if size < 0x80 else _varint(size)) + data


def _string(tag: bytes, text: str) -> bytes:
    return _delimited(tag, text.encode())


def _any_value(value: Any) -> bytes | None:
    """AnyValue's bytes for a scalar (None for anything else)."""
    kind = type(value)
    if kind is str:
        return _string(b"\x0a", value)
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value & _INT64)
    if kind is float:
        return b"\x21" + _PACK_DOUBLE(value)
    if kind is bytes:
        return _delimited(b"\x3a", value)
    return None


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue, length-prefixed as a repeated field of tag 9 (Span.attributes)."""
    kind = type(value)
    cacheable = kind is str or kind is bool
    if cacheable:
        found = _kv_cache.get((key, value, kind))
        if found is not None:
            return found
    encoded = _any_value(value)
    if encoded is None:  # a sequence, a mapping, None: as the SDK does
        body = _encode_key_value(key, value).SerializeToString()
    else:
        body = _string(b"\x0a", key) + _delimited(b"\x12", encoded)
    result = _delimited(b"\x4a", body)
    if cacheable:
        if len(_kv_cache) >= _CACHE_LIMIT:
            _kv_cache.clear()
        _kv_cache[(key, value, kind)] = result
    return result


def _attributes(attributes: Mapping[str, Any] | None) -> list[bytes]:
    if not attributes:
        return []
    # The SDK's BoundedAttributes is a Mapping over a plain dict: iterating the dict itself is several times
    # faster than through the Mapping protocol.
    items = getattr(attributes, "_dict", attributes).items()
    parts = []
    cache = _kv_cache
    for key, value in items:
        try:
            found = cache.get((key, value, type(value)))
        except TypeError:  # an unhashable value (a mapping)
            found = None
        if found is not None:
            parts.append(found)
            continue
        try:
            parts.append(_key_value(key, value))
        except Exception as error:  # noqa: BLE001 - as the SDK: one bad attribute does not lose the span
            log.warning("span attribute %s not exported: %s", key, error)
    return parts


def _status(span: ReadableSpan) -> bytes:
    status = span.status
    if status is None:
        return b""
    code = status.status_code
    if code is StatusCode.UNSET and not status.description:
        return _STATUS_UNSET
    body = (_string(b"\x12", status.description) if status.description else b"") + (
        b"\x18" + bytes((code.value,)) if code.value else b"")
    return _delimited(b"\x7a", body)


def encode_span(span: ReadableSpan) -> bytes:
    """One Span message (without its own tag and length)."""
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    name = span.name
    encoded_name = _name_cache.get(name)
    if encoded_name is None:
        encoded_name = _string(b"\x2a", name)
        if len(_name_cache) < _CACHE_LIMIT:
            _name_cache[name] = encoded_name
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        parts.append(_string(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items())))
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts += (encoded_name, _KIND_FIELD[span.kind], _PACK_TIMES(0x39, span.start_time or 0, 0x41, span.end_time or 0))
    parts += _attributes(span.attributes)
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    if span.events:
        parts += (_delimited(b"\x5a", event.SerializeToString()) for event in _encode_events(span.events) or ())
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    if span.links:
        parts += (_delimited(b"\x6a", link.SerializeToString()) for link in _encode_links(span.links) or ())
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    parts.append(_status(span))
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(parts)


def _cached(cache: dict[int, tuple[Any, bytes]], key: Any, encode: Any) -> bytes:
    found = cache.get(id(key))
    if found is not None and found[0] is key:
        return found[1]
    encoded: bytes = encode(key).SerializeToString()
    if len(cache) >= 64:
        cache.clear()
    cache[id(key)] = (key, encoded)
    return encoded


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialized ExportTraceServiceRequest of `spans`: grouped by resource, then instrumentation scope, as
    the SDK's encoder does."""
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope or None
        group = groups.get(id(resource))
        if group is None:
            group = groups[id(resource)] = (resource, {})
        found = group[1].get(id(scope))
        if found is None:
            found = group[1][id(scope)] = (scope, [])
        found[1].append(_delimited(b"\x12", encode_span(span)))
    out = []
    for resource, scopes in groups.values():
        body = [_delimited(b"\x0a", _cached(_resource_cache, resource, _encode_resource))]
        for scope, encoded in scopes.values():
            scope_body = [_delimited(b"\x0a", b"" if scope is None
                                     else _cached(_scope_cache, scope, _encode_instrumentation_scope)), *encoded]
            if scope is not None and scope.schema_url:
                scope_body.append(_string(b"\x1a", scope.schema_url))
            body.append(_delimited(b"\x12", b"".join(scope_body)))
        if resource.schema_url:
            body.append(_string(b"\x1a", resource.schema_url))
        out.append(_delimited(b"\x0a", b"".join(body)))
    return b"".join(out)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter (configured by the same `OTEL_EXPORTER_OTLP_*` variables), with the
    request encoded by `encode_request`. Should the fast encoder fail on a batch, the SDK's encodes it."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        try:
            return ExportTraceServiceRequest.FromString(encode_request(data))
        except Exception:  # noqa: BLE001 - never lose a batch to the fast path
            log.exception("fast OTLP encoding failed; using the SDK's encoder")
            return super()._translate_data(data)


__all__ = ["FastOTLPSpanExporter", "encode_request", "encode_span"]
