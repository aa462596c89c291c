"""Replicas sharing one PostgreSQL database (issue 14, first part): when a replica dies with
live calls, another one ends them, each once, with a recorded reason and their webhooks, within
the lease time plus one sweep; its own calls go on."""

import asyncio
import json
import signal
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.dev.simulator import simulate_call
from bridge.server import BackgroundServer

from .conftest import AUTH_TOKEN, api_client, caller_audio, until
from .test_drain import Replica, fake_twilio, live_call_id  # noqa: F401 - the fixture

HEARTBEAT_S = 0.5  # the lease is three heartbeats: 1.5 s


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_dead_replicas_calls_are_ended_once_by_another(tmp_path, fake_twilio, database_url):  # noqa: F811
    fake, url = fake_twilio
    events: list[tuple[str, str]] = []

    async def hook(request: Request) -> Response:
        body = json.loads(await request.body())
        events.append((body["event"], body["call"]["call_id"]))
        return Response(status_code=204)

    async with BackgroundServer(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as receiver:
        common = {"database_url": database_url, "heartbeat_interval_s": HEARTBEAT_S, "webhook_url": f"{receiver.base_url}/hook"}
        doomed = Replica(tmp_path, url, name="a", instance_id="replica-a", **common)
        survivor = Replica(tmp_path, url, name="b", instance_id="replica-b", **common)
        try:
            await doomed.start()
            await survivor.start()
            long = caller_audio() * 8
            lost = asyncio.create_task(simulate_call(doomed.base_url, AUTH_TOKEN, long, speed=1.0, fake_api=fake, max_call_s=60))
            lost_id = await live_call_id(doomed.base_url)
            kept = asyncio.create_task(
                simulate_call(survivor.base_url, AUTH_TOKEN, caller_audio(), speed=1.0, tail_ms=6000, fake_api=fake)
            )
            await until(lambda: sum(1 for e in events if e[0] == "call_started") == 2, timeout=10)
            doomed.process.send_signal(signal.SIGKILL)  # (perhaps while it records a delivery: the
            # job is then due again at the reaping, delivered at least once, and the calls' later
            # webhooks, which wait for it, are not held up for its lease)
            killed = time.monotonic()

            async def reaped():
                async with api_client(survivor.base_url) as http:
                    record = (await http.get(f"/v2/get-call/{lost_id}")).json()
                return record if record["call_status"] != "ongoing" else None

            record = await until(reaped, timeout=15, interval=0.05)
            reaped_after = time.monotonic() - killed
            print(f"\nreaped {reaped_after:.2f} s after kill -9 (lease {3 * HEARTBEAT_S:g} s + one sweep)")
            assert record["disconnection_reason"] == "error_unknown"
            assert reaped_after < 3 * HEARTBEAT_S + 2 + 5  # the lease, one sweep (<= 2 s), and room for a loaded machine
            kept_result = await kept
            await lost  # (the simulated Twilio saw its stream drop)
            await asyncio.sleep(2)  # any duplicate webhook would have come by now
        finally:
            doomed.stop()
            survivor.signal(signal.SIGTERM)
            await survivor.exit_code()
            survivor.stop()
    from bridge.store import SqlCallStore

    store = await SqlCallStore.open(database_url, "reader", tmp_path)
    try:
        stored = await store.get(lost_id)
    finally:
        await store.close()
    assert stored.error_detail.endswith("(its lease expired): replica-a"), stored.error_detail
    assert events.count(("call_ended", lost_id)) == 1, events
    assert kept_result.ended_by == "caller" and ("call_ended", kept_result.call_id) in events
