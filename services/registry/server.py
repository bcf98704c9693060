"""Composition root of the registry: open the stores, settle unfinished publishes, build the server."""

from __future__ import annotations

import grpc
from clawhub.registry.v1 import access_pb2_grpc as access_grpc
from clawhub.registry.v1 import registry_internal_pb2_grpc as internal_grpc
from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc

from services.registry.access import adopt_bootstrap_key
from services.registry.blobs import BlobStore
from services.registry.integrity import Integrity, PeriodicScrub
from services.registry.limits import DescriptorBudget, DownloadGate, DownloadLimits, UploadGate, UploadLimits
from services.registry.servicer import RegistryServicer, settle_unfinished
from services.registry.settings import Settings
from services.registry.store import SqliteMetadataStore
from services.registry.trust import Trust
from services.registry.verify import Verifier
from services.runtime.auth import UserAuthInterceptor
from services.runtime.channels import PUBLISH_MESSAGE_BYTES
from services.runtime.datadir import lock_data_dir
from services.runtime.identity import read_token_file
from services.runtime.policy import PUBLIC_RULES
from services.runtime.server import ServiceHost, create_server

SERVICE_NAME = "clawhub.registry.v1.RegistryService"
# Blob downloads, for executors; served here, never relayed by the gateway.
INTERNAL_SERVICE_NAME = "clawhub.registry.v1.RegistryInternalService"
# API keys and the audit log; public, relayed by the gateway.
ACCESS_SERVICE_NAME = "clawhub.registry.v1.AccessService"

DATABASE_FILE = "registry.sqlite3"


async def build_server(settings: Settings) -> ServiceHost:
    """A registry bound to settings.host:settings.port (0 picks a free port; see ServiceHost.port).

    Its data directory is locked first (DataDirInUse when another live process holds it) and released last."""
    lock = lock_data_dir(settings.data_dir, owner="registry", variable="CLAWHUB_REGISTRY_DATA_DIR")
    try:
        blobs = BlobStore(settings.data_dir / "blobs")
        await blobs.open()
        store = await SqliteMetadataStore.open(settings.data_dir / DATABASE_FILE)
    except BaseException:
        lock.release()
        raise
    try:
        verifier = Verifier()
        await settle_unfinished(store, blobs, verifier)
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
        lock.release()
        raise
    if settings.scrub_interval_seconds:
        scrub = PeriodicScrub(Integrity(store, blobs), settings.scrub_interval_seconds)
        host.on_start.append(scrub.start)
        host.closers.append(scrub.stop)
    # Background file work (removing the temporary files of cancelled uploads) finishes before the lock goes.
    host.closers.extend([blobs.close, store.close, lock.close])
    return host
