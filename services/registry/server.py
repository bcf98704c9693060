"""Composition root of the registry: open the stores, settle unfinished publishes, build the server."""

from __future__ import annotations

from clawhub.registry.v1 import registry_service_pb2_grpc as pb_grpc

from services.registry.blobs import BlobStore
from services.registry.servicer import RegistryServicer, settle_unfinished
from services.registry.settings import Settings
from services.registry.store import SqliteMetadataStore
from services.registry.trust import Trust
from services.registry.verify import Verifier
from services.runtime.server import ServiceHost, create_server

SERVICE_NAME = "clawhub.registry.v1.RegistryService"
DATABASE_FILE = "registry.sqlite3"


async def build_server(settings: Settings) -> ServiceHost:
    """A registry bound to settings.host:settings.port (0 picks a free port; see ServiceHost.port)."""
    blobs = BlobStore(settings.data_dir / "blobs")
    await blobs.open()
    store = await SqliteMetadataStore.open(settings.data_dir / DATABASE_FILE)
    try:
        verifier = Verifier()
        await settle_unfinished(store, blobs, verifier)
        trust = Trust(store, admin_token=settings.admin_token, require_namespace=settings.require_namespace)
        servicer = RegistryServicer(store, blobs, verifier, max_upload_bytes=settings.max_upload_bytes, trust=trust)
        host = create_server(
            name="registry",
            service_names=[SERVICE_NAME],
            host=settings.host,
            port=settings.port,
            grace_seconds=settings.shutdown_grace_seconds,
            register=lambda server: pb_grpc.add_RegistryServiceServicer_to_server(servicer, server),
        )
    except BaseException:
        await store.close()
        raise
    host.closers.append(store.close)
    return host
