"""One load per key at a time: concurrent callers asking for the same key share one task."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Future[V]] = {}

    async def do(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The result of `load()` for `key`, started once however many callers wait for it."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(load())
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        # A cancelled caller must not cancel the load the other callers share.
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Future[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # mark it retrieved even if every waiter went away

    async def close(self) -> None:
        """Cancel the loads in flight and wait for them to end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
