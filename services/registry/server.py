"""Composition root of the registry: open the stores, settle unfinished publishes, build the server."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import grpc
from clawhub.registry.v1 import access_pb2_grpc as access_grpc
from clawhub.registry.v1 import registry_internal_pb2_grpc as internal_grpc
from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc

from services.registry.access import adopt_bootstrap_key
from services.registry.blobs import BlobBackend, BlobStore
from services.registry.integrity import Integrity, PeriodicScrub
from services.registry.limits import DescriptorBudget, DownloadGate, DownloadLimits, UploadGate, UploadLimits
from services.registry.pgblobs import PostgresBlobStore
from services.registry.pgstore import PostgresMetadataStore, open_registry_pool
from services.registry.servicer import RegistryServicer, settle_unfinished
from services.registry.settings import Settings
from services.registry.store import MetadataStore, SqliteMetadataStore
from services.registry.trust import Trust
from services.registry.verify import Verifier
from services.runtime.auth import UserAuthInterceptor
from services.runtime.channels import PUBLISH_MESSAGE_BYTES
from services.runtime.datadir import lock_data_dir
from services.runtime.identity import read_token_file
from services.runtime.policy import PUBLIC_RULES
from services.runtime.postgres import open_pool, redact
from services.runtime.server import ServiceHost, StartupError, create_server
from services.runtime.tasks import BackgroundLoop

SERVICE_NAME = "clawhub.registry.v1.RegistryService"
# Blob downloads, for executors; served here, never relayed by the gateway.
INTERNAL_SERVICE_NAME = "clawhub.registry.v1.RegistryInternalService"
# API keys and the audit log; public, relayed by the gateway.
ACCESS_SERVICE_NAME = "clawhub.registry.v1.AccessService"

DATABASE_FILE = "registry.sqlite3"

log = logging.getLogger("clawhub.registry")
# A version PENDING or VERIFYING for this long on a shared database is a publish a stopped replica left.
SHARED_SETTLE_AFTER_SECONDS = 300.0
# How often a registry on a shared database looks for publishes a dead replica left in flight.
SHARED_SETTLE_INTERVAL_SECONDS = 60.0


class PeriodicSettle(BackgroundLoop):
    """settle_unfinished every `interval` seconds (replicas on one database: any of them finishes what a dead
    one left); a failed pass (two replicas settling one version) is logged and the next one goes on."""

    task_name = "registry-settle"

    def __init__(self, store: MetadataStore, blobs: BlobBackend, verifier: Verifier, interval: float, *,
                 older_than: float, pending_older_than: float) -> None:
        super().__init__()
        self._args = (store, blobs, verifier)
        self._interval = interval
        self._older_than = older_than
        self._pending_older_than = pending_older_than

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.settle_once()

    async def settle_once(self) -> None:
        try:
            await settle_unfinished(*self._args, older_than_seconds=self._older_than,
                                    pending_older_than_seconds=self._pending_older_than)
        except Exception:  # noqa: BLE001 - the next pass tries again
            log.exception("settling publishes left in flight failed; trying again in %.0fs", self._interval)


async def build_server(settings: Settings) -> ServiceHost:
    """A registry bound to settings.host:settings.port (0 picks a free port; see ServiceHost.port).

    Its data directory is locked first (DataDirInUse when another live process holds it) and released last."""
    lock = lock_data_dir(settings.data_dir, owner="registry", variable="CLAWHUB_REGISTRY_DATA_DIR")
    pools: list[asyncpg.Pool] = []
    try:
        store: MetadataStore
        blobs: BlobBackend
        if settings.database_url:
            log.info("registry: metadata and blobs on PostgreSQL at %s (uploads staged in %s)",
                     redact(settings.database_url), settings.data_dir / "blobs" / "tmp")
            try:
                # Two pools: recording a quarantine (metadata) happens while a blob transaction holds its lock.
                pools.append(await open_registry_pool(settings.database_url))
                pools.append(await open_pool(settings.database_url, component="registry"))
            except (ConnectionError, RuntimeError) as exc:
                raise StartupError(f"registry: {exc} (CLAWHUB_REGISTRY_DATABASE_URL, else CLAWHUB_DATABASE_URL)"
                                   ) from None
            store = PostgresMetadataStore(pools[0])
            blobs = PostgresBlobStore(pools[1], settings.data_dir / "blobs" / "tmp")
            await blobs.open()
        else:
            log.info("registry: metadata in sqlite at %s, blobs in %s", settings.data_dir / DATABASE_FILE,
                     settings.data_dir / "blobs")
            blobs = BlobStore(settings.data_dir / "blobs")
            await blobs.open()
            store = await SqliteMetadataStore.open(settings.data_dir / DATABASE_FILE)
    except BaseException:
        for pool in pools:
            await pool.close()
        lock.release()
        raise
    closers = [pool.close for pool in pools]
    try:
        verifier = Verifier()
        # On a shared database, a publish in flight on another replica is younger than this.
        pending_after = settings.upload_max_seconds + SHARED_SETTLE_AFTER_SECONDS
        await settle_unfinished(store, blobs, verifier,
                                older_than_seconds=SHARED_SETTLE_AFTER_SECONDS if settings.database_url else 0.0,
                                pending_older_than_seconds=pending_after if settings.database_url else 0.0)
        if settings.bootstrap_key_file is not None:
            await adopt_bootstrap_key(store, read_token_file(settings.bootstrap_key_file,
                                                             "CLAWHUB_REGISTRY_BOOTSTRAP_KEY_FILE"))
        trust = Trust(store, admin_token=settings.admin_token, require_namespace=settings.require_namespace,
                      auth=settings.auth)
        budget = DescriptorBudget.from_process()
        uploads = UploadGate(UploadLimits(
            max_total=settings.max_uploads, max_per_caller=settings.max_uploads_per_caller,
            idle_timeout_seconds=settings.upload_idle_timeout_seconds,
            max_duration_seconds=settings.upload_max_seconds), budget)
        downloads = DownloadGate(DownloadLimits(
            max_total=settings.max_downloads, max_per_caller=settings.max_downloads_per_caller), budget)
        servicer = RegistryServicer(store, blobs, verifier, max_upload_bytes=settings.max_upload_bytes, trust=trust,
                                    uploads=uploads, downloads=downloads)

        public = {m: r for m, r in PUBLIC_RULES.items() if m.split("/")[1] in (SERVICE_NAME, ACCESS_SERVICE_NAME)}
        # Users' permissions, checked again here (the gateway checked them first), and the audit log of every
        # mutating call. The deployer's and executors' own reads (a version, a namespace) carry no user.
        users = UserAuthInterceptor(trust.authenticator, public, audit=servicer.record_audit,
                                    platform_exempt=True, enforce=settings.auth.enabled)

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_RegistryServiceServicer_to_server(servicer, server)
            internal_grpc.add_RegistryInternalServiceServicer_to_server(servicer, server)
            access_grpc.add_AccessServiceServicer_to_server(servicer, server)


        host = create_server(
            name="registry",
            service_names=[SERVICE_NAME, INTERNAL_SERVICE_NAME, ACCESS_SERVICE_NAME],
            host=settings.host,
            port=settings.port,
            grace_seconds=settings.shutdown_grace_seconds,
            register=register,
            interceptors=[users],
            identity=settings.identity,
            tls=settings.tls.server, rate_limits=settings.rate_limits, metrics=settings.metrics,
            # Requests are small but for publish streams, whose messages are chunks (or the manifest).
            max_receive_bytes=PUBLISH_MESSAGE_BYTES,
        )
    except BaseException:
        await store.close()
        for close in closers:
            await close()
        lock.release()
        raise
    if settings.database_url:
        # A replica killed mid-publish leaves its version in flight: another replica settles it once it is
        # older than any publish in flight can be (a restart is not needed for that on a shared database).
        settler = PeriodicSettle(store, blobs, verifier, SHARED_SETTLE_INTERVAL_SECONDS,
                                 older_than=SHARED_SETTLE_AFTER_SECONDS, pending_older_than=pending_after)
        host.on_start.append(settler.start)
        host.closers.append(settler.stop)
    if settings.scrub_interval_seconds:
        scrub = PeriodicScrub(Integrity(store, blobs), settings.scrub_interval_seconds)
        host.on_start.append(scrub.start)
        host.closers.append(scrub.stop)
    # Background file work (removing the temporary files of cancelled uploads) finishes before the lock goes.
    host.closers.extend([blobs.close, store.close, *closers, lock.close])
    return host
