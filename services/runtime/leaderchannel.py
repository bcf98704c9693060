"""A client channel to a service whose replicas elect a leader (the deployer on PostgreSQL): it follows the
leader named by a standby's refusal.

A standby answers what only the leader does with UNAVAILABLE / NOT_LEADER and the leader's address in the
ErrorInfo metadata (`leader_address`; services/deployer/leader.py). Behind a Kubernetes Service (or any L4
balancer) a channel holds one connection to one replica, so retrying on the same channel would ask the same
standby forever: this channel opens a channel to the named leader instead, and sends the following calls
there. A unary call refused that way is sent again to the leader at once (the standby did nothing); a stream
(WatchRoutes) ends with the refusal, and the caller's reconnect goes to the leader. When the leader's channel
fails (the leader died: UNAVAILABLE, or it stopped leading: NOT_LEADER without a successor), the channel
forgets it and goes back to the configured address, whose balancer picks a live replica: after a failover,
the new leader or a standby that names it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import Any

import grpc

from services.runtime.errors import Reason, error_info
from services.runtime.wrapchannel import WrappingChannel

log = logging.getLogger("clawhub.channels")
# A former leader's channel stays open this long for the calls still running on it, then closes.
RETIRED_CLOSE_SECONDS = 60.0
_CLOSING: set[asyncio.Future[None]] = set()


class LeaderChannel(WrappingChannel):
    """`inner` (the configured address), or the leader a refusal named. `connect(address)` opens a channel
    like the inner one (run in the context this channel was made in: the same outgoing security)."""

    def __init__(self, inner: grpc.aio.Channel, connect: Callable[[str], grpc.aio.Channel]) -> None:
        super().__init__(inner)
        self._connect = connect
        self._context = contextvars.copy_context()
        self._leader: tuple[str, grpc.aio.Channel] | None = None
        self._retired: list[grpc.aio.Channel] = []

    @property
    def leader_address(self) -> str:
        """The leader this channel sends to now; "" when it uses the configured address."""
        return self._leader[0] if self._leader is not None else ""

    def current(self) -> grpc.aio.Channel:
        return self._leader[1] if self._leader is not None else self._inner

    def observe(self, err: grpc.RpcError, used: grpc.aio.Channel) -> bool:
        """Learn from a failed call made on `used`; whether the call should be sent again (to a new leader)."""
        code = err.code() if hasattr(err, "code") else None
        info = error_info(err) if code == grpc.StatusCode.UNAVAILABLE else None
        if info is not None and info.reason == Reason.NOT_LEADER:
            address = info.metadata.get("leader_address", "")
            if address and address != self.leader_address:
                self._follow(address)
                return True
            self._forget("it does not lead (any more)")
            return False
        if code == grpc.StatusCode.UNAVAILABLE and used is not self._inner:
            self._forget("its channel is unavailable")
        return False

    def _follow(self, address: str) -> None:
        self._forget("")
        log.info("following the leader at %s", address)
        self._leader = (address, self._context.run(self._connect, address))

    def _forget(self, why: str) -> None:
        if self._leader is not None:
            if why:
                log.info("leaving the leader at %s (%s); back to the configured address", self._leader[0], why)
            # Calls may still run on it: closed a minute later (or with this channel), not now.
            self._retire(self._leader[1])
            self._leader = None

    def _retire(self, old: grpc.aio.Channel) -> None:
        self._retired.append(old)
        try:
            asyncio.get_running_loop().call_later(RETIRED_CLOSE_SECONDS, self._close_retired, old)
        except RuntimeError:  # no loop: closed with this channel
            pass

    def _close_retired(self, old: grpc.aio.Channel) -> None:
        if old in self._retired:  # not closed with this channel meanwhile
            self._retired.remove(old)
            task = asyncio.ensure_future(old.close(None))
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unary(self, method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Stream(self, method, args, kwargs)

    async def close(self, grace: float | None = None) -> None:
        if self._leader is not None:
            self._retired.append(self._leader[1])
            self._leader = None
        for retired in self._retired:
            await retired.close(grace)
        self._retired.clear()
        await super().close(grace)


class _MultiCallable:
    def __init__(self, owner: LeaderChannel, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 kind: str) -> None:
        self._owner = owner
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._kind = kind
        self._made: dict[int, tuple[grpc.aio.Channel, Any]] = {}

    def _on(self, channel: grpc.aio.Channel) -> Any:
        made = self._made.get(id(channel))
        if made is None or made[0] is not channel:
            made = (channel, getattr(channel, self._kind)(self._method, *self._args, **self._kwargs))
            self._made[id(channel)] = made
        return made[1]


class _Unary(_MultiCallable):
    def __init__(self, owner: LeaderChannel, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(owner, method, args, kwargs, "unary_unary")

    async def __call__(self, request: Any, **kwargs: Any) -> Any:
        used = self._owner.current()
        try:
            return await self._on(used)(request, **kwargs)
        except grpc.aio.AioRpcError as err:
            if not self._owner.observe(err, used):
                raise
        return await self._on(self._owner.current())(request, **kwargs)


class _Stream(_MultiCallable):
    def __init__(self, owner: LeaderChannel, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(owner, method, args, kwargs, "unary_stream")

    def __call__(self, request: Any, **kwargs: Any) -> _StreamCall:
        used = self._owner.current()
        return _StreamCall(self._owner, used, self._on(used)(request, **kwargs))


class _StreamCall:
    """A server stream whose failure teaches the channel where the leader is (the caller reconnects)."""

    def __init__(self, owner: LeaderChannel, used: grpc.aio.Channel, call: Any) -> None:
        self._owner = owner
        self._used = used
        self._call = call

    async def __aiter__(self) -> Any:
        try:
            async for item in self._call:
                yield item
        except grpc.aio.AioRpcError as err:
            self._owner.observe(err, self._used)
            raise

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)
