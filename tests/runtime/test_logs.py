"""Service logs (services/runtime/logs.py): text by default, JSON lines with CLAWHUB_LOG_FORMAT=json, the
current span's trace and span ids on both, and a bad format refused like any bad setting."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry import trace

from services.runtime.logs import JsonFormatter, TextFormatter, log_format
from services.runtime.settings import SettingsError

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("clawhub.executor", logging.INFO, __file__, 1, message, args, exc_info)


def traced() -> trace.Span:
    return trace.NonRecordingSpan(trace.SpanContext(trace_id=TRACE_ID, span_id=SPAN_ID, is_remote=False,
                                                    trace_flags=trace.TraceFlags(1)))


def test_json_lines_carry_the_fields_and_the_current_span() -> None:
    formatter = JsonFormatter("executor")
    plain = json.loads(formatter.format(record("ran %s\nin two lines", "x")))
    assert set(plain) == {"time", "level", "logger", "service", "message"}
    assert plain["level"] == "INFO" and plain["logger"] == "clawhub.executor" and plain["service"] == "executor"
    assert plain["message"] == "ran x\nin two lines" and plain["time"].endswith("Z")
    with trace.use_span(traced()):
        line = formatter.format(record("inside a call", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and entry["span_id"] == "00f067aa0ba902b7"
    assert "ValueError: boom" in entry["exception"]


def test_text_lines_are_as_before_and_name_the_trace_only_inside_one() -> None:
    formatter = TextFormatter()
    assert formatter.format(record("hello")).endswith(" INFO clawhub.executor: hello")
    with trace.use_span(traced()):
        assert formatter.format(record("hello")).endswith(
            " INFO clawhub.executor: hello [trace 4bf92f3577b34da6a3ce929d0e0e4736]")


def test_the_format_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWHUB_LOG_FORMAT", raising=False)
    assert log_format() == "text"
    monkeypatch.setenv("CLAWHUB_LOG_FORMAT", " JSON ")
    assert log_format() == "json"
    monkeypatch.setenv("CLAWHUB_LOG_FORMAT", "xml")
    with pytest.raises(SettingsError, match="CLAWHUB_LOG_FORMAT='xml' is not a log format: use text or json"):
        log_format()


def service_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "CLAWHUB_INTERNAL_AUTH": "off", "CLAWHUB_REGISTRY_PORT": "0",
            "CLAWHUB_REGISTRY_DATA_DIR": str(tmp_path / "registry"), "CLAWHUB_SHUTDOWN_GRACE": "0.2", **extra}


def test_a_bad_log_format_stops_a_service_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "services.registry"], env=service_env(
        tmp_path, CLAWHUB_LOG_FORMAT="yaml"), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "clawhub: registry: CLAWHUB_LOG_FORMAT='yaml' is not a log format: use text or json"]
    assert "listening" not in done.stdout


def test_a_service_logs_json_lines(tmp_path: Path) -> None:
    """Every stderr line of a real service is one JSON object; the `listening` line stays plain on stdout."""
    process = subprocess.Popen([sys.executable, "-m", "services.registry"], env=service_env(
        tmp_path, CLAWHUB_LOG_FORMAT="json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("clawhub registry listening on ")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    entries = [json.loads(line) for line in stderr.splitlines()]
    assert entries and all(entry["service"] == "registry" and entry["level"] for entry in entries)
    assert any(entry["message"] == "registry: stopped" for entry in entries), entries
