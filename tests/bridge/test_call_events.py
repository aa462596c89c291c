"""The call-events feed (``GET /v2/call-events``, server-sent events) that keeps the dashboard's
live view current: a snapshot of the live calls, then each call as it starts and ends, over a
real HTTP stream; the key is required; a reader that falls behind is dropped, not waited for."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from bridge.api import live
from bridge.calls.feed import MAX_PENDING, MAX_REGISTERED, Subscription
from bridge.models import CallRecord, now_ms
from bridge.store.call_store import SUMMARY_FIELDS

from .conftest import API_KEY, api_client, caller_audio, until


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


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic a2V5X3Rlc3Q6", "Bearer"])
async def test_the_feed_needs_the_key(bridge, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient(base_url=bridge.base_url, headers=headers, timeout=5) as http:
        r = await http.get("/v2/call-events")
    assert r.status_code == 401 and "API key" in r.json()["message"], r.text


async def test_a_reader_that_falls_behind_is_dropped():
    subscription = Subscription(b"")
    for i in range(MAX_PENDING + 10):
        subscription.put(b"call %d" % i)
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


def registered_call(i: int, metadata: dict | None = None) -> CallRecord:
    return CallRecord(
        call_id=f"reg{i:05d}", agent_id="echo", audio_websocket_protocol="twilio", audio_encoding="mulaw", sample_rate=8000,
        registered_at=now_ms() + i, metadata=metadata,  # (recent: not swept as timed out meanwhile)
    )  # fmt: skip


async def test_the_view_holds_summaries_whatever_the_calls_carry(bridge):
    """300 registered calls of 50 kB metadata each (the API's own limit): every subscriber's
    snapshot is one shared event of summaries, a few hundred bytes a call (was: each whole
    record, 100 MB for 1000 calls, built on the event loop for every subscriber)."""
    big = {"notes": "x" * 50_000}
    for i in range(300):
        await bridge.store.create(registered_call(i, big))
    first, second = await bridge.calls.feed.subscribe(), await bridge.calls.feed.subscribe()
    try:
        assert first.snapshot is second.snapshot  # encoded once, shared
        name, data = first.snapshot.split(b"\n", 2)[:2]
        calls = json.loads(data.removeprefix(b"data: "))["calls"]
        assert name == b"event: snapshot" and len(calls) == MAX_REGISTERED  # (the newest 200)
        assert all(set(c) == set(SUMMARY_FIELDS) for c in calls), calls[0]
        assert len(first.snapshot) < MAX_REGISTERED * 600, len(first.snapshot)
    finally:
        bridge.calls.feed.unsubscribe(first)
        bridge.calls.feed.unsubscribe(second)


async def test_an_ongoing_call_stays_in_the_view_whatever_is_registered(bridge):
    """One ongoing call, then 1001 registrations: the ongoing call is in a new subscriber's
    snapshot, and an open subscriber never loses it (was: pushed out by the newest 1000)."""
    events: list = []
    reader = asyncio.create_task(read_events(bridge.base_url, events))
    try:
        await until(lambda: events, timeout=5)
        call = asyncio.create_task(bridge.call(caller_audio(), speed=1.0, tail_ms=8000))
        live_id = (await until(lambda: [e[1]["call_id"] for e in events if e[0] == "call" and e[1]["call_status"] == "ongoing"], timeout=15))[0]
        for i in range(1001):
            await bridge.store.create(registered_call(i))
        await until(lambda: sum(1 for e in events if e[0] == "call" and e[1]["call_id"].startswith("reg")) >= MAX_REGISTERED, timeout=15)
        late: list = []
        late_reader = asyncio.create_task(read_events(bridge.base_url, late))
        await until(lambda: late, timeout=5)
        late_reader.cancel()
        snapshot = late[0][1]["calls"]
        assert [c["call_id"] for c in snapshot if c["call_status"] == "ongoing"] == [live_id]
        assert len(snapshot) == MAX_REGISTERED + 1
        # the open reader: nothing ever took the ongoing call out of its view
        gone = [e for e in events if e[0] == "call" and e[1]["call_id"] == live_id and e[1].get("in_view") is False]
        assert gone == []
        await call
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def test_a_registered_call_pushed_out_of_the_view_is_said_so(bridge):
    events: list = []
    reader = asyncio.create_task(read_events(bridge.base_url, events))
    try:
        await until(lambda: events, timeout=5)
        await bridge.store.create(registered_call(0))
        await until(lambda: [e for e in events if e[0] == "call" and e[1]["call_id"] == "reg00000"], timeout=10)
        for i in range(1, MAX_REGISTERED + 1):  # newer ones: the first is past the cap now
            await bridge.store.create(registered_call(i))
        out = await until(lambda: [e[1] for e in events if e[0] == "call" and e[1]["call_id"] == "reg00000" and e[1].get("in_view") is False], timeout=10)
        assert out[0]["call_status"] == "registered"
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def test_a_reader_that_stops_reading_is_dropped_and_its_connection_aborted(bridge, monkeypatch):
    """A reader that reads nothing (its socket's buffers small, so they fill at once) holds one
    write of the bridge's memory at most, and is dropped SLOW_READER_S after its last write."""
    import socket

    monkeypatch.setattr(live, "SLOW_READER_S", 1.0)
    host, port = bridge.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    await loop.sock_sendall(sock, f"GET /v2/call-events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode())
    await until(lambda: bridge.calls.feed.subscribers == 1, timeout=5)
    # the bridge's side of it: small buffers too, so a few dozen events fill everything
    (connection,) = [c for c in bridge.server.server.server_state.connections if getattr(c, "scope", {}).get("path") == "/v2/call-events"]
    connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    connection.transport.set_write_buffer_limits(high=4096)
    for i in range(400):  # ~400 bytes an event
        await bridge.store.create(registered_call(i, {"n": i}))
        if i % 50 == 0:
            await asyncio.sleep(bridge.settings.feed_interval_s)  # (events in several reads)
    await until(lambda: bridge.calls.feed.subscribers == 0, timeout=15)  # dropped
    assert connection.transport.is_closing()
    sock.close()
