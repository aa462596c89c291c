"""The main paths end to end on each database the bridge supports: SQLite (the embedded
default) and PostgreSQL (what replicas share), a fresh database per test. The rest of the
relay, API and webhook tests run on SQLite; the store's own tests cover both in detail."""

import asyncio

from audio import Resampler
from bridge.server import BackgroundServer
from bridge.settings import AgentConfig

from .conftest import TRUTH, hung_up_cleanly, best_correlation, caller_audio, envelope_ms, ongoing_calls, retell_client, until, wait_for_end
from .test_web_call import talk, ws_url
from .test_webhooks import FAST, Receiver, all_delivered

OWNED = "+14155550100"


async def test_a_phone_call_its_record_and_its_webhooks(start_bridge, database_url):
    receiver = Receiver()
    async with BackgroundServer(receiver.app) as hooks:
        bridge = await start_bridge(database_url=database_url, webhook_url=f"{hooks.base_url}/hook", **FAST)
        result = await bridge.call(dtmf=((300, "7"),))
        await until(lambda: all_delivered(bridge, result.call_id, 2))
    assert receiver.kinds(result.call_id) == ["call_started", "call_ended"]
    assert best_correlation(result.heard, caller_audio()[8000:50000])[0] >= 0.9
    async with retell_client(bridge) as sdk:
        call = await sdk.call.retrieve(result.call_id)
        assert call.call_status == "ended" and call.disconnection_reason == "user_hangup"
        assert call.transcript_with_tool_calls[0].role == "dtmf" and call.e2e_latency["num"] >= 1
        await sdk.call.update(result.call_id, metadata={"checked": True})
        listed = await sdk.call.list(filter_criteria={"call_status": {"op": "in", "type": "enum", "value": ["ended"]}})
    assert [c.call_id for c in listed.items] == [result.call_id] and listed.items[0].metadata == {"checked": True}


async def test_stop_call_ends_a_live_call(start_bridge, database_url):
    bridge = await start_bridge(database_url=database_url)
    call = asyncio.create_task(bridge.call(speed=1.0, tail_ms=20000))
    (record,) = await until(lambda: ongoing_calls(bridge))
    async with retell_client(bridge) as sdk:
        await sdk.call.stop(record.call_id)
    assert hung_up_cleanly(await call)
    assert (await wait_for_end(bridge, record.call_id)).disconnection_reason.value == "agent_hangup"


async def test_a_web_call(start_bridge, database_url):
    bridge = await start_bridge(database_url=database_url)
    async with retell_client(bridge) as sdk:
        call = await sdk.call.create_web_call(agent_id="echo")
    said = Resampler(8000, 24000).process(caller_audio())
    heard, _ = await talk(ws_url(bridge, call.call_id, call.access_token), said, 24000)
    assert best_correlation(heard, said[int(TRUTH[0][0] * 48) : int(TRUTH[0][1] * 48)])[0] >= 0.9
    record = await wait_for_end(bridge, call.call_id)
    assert record.disconnection_reason.value == "user_hangup" and record.transcript


async def test_an_outbound_call(start_bridge, database_url):
    agents = {"echo": AgentConfig(agent_id="echo", numbers=[OWNED], default=True)}
    bridge = await start_bridge(
        database_url=database_url, agents=agents, twilio_calls_per_second=50, callee_pcm=caller_audio()
    )
    async with retell_client(bridge) as sdk:
        call = await sdk.call.create_phone_call(from_number=OWNED, to_number="+14155550199")
    callee = await next(iter(bridge.fake.outbound.values()))
    assert len(envelope_ms(callee.heard)) == 1  # the callee heard the echo
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert record.disconnection_reason.value == "user_hangup" and record.twilio_call_sid == callee.call_sid
