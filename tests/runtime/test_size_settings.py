"""Size settings: never negative, and those that size gRPC messages stay below gRPC's 2 GiB; a bad value stops
a service with one line naming the variable, never a traceback (gRPC's OverflowError) or a silent negative."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.executor.settings import Settings as ExecutorSettings
from services.gateway.settings import Settings as GatewaySettings
from services.runtime.channels import (
    CONTROL_MESSAGE_BYTES,
    ENVELOPE_BYTES,
    MAX_PAYLOAD_SETTING_BYTES,
    InvocationLimits,
    channel,
)
from services.runtime.server import create_server
from services.runtime.settings import SettingsError, env_size, parse_size


@pytest.fixture(autouse=True)
def _internal_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about other settings: the services' from_env needs service credentials or auth off."""
    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text", ["-5", "-1KiB", "-0.5MiB", "inf", "nan", "1e999", "1e999GiB"])
def test_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="negative|not a size"):
        parse_size(text)


def test_sizes_up_to_the_limit() -> None:
    assert parse_size("0") == 0
    assert parse_size("1.5KiB") == 1536
    # The largest message a payload setting sizes: the payload and its envelopes.
    assert MAX_PAYLOAD_SETTING_BYTES + CONTROL_MESSAGE_BYTES + ENVELOPE_BYTES < 2**31


@pytest.mark.parametrize(("variable", "load"), [
    ("CLAWHUB_GATEWAY_MAX_INPUT", GatewaySettings.from_env),
    ("CLAWHUB_EXECUTOR_MAX_OUTPUT", GatewaySettings.from_env),
    ("CLAWHUB_EXECUTOR_MAX_INPUT", ExecutorSettings.from_env),
    ("CLAWHUB_EXECUTOR_MAX_OUTPUT", ExecutorSettings.from_env),
    ("CLAWHUB_EXECUTOR_MAX_STDERR", ExecutorSettings.from_env),
    ("CLAWHUB_EXECUTOR_MAX_INPUT", InvocationLimits.from_env),
    ("CLAWHUB_EXECUTOR_MAX_STDERR", InvocationLimits.from_env),
])
@pytest.mark.parametrize("value", ["3GiB", "2GiB", "-5"])
def test_message_sizes_are_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                        load: object, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^{variable}"):
        load()  # type: ignore[operator]


async def test_the_largest_accepted_sizes_make_valid_channels_and_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit, every message bound gRPC is given fits its C int, even output + stderr together."""
    for variable in ("CLAWHUB_EXECUTOR_MAX_INPUT", "CLAWHUB_EXECUTOR_MAX_OUTPUT", "CLAWHUB_EXECUTOR_MAX_STDERR"):
        monkeypatch.setenv(variable, "2040MiB")
    sizes = InvocationLimits.from_env()
    assert sizes.max_output == MAX_PAYLOAD_SETTING_BYTES
    await channel("127.0.0.1:1", max_receive_bytes=sizes.execute_response,
                  max_send_bytes=sizes.execute_request).close()
    host = create_server("executor", [], host="127.0.0.1", port=0, register=lambda server: None,
                         max_receive_bytes=sizes.execute_request, max_send_bytes=sizes.execute_response)
    await host.server.stop(0)


def test_other_sizes_are_never_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWHUB_EXECUTOR_CACHE_BYTES", "-1MiB")
    with pytest.raises(SettingsError, match="^CLAWHUB_EXECUTOR_CACHE_BYTES"):
        ExecutorSettings.from_env()
    monkeypatch.setenv("CLAWHUB_X", "5GiB")
    assert env_size("CLAWHUB_X", "1MiB") == 5 * 1024**3


@pytest.mark.parametrize(("service", "variable", "value", "says"), [
    ("gateway", "CLAWHUB_GATEWAY_MAX_INPUT", "3GiB", "is too large: at most 2040MiB"),
    ("gateway", "CLAWHUB_GATEWAY_MAX_INPUT", "-5", "is negative"),
    # The dispatcher reads the executors' sizes while it builds, after its own settings.
    ("dispatcher", "CLAWHUB_EXECUTOR_MAX_INPUT", "3GiB", "is too large: at most 2040MiB"),
])
def test_a_bad_size_stops_a_service_with_one_line(service: str, variable: str, value: str, says: str,
                                                  tmp_path: Path) -> None:
    import os

    env = {**os.environ, variable: value, "CLAWHUB_DATA_DIR": str(tmp_path), f"CLAWHUB_{service.upper()}_PORT": "0",
           "CLAWHUB_EXECUTOR_ADDRESSES": "127.0.0.1:9", "CLAWHUB_DEPLOYER_ADDRESS": "127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clawhub: {service}: {variable}") and says in lines[0], lines
    assert "listening" not in done.stdout


async def test_grpc_itself_refuses_a_limit_of_2_gib() -> None:
    """Why the bound exists (if gRPC ever takes larger limits, it can be raised)."""
    with pytest.raises(OverflowError):
        grpc.aio.insecure_channel("127.0.0.1:1", options=(("grpc.max_receive_message_length", 2**31),))
