"""stop-call ends the call now, on whichever replica is asked, once: the agent's audio not
yet heard is dropped (``clear``), the 204 comes once the record says the call ended, and the
call is hung up once (by its stream's end: no REST hang-up beside it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.settings import AgentConfig

from .conftest import api_client, envelope_ms, hung_up_cleanly, until

PG = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def burst_agent(bad_agent) -> dict:
    return {"burst": AgentConfig(agent_id="burst", url=f"{bad_agent}/burst/{{call_id}}", default=True)}


async def ongoing(bridge):
    return (await bridge.store.list(statuses=["ongoing"]))[0]


async def stop_and_time(base_url: str, call_id: str) -> float:
    async with api_client(base_url) as http:
        started = time.monotonic()
        r = await http.post(f"/v2/stop-call/{call_id}")
        assert r.status_code == 204, r.text
        return time.monotonic() - started


async def test_stop_call_drops_the_queued_audio_and_ends_the_call_now(start_bridge, bad_agent):
    """The agent sends 5 s of speech in one burst; stop-call 0.6 s into it: the caller stops
    hearing it at once (not after the 5 s), the 204 comes when the record says ended."""
    bridge = await start_bridge(agents=burst_agent(bad_agent))
    call = asyncio.create_task(bridge.call(bytes(3200), speed=1.0, tail_ms=20000))
    (live,) = await until(lambda: ongoing(bridge), timeout=10)
    await asyncio.sleep(0.6)
    await stop_and_time(bridge.base_url, live.call_id)
    record = await bridge.store.get(live.call_id)  # ended already: the 204 waited for it
    assert record.call_status.value == "ended" and record.disconnection_reason.value == "agent_hangup"
    assert record.error_detail == "stopped through the API"
    result = await asyncio.wait_for(call, 10)
    assert hung_up_cleanly(result), result.summary()
    assert result.clears == 1  # Twilio was told to drop what it had queued
    heard = sum(end - start for start, end in envelope_ms(result.heard))
    assert heard < 2000, envelope_ms(result.heard)  # well short of the 5 s sent
    assert bridge.fake.requests == []  # one hang-up: the stream's end, no REST request beside it


@PG
async def test_stop_call_through_another_replica_ends_the_call_there_once(database_url, start_bridge, bad_agent):
    """Two replicas on one PostgreSQL: stop-call sent to the one not relaying the call reaches
    the relaying one through the control channel, which ends it as a local stop would; the asked
    replica neither declares it unresponsive nor hangs up a second time."""
    agents = burst_agent(bad_agent)
    relaying = await start_bridge(database_url=database_url, instance_id="relaying", agents=agents)
    asked = await start_bridge(database_url=database_url, instance_id="asked", agents=agents)
    await asyncio.wait_for(asked.calls.control.listening.wait(), 10)
    await asyncio.wait_for(relaying.calls.control.listening.wait(), 10)
    call = asyncio.create_task(relaying.call(bytes(3200), speed=1.0, tail_ms=20000))
    (live,) = await until(lambda: ongoing(relaying), timeout=10)
    await asyncio.sleep(0.6)
    await stop_and_time(asked.base_url, live.call_id)
    record = await asked.store.get(live.call_id)
    assert record.call_status.value == "ended" and record.error_detail == "stopped through the API", record.error_detail
    result = await asyncio.wait_for(call, 10)
    assert hung_up_cleanly(result) and result.clears == 1, result.summary()
    assert relaying.fake.requests == [] and asked.fake.requests == []  # hung up once, by the stream's end


@PG
async def test_stop_call_through_another_replica_that_is_gone_ends_it_there(database_url, start_bridge, bad_agent):
    """The relaying replica is frozen (its control channel hears nothing): after its two waits
    the asked replica hangs the call up through Twilio and ends it, saying why."""
    agents = burst_agent(bad_agent)
    relaying = await start_bridge(database_url=database_url, instance_id="frozen", agents=agents)
    asked = await start_bridge(database_url=database_url, instance_id="asked", agents=agents)
    call = asyncio.create_task(relaying.call(bytes(3200), speed=1.0, tail_ms=6000))
    (live,) = await until(lambda: ongoing(relaying), timeout=10)
    relaying.calls.control.on_command = lambda command: None  # its commands go nowhere
    await stop_and_time(asked.base_url, live.call_id)
    record = await asked.store.get(live.call_id)
    assert record.call_status.value == "ended" and "did not end it within 2 s: ended by asked" in record.error_detail
    assert [sid for sid, _ in asked.fake.requests] == [record.twilio_call_sid]
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
