"""The agent controls the call, end to end through the Twilio simulator and the fake Twilio REST
API (real HTTP): cold and warm transfers, keys pressed towards the callee (found by a Goertzel
detector in what the caller heard), a hang-up after the last words, and voicemail."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import websockets
from twilio.request_validator import RequestValidator

from audio.dtmf import DIGITS, detect
from bridge.settings import AgentConfig
from tests.audio.signals import tone_pcm

from .conftest import AUTH_TOKEN, api_client, caller_audio, envelope_ms, hung_up_cleanly, until, wait_for_end
from .fake_providers import KEY, FakeGemini, FakeOpenAI
from .test_web_call import talk

TARGET = "+14155550123"
OWNED = "+15550100000"  # the simulator's default To: the bridge's number on inbound calls


class ControlAgent:
    """A web-protocol agent on loopback that asks the bridge to control the call, by script
    (the path): it speaks ``speak_ms`` of tone, sends the request, and notes every event."""

    def __init__(self):
        self.events: list[dict] = []  # call_control_result / voicemail events it got
        self.requests: dict[str, list[dict]] = {}

    def url(self, script: str) -> str:
        return f"ws://127.0.0.1:{self.port}/{script}/{{call_id}}"

    async def start(self):
        self.server = await websockets.serve(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, ws):
        script = ws.request.path.strip("/").split("/")[0]
        requests = self.requests.get(script, [])
        got = asyncio.get_running_loop().create_future()

        async def listen():
            try:
                async for message in ws:
                    if isinstance(message, bytes):
                        if not got.done():
                            got.set_result(None)
                        continue
                    if message.startswith("{"):
                        event = json.loads(message)
                        if event.get("event_type") in ("call_control_result", "voicemail"):
                            self.events.append(event)
                            if event["event_type"] == "voicemail":  # leave a message, then hang up
                                await ws.send(json.dumps({"event_type": "update", "transcript": [{"role": "agent", "content": "Please call us back."}]}))
                                await ws.send(tone_pcm(24000, 800))
                                await ws.send(json.dumps({"event_type": "end_call"}))
                            elif event.get("ok") is False and script.startswith("refused"):
                                await asyncio.sleep(2.0)  # (the refusal came at once, its first words still playing)
                                await ws.send(tone_pcm(24000, 500, 660))  # it goes on talking
            except websockets.ConnectionClosed:
                pass

        listener = asyncio.ensure_future(listen())
        await got
        if script != "listen":
            await ws.send(tone_pcm(24000, 1500))
        for request in requests:
            await ws.send(json.dumps(request))
        await listener


@pytest.fixture
async def control_agent():
    agent = ControlAgent()
    await agent.start()
    yield agent
    await agent.stop()


def agents(control_agent, script: str, **fields) -> dict:
    fields.setdefault("transfer_destinations", ["+1415555*", "sip:*@pbx.example.com"])
    return {"ai": AgentConfig(agent_id="ai", url=control_agent.url(script), default=True, numbers=[OWNED], **fields)}


async def timeline(bridge, call_id: str) -> list[dict]:
    record = await wait_for_end(bridge, call_id)
    async with api_client(bridge.base_url) as http:
        return [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]


async def test_a_cold_transfer_dials_the_target_after_the_agent_s_last_words_were_heard(start_bridge, control_agent):
    control_agent.requests["cold"] = [{"event_type": "transfer_call", "to": TARGET, "extension": "12#"}]
    bridge = await start_bridge(agents=agents(control_agent, "cold", transfer_timeout_s=25))
    result = await bridge.call(bytes(3200), speed=1.0, tail_ms=8000)
    # the agent's 1.5 s were heard in full before Twilio was told to dial (after their mark)
    (spoken,) = envelope_ms(result.heard)
    assert spoken[1] - spoken[0] >= 1400, envelope_ms(result.heard)
    assert result.dialed == {"to": TARGET, "caller_id": OWNED, "timeout": "25", "send_digits": "12#"}, result.summary()
    assert bridge.fake.requests == []  # (the stream's end said it: no REST request)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "call_transfer" and record.call_status.value == "ended"
    assert record.transfer_destination == TARGET
    assert control_agent.events == [{"event_type": "call_control_result", "action": "transfer_call", "ok": True, "reason": None}]
    kinds = [e["event"] for e in await timeline(bridge, result.call_id)]
    assert kinds.index("call_control") < kinds.index("transfer") < kinds.index("end")
    print(f"\ncold transfer: record {record.disconnection_reason.value} to {record.transfer_destination}; after the stream {result.after}")


async def test_a_transfer_to_a_destination_not_allowed_is_refused_and_the_agent_goes_on(start_bridge, control_agent):
    control_agent.requests["refused"] = [{"event_type": "transfer_call", "to": "+19005550100"}]
    bridge = await start_bridge(agents=agents(control_agent, "refused"))
    result = await bridge.call(bytes(3200), speed=1.0, tail_ms=5000)
    assert control_agent.events == [
        {"event_type": "call_control_result", "action": "transfer_call", "ok": False, "reason": "+19005550100 is not among this agent's transfer_destinations"}
    ]  # fmt: skip
    assert len(envelope_ms(result.heard)) == 2  # its first words, then more after the refusal
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup" and record.transfer_destination is None
    assert [e for e in await timeline(bridge, result.call_id) if e["event"] == "transfer_refused"]


async def test_an_agent_with_no_destinations_may_transfer_nowhere(start_bridge, control_agent):
    control_agent.requests["refused2"] = [{"event_type": "transfer_call", "to": TARGET}]
    bridge = await start_bridge(agents=agents(control_agent, "refused2", transfer_destinations=[]))
    await bridge.call(bytes(3200), speed=2.0, tail_ms=2000)
    assert control_agent.events[0]["ok"] is False and "transfer_destinations" in control_agent.events[0]["reason"]


async def test_a_bad_request_is_answered_with_the_reason(start_bridge, control_agent):
    control_agent.requests["bad"] = [{"event_type": "transfer_call", "to": "hello"}, {"event_type": "press_digit", "digits": "9x"}]
    bridge = await start_bridge(agents=agents(control_agent, "bad"))
    await bridge.call(bytes(3200), speed=2.0, tail_ms=2000)
    assert [(e["action"], e["ok"]) for e in control_agent.events] == [("transfer_call", False), ("press_digit", False)]
    assert "E.164" in control_agent.events[0]["reason"] and "0-9" in control_agent.events[1]["reason"]


async def test_a_warm_transfer_briefs_the_target_then_joins_it_with_the_caller(start_bridge, control_agent):
    message = "I have a caller who would like a table for two tomorrow."
    control_agent.requests["warm"] = [{"event_type": "transfer_call", "to": TARGET, "mode": "warm", "message": message}]
    bridge = await start_bridge(agents=agents(control_agent, "warm"))
    bridge.fake.target_ring_s = 2.5
    result = await bridge.call(bytes(3200), speed=1.0, tail_ms=15000)
    fake = bridge.fake
    (leg_sid,) = fake.legs
    leg = fake.legs[leg_sid]
    assert leg["params"]["To"] == TARGET and leg["params"]["MachineDetection"] == "Enable" and leg["joined"]
    assert fake.said[leg_sid] == [message]  # the target heard the message before joining
    assert result.conference == leg["joined"] and fake.conferences[result.conference] == [leg_sid, result.call_sid]
    (spans,) = envelope_ms(result.heard)  # the agent's words, then hold music while the target rang
    assert spans[1] - spans[0] >= 1500 + 2300, spans
    held = np.frombuffer(result.heard, "<i2")[8 * 2000 : 8 * 3500].astype(float)
    spectrum = np.abs(np.fft.rfft(held))
    peak_hz = np.argmax(spectrum) * 8000 / len(held)
    assert min(abs(peak_hz - f) for f in (261.63, 329.63, 392.0, 523.25)) < 5, peak_hz  # (the arpeggio, not the agent's tone)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "call_transfer" and record.transfer_destination == TARGET
    assert control_agent.events[-1]["ok"] is True
    kinds = [e["event"] for e in await timeline(bridge, result.call_id)]
    assert kinds.index("transfer_dialing") < kinds.index("transfer_answered") < kinds.index("transfer")
    print(f"\nwarm transfer: timeline {[k for k in kinds if k.startswith(('call_control', 'transfer'))]}; conference {result.conference}")


@pytest.mark.parametrize("outcome, reason", [("no-answer", "the target did not answer (no-answer)"), ("machine", "the target's voicemail answered")])
async def test_a_warm_transfer_that_fails_brings_the_caller_back_to_the_agent(start_bridge, control_agent, outcome, reason):
    control_agent.requests["warm2"] = [{"event_type": "transfer_call", "to": TARGET, "mode": "warm", "message": "Hello"}]
    bridge = await start_bridge(agents=agents(control_agent, "warm2"))
    bridge.fake.dial_outcome = lambda params: outcome
    result = await bridge.call(bytes(3200), speed=1.0, tail_ms=6000)
    assert control_agent.events == [{"event_type": "call_control_result", "action": "transfer_call", "ok": False, "reason": reason}]
    assert result.conference is None and result.dialed is None
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup" and record.transfer_destination is None  # the same call, on
    assert [e["reason"] for e in await timeline(bridge, result.call_id) if e["event"] == "transfer_failed"] == [reason]


async def test_a_second_transfer_while_one_runs_is_refused(start_bridge, control_agent):
    request = {"event_type": "transfer_call", "to": TARGET, "mode": "warm", "message": "Hi"}
    control_agent.requests["twice"] = [request, request]
    bridge = await start_bridge(agents=agents(control_agent, "twice"))
    result = await bridge.call(bytes(3200), speed=1.0, tail_ms=15000)
    assert [e["ok"] for e in control_agent.events] == [False, True]  # (the second, refused at once; then the first done)
    assert control_agent.events[0]["reason"] == "a transfer is already under way"
    assert len(bridge.fake.legs) == 1 and result.conference


async def test_pressed_keys_are_heard_as_dtmf_tones_in_order(start_bridge, control_agent):
    control_agent.requests["digits"] = [{"event_type": "press_digit", "digits": "1w2#"}]
    bridge = await start_bridge(agents=agents(control_agent, "digits"))
    result = await bridge.call(bytes(3200), speed=1.0, tail_ms=3000)
    presses = detect(result.heard)
    assert [p.digit for p in presses] == ["1", "2", "#"], presses
    for p in presses:
        assert (p.low_hz, p.high_hz) == DIGITS[p.digit] and 70 <= p.duration_ms <= 130, p
    assert presses[0].start_ms > 1400  # after the agent's 1.5 s already sent
    assert 450 <= presses[1].start_ms - presses[0].start_ms - 180 <= 550  # the w: half a second
    record = await wait_for_end(bridge, result.call_id)
    invoked = [u for u in record.transcript_with_tool_calls if u["role"] == "tool_call_invocation"]
    assert invoked and invoked[0]["name"] == "press_digit" and json.loads(invoked[0]["arguments"]) == {"digits": "1w2#"}
    print("\nDTMF found in what the caller heard: " + ", ".join(f"{p.digit} {p.low_hz:g}+{p.high_hz:g} Hz at {p.start_ms:.0f} ms for {p.duration_ms:.0f} ms" for p in presses))


async def test_end_call_hangs_up_after_the_last_words(start_bridge, control_agent):
    control_agent.requests["end"] = [{"event_type": "end_call"}]
    bridge = await start_bridge(agents=agents(control_agent, "end"))
    result = await bridge.call(bytes(3200), speed=1.0, tail_ms=8000)
    (spoken,) = envelope_ms(result.heard)
    assert spoken[1] - spoken[0] >= 1400 and hung_up_cleanly(result), result.summary()
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "agent_hangup"


async def test_the_api_transfers_a_call_and_a_retry_with_the_same_key_is_done_once(start_bridge, control_agent):
    bridge = await start_bridge(agents=agents(control_agent, "listen"))
    call = asyncio.create_task(bridge.call(bytes(3200), speed=1.0, tail_ms=10000))
    (live,) = await until(lambda: _ongoing(bridge), timeout=10)
    async with api_client(bridge.base_url) as http:
        body = {"to": TARGET, "mode": "warm", "message": "From the API"}
        first, second = await asyncio.gather(
            http.post(f"/v2/transfer-call/{live.call_id}", json=body, headers={"Idempotency-Key": "k1"}),
            http.post(f"/v2/transfer-call/{live.call_id}", json=body, headers={"Idempotency-Key": "k1"}),
        )
        assert first.status_code == second.status_code == 200 and first.json() == second.json() and first.json()["ok"] is True
        refused = await http.post(f"/v2/transfer-call/{live.call_id}", json={"to": "+19005550100"})
        assert refused.status_code in (200, 409)
        bad = await http.post(f"/v2/transfer-call/{live.call_id}", json={"to": TARGET, "mode": "sideways"})
        assert bad.status_code == 422
    result = await call
    assert len(bridge.fake.legs) == 1 and result.conference  # one transfer, though asked twice


async def _ongoing(bridge):
    return (await bridge.store.list(statuses=["ongoing"]))[0]


async def test_stop_call_during_a_warm_transfer_hangs_up_the_target_leg_too(start_bridge, control_agent):
    control_agent.requests["warm3"] = [{"event_type": "transfer_call", "to": TARGET, "mode": "warm", "message": "Hi"}]
    bridge = await start_bridge(agents=agents(control_agent, "warm3"))
    bridge.fake.dial_outcome = lambda params: "ringing"  # the target's phone rings
    call = asyncio.create_task(bridge.call(bytes(3200), speed=1.0, tail_ms=20000))
    await until(lambda: bridge.fake.created, timeout=15)
    (live,) = await _ongoing(bridge)
    async with api_client(bridge.base_url) as http:
        assert (await http.post(f"/v2/stop-call/{live.call_id}")).status_code == 204
    result = await call
    assert hung_up_cleanly(result)
    hung = await until(lambda: [sid for sid, form in bridge.fake.requests if form.get("Status") == "completed"], timeout=5)
    assert len(hung) == 1  # the target leg, hung up
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "agent_hangup"


# --- voicemail ---------------------------------------------------------------------------------


async def dial_to_voicemail(bridge, **body) -> object:
    async with api_client(bridge.base_url) as http:
        r = await http.post("/v2/create-phone-call", json={"from_number": OWNED, "to_number": "+14155550199", **body})
    assert r.status_code == 201, r.text
    call = r.json()
    callee = await asyncio.wait_for(list(bridge.fake.outbound.values())[-1], 30)
    return call, callee, await wait_for_end(bridge, call["call_id"], timeout=20)


@pytest.mark.parametrize("action", ["hangup", "static", "message"])
async def test_a_voicemail_at_the_beep_is_left_as_configured(start_bridge, control_agent, action):
    message = "Hello, this is Luigi's about your booking. Please call us back."
    fields = dict(voicemail_detection=True, voicemail_action=action, voicemail_message=message if action == "static" else "")
    bridge = await start_bridge(agents=agents(control_agent, "listen", **fields), callee_pcm=bytes(16000 * 6), twilio_calls_per_second=50)
    bridge.fake.dial_outcome = lambda params: "machine"
    bridge.fake.amd_after_ms = 800
    call, callee, record = await dial_to_voicemail(bridge)
    params = bridge.fake.created[0]
    assert params["MachineDetection"] == "DetectMessageEnd" and params["AsyncAmd"] == "true"
    assert record.disconnection_reason.value == "voicemail_reached", record.error_detail
    assert record.voicemail["answered_by"] == "machine_end_beep" and record.voicemail["action"] == action
    if action == "static":
        assert callee.after == [f"Say: {message}", "Hangup"] and record.voicemail["message"] == message
    elif action == "message":
        assert control_agent.events == [
            {"event_type": "voicemail", "answered_by": "machine_end_beep"},
            {"event_type": "call_control_result", "action": "end_call", "ok": True, "reason": None},
        ]  # (told of the beep; its end_call, done)
        assert record.voicemail["message"] == "Please call us back." and hung_up_cleanly(callee)
    else:
        assert hung_up_cleanly(callee) and record.voicemail["message"] is None
    print(f"\nvoicemail ({action}): {record.voicemail}")


async def test_create_phone_call_takes_its_own_voicemail_settings(start_bridge, control_agent):
    bridge = await start_bridge(agents=agents(control_agent, "listen"), callee_pcm=bytes(16000 * 6), twilio_calls_per_second=50)
    bridge.fake.dial_outcome = lambda params: "machine"
    call, callee, record = await dial_to_voicemail(bridge, voicemail_detection=True, voicemail_action="static", voicemail_message="Call back")
    assert record.disconnection_reason.value == "voicemail_reached" and callee.after == ["Say: Call back", "Hangup"]


async def test_a_static_voicemail_plays_its_audio_and_one_with_nothing_to_say_hangs_up(start_bridge, control_agent):
    bridge = await start_bridge(agents=agents(control_agent, "listen"), callee_pcm=bytes(16000 * 6), twilio_calls_per_second=50)
    bridge.fake.dial_outcome = lambda params: "machine"
    audio = "https://files.example.com/luigi-voicemail.mp3"
    _, callee, record = await dial_to_voicemail(bridge, voicemail_detection=True, voicemail_action="static", voicemail_audio_url=audio)
    assert callee.after == [f"Play: {audio}", "Hangup"] and record.voicemail["audio_url"] == audio
    _, callee, record = await dial_to_voicemail(bridge, voicemail_detection=True, voicemail_action="static", voicemail_message="")
    assert record.disconnection_reason.value == "voicemail_reached" and "no voicemail_message, hung up" in record.error_detail
    assert hung_up_cleanly(callee) and record.voicemail["message"] is None


async def test_a_voicemail_a_twilio_protocol_agent_cannot_leave_is_refused_before_dialling(start_bridge):
    twilio_agent = AgentConfig(agent_id="t", protocol="twilio", encoding="mulaw", sample_rate=8000, url="ws://127.0.0.1:9/{call_id}", numbers=[OWNED])
    bridge = await start_bridge(agents={"t": twilio_agent}, twilio_calls_per_second=50)
    async with api_client(bridge.base_url) as http:
        body = {"from_number": OWNED, "to_number": "+14155550199", "voicemail_detection": True, "voicemail_action": "message"}
        r = await http.post("/v2/create-phone-call", json=body)
        bad_url = await http.post("/v2/create-phone-call", json={**body, "voicemail_action": "static", "voicemail_audio_url": "file:///etc/passwd"})
    assert r.status_code == 422 and "twilio protocol has no event" in r.json()["message"], r.text
    assert bad_url.status_code == 422
    assert bridge.fake.created == []


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(protocol="twilio", encoding="mulaw", sample_rate=8000, voicemail_action="message"), "twilio protocol has no event"),
        (dict(voicemail_action="static", voicemail_audio_url="ftp://x"), "should match pattern"),
        (dict(protocol="openai-realtime", api_key_env="K", call_tools=["transfer_call"]), "needs transfer_destinations"),
    ],
)  # fmt: skip
def test_control_settings_that_cannot_work_are_refused_at_start_up(fields, problem):
    with pytest.raises(ValueError, match=problem):
        AgentConfig(agent_id="a", url="wss://agent.example.com/{call_id}", **fields)


# --- a hosted model's built-in tools ----------------------------------------------------------


@pytest.fixture
def provider_keys(monkeypatch):
    monkeypatch.setenv("TEST_PROVIDER_KEY", KEY)


async def test_a_hosted_model_transfers_the_call_with_its_built_in_tool(start_bridge, provider_keys):
    fake = FakeOpenAI()
    await fake.start()
    fake.tool = ("transfer_call", {"to": TARGET})
    try:
        config = AgentConfig(
            agent_id="ai", protocol="openai-realtime", url=fake.url("tool"), api_key_env="TEST_PROVIDER_KEY", default=True,
            numbers=[OWNED], call_tools=["transfer_call"], transfer_destinations=["+1415555*"],
        )  # fmt: skip
        bridge = await start_bridge(agents={"ai": config})
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=4000)
    finally:
        await fake.stop()
    assert fake.problems == []
    (update,) = fake.received("session.update")
    (tool,) = update["session"]["tools"]
    assert tool["name"] == "transfer_call" and tool["parameters"]["required"] == ["to"]
    assert result.dialed is not None and result.dialed["to"] == TARGET, result.summary()
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "call_transfer" and record.transfer_destination == TARGET
    invoked = [u for u in record.transcript_with_tool_calls if u["role"] == "tool_call_invocation"]
    assert [u["name"] for u in invoked] == ["transfer_call"]  # once: the model's call, not also the control's


async def test_a_hosted_model_presses_keys_and_hears_that_they_were(start_bridge, provider_keys):
    fake = FakeGemini()
    await fake.start()
    fake.tool = ("press_digit", {"digits": "42"})
    try:
        config = AgentConfig(
            agent_id="ai", protocol="gemini-live", url=fake.url("tool"), api_key_env="TEST_PROVIDER_KEY", default=True,
            numbers=[OWNED], call_tools=["press_digit"],
        )  # fmt: skip
        bridge = await start_bridge(agents={"ai": config})
        result = await bridge.call(caller_audio(), speed=1.0, tail_ms=4000)
    finally:
        await fake.stop()
    assert fake.problems == []
    assert [p.digit for p in detect(result.heard)] == ["4", "2"]
    (response,) = [m["toolResponse"] for m in fake.received("toolResponse")]
    assert response["functionResponses"][0]["response"]["ok"] is True


# --- across replicas (PostgreSQL) -------------------------------------------------------------

PG = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


async def two_replicas(start_bridge, database_url, agents_):
    relaying = await start_bridge(database_url=database_url, instance_id="relaying", agents=agents_)
    asked = await start_bridge(database_url=database_url, instance_id="asked", agents=agents_)
    for bridge in (relaying, asked):
        await asyncio.wait_for(bridge.calls.control.listening.wait(), 10)
    return relaying, asked


async def leg_callback(bridge, path: str, leg_sid: str, **fields) -> int:
    url = bridge.base_url + path
    form = {"CallSid": leg_sid, "AccountSid": "AC" + "0" * 32, "From": OWNED, "To": TARGET, "Direction": "outbound-api", **fields}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.post(url, data=form, headers={"X-Twilio-Signature": signature})).status_code


@PG
async def test_keys_pressed_through_another_replica_are_played_by_the_relaying_one(database_url, start_bridge, control_agent):
    relaying, asked = await two_replicas(start_bridge, database_url, agents(control_agent, "listen"))
    call = asyncio.create_task(relaying.call(bytes(3200), speed=1.0, tail_ms=4000))
    (live,) = await until(lambda: _ongoing(relaying), timeout=10)
    async with api_client(asked.base_url) as http:
        r = await http.post(f"/v2/press-digit/{live.call_id}", json={"digits": "9*"})
    assert r.status_code == 200 and r.json() == {"event_type": "call_control_result", "action": "press_digit", "ok": True, "reason": None}
    result = await call
    assert [p.digit for p in detect(result.heard)] == ["9", "*"]


@PG
async def test_a_warm_transfer_s_target_callbacks_reach_the_relaying_replica_from_any(database_url, start_bridge, control_agent):
    """The target leg's status callback lands on the replica not relaying the call (a load
    balancer's choice): it travels to the relaying one, which brings the caller back; a late
    callback of another leg changes nothing."""
    relaying, asked = await two_replicas(start_bridge, database_url, agents(control_agent, "listen"))
    relaying.fake.dial_outcome = lambda params: "ringing"
    call = asyncio.create_task(relaying.call(bytes(3200), speed=1.0, tail_ms=8000))
    (live,) = await until(lambda: _ongoing(relaying), timeout=10)
    async with api_client(asked.base_url) as http:
        transfer = asyncio.create_task(http.post(f"/v2/transfer-call/{live.call_id}", json={"to": TARGET, "mode": "warm", "message": "Hi"}))
        await until(lambda: relaying.fake.created, timeout=10)
        await asyncio.sleep(0.3)
        path = f"/twilio/transfer/{live.call_id}/status"
        assert await leg_callback(asked, path, "CA" + "f" * 32, CallStatus="completed") == 204  # another leg's: ignored
        await asyncio.sleep(0.5)
        assert not transfer.done()
        (leg_sid,) = relaying.fake.outbound
        assert await leg_callback(asked, path, leg_sid, CallStatus="no-answer") == 204
        r = await asyncio.wait_for(transfer, 10)
    assert r.json() == {"event_type": "call_control_result", "action": "transfer_call", "ok": False, "reason": "the target did not answer (no-answer)"}
    result = await call
    record = await wait_for_end(relaying, result.call_id)
    assert record.disconnection_reason.value == "user_hangup" and record.transfer_destination is None


@PG
async def test_a_control_request_for_a_call_no_replica_relays_is_answered_at_once(database_url, start_bridge, control_agent):
    relaying, asked = await two_replicas(start_bridge, database_url, agents(control_agent, "listen"))
    call = asyncio.create_task(relaying.call(bytes(3200), speed=1.0, tail_ms=6000))
    (live,) = await until(lambda: _ongoing(relaying), timeout=10)
    relaying.calls.control.on_command = lambda command: None  # (frozen: it hears nothing)
    async with api_client(asked.base_url) as http:
        r = await http.post(f"/v2/end-call/{live.call_id}")
    assert r.status_code == 200 and r.json()["ok"] is False and "no replica relays the call" in r.json()["reason"]
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)


async def test_on_a_web_call_keys_are_audio_too_and_a_transfer_is_refused(start_bridge, control_agent):
    control_agent.requests["webcall"] = [{"event_type": "press_digit", "digits": "3#"}, {"event_type": "transfer_call", "to": TARGET}]
    bridge = await start_bridge(agents=agents(control_agent, "webcall"))
    async with api_client(bridge.base_url) as http:
        call = (await http.post("/v2/create-web-call", json={"agent_id": "ai"})).json()
    url = f"{bridge.base_url.replace('http', 'ws')}/web-call/{call['call_id']}?access_token={call['access_token']}&encoding=s16le&sample_rate=16000"
    heard, _ = await talk(url, bytes(640), 16000, tail_s=4.0, speed=1.0)
    assert [p.digit for p in detect(heard, 16000)] == ["3", "#"]
    assert control_agent.events[-1] == {"event_type": "call_control_result", "action": "transfer_call", "ok": False, "reason": "only a phone call can be transferred"}


async def test_a_caller_who_hangs_up_on_hold_ends_the_transfer_at_once(start_bridge, control_agent):
    bridge = await start_bridge(agents=agents(control_agent, "listen"))
    bridge.fake.dial_outcome = lambda params: "ringing"  # the target never answers
    # (a caller hangs up when it likes: at 3 s of the call, hold music playing)
    call = asyncio.create_task(bridge.call(bytes(3200), speed=1.0, tail_ms=3000, max_call_s=3))
    (live,) = await until(lambda: _ongoing(bridge), timeout=10)
    async with api_client(bridge.base_url) as http:
        transfer = asyncio.create_task(http.post(f"/v2/transfer-call/{live.call_id}", json={"to": TARGET, "mode": "warm", "message": "Hi"}))
        assert (await call).hit_max_call  # the caller hangs up while held
        r = await asyncio.wait_for(transfer, 5)  # (not after the ring timeout)
    assert r.json()["ok"] is False and "ended" in r.json()["reason"], r.json()
    (leg_sid,) = bridge.fake.outbound
    assert await until(lambda: [sid for sid, form in bridge.fake.requests if sid == leg_sid and form.get("Status") == "completed"], timeout=5)
    record = await wait_for_end(bridge, live.call_id)
    assert record.disconnection_reason.value == "user_hangup"
