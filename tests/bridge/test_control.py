"""The replicas' coordination through the database, piece by piece (the whole, with real
replicas behind HAProxy, is ``test_many_replicas.py``): the control channel survives losing its
connection, dial slots are one schedule for every process, a stop that comes while a call's
relay is being set up holds for it, a replica ends its reaped calls."""

import asyncio

import pytest
from sqlalchemy import text

from bridge.calls import CallService
from bridge.calls.throttle import SharedDialThrottle, TooManyCalls
from bridge.models import DisconnectionReason, now_ms
from bridge.settings import load_settings
from bridge.store import ControlChannel, SqlCallStore

from .conftest import API_KEY, AUTH_TOKEN, api_client, until
from .test_store import record as new_record

PG = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@PG
async def test_the_control_channel_listens_again_after_losing_its_connection(database_url, tmp_path):
    store = await SqlCallStore.open(database_url, "a", tmp_path)
    got: list[dict] = []
    channel = ControlChannel(store.engine, got.append)
    listener = asyncio.create_task(channel.run())
    try:
        await asyncio.wait_for(channel.listening.wait(), 10)
        await channel.send({"op": "stop", "call_id": "one"})
        await until(lambda: got == [{"op": "stop", "call_id": "one"}])
        async with store.engine.begin() as conn:  # the database drops the listening connection
            killed = await conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()")
            )
            assert killed.rowcount == 1
        await until(lambda: not channel.listening.is_set(), timeout=10)
        await asyncio.wait_for(channel.listening.wait(), 10)  # made again
        await channel.send({"op": "stop", "call_id": "two"})
        await until(lambda: len(got) == 2)
        assert got[1]["call_id"] == "two"
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await store.close()


async def test_on_sqlite_a_command_goes_straight_to_this_process(tmp_path):
    store = await SqlCallStore.open(f"sqlite:///{tmp_path / 'calls.db'}", "a", tmp_path)
    got: list[dict] = []
    channel = ControlChannel(store.engine, got.append)
    try:
        await channel.run()  # (returns at once: nothing to listen to)
        assert channel.listening.is_set()
        await channel.send({"op": "stop", "call_id": "x"})
        assert got == [{"op": "stop", "call_id": "x"}]
    finally:
        await store.close()


@PG
async def test_dial_slots_are_one_schedule_for_every_process(database_url, tmp_path):
    stores = [await SqlCallStore.open(database_url, name, tmp_path) for name in ("a", "b", "c")]
    throttle = SharedDialThrottle(stores[1], 0.1, "twilio-calls:AC1")  # one call every 10 s
    try:
        waits = await asyncio.gather(*(store.take_slot("twilio-calls:AC1", 10.0, 1000.0) for store in stores for _ in range(6)))
        assert sorted(round(w / 10) for w in waits) == list(range(18))  # 18 distinct slots, 10 s apart, none twice
        assert await stores[0].take_slot("twilio-calls:AC1", 10.0, 175.0) is None  # the next is 180 s away: refused
        assert await stores[0].take_slot("twilio-calls:AC2", 10.0, 1.0) == 0  # another account: its own schedule
        with pytest.raises(TooManyCalls):
            await throttle.wait(100)
    finally:
        for store in stores:
            await store.close()


def _service(tmp_path) -> CallService:
    settings = load_settings(twilio_auth_token=AUTH_TOKEN, api_keys=API_KEY, data_dir=tmp_path, request_host_signatures=True)
    return CallService(settings)


def test_a_stop_during_set_up_holds_for_the_relay(tmp_path):
    calls = _service(tmp_path)
    record = new_record("c1")
    calls._on_command({"op": "stop", "call_id": "c1", "reason": "agent_hangup", "detail": "stopped through the API"})
    calls._on_command({"op": "stop", "call_id": "c2", "reason": "not a reason"})  # ignored, logged
    stopped = []
    calls.attach(record, lambda reason, detail: stopped.append((reason, detail)))
    assert stopped == [(DisconnectionReason.agent_hangup, "stopped through the API")]
    calls.detach("c1")
    calls.attach(record, lambda reason, detail: stopped.append((reason, detail)))  # (held once)
    assert len(stopped) == 1


async def test_a_replica_lets_go_of_the_calls_ended_elsewhere(tmp_path):
    calls = _service(tmp_path)
    await calls.open()
    try:
        ours, reaped = new_record("mine"), new_record("reaped")
        for record in (ours, reaped):
            await calls.store.create(record)
            await calls.store.start(record.call_id)
        stopped = []
        for record in (ours, reaped):
            calls.attach(record, lambda reason, detail, call_id=record.call_id: stopped.append((call_id, reason, detail)))
        await calls.store.finish("reaped", DisconnectionReason.error_unknown, error_detail="reaped by another replica")
        assert await calls.drop_lost_calls() == 1
        assert stopped == [("reaped", DisconnectionReason.error_unknown, "another replica ended the call while this replica did not answer for it")]
        ending = {"end_timestamp": now_ms(), "transcript": "hello"}
        await calls.endings.store_ending("reaped", DisconnectionReason.user_hangup, ending)  # its relay's ending comes late
        kept = await calls.store.get("reaped")
        assert kept.disconnection_reason is DisconnectionReason.error_unknown and kept.error_detail == "reaped by another replica"
        assert kept.transcript == "hello"  # what it measured is kept
    finally:
        await calls.close()


@PG
async def test_replicas_dial_on_one_shared_rate(database_url, start_bridge):
    """Two replicas of one account, each asked for three calls at once, at 2 calls a second:
    Twilio gets the six requests half a second apart or more, whichever replica sent them (the
    service's own dial path, on the schedule in PostgreSQL)."""
    from .test_lifecycle import AGENTS

    settings = dict(database_url=database_url, agents=AGENTS, twilio_calls_per_second=2, dial_queue_timeout_s=10)
    replicas = [await start_bridge(instance_id=name, **settings) for name in ("one", "two")]
    for replica in replicas:
        replica.fake.dial_outcome = lambda params: "ringing"

    async def dial(replica):
        async with api_client(replica.base_url) as http:
            r = await http.post("/v2/create-phone-call", json={"from_number": "+14155550100", "to_number": "+14155550199"})
        assert r.status_code == 201, r.text

    await asyncio.gather(*(dial(replica) for replica in replicas for _ in range(3)))
    times = sorted(t for replica in replicas for t in replica.fake.created_at)
    assert len(times) == 6 and all(len(r.fake.created_at) == 3 for r in replicas)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # (slots are 0.5 s apart on the database's clock; each request's way to Twilio varies by tens
    # of ms. A throttle per replica would let both replicas' first calls go together: a gap of 0)
    assert min(gaps) >= 0.5 - 0.15 and times[-1] - times[0] >= 5 * 0.5 - 0.15, gaps
