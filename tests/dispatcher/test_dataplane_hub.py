"""DataPlaneHub: subscribers get the whole state on every change, and a gateway that does not acknowledge a
generation in time is cut off, so it cannot hold a release (services/dispatcher/dataplane.py)."""

from __future__ import annotations

import asyncio

from clawhub.common.v1 import routing_pb2

from services.dispatcher.dataplane import DataPlaneHub
from services.runtime.routing import RouteState


async def test_subscribers_get_every_change_and_a_late_one_is_cut_off() -> None:
    routes = RouteState()
    hub = DataPlaneHub(routes, ("127.0.0.1:1",))
    routes.apply(routing_pb2.RouteTable(generation=1))
    hub.publish()
    prompt, late = hub.watch("prompt"), hub.watch("late")
    assert (await anext(prompt)).endpoints[0].serving
    await anext(late)
    assert hub.following() == ["late", "prompt"]

    routes.apply(routing_pb2.RouteTable(generation=2))
    hub.publish()
    assert (await anext(prompt)).route_table.generation == 2
    hub.acknowledge("prompt", 2)
    assert hub.pending(2) == ["late"]
    assert await hub.wait_acknowledged(2, timeout=0.2) == ["late"]
    # The late subscriber's stream ends (it reconnects and gets the newest state first).
    try:
        await asyncio.wait_for(anext(late), 1)
        raise AssertionError("the late subscriber was not cut off")
    except StopAsyncIteration:
        pass
    assert hub.following() == ["prompt"]
    # It is most likely reconnecting: for a while a new generation still waits for it.
    assert hub.pending(2) == ["late"]
    await hub.close()
    try:
        await asyncio.wait_for(anext(prompt), 1)
        raise AssertionError("close() did not end the stream")
    except StopAsyncIteration:
        pass
    assert hub.following() == []


async def test_nobody_following_acknowledges_at_once() -> None:
    hub = DataPlaneHub(RouteState(), ())
    assert await hub.wait_acknowledged(5, timeout=5) == []


async def test_nothing_is_sent_before_the_deployers_first_table() -> None:
    """A dispatcher that just restarted has no routes: a gateway that reconnects must keep its own last ones,
    so the stream stays silent until the deployer's table arrives (then the gateway gets it at once)."""
    routes = RouteState()
    hub = DataPlaneHub(routes, ("127.0.0.1:1",))
    stream = hub.watch("gateway")
    first = asyncio.ensure_future(anext(stream))
    hub.set_endpoints(hub.endpoints)  # an executor health change is no reason to send an empty table
    await asyncio.sleep(0.1)
    assert not first.done()
    routes.apply(routing_pb2.RouteTable(generation=9))
    hub.publish()
    state = await asyncio.wait_for(first, 1)
    assert state.route_table.generation == 9
    await hub.close()
