"""The project's own files tell the truth: README documents every setting, compose.yaml runs the suite."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "registry", "deployer", "dispatcher", "executor")


def test_readme_documents_every_setting() -> None:
    used = set()
    for path in (ROOT / "services").rglob("*.py"):
        used |= set(re.findall(r'"(CLAWHUB_[A-Z_]+)"', path.read_text()))
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(CLAWHUB_[A-Z_]+)`", readme))
    # Host variables are documented once as CLAWHUB_<SERVICE>_HOST.
    host_vars = {f"CLAWHUB_{s.upper()}_HOST" for s in SERVICES}
    assert "CLAWHUB_<SERVICE>_HOST" in readme
    missing = sorted(used - documented - host_vars)
    assert not missing, f"README's configuration table lacks {missing}"


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./dev up" in readme and "./dev test" in readme
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()


def test_compose_runs_the_five_services() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    # The five services, plus the observability stack (tests/test_observability_config.py checks that part).
    assert set(services) == set(SERVICES) | {"otel-collector", "jaeger", "prometheus", "grafana"}
    for name, service in ((n, services[n]) for n in SERVICES):
        assert service["command"] == ["python", "-m", f"services.{name}"]
        env = service["environment"]
        assert env[f"CLAWHUB_{name.upper()}_HOST"] == "0.0.0.0"
        assert "clawhub" in service["healthcheck"]["test"] and "health" in service["healthcheck"]["test"]
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        # Every address a service is given names a service of this file, on that service's port.
        for key, value in env.items():
            if key.endswith("_ADDRESS") or key.endswith("_ADDRESSES"):
                for address in str(value).split(","):
                    host, _, port = address.partition(":")
                    assert host in services, f"{name}: {key} points at unknown host {host}"
                    assert services[host]["environment"][f"CLAWHUB_{host.upper()}_PORT"] == port
    assert services["gateway"]["ports"] == ["50051:50051"]
    assert all("ports" not in services[n] for n in SERVICES if n != "gateway"), "only the gateway is public"
    assert (ROOT / "Dockerfile").is_file()


def _documented_reasons() -> dict[str, str]:
    """docs/errors.md's table: reason → its status cell."""
    rows = {}
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        if match := re.match(r"\|\s*`([A-Z_]+)`\s*\|([^|]*)\|", line):
            rows[match[1]] = match[2]
    return rows


def test_errors_doc_lists_every_reason_with_the_codes_the_code_returns() -> None:
    """docs/errors.md cannot drift from the code: every Reason is listed, and every status code a service
    pairs with a reason (`ServiceError(grpc.StatusCode.X, Reason.Y, …)`, `invalid(Reason.Y, …)`) is named in
    that reason's row."""
    from services.runtime.errors import Reason

    rows = _documented_reasons()
    assert sorted(set(Reason) - set(rows)) == []
    wrong = []
    for path in (ROOT / "services").rglob("*.py"):
        text = path.read_text()
        pairs = set(re.findall(r"StatusCode\.([A-Z_]+),\s*Reason\.([A-Z_]+)", text))
        pairs |= {("INVALID_ARGUMENT", reason) for reason in re.findall(r"\binvalid\(\s*Reason\.([A-Z_]+)", text)}
        wrong += [f"{reason} is returned as {code} in {path.relative_to(ROOT)}" for code, reason in pairs
                  if reason in rows and code not in rows[reason]]
    assert sorted(set(wrong)) == []
