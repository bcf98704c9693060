"""W3C trace context headers without the OpenTelemetry SDK: what the CLI needs to start a trace, kept apart
from services/runtime/tracing.py so the CLI does not import OpenTelemetry to send one header."""

from __future__ import annotations

import secrets


def new_traceparent() -> tuple[str, str]:
    """(traceparent, trace id): a fresh, sampled W3C trace context (version 00, flags 01) for a call that starts
    a trace, as `clawhub invoke -v` does. Every service that exports traces then records the call, whatever its
    sampler's ratio (the default sampler is parent-based)."""
    trace_id = span_id = ""
    while not trace_id.strip("0"):  # all zeros is invalid by the spec
        trace_id = secrets.token_hex(16)
    while not span_id.strip("0"):
        span_id = secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id
