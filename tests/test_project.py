"""The project's own files tell the truth: README documents every setting, compose.yaml runs the topology."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def compose_kind(service: dict[str, Any]) -> str | None:
    """Which clawhub service a compose service runs (`python -m services.X`), or None."""
    command = service.get("command") or []
    return command[2].removeprefix("services.") if command[:2] == ["python", "-m"] else None


def test_compose_runs_the_topology() -> None:
    """The issue-15 topology on one machine: PostgreSQL, Redis, two executors, two deployers (a standby), one
    of each other service, wired the way deploy/k8s/ is (docs/deploy.md)."""
    from services.runtime.channels import grpc_target

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    kinds = {name: compose_kind(service) for name, service in services.items()}
    clawhub = {name: kind for name, kind in kinds.items() if kind}
    assert sorted(clawhub.values()) == sorted([*SERVICES, "executor", "deployer"])
    # Plus the dependencies and the observability stack (tests/test_observability_config.py checks that part).
    assert set(services) - set(clawhub) == {"postgres", "redis", "otel-collector", "jaeger", "prometheus", "grafana"}
    # The names an address may use: each service's own, and the network aliases replicas share.
    names: dict[str, set[str]] = {}
    for name, service in services.items():
        for alias in [name, *service.get("networks", {}).get("default", {}).get("aliases", [])]:
            names.setdefault(alias, set()).add(name)
    assert names["executor"] == {n for n, k in clawhub.items() if k == "executor"}
    assert names["deployer"] == {n for n, k in clawhub.items() if k == "deployer"}
    database_urls = set()
    for name, kind in clawhub.items():
        service = services[name]
        env = service["environment"]
        assert env[f"CLAWHUB_{kind.upper()}_HOST"] == "0.0.0.0"
        assert "clawhub" in service["healthcheck"]["test"] and "health" in service["healthcheck"]["test"]
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{env[f'CLAWHUB_{kind.upper()}_PORT']}", name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        # Every address a service is given names services of this file (through `dns:///` for replicas), on the
        # port those services listen on.
        for key, value in env.items():
            if key.endswith("_ADDRESS") or key.endswith("_ADDRESSES"):
                grpc_target(str(value))  # a form the channels take (a list of names is not one)
                for address in str(value).split(","):
                    host, _, port = address.removeprefix("dns:///").partition(":")
                    assert host in names, f"{name}: {key} points at unknown host {host}"
                    if len(names[host]) > 1:
                        assert address.startswith("dns:///"), f"{name}: {key}: replicas are found by dns:///"
                    for target in names[host]:
                        target_kind = kinds[target]
                        assert target_kind, f"{name}: {key} points at {target}"
                        assert services[target]["environment"][f"CLAWHUB_{target_kind.upper()}_PORT"] == port
        if kind in ("registry", "deployer"):
            database_urls.add(env["CLAWHUB_DATABASE_URL"])
        # Rate-limit buckets in Redis, so that the replicas share them.
        assert env["CLAWHUB_RATE_BACKEND"] == "redis" and env["CLAWHUB_RATE_REDIS_URL"].startswith("redis://redis:")
    # One PostgreSQL for the registry and both deployers, the one this file runs.
    (url,) = database_urls
    postgres = services["postgres"]["environment"]
    assert url == (f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/"
                   f"{postgres['POSTGRES_DB']}")
    deployers = [services[n]["environment"] for n, k in clawhub.items() if k == "deployer"]
    # Each deployer has its own name and advertised address, and all share one secrets key file (a volume).
    assert len({e["CLAWHUB_DEPLOYER_ID"] for e in deployers}) == len(deployers) == 2
    for name, kind in clawhub.items():
        if kind == "deployer":
            env = services[name]["environment"]
            assert env["CLAWHUB_DEPLOYER_ADVERTISE_ADDRESS"] == f"{name}:{env['CLAWHUB_DEPLOYER_PORT']}"
            key_dir = env["CLAWHUB_DEPLOYER_SECRETS_KEY_FILE"].rsplit("/", 1)[0]
            assert f"deployer-keys:{key_dir}" in services[name]["volumes"], name
    for name, kind in clawhub.items():
        if kind == "executor":
            assert services[name]["environment"]["CLAWHUB_KV_REDIS_URL"].startswith("redis://redis:"), name
    assert services["gateway"]["ports"] == ["50051:50051"]
    assert all("ports" not in services[n] for n in [*clawhub, "postgres", "redis"] if n != "gateway"), \
        "only the gateway is public"
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
