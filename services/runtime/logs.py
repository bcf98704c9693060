"""Service logs: readable text by default, one JSON object per line with `CLAWHUB_LOG_FORMAT=json`.

Both carry the trace of the call being handled: the trace and span ids of the OpenTelemetry span current when
the line was logged (with tracing on, every gRPC call handled or made has one). Without tracing the current span
is the invalid one (all-zero ids), and the ids are left out: a text line is then exactly what it always was.

JSON lines are for log collectors (Loki, Elasticsearch, `jq`): each has `time` (UTC, RFC 3339, milliseconds),
`level`, `logger`, `service`, `message`, `trace_id` and `span_id` when a span is current, and `exception`
with the formatted traceback when one was logged. One event is one line in both formats: a message's own
newlines are kept inside the JSON string, never split into lines a collector would read as separate events.

The process's `listening` line (services/runtime/server.py) goes to stdout as plain text in both formats:
`clawhub up` and supervisors wait for it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import trace

from services.runtime.settings import SettingsError

FORMAT_VARIABLE = "CLAWHUB_LOG_FORMAT"
LEVEL_VARIABLE = "CLAWHUB_LOG_LEVEL"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_format() -> str:
    """`CLAWHUB_LOG_FORMAT` (`text` when unset); any other value is a SettingsError naming the choices."""
    raw = os.environ.get(FORMAT_VARIABLE, "").strip()
    value = raw.lower() or "text"
    if value not in FORMATS:
        raise SettingsError(f"{FORMAT_VARIABLE}={raw!r} is not a log format: use text or json")
    return value


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as lowercase hex; for a call tracing does not record, the ids of
    its `traceparent` (so its lines still share an id across services); ("", "") when there is neither."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        from services.runtime import tracing  # here: tracing imports the SDK's pieces lazily, logs stay light

        entries = tracing.unsampled_entries()
        if entries:
            parts = entries[0][1].split("-")
            return (parts[1], parts[2]) if len(parts) == 4 else ("", "")
        return "", ""
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


class TextFormatter(logging.Formatter):
    """Today's `TIME LEVEL LOGGER: MESSAGE`, with ` [trace ID]` after the message when the line was logged
    inside a traced call."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        trace_id, _ = current_ids()
        return f"{line} [trace {trace_id}]" if trace_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "service": self._service,
            "message": record.getMessage(),
        }
        trace_id, span_id = current_ids()
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = span_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _rfc3339(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def configure(service: str = "") -> None:
    """Send every log record to stderr in the configured format, at `CLAWHUB_LOG_LEVEL` (default INFO).
    Raises SettingsError for a bad `CLAWHUB_LOG_FORMAT` before changing anything."""
    chosen = log_format()
    level = getattr(logging, os.environ.get(LEVEL_VARIABLE, "INFO").strip().upper(), logging.INFO)
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service or "clawhub") if chosen == "json" else TextFormatter())
    # As before: a process whose root logger has handlers already (pytest's) keeps them.
    logging.basicConfig(level=level, handlers=[handler])
    # aiosqlite logs every statement with its parameters at DEBUG, and those include deploy-time env values
    # (secrets): never below INFO, whatever CLAWHUB_LOG_LEVEL says.
    logging.getLogger("aiosqlite").setLevel(max(level, logging.INFO))
