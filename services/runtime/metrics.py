"""Prometheus metrics of a clawhub service: what an operator scrapes to see each service's health.

One registry per process (`REGISTRY`, not prometheus-client's global one, so a library that registers its own
metrics there does not leak into ours), served as Prometheus text over HTTP on the service's metrics port
(`CLAWHUB_<SERVICE>_METRICS_PORT`, bound to `CLAWHUB_METRICS_HOST`, 127.0.0.1 by default; off unless set;
`clawhub up` sets it for every service). docs/metrics.md lists every metric; `METRIC_NAMES` below is the same
list for programs (the Grafana dashboard's test checks its queries against it).

Cost, which matters (the benchmark allows metrics at most 3% of invoke throughput):

- RPC metrics are recorded by the ErrorInterceptor's wrapper that already runs around every handler
  (`RpcMetrics.observe` wraps it once per method), not by another grpc.aio interceptor; each method's label
  children are looked up once, so a call pays two clock reads, a counter and a histogram.
- Whatever a component already counts (the executor's pool, its module tiers) is read when Prometheus scrapes
  (`_ScrapeTimeCollector`), not on every call.
- Labels are bounded: methods are the ones the server registered; skills and versions are folded into
  `other` past `CLAWHUB_METRICS_MAX_SKILLS` skills (and MAX_VERSIONS_PER_SKILL versions of one skill); no
  request ids, no inputs, no principals.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from services.runtime.settings import SettingsError, env_int, env_str

log = logging.getLogger("clawhub.metrics")

# Every metric of every service, as Prometheus exposes it (counters with their `_total`; histograms by their
# base name: each also has `_bucket`, `_sum` and `_count`). docs/metrics.md describes each one.
METRIC_NAMES: tuple[str, ...] = (
    # Every service.
    "clawhub_rpc_requests_total",
    "clawhub_rpc_errors_total",
    "clawhub_rpc_duration_seconds",
    "clawhub_rate_limit_refusals_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "python_gc_collections_total",
    "python_info",
    # Executor.
    "clawhub_skill_invocations_total",
    "clawhub_skill_failures_total",
    "clawhub_skill_duration_seconds",
    "clawhub_skill_fuel_consumed",
    "clawhub_executor_threads",
    "clawhub_executor_busy_threads",
    "clawhub_executor_queue_depth",
    "clawhub_executor_queue_capacity",
    "clawhub_executor_module_loads_total",
    "clawhub_executor_module_cache_bytes",
    # Gateway.
    "clawhub_gateway_cache_lookups_total",
    "clawhub_gateway_cache_refreshes_total",
    # Registry and deployer.
    "clawhub_db_query_duration_seconds",
    # Deployer.
    "clawhub_releases_total",
    "clawhub_rollbacks_total",
    # Dispatcher.
    "clawhub_skill_requests_total",
    "clawhub_skill_availability_ratio",
    "clawhub_skill_availability_requests",
)

# The `_created` series (when each counter was first used) double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Label value of everything folded past a label's bound.
OTHER = "other"
# Label value of a skill or version a request did not name (an executor called by digest only).
UNKNOWN = "unknown"
# ErrorInfo reason label of a non-OK status that carries none (a cancelled call, gRPC's own errors).
NO_REASON = "NONE"
DEFAULT_MAX_SKILLS = 100
MAX_VERSIONS_PER_SKILL = 10

# Seconds; from a cached hot call (~0.5 ms) to the executors' largest timeout (60 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# sqlite statements through aiosqlite: ~50 µs when idle, more when queued behind others on the connection.
DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
# Fuel units (about one per wasm instruction).
FUEL_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11)

# Every service.
RPC_REQUESTS = Counter("clawhub_rpc_requests", "RPCs handled, by method and status code.",
                       ("grpc_service", "grpc_method", "grpc_code"), registry=REGISTRY)
RPC_ERRORS = Counter("clawhub_rpc_errors", "RPCs that ended with a non-OK status, by code and ErrorInfo reason "
                     f"({NO_REASON} when the status carries none).",
                     ("grpc_service", "grpc_method", "grpc_code", "reason"), registry=REGISTRY)
RPC_DURATION = Histogram("clawhub_rpc_duration_seconds", "Time from a call's handler starting to its status "
                         "(a response stream: its whole life).", ("grpc_service", "grpc_method"),
                         buckets=LATENCY_BUCKETS, registry=REGISTRY)
RATE_LIMIT_REFUSALS = Counter("clawhub_rate_limit_refusals", "Calls refused by the rate limits, by method class; "
                              "reason UPSTREAM_UNAVAILABLE when the Redis store was down and limits fail closed.",
                              ("method_class", "reason"), registry=REGISTRY)
# Gateway: the result cache (docs/cache.md).
CACHE_LOOKUPS = Counter("clawhub_gateway_cache_lookups", "InvokeSkill calls of skills that declare a result cache, "
                        "by how they were answered: hit_l1, hit_l2 (the skill did not run), miss, bypass.",
                        ("status",), registry=REGISTRY)
_CACHE_CHILDREN: dict[str, Any] = {}
CACHE_REFRESHES = Counter("clawhub_gateway_cache_refreshes", "Refreshes of hot result cache entries ahead of their "
                          "expiry, by how they ended: refreshed, l2, busy, failed, stale, full.",
                          ("result",), registry=REGISTRY)


def cache_lookup(status: str) -> None:
    """Count one call of a cached skill by its cache status (`hit_l1`, `hit_l2`, `miss`, `bypass`)."""
    child = _CACHE_CHILDREN.get(status)
    if child is None:
        child = _CACHE_CHILDREN[status] = CACHE_LOOKUPS.labels(status)
    child.inc()


def cache_refresh(result: str) -> None:
    """Count one refresh-ahead of a hot cache entry by how it ended (services/gateway/cache.REFRESH_RESULTS)."""
    CACHE_REFRESHES.labels(result).inc()  # about one per hot key per TTL: no need to keep the child


# Executor.
SKILL_INVOCATIONS = Counter("clawhub_skill_invocations", "Execute calls of a skill version on this executor "
                            "(release smoke examples included).", ("skill", "version"), registry=REGISTRY)
SKILL_FAILURES = Counter("clawhub_skill_failures", "Execute calls of a skill version that failed, by ErrorInfo "
                         "reason.", ("skill", "version", "reason"), registry=REGISTRY)
SKILL_DURATION = Histogram("clawhub_skill_duration_seconds", "Execute time of a skill version on the executor "
                           "(module load, queueing and the sandbox run).", ("skill", "version"),
                           buckets=LATENCY_BUCKETS, registry=REGISTRY)
SKILL_FUEL = Histogram("clawhub_skill_fuel_consumed", "Fuel a metered call of a skill version consumed.",
                       ("skill", "version"), buckets=FUEL_BUCKETS, registry=REGISTRY)
# Registry and deployer.
DB_QUERY_DURATION = Histogram("clawhub_db_query_duration_seconds", "Time of one database operation (a statement, "
                              "a fetch, a commit) from being queued on its connection to its result.", ("store",),
                              buckets=DB_BUCKETS, registry=REGISTRY)
# Deployer.
RELEASES = Counter("clawhub_releases", "Releases (deployments) that ended, by strategy and outcome "
                   "(active: the new version serves; failed: rolled back or refused).", ("strategy", "outcome"),
                   registry=REGISTRY)
ROLLBACKS = Counter("clawhub_rollbacks", "Rollbacks started, by cause.", ("cause",), registry=REGISTRY)
# Dispatcher.
SKILL_REQUESTS = Counter("clawhub_skill_requests", "Dispatch calls per skill, by outcome: success, failure (counts "
                         "against availability) or caller_error (bad input, cancelled: does not).",
                         ("skill", "outcome"), registry=REGISTRY)

ROLLBACK_CAUSES = ("analysis_breach", "health_not_serving", "ack_timeout", "preload_failed", "smoke_test_failed",
                   "internal_error", "manual", "deployer_restart")


class BoundedLabel:
    """A label's values as they are exported: the first `limit` distinct ones as themselves, any later one as
    `other`. Folded values are not remembered, so the memory stays bounded too."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        kept = self._kept.get(value)
        if kept is not None:
            return kept
        if len(self._kept) >= self.limit:
            return OTHER
        self._kept[value] = value
        return value

    def __len__(self) -> int:
        return len(self._kept)


class SkillLabels:
    """(skill, version) label pairs, bounded: at most `max_skills` skills, each with at most
    MAX_VERSIONS_PER_SKILL versions; the rest are `other`."""

    def __init__(self, max_skills: int = DEFAULT_MAX_SKILLS) -> None:
        self.skills = BoundedLabel(max_skills)
        self._versions: dict[str, BoundedLabel] = {}

    def skill(self, name: str) -> str:
        return self.skills(name or UNKNOWN)

    def pair(self, skill: str, version: str) -> tuple[str, str]:
        name = self.skill(skill)
        if name == OTHER:
            return OTHER, OTHER
        versions = self._versions.get(name)
        if versions is None:
            versions = self._versions[name] = BoundedLabel(MAX_VERSIONS_PER_SKILL)
        return name, versions(version or UNKNOWN)


SKILL_LABELS = SkillLabels()


def set_max_skills(limit: int) -> None:
    """Bound the skill label (`CLAWHUB_METRICS_MAX_SKILLS`); skills already labelled keep their label."""
    SKILL_LABELS.skills.limit = limit


# RPCs.

def split_method(method: str) -> tuple[str, str]:
    """`/pkg.Service/Method` → (`pkg.Service`, `Method`)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or method


def _reason_of(context: Any) -> str:
    """The ErrorInfo reason of the status a handler ended with (in the trailing metadata it aborted with)."""
    try:
        trailing = context.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a context without trailers: no reason
        return NO_REASON
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # noqa: BLE001 - not ours
                return NO_REASON
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason or NO_REASON
    return NO_REASON


def _code_of(context: Any, exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        # gRPC cancels the handler both when the caller cancels and when its deadline passes.
        try:
            remaining = context.time_remaining()
        except Exception:  # noqa: BLE001
            remaining = None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001
        pass
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN"


class _MethodMetrics:
    """The label children of one method, looked up once."""

    __slots__ = ("service", "method", "duration", "ok", "_failed")

    def __init__(self, method: str) -> None:
        self.service, self.method = split_method(method)
        self.duration = RPC_DURATION.labels(self.service, self.method)
        self.ok = RPC_REQUESTS.labels(self.service, self.method, "OK")
        self._failed: dict[tuple[str, str], tuple[Any, Any]] = {}

    def failed(self, context: Any, exc: BaseException) -> None:
        code = _code_of(context, exc)
        reason = NO_REASON if isinstance(exc, asyncio.CancelledError) else _reason_of(context)
        children = self._failed.get((code, reason))
        if children is None:
            # Codes and reasons are bounded (gRPC's codes, services/runtime/errors.Reason): so is this cache.
            children = self._failed[(code, reason)] = (
                RPC_REQUESTS.labels(self.service, self.method, code),
                RPC_ERRORS.labels(self.service, self.method, code, reason))
        children[0].inc()
        children[1].inc()


class RpcMetrics:
    """Request count, errors by code and reason, and latency of every RPC of a server.

    `observe(handler, method)` is given to the ErrorInterceptor (services/runtime/errors.py), which calls it
    once per method with its wrapped handler: the metrics wrapper runs outside the error handling, so it sees
    the status the caller gets (a ServiceError is an AbortError with the status set by then)."""

    def __init__(self) -> None:
        self._methods: dict[str, _MethodMetrics] = {}

    def _for(self, method: str) -> _MethodMetrics:
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = _MethodMetrics(method)
        return found

    def observe(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        metrics = self._for(method)
        if handler.unary_unary:
            return handler._replace(unary_unary=_observe_call(handler.unary_unary, metrics))
        if handler.stream_unary:
            return handler._replace(stream_unary=_observe_call(handler.stream_unary, metrics))
        if handler.unary_stream:
            return handler._replace(unary_stream=_observe_stream(handler.unary_stream, metrics))
        if handler.stream_stream:
            return handler._replace(stream_stream=_observe_stream(handler.stream_stream, metrics))
        return handler


def _observe_call(fn: Callable[..., Awaitable[Any]], metrics: _MethodMetrics) -> Callable[..., Awaitable[Any]]:
    clock = time.perf_counter
    observe = metrics.duration.observe
    ok = metrics.ok.inc

    async def observed(request: Any, context: Any) -> Any:
        started = clock()
        try:
            response = await fn(request, context)
        except BaseException as exc:
            observe(clock() - started)
            metrics.failed(context, exc)
            raise
        observe(clock() - started)
        ok()
        return response

    return observed


def _observe_stream(fn: Callable[..., Any], metrics: _MethodMetrics) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(fn):
        return _observe_call(fn, metrics)
    clock = time.perf_counter

    async def observed(request: Any, context: Any) -> Any:
        started = clock()
        try:
            async for item in fn(request, context):
                yield item
        except BaseException as exc:
            metrics.duration.observe(clock() - started)
            metrics.failed(context, exc)
            raise
        metrics.duration.observe(clock() - started)
        metrics.ok.inc()

    return observed


# Rate limits (services/runtime/ratelimit/interceptor.py).

def rate_limit_refused(method_class: str, unavailable: bool = False) -> None:
    RATE_LIMIT_REFUSALS.labels(method_class, "UPSTREAM_UNAVAILABLE" if unavailable else "RATE_LIMITED").inc()


# Executor: per skill version.

class _SkillChildren:
    __slots__ = ("skill", "version", "invocations", "duration", "fuel")

    def __init__(self, skill: str, version: str) -> None:
        self.skill, self.version = skill, version
        self.invocations = SKILL_INVOCATIONS.labels(skill, version)
        self.duration = SKILL_DURATION.labels(skill, version)
        self.fuel = SKILL_FUEL.labels(skill, version)


_skill_children: dict[tuple[str, str], _SkillChildren] = {}


def _skill(skill: str, version: str) -> _SkillChildren:
    labels = SKILL_LABELS.pair(skill, version)
    children = _skill_children.get(labels)
    if children is None:
        children = _skill_children[labels] = _SkillChildren(*labels)
    return children


def skill_called(skill: str, version: str, seconds: float, fuel: int = 0, failure: str | None = None) -> None:
    """One Execute of `skill@version`: its time, the fuel it consumed (0: not metered), its failure reason."""
    children = _skill(skill, version)
    children.invocations.inc()
    children.duration.observe(seconds)
    if fuel > 0:
        children.fuel.observe(fuel)
    if failure is not None:
        SKILL_FAILURES.labels(children.skill, children.version, failure).inc()


def failure_reason(exc: BaseException) -> str:
    """The ErrorInfo reason an exception becomes (a ServiceError's own; a relayed status's; INTERNAL)."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AioRpcError):
        from services.runtime.errors import error_info  # errors imports nothing from here; keep it that way

        info = error_info(exc)
        return info.reason if info is not None and info.reason else NO_REASON
    return "INTERNAL"


T = TypeVar("T")


def observe_execute(fn: Callable[[Any, Any, Any], Awaitable[T]]) -> Callable[[Any, Any, Any], Awaitable[T]]:
    """Decorates ExecutorService.Execute: per skill version invocations, failures by reason, time and fuel
    (read from the request's `skill` / `version` and the response's usage)."""
    clock = time.perf_counter

    @functools.wraps(fn)
    async def execute(self: Any, request: Any, context: Any) -> T:
        started = clock()
        try:
            response = await fn(self, request, context)
        except BaseException as exc:
            skill_called(request.skill, request.version, clock() - started, failure=failure_reason(exc))
            raise
        skill_called(request.skill, request.version, clock() - started,
                     int(getattr(getattr(response, "usage", None), "fuel_consumed", 0) or 0))
        return response

    return execute


# Values read at scrape time from the objects that keep them.

class WorkerPoolLike(Protocol):
    threads: int
    capacity: int

    @property
    def admitted(self) -> int: ...


class ModuleLoaderLike(Protocol):
    tiers: Any

    @property
    def hot_bytes(self) -> int: ...


_pools: weakref.WeakSet[Any] = weakref.WeakSet()
_loaders: weakref.WeakSet[Any] = weakref.WeakSet()
TIERS = ("hot", "warm", "cold")


def watch_worker_pool(pool: WorkerPoolLike) -> None:
    """Export an executor's worker pool (busy threads, queue depth) while it lives."""
    _pools.add(pool)


# Loads counted by loaders that are gone (an executor stopped in a process that runs several, as tests do), so
# the counter never goes down when one is collected.
_retired_loads: dict[str, int] = dict.fromkeys(TIERS, 0)


def _retire(tiers: Any) -> None:
    for tier in TIERS:
        _retired_loads[tier] += tiers.get(tier, 0)


def watch_module_loader(loader: ModuleLoaderLike) -> None:
    """Export an executor's module loads by tier and its hot cache size while it lives (and its loads after)."""
    if loader not in _loaders:
        _loaders.add(loader)
        weakref.finalize(loader, _retire, loader.tiers)


# Dispatcher: per-skill availability.

class Availability:
    """Per-skill success and failure counts in a rolling window of SLOT_SECONDS slots covering the longest of
    WINDOWS, from which the availability gauges are computed when Prometheus scrapes. Recording a call costs an
    integer division and two list updates; a skill costs 3 × SLOTS integers."""

    SLOT_SECONDS = 10
    WINDOWS = (("5m", 300), ("1h", 3600))
    SLOTS = 3600 // SLOT_SECONDS

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # skill label → (slot stamps, successes, failures)
        self._skills: dict[str, tuple[list[int], list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def record(self, skill: str, success: bool) -> None:
        tick = int(self._clock()) // self.SLOT_SECONDS
        slot = tick % self.SLOTS
        rows = self._skills.get(skill)
        if rows is None:
            with self._lock:
                rows = self._skills.setdefault(skill, ([-1] * self.SLOTS, [0] * self.SLOTS, [0] * self.SLOTS))
        stamps, ok, failed = rows
        if stamps[slot] != tick:
            stamps[slot], ok[slot], failed[slot] = tick, 0, 0
        if success:
            ok[slot] += 1
        else:
            failed[slot] += 1

    def ratios(self) -> Iterator[tuple[str, str, float, int]]:
        """(skill, window, success ratio, calls counted) for every skill with calls in the window."""
        tick = int(self._clock()) // self.SLOT_SECONDS
        with self._lock:
            skills = list(self._skills.items())
        for skill, (stamps, ok, failed) in skills:
            for window, seconds in self.WINDOWS:
                oldest = tick - seconds // self.SLOT_SECONDS
                good = bad = 0
                for slot in range(self.SLOTS):
                    if oldest < stamps[slot] <= tick:
                        good += ok[slot]
                        bad += failed[slot]
                if good + bad:
                    yield skill, window, good / (good + bad), good + bad


AVAILABILITY = Availability()
_skill_requests: dict[tuple[str, str], Any] = {}


def skill_requested(skill: str, outcome: str) -> None:
    """One Dispatch of `skill`: outcome `success`, `failure` (against availability) or `caller_error`."""
    label = SKILL_LABELS.skill(skill)
    child = _skill_requests.get((label, outcome))
    if child is None:
        child = _skill_requests[(label, outcome)] = SKILL_REQUESTS.labels(label, outcome)
    child.inc()
    if outcome != "caller_error":
        AVAILABILITY.record(label, outcome == "success")


# Deployer.

def release_ended(strategy: str, outcome: str) -> None:
    RELEASES.labels(strategy or "immediate", outcome).inc()


def rollback_started(cause: str) -> None:
    ROLLBACKS.labels(cause if cause in ROLLBACK_CAUSES else "internal_error").inc()


class _ScrapeTimeCollector(Collector):
    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families(live=True))

    @staticmethod
    def _families(live: bool = False) -> Iterator[Metric]:
        threads = GaugeMetricFamily("clawhub_executor_threads", "Worker threads that run skills.")
        busy = GaugeMetricFamily("clawhub_executor_busy_threads", "Worker threads running a skill now.")
        depth = GaugeMetricFamily("clawhub_executor_queue_depth", "Calls waiting for a worker thread.")
        capacity = GaugeMetricFamily("clawhub_executor_queue_capacity", "Calls allowed to wait beyond the running "
                                     "ones; more are shed (EXECUTOR_OVERLOADED).")
        loads = CounterMetricFamily("clawhub_executor_module_loads", "Module loads by the tier that served them: "
                                    "hot (compiled, in memory), warm (precompiled on disk), cold (downloaded and "
                                    "compiled).", labels=("tier",))
        cache = GaugeMetricFamily("clawhub_executor_module_cache_bytes", "Module bytes in the hot cache.")
        availability = GaugeMetricFamily("clawhub_skill_availability_ratio", "Share of a skill's calls that "
                                         "succeeded over the window (calls failed by their caller not counted).",
                                         labels=("skill", "window"))
        counted = GaugeMetricFamily("clawhub_skill_availability_requests", "Calls the availability ratio of the "
                                    "window counts.", labels=("skill", "window"))
        if live:
            pools = list(_pools)
            if pools:
                size = sum(p.threads for p in pools)
                admitted = sum(p.admitted for p in pools)
                running = sum(min(p.admitted, p.threads) for p in pools)
                threads.add_metric([], size)
                busy.add_metric([], running)
                depth.add_metric([], admitted - running)
                capacity.add_metric([], sum(p.capacity - p.threads for p in pools))
            loaders = list(_loaders)
            if loaders or any(_retired_loads.values()):
                for tier in TIERS:
                    loads.add_metric([tier], _retired_loads[tier] + sum(loader.tiers.get(tier, 0)
                                                                        for loader in loaders))
                cache.add_metric([], sum(loader.hot_bytes for loader in loaders))
            for skill, window, ratio, calls in AVAILABILITY.ratios():
                availability.add_metric([skill, window], ratio)
                counted.add_metric([skill, window], calls)
        yield from (threads, busy, depth, capacity, loads, cache, availability, counted)


REGISTRY.register(_ScrapeTimeCollector())


# Databases (services/runtime/sqlite.py calls this for the registry's and the deployer's connections).

def observe_queries(connection: Any, store: str) -> None:
    """Time every operation on an aiosqlite connection (`store` labels it: registry, deployer).

    aiosqlite runs each statement, fetch and commit through the connection's `_execute` (its cursors too), so
    wrapping that one method times them all without touching the stores' code; a version of aiosqlite without
    it is left unobserved (tests/runtime/test_metrics.py notices)."""
    execute = getattr(connection, "_execute", None)
    if execute is None or getattr(execute, "_clawhub_observed", False):
        return
    observe = DB_QUERY_DURATION.labels(store).observe
    clock = time.perf_counter

    async def timed(fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return await execute(fn, *args, **kwargs)
        finally:
            observe(clock() - started)

    timed._clawhub_observed = True  # type: ignore[attr-defined]
    connection._execute = timed


# The endpoint.

@dataclass(frozen=True)
class MetricsSettings:
    """Where a service serves its metrics. `port` None: no endpoint, and no RPC metrics recorded."""

    port: int | None = None
    """CLAWHUB_<SERVICE>_METRICS_PORT: unset, empty or `off`: no metrics endpoint; 0 picks a free port."""
    host: str = "127.0.0.1"
    """CLAWHUB_METRICS_HOST: interface the metrics endpoints listen on (0.0.0.0 for a Prometheus elsewhere)."""
    max_skills: int = DEFAULT_MAX_SKILLS
    """CLAWHUB_METRICS_MAX_SKILLS: distinct skill label values; further skills are counted as `other`."""

    @property
    def enabled(self) -> bool:
        return self.port is not None

    @classmethod
    def from_env(cls, service: str) -> MetricsSettings:
        d = cls()
        variable = port_variable(service)
        raw = env_str(variable, "off")
        port: int | None = None
        if raw.lower() not in ("off", "none", "disabled"):
            try:
                port = int(raw)
            except ValueError:
                raise SettingsError(f"{variable}={raw!r} is not a port number (or `off`)") from None
            if not 0 <= port <= 65535:
                raise SettingsError(f"{variable}={port} is not a port number (0 to 65535; 0 picks a free one)")
        return cls(port=port, host=env_str("CLAWHUB_METRICS_HOST", d.host),
                   max_skills=env_int("CLAWHUB_METRICS_MAX_SKILLS", d.max_skills, minimum=1))


def port_variable(service: str) -> str:
    return f"CLAWHUB_{service.upper()}_METRICS_PORT"


class MetricsEndpoint:
    """The HTTP server Prometheus scrapes (`GET /metrics`), on a thread of its own."""

    def __init__(self, server: Any, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(settings: MetricsSettings, service: str) -> MetricsEndpoint:
    """Start the metrics endpoint of `service`. A taken port is a StartupError naming its variable."""
    from services.runtime.server import PortInUse, StartupError  # the server module builds on this one

    assert settings.port is not None
    set_max_skills(settings.max_skills)
    host = settings.host.strip("[]")
    try:
        server, thread = start_http_server(settings.port, addr=host, registry=REGISTRY)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"{service}: metrics port {host}:{settings.port} is already in use; set "
                            f"{port_variable(service)} to another port (0 picks a free one, off disables it)") from None
        raise StartupError(f"{service}: cannot serve metrics on {host}:{settings.port}: {exc}") from None
    endpoint = MetricsEndpoint(server, thread, settings.host)
    log.debug("%s: metrics on %s", service, endpoint.url)
    return endpoint
