"""compose.yaml's observability stack is wired, and the Grafana dashboard asks only for metrics that exist.

There is no Docker engine in CI, so these read the files as compose, the collector, Prometheus and Grafana
would: every clawhub service exports its spans to the collector and is scraped by Prometheus on the port it
serves its metrics on; the collector's trace pipeline ends in Jaeger; every file compose mounts is in the
repository and parses; and every metric name in every dashboard query is one the services really serve, read
from a real service's /metrics (so a renamed metric breaks this test, not the dashboard at 3 a.m.).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "registry", "deployer", "dispatcher", "executor")
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "clawhub.json"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def clawhub_containers(services: dict[str, Any]) -> dict[str, str]:
    """compose service name → the clawhub service it runs (`python -m services.X`); replicas share a kind."""
    return {name: service["command"][2].removeprefix("services.") for name, service in services.items()
            if service.get("command", [])[:2] == ["python", "-m"]}


def host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"//{url}")
    assert parsed.hostname and parsed.port, url
    return parsed.hostname, parsed.port


def test_every_file_compose_mounts_is_in_the_repository_and_parses() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("./"):
                continue  # a named volume
            path = ROOT / source
            assert path.exists(), f"{name} mounts {source}, which is not in the repository"
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix in (".yaml", ".yml"):
                    assert isinstance(yaml.safe_load(file.read_text()), dict), file
                elif file.suffix == ".json":
                    assert isinstance(json.loads(file.read_text()), dict), file


def test_every_service_exports_its_spans_to_the_collector() -> None:
    services = compose()["services"]
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    receiver_port = host_port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    names: dict[str, set[str]] = {}
    containers = clawhub_containers(services)
    assert set(containers.values()) == set(SERVICES)
    for name, kind in containers.items():
        env = services[name]["environment"]
        assert host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", receiver_port), name
        assert env.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio").startswith("parentbased_")
        names.setdefault(kind, set()).add(env["OTEL_SERVICE_NAME"])
        assert kind in env["OTEL_SERVICE_NAME"]
    # Replicas of a service are one service in Jaeger (their spans tell the hosts apart).
    assert all(len(n) == 1 for n in names.values()), names
    assert len(set.union(*names.values())) == len(SERVICES), "each service has a service.name of its own in Jaeger"
    # The trace pipeline: OTLP in, the declared processors, out to Jaeger's OTLP port inside the network.
    pipeline = collector["service"]["pipelines"]["traces"]
    for section, used in (("receivers", pipeline["receivers"]), ("processors", pipeline.get("processors", [])),
                          ("exporters", pipeline["exporters"])):
        assert set(used) <= set(collector[section]), f"the traces pipeline uses undeclared {section}"
    (exporter,) = pipeline["exporters"]
    assert exporter.split("/")[0] == "otlp"
    assert host_port(collector["exporters"][exporter]["endpoint"]) == ("jaeger", 4317)
    assert "jaeger" in services and services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert "127.0.0.1:16686:16686" in services["jaeger"]["ports"], "Jaeger's UI is published (on loopback)"


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    services = compose()["services"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    containers = clawhub_containers(services)
    targets = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for group in job["static_configs"]:
            for target in group["targets"]:
                host, port = host_port(target)
                targets[host] = port
                # The dashboard selects by these two (the metrics carry no service label of their own): the
                # label names the clawhub service the container runs, the same for its replicas.
                assert job["job_name"] == "clawhub" and group["labels"]["service"] == containers.get(host), host
    assert set(targets) == set(containers), "Prometheus scrapes exactly the clawhub containers"
    assert set(containers.values()) == set(SERVICES)
    for name, kind in containers.items():
        env = services[name]["environment"]
        assert int(env[f"CLAWHUB_{kind.upper()}_METRICS_PORT"]) == targets[name], name
        assert env[f"CLAWHUB_{kind.upper()}_PORT"] != env[f"CLAWHUB_{kind.upper()}_METRICS_PORT"]
        host = env.get(f"CLAWHUB_{kind.upper()}_METRICS_HOST", env.get("CLAWHUB_METRICS_HOST"))
        assert host == "0.0.0.0", f"{name} serves its metrics to the compose network"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yaml").read_text())["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    assert host_port(by_uid["prometheus"]["url"]) == ("prometheus", 9090)
    assert by_uid["prometheus"]["type"] == "prometheus"
    assert host_port(by_uid["jaeger"]["url"]) == ("jaeger", 16686)
    # The dashboards provider reads the directory compose mounts the repository's dashboards at.
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in by_uid, panel["title"]
    assert "127.0.0.1:3000:3000" in services["grafana"]["ports"]


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return [p for p in found if p.get("type") != "row"]


# The dashboard's queries against the metrics a real service serves.

PROMQL_WORDS = {
    # Aggregations, functions and keywords: what a PromQL identifier may be other than a metric name.
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: every identifier that is not a function call, a keyword, a
    label inside `{…}` or `by (…)`, a range, a string or a number."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\blabel_values\(\s*([^,()]*)(,[^)]*)?\)", r"(\1)", text)  # Grafana: label_values(metric, label)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, $__rate_interval included
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        if match[2] is None and match[1] not in PROMQL_WORDS:
            names.add(match[1])
    return names


def test_metric_names_are_read_as_prometheus_would() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (service, le) (rate(x_bucket{a="b", c=~"$d"}[5m])))') \
        == {"x_bucket"}
    assert metric_names("sum(rate(a_total[$__rate_interval])) / on (job) group_left b * 1e3") == {"a_total", "b"}
    assert metric_names("label_values(clawhub_rpc_requests_total, service)") == {"clawhub_rpc_requests_total"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every query of the dashboard: panels' targets and template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel["targets"]]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append((f"${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return queries


def series_names(exposition: str) -> set[str]:
    """Every series name the Prometheus text `exposition` declares, from its `# TYPE` lines (so a labelled
    metric with no sample yet counts): a counter's `_total`, a histogram's `_bucket` / `_sum` / `_count`."""
    names = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if kind == "counter":
            base = name.removesuffix("_total")
            names |= {f"{base}_total"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


async def test_every_dashboard_query_names_metrics_a_real_service_serves(tmp_path: Path) -> None:
    """An executor serving its metrics on a free port: the names its /metrics declares (the process registry
    holds every service's metrics) are the only ones the dashboard may ask for, and the dashboard shows every
    metric the issue asks an operator to see."""
    import asyncio
    import urllib.request

    from services.executor.server import build_server
    from services.executor.settings import Settings
    from services.runtime.metrics import METRIC_NAMES, MetricsSettings

    host = await build_server(Settings(host="127.0.0.1", port=0, registry_address="127.0.0.1:1",
                                       grace_seconds=0.5, metrics=MetricsSettings(port=0)))
    await host.start()
    try:
        assert host.metrics_url.startswith("http://127.0.0.1:")

        def scrape() -> str:
            with urllib.request.urlopen(host.metrics_url, timeout=10) as response:
                text: str = response.read().decode()
                return text

        served = series_names(await asyncio.to_thread(scrape))
    finally:
        await host.stop(grace=0.5)
    # It serves every metric metrics.py (and docs/metrics.md) lists, histograms by their series.
    assert sorted(n for n in METRIC_NAMES if n not in served and f"{n}_bucket" not in served) == []
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - served
        assert not unknown, f"{where}: {sorted(unknown)} is not served (served: {sorted(served)})"
        for name in names:
            used.setdefault(name, set()).add(where)
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    must_show = {
        "clawhub_rpc_requests_total", "clawhub_rpc_errors_total", "clawhub_rpc_duration_seconds",
        "clawhub_skill_invocations_total", "clawhub_skill_failures_total", "clawhub_skill_duration_seconds",
        "clawhub_skill_fuel_consumed", "clawhub_skill_availability_ratio", "clawhub_executor_busy_threads",
        "clawhub_executor_queue_depth", "clawhub_executor_module_loads_total", "clawhub_db_query_duration_seconds",
        "clawhub_rate_limit_refusals_total", "clawhub_releases_total", "clawhub_rollbacks_total",
        "process_cpu_seconds_total", "process_resident_memory_bytes",
    }
    assert sorted(must_show - shown) == [], "the dashboard lacks a panel for these"
