"""The call-events feed (``GET /v2/call-events``, server-sent events) that keeps the dashboard's
live view current: a snapshot of the live calls, then each call as it starts and ends, over a
real HTTP stream; the key is required; a reader that falls behind is dropped, not waited for."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from bridge.calls.feed import MAX_PENDING, Subscription

from .conftest import api_client, caller_audio, until


async def read_events(base_url: str, events: list, api_key: str | None = None) -> None:
    """Append (event name, data) from the feed to ``events`` until cancelled or the stream ends."""
    async with api_client(base_url, **({"api_key": api_key} if api_key else {})) as http:
        async with http.stream("GET", "/v2/call-events", timeout=None) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            name, data = None, []
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    name = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    data.append(line.partition(":")[2].strip())
                elif line == "" and data:
                    events.append((name or "message", json.loads("\n".join(data))))
                    name, data = None, []


async def test_the_feed_shows_each_call_start_and_end(bridge):
    events: list = []
    reader = asyncio.create_task(read_events(bridge.base_url, events))
    try:
        await until(lambda: events, timeout=5)
        assert events[0] == ("snapshot", {"calls": []})
        first = await bridge.call(caller_audio(), speed=4.0)
        await until(lambda: any(e[1].get("call_id") == first.call_id and e[1]["call_status"] == "ended" for e in events[1:]), timeout=10)
        statuses = [e[1]["call_status"] for e in events[1:] if e[0] == "call" and e[1]["call_id"] == first.call_id]
        assert statuses[-1] == "ended" and "ongoing" in statuses, statuses
        ended = [e[1] for e in events if e[0] == "call" and e[1]["call_status"] == "ended"][-1]
        assert ended["disconnection_reason"] == "user_hangup" and ended["end_timestamp"]

        # a second reader, while a call is live, starts with it in its snapshot
        second = asyncio.create_task(bridge.call(caller_audio() * 2, speed=1.0))
        await until(lambda: any(e[1].get("call_status") == "ongoing" and e[1]["call_id"] != first.call_id for e in events[1:]), timeout=10)
        late: list = []
        late_reader = asyncio.create_task(read_events(bridge.base_url, late))
        await until(lambda: late, timeout=5)
        assert late[0][0] == "snapshot" and [c["call_status"] for c in late[0][1]["calls"]] == ["ongoing"]
        late_reader.cancel()
        await second
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def test_the_feed_ends_when_the_replica_drains(bridge):
    """(so the browser reconnects, through the load balancer, to a replica that is not leaving)"""
    events: list = []
    reader = asyncio.create_task(read_events(bridge.base_url, events))
    await until(lambda: events, timeout=5)
    bridge.calls.draining = True
    await asyncio.wait_for(reader, timeout=5)  # the stream ended by itself
    assert events == [("snapshot", {"calls": []})]


async def test_the_feed_needs_the_key(bridge):
    async with api_client(bridge.base_url, api_key="wrong") as http:
        r = await http.get("/v2/call-events")
    assert r.status_code == 401


async def test_a_reader_that_falls_behind_is_dropped():
    subscription = Subscription([])
    for i in range(MAX_PENDING + 10):
        subscription.put({"call_id": str(i)})
    assert subscription.dropped and subscription.queue.qsize() == MAX_PENDING + 1
    for _ in range(MAX_PENDING):
        assert (await subscription.next(0.1)) is not None
    with pytest.raises(OverflowError):
        await subscription.next(0.1)


async def test_the_feed_rides_out_a_database_outage(start_bridge, own_postgres):
    """The stream stays open while the database is down (a new reader gets 503 then), and the
    call that ended meanwhile is shown once it is back."""
    bridge = await start_bridge(database_url=own_postgres.url, heartbeat_interval_s=0.5)
    events: list = []
    reader = asyncio.create_task(read_events(bridge.base_url, events))
    try:
        await until(lambda: events, timeout=10)
        call = asyncio.create_task(bridge.call(caller_audio(), speed=1.0, tail_ms=2500))
        call_id = (await until(lambda: [e[1]["call_id"] for e in events if e[0] == "call" and e[1]["call_status"] == "ongoing"], timeout=20))[0]
        await asyncio.to_thread(own_postgres.stop)
        await asyncio.sleep(1.5)  # a few reads fail
        async with api_client(bridge.base_url) as http:
            refused = await http.get("/v2/call-events")  # a new reader: "try again"
        assert refused.status_code == 503 and "does not answer" in refused.json()["message"], refused.text
        await call  # it ends during the outage
        assert not reader.done()  # the stream stayed open
        await asyncio.to_thread(own_postgres.start)
        await until(lambda: any(e[1].get("call_id") == call_id and e[1]["call_status"] == "ended" for e in events), timeout=30)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
