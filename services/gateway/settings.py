"""Gateway settings, from `CLAWHUB_*` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.channels import CONTROL_MESSAGE_BYTES, ENVELOPE_BYTES, env_payload_size
from services.runtime.settings import env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """CLAWHUB_GATEWAY_HOST: interface to listen on."""
    port: int = 50051
    """CLAWHUB_GATEWAY_PORT: the public port (0 picks a free one)."""
    dispatcher_address: str = "127.0.0.1:50054"
    """CLAWHUB_DISPATCHER_ADDRESS: where invocations go."""
    registry_address: str = "127.0.0.1:50052"
    """CLAWHUB_REGISTRY_ADDRESS: where RegistryService calls are forwarded."""
    deployer_address: str = "127.0.0.1:50053"
    """CLAWHUB_DEPLOYER_ADDRESS: where DeployerService calls are forwarded."""
    max_input_bytes: int = 4 * 1024 * 1024
    """CLAWHUB_GATEWAY_MAX_INPUT: largest accepted invocation input (as JSON text or raw bytes); it also bounds
    the public port's messages (see max_request_bytes)."""
    max_output_bytes: int = 4 * 1024 * 1024
    """CLAWHUB_EXECUTOR_MAX_OUTPUT: the executors' output cap, which bounds InvokeSkill responses."""
    invoke_timeout: float = 30.0
    """CLAWHUB_GATEWAY_INVOKE_TIMEOUT: deadline in seconds when the caller sets none."""
    forward_timeout: float = 300.0
    """CLAWHUB_GATEWAY_FORWARD_TIMEOUT: deadline for forwarded admin calls when the caller sets none."""
    grace_seconds: float = 5.0
    """CLAWHUB_SHUTDOWN_GRACE: seconds to drain in-flight calls on SIGTERM."""

    @property
    def max_request_bytes(self) -> int:
        """Receive limit of the public port, per message.

        An InvokeSkill request is its input plus a small envelope; relayed registry and deployer requests are
        control messages. The limit applies to the encoded request: a JSON `input` whose protobuf encoding is
        larger than its text (arrays of small numbers, up to ~5.5x) is refused with RESOURCE_EXHAUSTED before
        its JSON size is checked, and goes as `raw_input` instead.
        """
        return max(self.max_input_bytes + ENVELOPE_BYTES, CONTROL_MESSAGE_BYTES)

    @property
    def max_response_bytes(self) -> int:
        """Send limit of the public port, per message: an InvokeSkill response carries at most
        CLAWHUB_EXECUTOR_MAX_OUTPUT of output (a JSON output that would encode larger goes as raw_output);
        relayed responses are control messages."""
        return max(self.max_output_bytes + ENVELOPE_BYTES, CONTROL_MESSAGE_BYTES)

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        return cls(
            host=env_str("CLAWHUB_GATEWAY_HOST", d.host),
            port=env_int("CLAWHUB_GATEWAY_PORT", d.port, minimum=0),
            dispatcher_address=env_str("CLAWHUB_DISPATCHER_ADDRESS", d.dispatcher_address),
            registry_address=env_str("CLAWHUB_REGISTRY_ADDRESS", d.registry_address),
            deployer_address=env_str("CLAWHUB_DEPLOYER_ADDRESS", d.deployer_address),
            max_input_bytes=env_payload_size("CLAWHUB_GATEWAY_MAX_INPUT", str(d.max_input_bytes)),
            max_output_bytes=env_payload_size("CLAWHUB_EXECUTOR_MAX_OUTPUT", str(d.max_output_bytes)),
            invoke_timeout=env_float("CLAWHUB_GATEWAY_INVOKE_TIMEOUT", d.invoke_timeout, minimum=0.001),
            forward_timeout=env_float("CLAWHUB_GATEWAY_FORWARD_TIMEOUT", d.forward_timeout, minimum=0.001),
            grace_seconds=env_float("CLAWHUB_SHUTDOWN_GRACE", d.grace_seconds, minimum=0),
        )
