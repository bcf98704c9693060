"""Prometheus metrics (services/runtime/metrics.py, docs/metrics.md): real servers with their metrics port on,
scraped over HTTP; the numbers must move with the calls made.

The registry is one per process, so every check compares a scrape before with one after the calls."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.deployer.store import SqliteDeploymentStore
from services.registry.store import SqliteMetadataStore
from services.runtime import metrics
from services.runtime.errors import Reason, ServiceError
from services.runtime.metrics import METRIC_NAMES, Availability, MetricsSettings, SkillLabels
from services.runtime.ratelimit.policy import Limit, RateLimitSettings
from services.runtime.server import PortInUse, ServiceHost, create_server
from services.runtime.settings import SettingsError
from tests.runtime.metrics_scrape import ascrape, exposes, label_values, moved, names

SERVICE = "clawhub.test.v1.MetricsProbe"
ROOT = Path(__file__).resolve().parents[2]


async def _ok(request: bytes, context: Any) -> bytes:
    return b"fine"


async def _fail(request: bytes, context: Any) -> bytes:
    raise ServiceError(grpc.StatusCode.NOT_FOUND, Reason.SKILL_NOT_FOUND, "no such skill")


async def _crash(request: bytes, context: Any) -> bytes:
    raise RuntimeError("a bug")


async def _slow(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(30)
    return b"late"


async def _stream(request: bytes, context: Any) -> Any:
    for _ in range(3):
        yield b"item"


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Ok": grpc.unary_unary_rpc_method_handler(_ok),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }),))


async def _probe(**kwargs: Any) -> ServiceHost:
    host = create_server("probe", (SERVICE,), host="127.0.0.1", port=0, register=_register, grace_seconds=0.2,
                         **kwargs)
    await host.start()
    return host


async def _call(port: int, method: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await channel.unary_unary(f"/{SERVICE}/{method}")(b"", timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def test_every_rpc_is_counted_by_code_and_reason_and_timed() -> None:
    host = await _probe(metrics=MetricsSettings(port=0))
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", host.metrics_url), host.metrics_url
        before = await ascrape(host.metrics_url)
        for _ in range(3):
            assert await _call(host.port, "Ok") == grpc.StatusCode.OK
        for _ in range(2):
            assert await _call(host.port, "Fail") == grpc.StatusCode.NOT_FOUND
        assert await _call(host.port, "Crash") == grpc.StatusCode.INTERNAL
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            items = [item async for item in channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=5)]
        assert len(items) == 3
        after = await ascrape(host.metrics_url)
    finally:
        await host.stop(0.2)

    ok = {"grpc_service": SERVICE, "grpc_method": "Ok"}
    assert moved(before, after, "clawhub_rpc_requests_total", **ok, grpc_code="OK") == 3
    assert moved(before, after, "clawhub_rpc_duration_seconds_count", **ok) == 3
    assert moved(before, after, "clawhub_rpc_duration_seconds_sum", **ok) > 0
    # The histogram's buckets are cumulative: the largest holds every call.
    assert moved(before, after, "clawhub_rpc_duration_seconds_bucket", **ok, le="+Inf") == 3
    assert moved(before, after, "clawhub_rpc_errors_total", grpc_method="Ok") == 0
    fail = {"grpc_service": SERVICE, "grpc_method": "Fail"}
    assert moved(before, after, "clawhub_rpc_requests_total", **fail, grpc_code="NOT_FOUND") == 2
    assert moved(before, after, "clawhub_rpc_errors_total", **fail, grpc_code="NOT_FOUND",
                 reason="SKILL_NOT_FOUND") == 2
    assert moved(before, after, "clawhub_rpc_duration_seconds_count", **fail) == 2
    # An unexpected exception is the INTERNAL status the caller got, with its reason.
    assert moved(before, after, "clawhub_rpc_errors_total", grpc_service=SERVICE, grpc_method="Crash",
                 grpc_code="INTERNAL", reason="INTERNAL") == 1
    stream = {"grpc_service": SERVICE, "grpc_method": "Stream"}
    assert moved(before, after, "clawhub_rpc_requests_total", **stream, grpc_code="OK") == 1
    # Health checks of the probe are RPCs too; CPU and memory come with every endpoint.
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names(after)
    # No label carries anything a caller chose: only the methods the server registered appear.
    assert label_values(after, "clawhub_rpc_requests_total", "grpc_service") >= {SERVICE}


async def test_a_call_whose_deadline_passes_is_counted_as_deadline_exceeded() -> None:
    host = await _probe(metrics=MetricsSettings(port=0))
    slow = {"grpc_service": SERVICE, "grpc_method": "Slow"}
    try:
        before = await ascrape(host.metrics_url)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server notices the deadline a moment after the caller: a bounded wait for the count.
        for _ in range(100):
            after = await ascrape(host.metrics_url)
            if moved(before, after, "clawhub_rpc_requests_total", **slow):
                break
            await asyncio.sleep(0.02)
    finally:
        await host.stop(0.2)
    assert moved(before, after, "clawhub_rpc_errors_total", **slow, grpc_code="DEADLINE_EXCEEDED", reason="NONE") == 1
    assert moved(before, after, "clawhub_rpc_requests_total", **slow) == 1


async def test_the_endpoint_closes_with_the_service() -> None:
    host = await _probe(metrics=MetricsSettings(port=0))
    url = host.metrics_url
    await ascrape(url)
    await host.stop(0.2)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)


async def test_without_a_metrics_port_there_is_no_endpoint_and_no_rpc_recording() -> None:
    quiet = await _probe()
    # Another server of the process serves the (one) registry.
    scraped = await _probe(metrics=MetricsSettings(port=0))
    try:
        assert quiet.metrics_url == ""
        before = await ascrape(scraped.metrics_url)
        assert await _call(quiet.port, "Ok") == grpc.StatusCode.OK
        after = await ascrape(scraped.metrics_url)
    finally:
        await quiet.stop(0.2)
        await scraped.stop(0.2)
    assert moved(before, after, "clawhub_rpc_requests_total", grpc_service=SERVICE, grpc_method="Ok") == 0


async def test_rate_limit_refusals_are_counted_by_method_class() -> None:
    limits = RateLimitSettings(class_limits={"read": None, "write": Limit(0.001, 1), "invoke": None, "stream": None})
    host = await _probe(metrics=MetricsSettings(port=0), rate_limits=limits)
    try:
        before = await ascrape(host.metrics_url)
        assert await _call(host.port, "Ok") == grpc.StatusCode.OK
        assert await _call(host.port, "Ok") == grpc.StatusCode.RESOURCE_EXHAUSTED
        after = await ascrape(host.metrics_url)
    finally:
        await host.stop(0.2)
    assert moved(before, after, "clawhub_rate_limit_refusals_total", method_class="write", reason="RATE_LIMITED") == 1
    assert moved(before, after, "clawhub_rpc_errors_total", grpc_service=SERVICE, grpc_method="Ok",
                 grpc_code="RESOURCE_EXHAUSTED", reason="RATE_LIMITED") == 1


async def test_a_taken_metrics_port_names_its_variable() -> None:
    first = await _probe(metrics=MetricsSettings(port=0))
    try:
        taken = int(first.metrics_url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(PortInUse, match="CLAWHUB_PROBE_METRICS_PORT"):
            create_server("probe", (SERVICE,), host="127.0.0.1", port=0, register=_register,
                          metrics=MetricsSettings(port=taken))
    finally:
        await first.stop(0.2)


def test_metrics_settings_are_off_unless_a_port_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWHUB_GATEWAY_METRICS_PORT", raising=False)
    assert not MetricsSettings.from_env("gateway").enabled
    for off in ("", "off", "OFF"):
        monkeypatch.setenv("CLAWHUB_GATEWAY_METRICS_PORT", off)
        assert MetricsSettings.from_env("gateway").port is None
    monkeypatch.setenv("CLAWHUB_GATEWAY_METRICS_PORT", "0")
    assert MetricsSettings.from_env("gateway").port == 0
    monkeypatch.setenv("CLAWHUB_GATEWAY_METRICS_PORT", "9151")
    monkeypatch.setenv("CLAWHUB_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("CLAWHUB_METRICS_MAX_SKILLS", "7")
    assert MetricsSettings.from_env("gateway") == MetricsSettings(port=9151, host="0.0.0.0", max_skills=7)
    for bad in ("http", "70000", "-1"):
        monkeypatch.setenv("CLAWHUB_GATEWAY_METRICS_PORT", bad)
        with pytest.raises(SettingsError, match="CLAWHUB_GATEWAY_METRICS_PORT"):
            MetricsSettings.from_env("gateway")


def test_every_service_reads_its_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setenv("CLAWHUB_INTERNAL_AUTH", "off")
    for service in ("gateway", "registry", "deployer", "dispatcher", "executor"):
        monkeypatch.setenv(f"CLAWHUB_{service.upper()}_METRICS_PORT", "0")
        settings = importlib.import_module(f"services.{service}.settings").Settings
        assert settings().metrics == MetricsSettings(), service  # built directly (tests): off
        assert settings.from_env().metrics.port == 0, service


def test_skill_labels_are_bounded() -> None:
    labels = SkillLabels(max_skills=2)
    assert labels.pair("a", "1.0.0") == ("a", "1.0.0")
    assert labels.pair("b", "") == ("b", "unknown")
    assert labels.pair("c", "1.0.0") == ("other", "other")
    assert labels.skill("a") == "a" and labels.skill("d") == "other"
    for i in range(metrics.MAX_VERSIONS_PER_SKILL + 5):
        labels.pair("a", f"2.0.{i}")
    assert labels.pair("a", "9.9.9") == ("a", "other")
    assert labels.pair("a", "1.0.0") == ("a", "1.0.0")  # kept ones stay


def test_availability_is_a_rolling_success_ratio_per_window() -> None:
    now = [10_000.0]
    window = Availability(clock=lambda: now[0])
    for _ in range(99):
        window.record("s", True)
    window.record("s", False)
    ratios = {(skill, name): (ratio, calls) for skill, name, ratio, calls in window.ratios()}
    assert ratios == {("s", "5m"): (0.99, 100), ("s", "1h"): (0.99, 100)}
    now[0] += 600  # ten minutes on: only the hour still holds those calls
    window.record("s", True)
    ratios = {(skill, name): (ratio, calls) for skill, name, ratio, calls in window.ratios()}
    assert ratios == {("s", "5m"): (1.0, 1), ("s", "1h"): (100 / 101, 101)}
    now[0] += 3600
    assert list(window.ratios()) == []  # nothing in either window: no sample rather than a made-up ratio


async def test_availability_gauges_follow_dispatches() -> None:
    host = await _probe(metrics=MetricsSettings(port=0))
    try:
        before = await ascrape(host.metrics_url)
        metrics.skill_requested("com.test.available", "success")
        metrics.skill_requested("com.test.available", "success")
        metrics.skill_requested("com.test.available", "failure")
        metrics.skill_requested("com.test.available", "caller_error")
        after = await ascrape(host.metrics_url)
    finally:
        await host.stop(0.2)
    skill = {"skill": "com.test.available"}
    assert moved(before, after, "clawhub_skill_requests_total", **skill, outcome="success") == 2
    assert moved(before, after, "clawhub_skill_requests_total", **skill, outcome="caller_error") == 1
    for window in ("5m", "1h"):
        assert after[("clawhub_skill_availability_ratio", frozenset({**skill, "window": window}.items()))] == \
            pytest.approx(2 / 3)
        assert after[("clawhub_skill_availability_requests", frozenset({**skill, "window": window}.items()))] == 3


async def test_both_stores_time_their_queries(tmp_path: Path) -> None:
    host = await _probe(metrics=MetricsSettings(port=0))
    try:
        before = await ascrape(host.metrics_url)
        registry = await SqliteMetadataStore.open(tmp_path / "registry.db")
        try:
            await registry.list_skills(after=None, limit=10)
        finally:
            await registry.close()
        between = await ascrape(host.metrics_url)
        deployer = await SqliteDeploymentStore.open(tmp_path / "deployer" / "deployer.db")
        try:
            await deployer.list_audit(None, 10)
        finally:
            await deployer.close()
        after = await ascrape(host.metrics_url)
    finally:
        await host.stop(0.2)
    # aiosqlite still runs every operation through the method observe_queries wraps.
    assert moved(before, between, "clawhub_db_query_duration_seconds_count", store="registry") > 0
    assert moved(between, after, "clawhub_db_query_duration_seconds_count", store="deployer") > 0
    assert moved(before, after, "clawhub_db_query_duration_seconds_sum", store="deployer") > 0


def test_every_metric_is_exposed_and_documented() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    # Executor-only families read live objects; a fake pool and loader make them appear here.
    class Pool:
        threads, capacity, admitted = 2, 6, 3

    class Loader:
        tiers = {"hot": 1}
        hot_bytes = 10

    pool, loader = Pool(), Loader()
    metrics.watch_worker_pool(pool)  # type: ignore[arg-type]
    metrics.watch_module_loader(loader)  # type: ignore[arg-type]
    for call in (lambda: metrics.skill_called("com.test.doc", "1.0.0", 0.01, 5000, "SKILL_TRAPPED"),
                 lambda: metrics.skill_requested("com.test.doc", "success"),
                 lambda: metrics.release_ended("canary", "active"), lambda: metrics.rollback_started("manual"),
                 lambda: metrics.rate_limit_refused("write"), lambda: metrics.cache_lookup("hit_l1"),
                 lambda: metrics.cache_refresh("refreshed")):
        call()
    metrics.DB_QUERY_DURATION.labels("registry").observe(0.001)
    metrics.RPC_DURATION.labels("s", "m").observe(0.001)
    metrics.RPC_REQUESTS.labels("s", "m", "OK").inc(0)
    metrics.RPC_ERRORS.labels("s", "m", "NOT_FOUND", "NONE").inc(0)
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode())
               for s in family.samples}
    missing = [name for name in METRIC_NAMES if not exposes(samples, name)]
    assert not missing
    # Busy threads are the admitted calls up to the pool's size, the rest wait.
    assert samples[("clawhub_executor_busy_threads", frozenset())] >= 2
    assert samples[("clawhub_executor_queue_depth", frozenset())] >= 1
    documented = (ROOT / "docs" / "metrics.md").read_text()
    undocumented = [name for name in METRIC_NAMES if f"`{name}`" not in documented
                    and not any(name in line for line in documented.splitlines() if line.startswith("| `"))]
    assert not undocumented
    # Names follow Prometheus's conventions: counters end in _total, durations are in seconds.
    for name in METRIC_NAMES:
        assert re.fullmatch(r"[a-z_]+", name), name
        if "duration" in name:
            assert name.endswith("_seconds"), name
    del pool, loader
