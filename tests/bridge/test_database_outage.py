"""The database goes away mid-call (a PostgreSQL server of the test's own, stopped and started
again; never the machine's): the call's ending is kept and stored once the database is back,
as if it had never gone (reason, latency, transcript, end time, one call_ended webhook); while
it is down the API answers 503 with Retry-After and Twilio's webhook still gives the caller a
sentence; an ending a stopping process could not store is stored by the next one."""

import asyncio
import time

from .conftest import api_client, call_status, until
from .test_webhook import PARAMS, post
from .test_webhooks import FAST, Receiver, all_delivered
from bridge.server import BackgroundServer
from bridge.dev.simulator import parse_twiml


async def test_a_call_that_ends_while_the_database_is_down_is_recorded_once_it_is_back(start_bridge, own_postgres):
    receiver = Receiver()
    async with BackgroundServer(receiver.app) as hooks:
        bridge = await start_bridge(database_url=own_postgres.url, webhook_url=f"{hooks.base_url}/hook", **FAST)
        call = asyncio.create_task(bridge.call(speed=1.0, tail_ms=2500, dtmf=((300, "4"),)))
        record = await until(lambda: ongoing_call(bridge), timeout=20)
        call_id = record.call_id
        await asyncio.to_thread(own_postgres.stop)
        down_at_ms = time.time() * 1000

        # while it is down: the API says "try again", Twilio's webhook still answers the caller
        async with api_client(bridge.base_url) as http:
            r = await http.get(f"/v2/get-call/{call_id}")
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json() == {"status": "error", "message": "the call database is unavailable; try again shortly"}
        webhook = await post(bridge.base_url, params={**PARAMS, "CallSid": "CA" + "7" * 32})
        assert webhook.status_code == 200
        assert parse_twiml(webhook.text)[2] == [("Say", bridge.settings.fallback_message), ("Hangup", "")]

        result = await call  # the caller hangs up during the outage
        assert result.ended_by == "caller"
        assert bridge.calls.endings.pending == [call_id]
        await asyncio.sleep(1.0)  # a while down, with the ending retried
        await asyncio.to_thread(own_postgres.start)
        back_at_ms = time.time() * 1000

        stored = await until(lambda: call_status(bridge, call_id, "ended"), timeout=30)
        await until(lambda: all_delivered(bridge, call_id, 2), timeout=30)
    assert stored.disconnection_reason.value == "user_hangup" and stored.error_detail == "Twilio sent stop"
    assert stored.e2e_latency is not None and stored.transcript_with_tool_calls[0] == {"role": "dtmf", "digit": "4"}
    assert down_at_ms <= stored.end_timestamp < back_at_ms  # when it ended, not when it was stored
    assert receiver.kinds(call_id) == ["call_started", "call_ended"]
    ended = receiver.events[-1]["call"]
    assert ended["disconnection_reason"] == "user_hangup" and ended["end_timestamp"] == stored.end_timestamp
    assert bridge.calls.endings.pending == []


async def test_an_ending_a_stopping_process_could_not_store_is_stored_by_the_next(start_bridge, own_postgres, tmp_path):
    data_dir = tmp_path / "spooling"
    first = await start_bridge(database_url=own_postgres.url, data_dir=data_dir)
    call = asyncio.create_task(first.call(speed=1.0, tail_ms=1500))
    record = await until(lambda: ongoing_call(first), timeout=20)
    await asyncio.to_thread(own_postgres.stop)
    await call
    spooled = data_dir / "spool" / "endings" / f"{record.call_id}.json"
    assert spooled.exists()
    await first.server.stop()  # it has to go, with the database still down
    await asyncio.to_thread(own_postgres.start)

    second = await start_bridge(database_url=own_postgres.url, data_dir=data_dir)  # same instance id
    stored = await second.store.get(record.call_id)
    assert stored.call_status.value == "ended" and stored.disconnection_reason.value == "user_hangup"
    assert "restarted" not in (stored.error_detail or "")  # the truth, not start-up recovery's guess
    assert not spooled.exists()


async def ongoing_call(bridge):
    page, _ = await bridge.store.list(statuses=["ongoing"])
    return page[0] if page else None
