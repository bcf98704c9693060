"""Which metrics port `clawhub up` gives each service (docs/metrics.md), and the banner lines that say where."""

from __future__ import annotations

from services.cli.up import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, METRICS_LINE, _metrics_port, metrics_banner


def test_up_gives_each_service_its_fixed_metrics_port_by_default() -> None:
    for service, port in DEFAULT_PORTS.items():
        assert _metrics_port({}, service, port) == str(DEFAULT_METRICS_PORTS[service])
    # Executor N: the executor's metrics port + N - 1, as with their gRPC ports.
    assert [_metrics_port({}, "executor", 50055 + i, i) for i in range(3)] == ["9155", "9156", "9157"]
    assert len(set(DEFAULT_METRICS_PORTS.values())) == len(DEFAULT_METRICS_PORTS)


def test_a_service_on_a_free_port_gets_a_free_metrics_port() -> None:
    assert _metrics_port({}, "gateway", 0) == "0"
    assert _metrics_port({}, "executor", 0, 1) == "0"


def test_the_metrics_variables_win() -> None:
    env = {"CLAWHUB_REGISTRY_METRICS_PORT": "19000", "CLAWHUB_EXECUTOR_METRICS_PORT": "19100",
           "CLAWHUB_GATEWAY_METRICS_PORT": "off", "CLAWHUB_DEPLOYER_METRICS_PORT": "0"}
    assert _metrics_port(env, "registry", 50052) == "19000"
    assert _metrics_port(env, "executor", 0, 2) == "19102"
    assert _metrics_port(env, "gateway", 50051) == "off"
    assert _metrics_port(env, "deployer", 50053, 0) == "0"
    # A bad value is passed on: the service refuses it, naming the variable.
    assert _metrics_port({"CLAWHUB_DISPATCHER_METRICS_PORT": "http"}, "dispatcher", 50054) == "http"


def test_the_banner_lists_every_metrics_address_and_the_line_up_reads() -> None:
    text = metrics_banner({"registry": "http://127.0.0.1:9152/metrics", "executor-1": "http://127.0.0.1:9155/metrics"})
    lines = text.splitlines()
    assert lines[0].startswith("Prometheus metrics (docs/metrics.md")
    assert lines[1:] == ["  registry    http://127.0.0.1:9152/metrics", "  executor-1  http://127.0.0.1:9155/metrics"]
    assert metrics_banner({}) == ""
    match = METRICS_LINE.match("clawhub registry metrics on http://127.0.0.1:9152/metrics")
    assert match is not None and match[2] == "http://127.0.0.1:9152/metrics"
