"""Composition root of the executor."""

from __future__ import annotations

import asyncio

import grpc
from clawhub.executor.v1 import executor_service_pb2 as pb
from clawhub.executor.v1 import executor_service_pb2_grpc as pb_grpc

from services.executor.bundles import BundleCache
from services.executor.dependencies import DependencyLinker
from services.executor.kvstore import KvLimits, open_store
from services.executor.modules import ModuleLoader
from services.executor.outbound import OutboundHttp
from services.executor.provenance import Provenance, ProvenanceSource, RegistryProvenanceSource
from services.executor.registration import Registration, advertise_address
from services.executor.sandbox import DEFAULT_POOL_SLOTS, Sandbox
from services.executor.scheduling import WorkerPool
from services.executor.servicer import ExecutorServicer
from services.executor.settings import Settings
from services.executor.source import ModuleSource, RegistryModuleSource
from services.runtime import metrics
from services.runtime.channels import CONTROL_MESSAGE_BYTES, InvocationLimits, channel, outgoing
from services.runtime.executors import EXECUTE_STREAM
from services.runtime.identity import outgoing_security
from services.runtime.linking import MAX_INSTANCES
from services.runtime.mux import MuxServer
from services.runtime.server import ServiceHost, create_server

EXECUTOR_SERVICE = pb.DESCRIPTOR.services_by_name["ExecutorService"]


async def build_server(settings: Settings, module_source: ModuleSource | None = None,
                       provenance_source: ProvenanceSource | None = None) -> ServiceHost:
    """The executor's ServiceHost. Modules come from `module_source`, and what the registry says about a
    published version (to re-verify digests and signatures) from `provenance_source`; both default to the
    registry at `settings.registry_address`. Its calls carry its platform token."""
    with outgoing(outgoing_security(settings.identity, settings.tls)):
        return await _build(settings, module_source, provenance_source)


async def _build(settings: Settings, module_source: ModuleSource | None,
                 provenance_source: ProvenanceSource | None) -> ServiceHost:
    registry: grpc.aio.Channel | None = None
    if module_source is None or provenance_source is None:
        registry = channel(settings.registry_address)
    if module_source is None:
        assert registry is not None
        module_source = RegistryModuleSource(registry, timeout=settings.fetch_timeout)
    if provenance_source is None:
        assert registry is not None
        provenance_source = RegistryProvenanceSource(registry, timeout=settings.fetch_timeout)
    # Pool slots for every call that can run at once, with room for the instances dependencies add.
    sandbox = Sandbox(pool_slots=max(DEFAULT_POOL_SLOTS, MAX_INSTANCES * settings.threads))
    loader = ModuleLoader(module_source, sandbox, settings.cache_bytes,
                          artifacts_dir=settings.data_dir / "artifacts")
    # No data-directory lock, unlike the registry and deployer: executors may share this cache (`up --executors
    # N` does), as every entry is content-addressed and renamed into place whole (docs/supervision.md).
    bundles = BundleCache(module_source, settings.data_dir / "bundles")
    pool = WorkerPool(settings.threads, settings.queue)
    # Read when Prometheus scrapes: busy threads, queue depth, module loads by tier (docs/metrics.md).
    metrics.watch_worker_pool(pool)
    metrics.watch_module_loader(loader)
    provenance = Provenance(provenance_source, recheck_seconds=settings.trust_recheck_seconds)
    links = DependencyLinker(module_source, sandbox)
    # The `kv` capability's store: Redis when configured, else sqlite in the data dir (services/executor/kvstore.py).
    kv = open_store(data_dir=settings.data_dir, redis_url=settings.kv_redis_url,
                    redis_prefix=settings.kv_redis_prefix,
                    limits=KvLimits(max_key_bytes=settings.kv_max_key_bytes,
                                    max_value_bytes=settings.kv_max_value_bytes,
                                    max_keys=settings.kv_max_keys, max_total_bytes=settings.kv_max_total_bytes))
    # Skills' outbound HTTP (`http:HOST` capabilities; services/executor/outbound.py): one pooled client.
    http = OutboundHttp(settings.http)
    servicer = ExecutorServicer(settings, loader, sandbox, pool, bundles=bundles, provenance=provenance,
                                links=links, kv=kv, http=http)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_ExecutorServiceServicer_to_server(servicer, server)

    sizes = InvocationLimits(max_input=settings.max_input, max_output=settings.max_output,
                             max_stderr=settings.max_stderr)
    # Execute calls multiplexed on one stream per caller (services/runtime/mux.py), each one checked as an Execute.
    execute_stream = MuxServer(
        EXECUTE_STREAM, "/clawhub.executor.v1.ExecutorService/Execute",
        grpc.unary_unary_rpc_method_handler(servicer.Execute, request_deserializer=pb.ExecuteRequest.FromString,
                                            response_serializer=pb.ExecuteResponse.SerializeToString),
        pb.ExecuteStreamRequest, pb.ExecuteStreamResponse)
    servicer.execute_stream = execute_stream
    try:
        host = create_server(
            "executor", (EXECUTOR_SERVICE.full_name,), host=settings.host, port=settings.port,
            grace_seconds=settings.grace_seconds, register=register,
            identity=settings.identity, tls=settings.tls.server, rate_limits=settings.rate_limits,
            metrics=settings.metrics,
            max_receive_bytes=sizes.execute_request,
            max_send_bytes=max(sizes.execute_response, CONTROL_MESSAGE_BYTES), muxed=(execute_stream,),
        )
    except BaseException:
        sandbox.close()
        pool.shutdown()
        kv.close()
        http.close()
        if registry is not None:
            await registry.close()
        raise
    servicer.health = host.health
    host.end_streams.append(servicer.skill_logs.close)
    provenance.on_change = servicer.trust_changed
    rechecks: list[asyncio.Task[None]] = []

    async def start_rechecks() -> None:
        rechecks.append(asyncio.create_task(provenance.run_rechecks(), name="provenance-rechecks"))

    host.on_start.append(start_rechecks)
    if settings.register_with:
        # Registered once it serves; deregistered as soon as it stops serving, before the drain.
        deployer = channel(settings.register_with)
        registration = Registration(deployer, advertise_address(settings.advertise_address, settings.host,
                                                                host.port), lease=settings.lease)
        host.on_start.append(registration.start)
        host.end_streams.append(registration.deregister)
        host.closers.append(deployer.close)

    async def close() -> None:
        for task in rechecks:
            task.cancel()
        await asyncio.gather(*rechecks, return_exceptions=True)
        await provenance.close()
        await loader.close()
        await links.close()
        await bundles.close()
        # Running calls finish within their timeouts; the epoch ticker must outlive them.
        await asyncio.to_thread(pool.shutdown)
        sandbox.close()
        kv.close()  # after the calls that use it
        http.close()
        if registry is not None:
            await registry.close()

    host.closers.append(close)
    return host
