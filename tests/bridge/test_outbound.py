"""POST /v2/create-phone-call through Twilio REST (a local fake Twilio the twilio client is
pointed at), with its status and AMD callbacks signed like Twilio's."""

import asyncio
import time

import pytest
from retell import APIStatusError

from bridge.settings import AgentConfig

from .conftest import hung_up_cleanly, api_client, caller_audio, envelope_ms, retell_client, wait_for_end

OWNED = "+14155550100"
AGENTS = {
    "echo": AgentConfig(agent_id="echo", numbers=[OWNED], default=True),
    "slow": AgentConfig(agent_id="slow", sample_rate=16000),
}


BRIDGE_SETTINGS = dict(agents=AGENTS, twilio_calls_per_second=50, callee_pcm=caller_audio())


async def test_a_dialed_call_that_is_answered_reaches_the_agent(bridge, sdk):
    call = await sdk.call.create_phone_call(
        from_number=OWNED, to_number="+14155550199", metadata={"campaign": 3}, retell_llm_dynamic_variables={"first": "Ada"},
    )  # fmt: skip
    assert call.direction == "outbound" and call.call_status == "registered" and call.agent_id == "echo"
    params = bridge.fake.created[0]
    assert (params["To"], params["From"]) == ("+14155550199", OWNED)
    assert params["Url"].endswith(f"/twilio/voice/echo?call_id={call.call_id}")
    assert params["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert "MachineDetection" not in params
    callee = await next(iter(bridge.fake.outbound.values()))
    assert callee.ended_by == "caller" and len(envelope_ms(callee.heard)) == 1  # heard its echo
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert record.disconnection_reason.value == "user_hangup" and record.twilio_call_sid == callee.call_sid
    assert record.metadata == {"campaign": 3} and record.retell_llm_dynamic_variables == {"first": "Ada"}
    assert len((await bridge.store.list(limit=100))[0]) == 1  # Twilio's voice request did not register another


async def test_override_agent_id(bridge, sdk):
    call = await sdk.call.create_phone_call(from_number=OWNED, to_number="+14155550199", override_agent_id="slow")
    assert call.agent_id == "slow"
    await next(iter(bridge.fake.outbound.values()))
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert (record.audio_websocket_protocol.value, record.sample_rate) == ("twilio", 8000)  # the caller's leg
    log = bridge.calls.log_path(call.call_id).read_text()
    assert '"event":"agent_connected","protocol":"web","encoding":"s16le","sample_rate":16000' in log  # the slow agent's


@pytest.mark.parametrize("outcome,reason", [("busy", "dial_busy"), ("failed", "dial_failed"), ("no-answer", "dial_no_answer")])
async def test_calls_that_never_connect_end_with_the_dial_reason(bridge, sdk, outcome, reason):
    bridge.fake.dial_outcome = lambda params: outcome
    call = await sdk.call.create_phone_call(from_number=OWNED, to_number="+14155550199")
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert record.disconnection_reason.value == reason and record.start_timestamp is None


async def test_twilio_refusing_the_number_is_a_clear_error(bridge, sdk):
    bridge.fake.dial_outcome = lambda params: "refuse"
    with pytest.raises(APIStatusError) as refused:
        await sdk.call.create_phone_call(from_number=OWNED, to_number="+19999999999")
    assert refused.value.status_code == 400 and "not a valid phone number" in refused.value.body["message"]
    (record,), _ = await bridge.store.list()
    assert record.disconnection_reason.value == "dial_failed" and "Twilio refused" in record.error_detail


async def test_a_machine_answering_drops_the_call_when_asked(bridge, sdk):
    bridge.fake.dial_outcome = lambda params: "machine"
    call = await sdk.call.create_phone_call(from_number=OWNED, to_number="+14155550199", extra_body={"drop_call_if_machine_detected": True})
    params = bridge.fake.created[0]
    assert params["MachineDetection"] == "DetectMessageEnd" and params["AsyncAmd"] == "true"
    assert params["AsyncAmdStatusCallback"].endswith(f"/twilio/amd/{call.call_id}")
    callee = await next(iter(bridge.fake.outbound.values()))
    assert hung_up_cleanly(callee) and bridge.fake.requests == []  # no fallback, no REST request
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert record.disconnection_reason.value == "voicemail_reached" and record.call_status.value == "ended"


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"from_number": "+15550001111", "to_number": "+14155550199"}, 422, "not one of this bridge's numbers"),
        ({"from_number": OWNED, "to_number": "14155550199"}, 422, "E.164"),
        ({"from_number": OWNED}, 422, "to_number"),
        ({"from_number": OWNED, "to_number": "+14155550199", "override_agent_id": "nobody"}, 404, "agent nobody not found"),
    ],
)
async def test_bad_dial_requests(bridge, body, status, message):

    async with api_client(bridge.base_url) as http:
        r = await http.post("/v2/create-phone-call", json=body)
    assert r.status_code == status and message in r.json()["message"]
    assert bridge.fake.created == [] and (await bridge.store.list())[0] == []


async def test_dialing_is_throttled_to_twilio_s_rate(start_bridge):
    bridge = await start_bridge(agents=AGENTS, twilio_calls_per_second=4, dial_queue_timeout_s=5)
    bridge.fake.dial_outcome = lambda params: "busy"
    async with retell_client(bridge) as sdk:
        started = time.monotonic()
        await asyncio.gather(*(sdk.call.create_phone_call(from_number=OWNED, to_number="+14155550199") for _ in range(5)))
        elapsed = time.monotonic() - started
    assert elapsed >= 4 * 0.25 * 0.9  # five starts at 4 a second span a second (a lower bound)
    assert len(bridge.fake.created) == 5


async def test_a_full_dial_queue_answers_429(start_bridge):
    bridge = await start_bridge(agents=AGENTS, twilio_calls_per_second=1, dial_queue_timeout_s=0.2)
    bridge.fake.dial_outcome = lambda params: "busy"
    async with retell_client(bridge) as sdk:
        results = await asyncio.gather(
            *(sdk.call.create_phone_call(from_number=OWNED, to_number="+14155550199") for _ in range(3)), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, APIStatusError)]
    assert len(errors) == 2 and {e.status_code for e in errors} == {429}
    assert len(bridge.fake.created) == 1


async def test_dialing_without_a_twilio_account_is_a_configuration_error_not_a_500(start_bridge):
    bridge = await start_bridge(agents=AGENTS, twilio_account_sid=None)
    async with retell_client(bridge) as sdk:
        with pytest.raises(APIStatusError) as refused:
            await sdk.call.create_phone_call(from_number=OWNED, to_number="+14155550199")
    assert refused.value.status_code == 422
    assert "set BRIDGE_TWILIO_ACCOUNT_SID" in refused.value.body["message"]
    assert bridge.fake.created == []
