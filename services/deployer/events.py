"""Fan-out of deployment events to WatchDeployment streams."""

from __future__ import annotations

import asyncio

from clawhub.deployer.v1 import deployer_service_pb2 as pb


class EventBus:
    """Per-deployment subscriber queues. Events are few per deployment, so the queues are unbounded."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[pb.WatchDeploymentResponse | None]]] = {}
        self._closed = False

    def subscribe(self, deployment_id: str) -> asyncio.Queue[pb.WatchDeploymentResponse | None]:
        """A queue of the deployment's events; `None` means the deployer is shutting down."""
        queue: asyncio.Queue[pb.WatchDeploymentResponse | None] = asyncio.Queue()
        if self._closed:
            queue.put_nowait(None)
        self._subscribers.setdefault(deployment_id, set()).add(queue)
        return queue

    def unsubscribe(self, deployment_id: str, queue: asyncio.Queue[pb.WatchDeploymentResponse | None]) -> None:
        queues = self._subscribers.get(deployment_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[deployment_id]

    def publish(self, event: pb.WatchDeploymentResponse) -> None:
        for queue in self._subscribers.get(event.deployment.id, ()):
            queue.put_nowait(event)

    def close(self) -> None:
        self._closed = True
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait(None)
