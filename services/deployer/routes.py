"""The route table: the source of truth for dispatchers, pushed over WatchRoutes, acknowledged per generation.

Every change of any skill's route makes a new generation of the whole table; it is persisted before it is
pushed. Watchers always get the newest table (a slow watcher skips generations, never gets a stale one).
The hub knows which dispatchers are connected and the newest generation each acknowledged, so a rollout can
wait until every connected dispatcher routes with its generation.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from clawhub.common.v1 import routing_pb2

from services.deployer.store import DeploymentStore, Fenced, StoredRoute
from services.runtime import tracing
from services.runtime.errors import Reason, ServiceError


@dataclass(frozen=True)
class Acks:
    """Who acknowledged a generation by the time the wait ended."""

    generation: int
    acknowledged: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.pending

    def describe(self) -> str:
        total = len(self.acknowledged) + len(self.pending)
        text = f"acknowledged by {len(self.acknowledged)}/{total} dispatchers"
        if self.pending:
            text += f" (still waiting for {', '.join(self.pending)})"
        return text


class RouteHub:
    """Holds the current route table, persists and broadcasts new generations, tracks acknowledgements."""

    def __init__(self, store: DeploymentStore) -> None:
        self._store = store
        self._generation = 0
        self._routes: dict[str, StoredRoute] = {}
        self._table = routing_pb2.RouteTable()
        self._publish_lock = asyncio.Lock()
        # Replaced on every change; waiters hold the old one, which is set to wake them.
        self._changed = asyncio.Event()
        # Dispatcher id → number of open WatchRoutes streams (a reconnect may briefly overlap the old one).
        self._connected: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        self._closed = False
        # Leader election (services/deployer/leader.py): the term whose epoch fences this hub's writes, why the
        # watch streams end when this replica stops leading, and whom to tell when a write was fenced.
        self._epoch = 0
        self._deposed: ServiceError | None = None
        self.on_fenced: Callable[[], None] = lambda: None
        # The executor set watchers get with the table, and a counter of its changes.
        self._executors: tuple[str, ...] | None = None
        self._executors_version = 0

    async def load(self) -> None:
        """Read the table from the store (at start; a standby, to follow the leader's changes)."""
        snapshot = await self._store.load_routes()
        self._generation = snapshot.generation
        self._routes = dict(snapshot.routes)
        self._table = self._build_table()

    async def begin(self, epoch: int) -> None:
        """Lead from the stored table, writing with `epoch` (a new term's)."""
        async with self._publish_lock:
            await self.load()
            self._epoch = epoch
            self._deposed = None

    def depose(self, error: ServiceError) -> None:
        """Stop leading: end every route stream with `error` (dispatchers reconnect to the new leader)."""
        self._deposed = error
        self._notify()

    @property
    def epoch(self) -> int:
        """The leadership term this hub writes in (0: a sole deployer's)."""
        return self._epoch

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def table(self) -> routing_pb2.RouteTable:
        return self._table

    def owner(self, skill: str) -> str | None:
        """Id of the deployment the skill's traffic goes to, if it has a route."""
        entry = self._routes.get(skill)
        return entry.deployment_id if entry else None

    def weight(self, skill: str, version: str, digest: str) -> int:
        """Percent of the skill's traffic the current route gives to this version (0 when none)."""
        entry = self._routes.get(skill)
        if entry is None:
            return 0
        total = sum(t.weight for t in entry.route.targets)
        share = sum(t.weight for t in entry.route.targets if (t.version, t.digest) == (version, digest))
        return round(100 * share / total) if total else 0

    def digests(self) -> set[str]:
        """Every digest some route sends traffic to."""
        return {t.digest for entry in self._routes.values() for t in entry.route.targets}

    @property
    def closed(self) -> bool:
        return self._closed

    def connected(self) -> tuple[str, ...]:
        return tuple(sorted(self._connected))

    async def publish(self, skill: str, entry: StoredRoute | None) -> int:
        """Set (or remove) one skill's route as a new generation: persisted first, then pushed."""
        with tracing.span("deployer.route_push") as span:
            async with self._publish_lock:
                generation = self._generation + 1
                try:
                    await self._store.save_route(generation, skill, entry, self._epoch)
                except Fenced:
                    self.on_fenced()
                    raise
                if entry is None:
                    self._routes.pop(skill, None)
                else:
                    self._routes[skill] = entry
                self._generation = generation
                self._table = self._build_table()
                if span.is_recording():
                    # Where the dispatchers' and gateways' route_apply spans hang (routing_pb2.RouteTable).
                    self._table.traceparent = dict(tracing.inject((), span)).get("traceparent", "")
                self._notify()
            if span.is_recording():
                span.set_attributes({"clawhub.skill": skill, "clawhub.route.generation": generation,
                                     "clawhub.route.removed": entry is None,
                                     "clawhub.route.targets": ",".join(
                                         f"{t.version}:{t.weight}" for t in entry.route.targets) if entry else ""})
            return generation

    def _build_table(self) -> routing_pb2.RouteTable:
        return routing_pb2.RouteTable(
            generation=self._generation,
            routes=[self._routes[skill].route for skill in sorted(self._routes)])

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not ready():
            event = self._changed
            if deadline is None:
                await event.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return ready()
        return True

    async def watch(self, dispatcher_id: str) -> AsyncIterator[routing_pb2.RouteTable]:
        """The current table at once, then every newer one, until the hub closes.

        A watcher with an empty dispatcher id (grpcurl, a person debugging) gets the tables but is not
        counted as a dispatcher that must acknowledge.
        """
        if dispatcher_id:
            self._connected[dispatcher_id] = self._connected.get(dispatcher_id, 0) + 1
            self._notify()
        try:
            sent: tuple[int, int] | None = None
            while True:
                await self._wait_until(functools.partial(self._has_news, sent))
                if self._deposed is not None:
                    raise self._deposed
                if self._closed:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN,
                                       "the deployer is shutting down; watch the routes again",
                                       retry_after_seconds=0.2)
                table = self._table
                # A change of the executor set alone sends the same table again (the caller adds `executors`).
                sent = (table.generation, self._executors_version)
                yield table
        finally:
            if dispatcher_id:
                left = self._connected.get(dispatcher_id, 1) - 1
                if left > 0:
                    self._connected[dispatcher_id] = left
                else:
                    self._connected.pop(dispatcher_id, None)
                    self._acked.pop(dispatcher_id, None)
                self._notify()

    def _has_news(self, sent: tuple[int, int] | None) -> bool:
        return self._closed or self._deposed is not None or (self._generation, self._executors_version) != sent

    @property
    def executors(self) -> tuple[str, ...] | None:
        """The executors published with the table (services/deployer/membership.py); None until known."""
        return self._executors

    def set_executors(self, addresses: tuple[str, ...]) -> None:
        """Publish a new executor set: every watcher gets it (with the current table) at once."""
        if addresses != self._executors:
            self._executors = addresses
            self._executors_version += 1
            self._notify()

    def acknowledge(self, dispatcher_id: str, generation: int) -> None:
        if generation > self._acked.get(dispatcher_id, -1):
            self._acked[dispatcher_id] = generation
            self._notify()

    def _acks(self, generation: int) -> Acks:
        acknowledged = tuple(d for d in sorted(self._connected) if self._acked.get(d, -1) >= generation)
        pending = tuple(d for d in sorted(self._connected) if self._acked.get(d, -1) < generation)
        return Acks(generation, acknowledged, pending)

    async def wait_acked(self, generation: int, timeout: float) -> Acks:
        """Wait until every connected dispatcher acknowledged `generation` (or a later one), or `timeout`.

        A dispatcher that disconnects stops counting; one that connects meanwhile gets the newest table on
        connecting and must acknowledge it too.
        """
        with tracing.span("deployer.acknowledgements") as span:
            await self._wait_until(lambda: self._closed or self._deposed is not None
                                   or self._acks(generation).complete, timeout)
            acks = self._acks(generation)
            if span.is_recording():
                span.set_attributes({"clawhub.route.generation": generation,
                                     "clawhub.acks.acknowledged": len(acks.acknowledged),
                                     "clawhub.acks.pending": ",".join(acks.pending)})
                if acks.pending:
                    tracing.fail(span, f"not acknowledged within {timeout:g}s by {', '.join(acks.pending)}")
            return acks

    def close(self) -> None:
        """End every watch (with UNAVAILABLE, so dispatchers reconnect to the next deployer)."""
        self._closed = True
        self._notify()
