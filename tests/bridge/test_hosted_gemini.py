"""Gemini Live as a call's agent, end to end: the Twilio simulator calls the bridge, whose agent
is a fake Gemini Live server on loopback that speaks the ``google-genai`` SDK's message types
and checks every message the bridge sends with them (tests/bridge/fake_providers.py). Gemini
takes 16 kHz PCM and speaks 24 kHz: the bridge's resampler converts both ways."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request

from bridge.server import BackgroundServer
from bridge.settings import AgentConfig

from .conftest import TRUTH, api_client, best_correlation, caller_audio, envelope_ms, wait_for_end
from .fake_providers import KEY, FakeGemini, tone


@pytest.fixture
async def gemini_fake():
    fake = FakeGemini()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("TEST_GEMINI_KEY", KEY)


def hosted_agent(fake, script: str = "talk", **fields) -> dict:
    return {"ai": AgentConfig(agent_id="ai", protocol="gemini-live", url=fake.url(script), api_key_env="TEST_GEMINI_KEY", default=True, **fields)}


async def public_log(bridge, record) -> list[dict]:
    async with api_client(bridge.base_url) as http:
        return [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]


async def test_a_call_with_gemini_live_has_everything_a_call_has(start_bridge, gemini_fake):
    bridge = await start_bridge(agents=hosted_agent(gemini_fake, instructions="You take bookings.", voice="Puck", greeting="Hello!"))
    result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    assert gemini_fake.problems == [], gemini_fake.problems
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    setup = gemini_fake.connections[0].received[0]["setup"]
    assert setup["systemInstruction"] == {"parts": [{"text": "You take bookings."}]}
    assert setup["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"] == "Puck"
    assert [t["role"] for t in record.transcript_object] == ["agent", "user", "agent"], record.transcript_object
    assert record.e2e_latency is not None and record.e2e_latency.num >= 1
    # 8 kHz to 16 kHz in: all the caller's audio; 24 kHz to 8 kHz out: the tone, heard clean
    assert abs(gemini_fake.connections[0].caller_ms - result.sent_ms) <= 40
    spans = envelope_ms(result.heard)
    start = spans[0][0]
    from audio import Resampler

    said = Resampler(24000, 8000).process(tone(24000, 1000).tobytes())
    corr, _ = best_correlation(result.heard[start * 16 : (start + 1500) * 16], said[1600:6400])
    assert corr >= 0.9, corr


async def test_a_barge_in_clears_what_the_caller_had_not_heard(start_bridge):
    """Gemini generates its 4 s answer faster than real time, so when the caller speaks over it
    the server has nothing left to interrupt and says nothing: the bridge's own voice activity
    clears what the caller had not heard."""
    fake = FakeGemini(answer_ms=4000)
    await fake.start()
    try:
        bridge = await start_bridge(agents=hosted_agent(fake))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=5000)
    finally:
        await fake.stop()
    assert fake.problems == []
    assert not [m for m in fake.sent("serverContent") if m["serverContent"].get("interrupted")]  # (done generating)
    assert result.clears == 1
    first_answer = next(s for s in envelope_ms(result.heard) if s[0] > TRUTH[0][1])
    assert first_answer[1] - first_answer[0] < 3000  # cut short
    record = await wait_for_end(bridge, result.call_id)
    assert [e for e in await public_log(bridge, record) if e["event"] == "barge_in"]
    # the caller's second sentence starts ~300 ms into the answer: it was cut within the bridge's
    # voice-activity batch (200 ms) and start (60 ms) of that
    heard = first_answer[1] - first_answer[0]
    print(f"\nGemini barge-in: the caller heard {heard} ms of the answer before it was cut")


async def test_a_barge_in_while_gemini_still_generates_is_its_interrupted(start_bridge):
    """Gemini still generating (its first audio not sent yet) says interrupted: nothing was
    queued, so nothing is cleared, and the answer never plays."""
    fake = FakeGemini(answer_ms=1000, delay_ms=700)
    await fake.start()
    try:
        bridge = await start_bridge(agents=hosted_agent(fake, "slow"))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=4000)
    finally:
        await fake.stop()
    assert fake.problems == []
    assert [m for m in fake.sent("serverContent") if m["serverContent"].get("interrupted")]
    assert result.clears == 0 and len(envelope_ms(result.heard)) >= 1  # (the second answer plays)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup"


async def test_a_tool_call_is_answered_with_the_tools_url_s_answer(start_bridge, gemini_fake):
    app = FastAPI()

    @app.post("/tools")
    async def tools(request: Request):
        return {"tables_free": 2}

    async with BackgroundServer(app) as server:
        bridge = await start_bridge(agents=hosted_agent(gemini_fake, "tool", tools_url=f"{server.base_url}/tools", tools=[{"name": "lookup"}]))
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    assert gemini_fake.problems == []
    declarations = gemini_fake.connections[0].received[0]["setup"]["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in declarations] == ["lookup"]
    (answer,) = [m["toolResponse"]["functionResponses"][0] for m in gemini_fake.received("toolResponse")]
    assert answer["name"] == "lookup" and answer["response"] == {"tables_free": 2}
    record = await wait_for_end(bridge, result.call_id)
    assert record.transcript_object[-1]["content"] == 'Answer 1 with {"tables_free": 2}'


async def test_go_away_moves_the_call_to_a_resumed_session_without_a_gap(start_bridge):
    """goAway after the first answer (the connection ends 3 s later): the bridge opens a new
    connection with the latest resumption handle at the next pause, holds the caller's audio
    meanwhile and sends it there, and the conversation goes on (no second greeting)."""
    fake = FakeGemini(go_away_s=3.0)
    await fake.start()
    try:
        bridge = await start_bridge(agents=hosted_agent(fake, "goaway"))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=4000)
    finally:
        await fake.stop()
    assert fake.problems == [], fake.problems
    assert len(fake.connections) == 2 and fake.resumed_with == [None, "handle-1"]
    second = fake.connections[1]
    assert second.answers >= 1 and not [m for m in second.received if "clientContent" in m]  # no greeting, no replay
    # every frame the caller sent reached one of the two connections: none lost in the move
    total = sum(c.caller_ms for c in fake.connections)
    assert abs(total - result.sent_ms) <= 60, (total, result.sent_ms)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup"
    (moved,) = [e for e in await public_log(bridge, record) if e["event"] == "provider_switched"]
    print(f"\ngoAway: moved to the resumed session holding the caller's audio for {moved['gap_ms']} ms")


async def test_a_gemini_drop_mid_call_resumes_the_session(start_bridge, gemini_fake):
    bridge = await start_bridge(agents=hosted_agent(gemini_fake, "drop"))
    result = await bridge.call(caller_audio(first_phrase_only=False), speed=2.0, tail_ms=4000)
    assert gemini_fake.problems == [] and gemini_fake.resumed_with == [None, "handle-1"]
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup"
    assert [e for e in await public_log(bridge, record) if e["event"] == "provider_reconnected"]


async def test_a_refused_gemini_key_ends_the_call_with_the_reason(start_bridge, gemini_fake, monkeypatch):
    monkeypatch.setenv("TEST_GEMINI_KEY", "wrong")
    bridge = await start_bridge(agents=hosted_agent(gemini_fake))
    result = await bridge.call(caller_audio(), speed=4.0)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "error_llm_websocket_open" and "401" in record.error_detail
    assert result.fallback == [f"Say: {bridge.settings.fallback_message}"]


async def test_caller_keys_reach_gemini(start_bridge, gemini_fake):
    bridge = await start_bridge(agents=hosted_agent(gemini_fake))
    await bridge.call(caller_audio(), speed=2.0, dtmf=((500, "#"),))
    texts = [m["realtimeInput"]["text"] for m in gemini_fake.received("realtimeInput") if "text" in m["realtimeInput"]]
    assert texts == ["[The caller pressed the key # on their phone's keypad.]"]


async def test_a_web_call_reaches_gemini_too(start_bridge, gemini_fake):
    """A browser's web call (create-web-call, s16le 24 kHz) to a hosted model: the same relay,
    the caller's audio converted to Gemini's 16 kHz, Gemini's 24 kHz played back."""
    from audio import Resampler

    from .test_web_call import talk, ws_url

    bridge = await start_bridge(agents=hosted_agent(gemini_fake))
    async with api_client(bridge.base_url) as http:
        call = (await http.post("/v2/create-web-call", json={"agent_id": "ai", "sample_rate": 24000})).json()
    said = Resampler(8000, 24000).process(caller_audio())
    heard, texts = await talk(ws_url(bridge, call["call_id"], call["access_token"]), said, 24000, tail_s=3, speed=2.0)
    assert gemini_fake.problems == []
    assert len(heard) > 24000 * 2 * 0.5  # the answer, heard
    record = await wait_for_end(bridge, call["call_id"])
    assert record.disconnection_reason.value == "user_hangup" and [t["role"] for t in record.transcript_object] == ["user", "agent"]
