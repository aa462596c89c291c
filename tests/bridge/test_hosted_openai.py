"""OpenAI Realtime as a call's agent, end to end: the Twilio simulator (signed webhook, media
stream, marks echoed as Twilio does) calls the bridge, whose agent is a fake OpenAI Realtime
server on loopback that speaks the ``openai`` SDK's event types and checks every message the
bridge sends with them (tests/bridge/fake_providers.py)."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from retell.lib.webhook_auth import verify

from bridge.server import BackgroundServer
from bridge.settings import AgentConfig

from .conftest import API_KEY, TRUTH, api_client, caller_audio, envelope_ms, hung_up_cleanly, retell_client, wait_for_end
from .fake_providers import KEY, FakeOpenAI


@pytest.fixture
async def openai_fake():
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


def hosted_agent(fake, script: str = "talk", **fields) -> dict:
    return {"ai": AgentConfig(agent_id="ai", protocol="openai-realtime", url=fake.url(script), api_key_env="TEST_OPENAI_KEY", default=True, **fields)}


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_KEY", KEY)


async def public_log(bridge, record) -> list[dict]:
    async with api_client(bridge.base_url) as http:
        return [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]


async def test_a_call_with_openai_realtime_has_everything_a_call_has(start_bridge, openai_fake):
    bridge = await start_bridge(
        agents=hosted_agent(openai_fake, instructions="You take bookings.", voice="marin", greeting="Hello, bookings!"), keepalive_interval_s=0.5
    )
    result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    assert openai_fake.problems == [], openai_fake.problems
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    (update,) = openai_fake.received("session.update")
    session = update["session"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"} and session["audio"]["output"]["voice"] == "marin"
    assert session["instructions"] == "You take bookings."
    # the greeting, then the answer to the caller's turn: both heard
    spans = envelope_ms(result.heard)
    assert len(spans) >= 2, spans
    assert [t["role"] for t in record.transcript_object] == ["agent", "user", "agent"], record.transcript_object
    assert record.transcript.startswith("Agent: Answer 1\nUser: I would like a table.\nAgent: Answer 2")
    assert record.transcript_object[1]["content"] == "I would like a table."
    assert record.e2e_latency is not None and record.e2e_latency.num >= 1
    assert record.llm_websocket_network_rtt_latency.num >= 2  # the provider socket's ping round trips
    assert record.recording_url and record.public_log_url
    # caller audio reached the model untouched: mu-law 8 kHz both ways, every frame
    conn = openai_fake.connections[0]
    assert abs(conn.caller_ms - result.sent_ms) <= 40, (conn.caller_ms, result.sent_ms)
    assert len(openai_fake.connections) == 1 and conn.close_code == 1000  # closed with the call, by the bridge


async def test_a_barge_in_truncates_the_answer_at_what_the_caller_heard(start_bridge):
    """The caller's second sentence starts while the model's 4 s answer to the first plays:
    Twilio's queue is cleared at once, and conversation.item.truncate carries what the caller
    heard of that answer (by Twilio's mark echoes and its playing clock), never more than the
    model sent."""
    fake = FakeOpenAI(answer_ms=4000)
    await fake.start()
    try:
        bridge = await start_bridge(agents=hosted_agent(fake))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=5000)
    finally:
        await fake.stop()
    assert fake.problems == [], fake.problems
    (truncate,) = fake.received("conversation.item.truncate")
    assert result.clears >= 1
    # what the caller heard of the first answer: from its start to the clear
    spans = envelope_ms(result.heard)
    first_answer = next(s for s in spans if s[0] > TRUTH[0][1])
    heard_ms = first_answer[1] - first_answer[0]
    assert heard_ms < 3000, spans  # cut short, not played out
    assert abs(truncate["audio_end_ms"] - heard_ms) <= 120, (truncate, spans)
    sent = fake.sent("response.output_audio.delta")
    item_ms = sum(len(d["delta"]) * 3 / 4 / 8 for d in sent if d["item_id"] == truncate["item_id"])
    assert truncate["audio_end_ms"] <= item_ms
    record = await wait_for_end(bridge, result.call_id)
    log = await public_log(bridge, record)
    (logged,) = [e for e in log if e["event"] == "provider_truncate"]
    assert logged["audio_end_ms"] == truncate["audio_end_ms"] and logged["item_id"] == truncate["item_id"]
    print(f"\nbarge-in: audio_end_ms {truncate['audio_end_ms']} sent, the caller heard {heard_ms} ms of that answer")


async def test_a_barge_in_before_any_audio_truncates_nothing(start_bridge):
    """The caller speaks again before the answer's first audio: nothing was heard, so no
    truncate (the server would refuse it) and nothing to clear."""
    fake = FakeOpenAI(answer_ms=1000, delay_ms=1500)
    await fake.start()
    try:
        bridge = await start_bridge(agents=hosted_agent(fake, "slow"))
        result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=4000)
    finally:
        await fake.stop()
    assert fake.problems == [] and fake.received("conversation.item.truncate") == []
    assert len(fake.received("response.create")) == 0 and fake.connections[0].answers == 2
    assert result.clears == 0
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup"


async def test_a_tool_call_goes_to_tools_url_and_its_answer_back_to_the_model(start_bridge, openai_fake):
    calls = []
    app = FastAPI()

    @app.post("/tools")
    async def tools(request: Request):
        body = (await request.body()).decode()
        calls.append((json.loads(body), verify(body, API_KEY, request.headers["x-retell-signature"])))
        return {"tables_free": 3}

    async with BackgroundServer(app) as server:
        tool = {"name": "lookup", "description": "Find a free table", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}
        bridge = await start_bridge(agents=hosted_agent(openai_fake, "tool", tools_url=f"{server.base_url}/tools", tools=[tool]))
        result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    assert openai_fake.problems == []
    (update,) = openai_fake.received("session.update")
    assert update["session"]["tools"] == [{"type": "function", **tool}]
    ((body, signed),) = calls
    assert signed and body["name"] == "lookup" and body["arguments"] == {"q": "table"} and body["call_id"] == result.call_id
    (output,) = [m["item"] for m in openai_fake.received("conversation.item.create") if m["item"]["type"] == "function_call_output"]
    assert json.loads(output["output"]) == {"tables_free": 3}
    record = await wait_for_end(bridge, result.call_id)
    last = record.transcript_object[-1]
    assert (last["role"], last["content"]) == ("agent", 'Answer 2 with {"tables_free":3}')
    log = await public_log(bridge, record)
    kinds = [e["event"] for e in log]
    assert "tool_call" in kinds and "tool_result" in kinds
    roles = [u["role"] for u in record.transcript_with_tool_calls]
    assert roles == ["user", "tool_call_invocation", "tool_call_result", "agent"], record.transcript_with_tool_calls
    async with retell_client(bridge) as sdk:  # the official client reads it
        call = await sdk.call.retrieve(result.call_id)
    assert call.transcript_with_tool_calls[1].name == "lookup" and call.transcript_with_tool_calls[2].content == '{"tables_free":3}'
    print(f"\ntool round trip: {[e for e in log if e['event'] == 'tool_result'][0]['ms']} ms")


async def test_a_tool_that_fails_answers_the_model_with_the_error(start_bridge, openai_fake):
    bridge = await start_bridge(agents=hosted_agent(openai_fake, "tool", tools_url="http://127.0.0.1:9/tools", tools=[{"name": "lookup"}]))
    result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    (output,) = [m["item"] for m in openai_fake.received("conversation.item.create") if m["item"]["type"] == "function_call_output"]
    assert "could not be reached" in json.loads(output["output"])["error"]
    record = await wait_for_end(bridge, result.call_id)
    assert [e for e in await public_log(bridge, record) if e["event"] == "tool_failed"]
    assert record.disconnection_reason.value == "user_hangup"


async def test_a_provider_error_is_on_the_public_log_and_the_call_goes_on(start_bridge, openai_fake):
    bridge = await start_bridge(agents=hosted_agent(openai_fake, "error"))
    result = await bridge.call(caller_audio(), speed=2.0, tail_ms=3000)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup"
    (error,) = [e for e in await public_log(bridge, record) if e["event"] == "provider_error"]
    assert error["error"] == "OpenAI error unknown_parameter: Unknown parameter: 'x'."


async def test_a_provider_that_drops_mid_call_is_reconnected_and_the_conversation_goes_on(start_bridge, openai_fake):
    bridge = await start_bridge(agents=hosted_agent(openai_fake, "drop", greeting="Hello!"))
    result = await bridge.call(caller_audio(first_phrase_only=False), speed=2.0, tail_ms=4000)
    assert openai_fake.problems == []
    first, second = openai_fake.connections
    assert first.closed_by_fake and second.received[0]["type"] == "session.update"
    replay = [m["item"] for m in second.received if m["type"] == "conversation.item.create"]
    # the greeting was said on the first connection (then it dropped): the new one is told
    assert [(i["role"], i["content"][0]["text"]) for i in replay] == [("assistant", "Answer 1")]
    assert [m for m in second.received if m["type"] == "response.create"] == []  # no second greeting
    assert second.answers == 2 and second.caller_ms > 6000  # both sentences heard and answered there
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup"
    (back,) = [e for e in await public_log(bridge, record) if e["event"] == "provider_reconnected"]
    print(f"\nreconnected after {back['gap_ms']} ms (attempt {back['attempt']})")


async def test_a_refused_key_ends_the_call_with_the_reason_and_the_fallback(start_bridge, openai_fake, monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-wrong")
    bridge = await start_bridge(agents=hosted_agent(openai_fake))
    result = await bridge.call(caller_audio(), speed=4.0)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "error_llm_websocket_open"
    assert "401" in record.error_detail and "Incorrect API key provided" in record.error_detail, record.error_detail
    assert "sk-wrong" not in record.error_detail
    assert result.fallback == [f"Say: {bridge.settings.fallback_message}"]


async def test_an_unreachable_provider_ends_the_call_with_the_fallback(start_bridge):
    agents = {"ai": AgentConfig(agent_id="ai", protocol="openai-realtime", url="ws://127.0.0.1:9/v1", api_key_env="TEST_OPENAI_KEY", default=True)}
    bridge = await start_bridge(agents=agents)
    result = await bridge.call(caller_audio(), speed=4.0)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "error_llm_websocket_open" and "OpenAI Realtime" in record.error_detail
    assert result.fallback == [f"Say: {bridge.settings.fallback_message}"]


async def test_a_session_past_the_provider_s_cap_ends_cleanly_with_the_reason(start_bridge, openai_fake):
    bridge = await start_bridge(agents=hosted_agent(openai_fake, "expire"))
    result = await bridge.call(caller_audio(first_phrase_only=False), speed=2.0, tail_ms=4000)
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "max_duration_reached" and "60 minutes" in record.error_detail
    assert hung_up_cleanly(result), result.summary()


async def test_caller_keys_reach_the_model(start_bridge, openai_fake):
    bridge = await start_bridge(agents=hosted_agent(openai_fake))
    await bridge.call(caller_audio(), speed=2.0, dtmf=((500, "5"),))
    texts = [m["item"]["content"][0]["text"] for m in openai_fake.received("conversation.item.create") if m["item"]["type"] == "message"]
    assert texts == ["[The caller pressed the key 5 on their phone's keypad.]"]
    assert openai_fake.problems == []
