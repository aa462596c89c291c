"""Deepgram Voice Agent and ElevenLabs Agents as a call's agent, end to end from the Twilio
simulator, against fake servers on loopback that speak each SDK's messages (deepgram-sdk's
``deepgram.agent.v1`` types; the events the elevenlabs SDK's ``conversational_ai`` sends and
reads) and check every message the bridge sends (tests/bridge/fake_providers.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import websockets
from fastapi import FastAPI, Request

from audio import Resampler
from bridge.protocol.hosted import deepgram_agent
from bridge.server import BackgroundServer
from bridge.settings import AgentConfig

from .conftest import TRUTH, api_client, best_correlation, caller_audio, envelope_ms, until, wait_for_end
from .fake_providers import KEY, FakeDeepgram, FakeElevenLabs, tone


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("TEST_PROVIDER_KEY", KEY)


async def started(fake):
    await fake.start()
    return fake


def agent(fake, protocol: str, script: str = "talk", **fields) -> dict:
    if protocol == "elevenlabs-agent":
        fields.setdefault("provider_agent_id", "agent_fake")
        url = f"ws://127.0.0.1:{fake.port}/{script}/v1/convai/conversation"
    else:
        url = fake.url(script)
    return {"ai": AgentConfig(agent_id="ai", protocol=protocol, url=url, api_key_env="TEST_PROVIDER_KEY", default=True, **fields)}


async def public_log(bridge, record) -> list[dict]:
    async with api_client(bridge.base_url) as http:
        return [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]


def tools_app(answer: dict) -> FastAPI:
    app = FastAPI()

    @app.post("/tools")
    async def tools(request: Request):
        return answer

    return app


# --- Deepgram Voice Agent ----------------------------------------------------------------------


async def test_a_deepgram_call_has_everything_a_call_has(start_bridge):
    fake = await started(FakeDeepgram())
    try:
        bridge = await start_bridge(agents=agent(fake, "deepgram-agent", instructions="You take bookings.", voice="aura-2-luna-en", greeting="Hello!"))
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    finally:
        await fake.stop()
    assert fake.problems == [], fake.problems
    settings = fake.received("Settings")[0]
    assert settings["audio"] == {"input": {"encoding": "mulaw", "sample_rate": 8000}, "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}}
    assert settings["agent"]["think"]["prompt"] == "You take bookings." and settings["agent"]["greeting"] == "Hello!"
    assert settings["agent"]["speak"]["provider"] == {"type": "deepgram", "model": "aura-2-luna-en"}
    # binary audio both ways, every caller frame as it came (no batching)
    assert abs(fake.connections[0].caller_ms - result.sent_ms) <= 40
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup"
    assert [(t["role"], t["content"]) for t in record.transcript_object] == [("agent", "Answer 1"), ("user", "I would like a table."), ("agent", "Answer 2")]
    assert record.e2e_latency.num >= 1


async def test_deepgram_user_started_speaking_is_a_barge_in(start_bridge):
    fake = await started(FakeDeepgram(answer_ms=4000))
    try:
        bridge = await start_bridge(agents=agent(fake, "deepgram-agent"))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=5000)
    finally:
        await fake.stop()
    assert fake.problems == [] and result.clears == 1
    first = next(s for s in envelope_ms(result.heard) if s[0] > TRUTH[0][1])
    assert first[1] - first[0] < 3000


async def test_a_deepgram_function_call_is_answered_from_tools_url(start_bridge):
    fake = await started(FakeDeepgram())
    try:
        async with BackgroundServer(tools_app({"tables_free": 4})) as server:
            bridge = await start_bridge(agents=agent(fake, "deepgram-agent", "tool", tools_url=f"{server.base_url}/tools", tools=[{"name": "lookup"}]))
            result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    finally:
        await fake.stop()
    assert fake.problems == []
    (response,) = fake.received("FunctionCallResponse")
    assert response["name"] == "lookup" and json.loads(response["content"]) == {"tables_free": 4}
    assert fake.received("Settings")[0]["agent"]["think"]["functions"][0]["name"] == "lookup"
    record = await wait_for_end(bridge, result.call_id)
    assert record.transcript_object[-1]["content"] == 'Answer 2 with {"tables_free":4}'  # (answer 1: the function call)


async def test_deepgram_gets_keepalives_while_the_caller_sends_nothing(start_bridge):
    """A web caller that goes quiet (muted, on hold): no audio reaches Deepgram, so the bridge
    sends KeepAlive, and the session stays open."""
    fake = await started(FakeDeepgram())
    try:
        bridge = await start_bridge(agents=agent(fake, "deepgram-agent"), keepalive_interval_s=1.0, no_audio_timeout_s=30)
        async with api_client(bridge.base_url) as http:
            call = (await http.post("/v2/create-web-call", json={"agent_id": "ai", "sample_rate": 8000})).json()
        url = f"{bridge.base_url.replace('http', 'ws')}/web-call/{call['call_id']}?access_token={call['access_token']}"
        async with websockets.connect(url) as ws:
            for _ in range(25):
                await ws.send(bytes(320))
                await asyncio.sleep(0.02)
            await until(lambda: getattr(fake.connections[0], "keepalives", 0) >= 1, timeout=15)  # (then on hold)
        record = await wait_for_end(bridge, call["call_id"])
    finally:
        await fake.stop()
    assert fake.problems == [] and record.disconnection_reason.value == "user_hangup"


async def test_a_deepgram_warning_is_on_the_public_log(start_bridge):
    fake = await started(FakeDeepgram())
    try:
        bridge = await start_bridge(agents=agent(fake, "deepgram-agent", "error"))
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    (warning,) = [e for e in await public_log(bridge, record) if e["event"] == "provider_error"]
    assert warning["error"] == "Deepgram warning SLOW_THINK_REQUEST: The think provider is slow to answer."


async def test_a_deepgram_drop_is_reconnected_with_the_conversation_and_no_second_greeting(start_bridge):
    fake = await started(FakeDeepgram())
    try:
        bridge = await start_bridge(agents=agent(fake, "deepgram-agent", "drop", greeting="Hello!"))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=2.0, tail_ms=4000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert fake.problems == []
    first, second = fake.connections
    settings = [m for m in second.received if m["type"] == "Settings"][0]
    assert "greeting" not in settings["agent"]
    assert settings["agent"]["context"]["messages"] == [{"type": "History", "role": "assistant", "content": "Answer 1"}]
    assert record.disconnection_reason.value == "user_hangup" and second.answers >= 1


async def test_the_deepgram_session_cap_ends_the_call_with_the_reason(start_bridge, monkeypatch):
    capped = dataclasses.replace(deepgram_agent.SPEC, session_cap_s=6.5)  # (two hours, shortened to 1.5 s + the margin)
    monkeypatch.setattr(deepgram_agent.DeepgramAgent, "spec", capped)
    fake = await started(FakeDeepgram())
    try:
        bridge = await start_bridge(agents=agent(fake, "deepgram-agent"))
        result = await bridge.call(caller_audio(), speed=1.0, tail_ms=5000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert record.disconnection_reason.value == "max_duration_reached"
    assert record.error_detail == "Deepgram Voice Agent sessions last at most 0.108333 minutes"


async def test_a_refused_deepgram_key_ends_the_call_with_the_reason(start_bridge, monkeypatch):
    monkeypatch.setenv("TEST_PROVIDER_KEY", "wrong")
    fake = await started(FakeDeepgram())
    try:
        bridge = await start_bridge(agents=agent(fake, "deepgram-agent"))
        result = await bridge.call(caller_audio(), speed=4.0)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert record.disconnection_reason.value == "error_llm_websocket_open" and "401" in record.error_detail
    assert result.fallback == [f"Say: {bridge.settings.fallback_message}"]


# --- ElevenLabs Agents -------------------------------------------------------------------------


async def test_an_elevenlabs_call_has_everything_a_call_has(start_bridge):
    fake = await started(FakeElevenLabs())
    try:
        bridge = await start_bridge(agents=agent(fake, "elevenlabs-agent", instructions="You take bookings.", greeting="Hello!", voice="voice_x"))
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert fake.problems == [], fake.problems
    init = fake.connections[0].received[0]
    assert init["conversation_config_override"] == {"agent": {"prompt": {"prompt": "You take bookings."}, "first_message": "Hello!"}, "tts": {"voice_id": "voice_x"}}
    assert init["dynamic_variables"]["call_id"] == result.call_id and init["dynamic_variables"]["direction"] == "inbound"
    assert fake.pongs and set(fake.pongs) <= set(fake.pings)  # every ping answered with its event_id
    assert record.disconnection_reason.value == "user_hangup"
    assert [t["role"] for t in record.transcript_object] == ["agent", "user", "agent"]
    assert abs(fake.connections[0].caller_ms - result.sent_ms) <= 40


async def test_an_elevenlabs_interruption_clears_and_corrects_the_transcript(start_bridge):
    fake = await started(FakeElevenLabs(answer_ms=4000))
    try:
        bridge = await start_bridge(agents=agent(fake, "elevenlabs-agent"))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=5000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert fake.problems == [] and result.clears == 1
    assert [m for m in fake.sent("interruption")]
    first = next(s for s in envelope_ms(result.heard) if s[0] > TRUTH[0][1])
    assert first[1] - first[0] < 3000
    assert record.transcript_object[1]["content"] == "Answer..."  # the correction: what the caller heard of it


async def test_an_elevenlabs_client_tool_call_is_answered(start_bridge):
    fake = await started(FakeElevenLabs())
    try:
        async with BackgroundServer(tools_app({"tables_free": 1})) as server:
            bridge = await start_bridge(agents=agent(fake, "elevenlabs-agent", "tool", tools_url=f"{server.base_url}/tools"))
            await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    finally:
        await fake.stop()
    (result,) = fake.received("client_tool_result")
    assert json.loads(result["result"]) == {"tables_free": 1} and result["is_error"] is False


async def test_an_elevenlabs_agent_in_pcm_16000_is_converted(start_bridge):
    fake = await started(FakeElevenLabs(formats=("pcm_16000", "pcm_16000")))
    try:
        bridge = await start_bridge(agents=agent(fake, "elevenlabs-agent", greeting="Hi"))
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert fake.problems == [] and record.disconnection_reason.value == "user_hangup"
    assert abs(fake.connections[0].caller_ms - result.sent_ms) <= 60  # the caller's audio, at 16 kHz
    start = envelope_ms(result.heard)[0][0]
    said = Resampler(16000, 8000).process(tone(16000, 1000).tobytes())
    assert best_correlation(result.heard[start * 16 : (start + 1500) * 16], said[1600:6400])[0] >= 0.9  # not static
    assert [e for e in await public_log(bridge, record) if e["event"] == "provider_formats"][0]["said"] == "s16le/16000"


async def test_an_elevenlabs_agent_in_a_format_a_call_cannot_carry_is_refused_naming_the_setting(start_bridge):
    fake = await started(FakeElevenLabs(formats=("ulaw_8000", "mp3_44100_128")))
    try:
        bridge = await start_bridge(agents=agent(fake, "elevenlabs-agent"))
        result = await bridge.call(caller_audio(), speed=4.0)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert record.disconnection_reason.value == "error_llm_websocket_runtime"
    assert "agent output audio format is mp3_44100_128" in record.error_detail and "ulaw_8000" in record.error_detail
    assert result.fallback == [f"Say: {bridge.settings.fallback_message}"]


async def test_an_elevenlabs_signed_url_is_fetched_for_each_call(start_bridge):
    fake = await started(FakeElevenLabs())
    try:
        bridge = await start_bridge(agents=agent(fake, "elevenlabs-agent", signed_url=True))
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=2000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert fake.signed_urls == 1 and record.disconnection_reason.value == "user_hangup"
    assert "xi-api-key" not in {k.lower() for k in fake.connections[0].headers}  # the key never went on the socket


async def test_an_elevenlabs_drop_ends_the_call_saying_it_cannot_be_resumed(start_bridge):
    fake = await started(FakeElevenLabs())
    try:
        bridge = await start_bridge(agents=agent(fake, "elevenlabs-agent", "drop", greeting="Hi"))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=2.0, tail_ms=4000)
        record = await wait_for_end(bridge, result.call_id)
    finally:
        await fake.stop()
    assert len(fake.connections) == 1
    assert record.disconnection_reason.value == "error_llm_websocket_lost_connection" and "cannot be resumed" in record.error_detail
    assert result.fallback == [f"Say: {bridge.settings.fallback_message}"]
