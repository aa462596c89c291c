"""A hosted model in the agents file: what start-up refuses (one line naming the agent and the
fix), and the translators' own rules, socket-free (``bridge.protocol.hosted``)."""

from __future__ import annotations

import json

import pytest

from bridge import provider_types
from bridge.protocol.hosted import AgentSetup, Audio, GoAway, Interrupted, ProviderError, Ready, ToolCall, Transcript
from bridge.protocol.hosted.gemini_live import GeminiLive
from bridge.protocol.hosted.openai_realtime import OpenAIRealtime
from bridge.settings import SettingsError, load_settings


def agents_file(tmp_path, body: str):
    path = tmp_path / "agents.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ('protocol = "openai-realtime"\napi_key_env = "NOT_SET_ANYWHERE"', "agents.ai.api_key_env: the environment variable NOT_SET_ANYWHERE is not set: export NOT_SET_ANYWHERE=... (the OpenAI Realtime API key)"),
        ('protocol = "openai-realtime"', "api_key_env is required: the environment variable that holds the OpenAI Realtime API key"),
        ('protocol = "openai-realtme"\napi_key_env = "K"', "agents.ai.protocol: Input should be 'web', 'twilio', 'openai-realtime', 'gemini-live', 'deepgram-agent' or 'elevenlabs-agent'"),
        ('protocol = "gemini-live"\napi_key_env = "K"\nsample_rate = 16000', "sample_rate do not apply to Gemini Live: it speaks s16le 16 kHz in, s16le 24 kHz out; remove them"),
        ('protocol = "openai-realtime"\napi_key_env = "K"\ntools = [{name = "x"}]', "tools need tools_url"),
        ('protocol = "openai-realtime"\napi_key_env = "K"\n[agents.ai.session]\nvoices = "marin"', "agents.ai.session: OpenAI Realtime would refuse this agent's set-up: unknown field session.update.session.voices"),
        ('protocol = "gemini-live"\napi_key_env = "K"\n[agents.ai.session]\ngenerationConfig = {temprature = 1}', "agents.ai.session: Gemini Live would refuse this agent's set-up: setup.generationConfig.temprature"),
        ('url = "wss://x/no-call-id"', "agents.ai.url: Value error, must contain {call_id}"),
        ('voice = "marin"', "voice apply only to a hosted model's protocol"),
    ],
)
def test_a_bad_hosted_agent_stops_start_up_naming_the_fix(tmp_path, monkeypatch, body, message):
    monkeypatch.setenv("K", "key")
    with pytest.raises(SettingsError) as refused:
        load_settings(agents_file=agents_file(tmp_path, f"[agents.ai]\n{body}\n"))
    assert message in str(refused.value), str(refused.value)


def test_a_missing_sdk_extra_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("K", "key")
    monkeypatch.setattr(provider_types, "sdk_installed", lambda spec: False)
    with pytest.raises(SettingsError, match=r"agents.ai: protocol gemini-live needs the gemini extra: pip install 'twilio-audio-bridge\[gemini\]'"):
        load_settings(agents_file=agents_file(tmp_path, '[agents.ai]\nprotocol = "gemini-live"\napi_key_env = "K"\n'))


def test_a_good_hosted_agent_needs_no_call_id_in_its_url_and_keeps_its_key_out_of_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("K", "sk-secret")
    settings = load_settings(agents_file=agents_file(tmp_path, '[agents.ai]\nprotocol = "openai-realtime"\napi_key_env = "K"\nurl = "wss://proxy.example/realtime"\n'))
    agent = settings.agents["ai"]
    assert agent.websocket_url("c1", "http://x") == "wss://proxy.example/realtime"
    assert "sk-secret" not in settings.model_dump_json()
    default = load_settings(agents_file=agents_file(tmp_path, '[agents.ai]\nprotocol = "openai-realtime"\napi_key_env = "K"\n')).agents["ai"]
    assert default.websocket_url("c1", "http://x") == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert [f.sample_rate for f in default.formats] == [8000, 8000]


# --- the OpenAI translator ---------------------------------------------------------------------


def openai_events(agent, *events, position=0.0):
    out = []
    for event in events:
        out += agent.receive(json.dumps({"event_id": "e", **event}), position)
    return out


def delta(item: str, ms: int) -> dict:
    import base64

    return {"type": "response.output_audio.delta", "item_id": item, "response_id": "r", "output_index": 0, "content_index": 0,
            "delta": base64.b64encode(b"\xff" * (ms * 8)).decode()}  # fmt: skip


def test_openai_truncates_at_what_was_heard_never_more_and_never_an_unheard_item():
    agent = OpenAIRealtime(AgentSetup())
    assert isinstance(openai_events(agent, delta("a", 300), position=1000.0)[0], Audio)  # item a heard from 1000 ms
    openai_events(agent, delta("a", 300), position=1300.0)
    assert openai_events(agent, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 1, "item_id": "u"}) == [Interrupted()]
    assert agent.interrupt(900.0) == []  # not heard at all yet
    (truncate,) = agent.interrupt(1250.0)
    assert json.loads(truncate) == {"type": "conversation.item.truncate", "item_id": "a", "content_index": 0, "audio_end_ms": 250}
    assert agent.interrupt(1300.0) == []  # once per item
    other = OpenAIRealtime(AgentSetup())
    openai_events(other, delta("b", 200), position=0.0)
    assert other.interrupt(5000.0) == []  # heard in full: nothing to cut
    provider_types.check_message(OpenAIRealtime.spec, truncate)


def test_openai_greets_once_opens_outbound_calls_and_replays_after_a_reconnection():
    agent = OpenAIRealtime(AgentSetup(greeting="Hi there"))
    first = openai_events(agent, {"type": "session.updated", "session": {"type": "realtime"}})
    assert first[0] == Ready() and json.loads(first[1].message)["type"] == "response.create"
    agent.said(Transcript("agent", "Hi there"))
    agent.resume()
    again = openai_events(agent, {"type": "session.updated", "session": {"type": "realtime"}})
    assert [json.loads(r.message)["item"]["role"] for r in again[1:]] == ["assistant"]  # the conversation, no greeting
    outbound = OpenAIRealtime(AgentSetup(outbound=True))
    (_, opening) = openai_events(outbound, {"type": "session.updated", "session": {"type": "realtime"}})
    assert json.loads(opening.message) == {"type": "response.create"}
    assert openai_events(OpenAIRealtime(AgentSetup()), {"type": "session.updated", "session": {"type": "realtime"}}) == [Ready()]
    for message in [*agent.start(), first[1].message, *(r.message for r in again[1:]), opening.message]:
        provider_types.check_message(OpenAIRealtime.spec, message)


def test_openai_garbage_is_a_provider_error_and_errors_say_whether_they_end_the_session():
    agent = OpenAIRealtime(AgentSetup())
    with pytest.raises(ProviderError):
        agent.receive("not json", 0)
    with pytest.raises(ProviderError):
        agent.receive(json.dumps({"type": "response.output_audio.delta", "delta": "!!"}), 0)
    (fatal,) = openai_events(agent, {"type": "error", "error": {"type": "x", "code": "session_expired", "message": "60 minutes"}})
    assert fatal.fatal and fatal.cap
    (benign,) = openai_events(agent, {"type": "error", "error": {"type": "x", "code": "invalid_value", "message": "m"}})
    assert not benign.fatal


# --- the Gemini translator ---------------------------------------------------------------------


def test_gemini_keeps_the_latest_resumable_handle_and_resumes_with_it():
    agent = GeminiLive(AgentSetup(greeting="Hello"))
    ready = agent.receive(json.dumps({"setupComplete": {}}), 0)
    assert ready[0] == Ready() and "clientContent" in json.loads(ready[1].message)
    agent.receive(json.dumps({"sessionResumptionUpdate": {"newHandle": "h1", "resumable": True}}), 0)
    agent.receive(json.dumps({"sessionResumptionUpdate": {"newHandle": "", "resumable": False}}), 0)
    assert agent.handle == "h1"
    (resume,) = agent.resume()
    assert json.loads(resume)["setup"]["sessionResumption"] == {"handle": "h1"}
    assert agent.receive(json.dumps({"setupComplete": {}}), 0) == [Ready()]  # no second greeting
    assert agent.receive(json.dumps({"goAway": {"timeLeft": "9.5s"}}), 0) == [GoAway(9.5)]
    provider_types.check_message(GeminiLive.spec, resume)


def test_gemini_transcripts_are_whole_utterances_in_order():
    agent = GeminiLive(AgentSetup())
    events = []
    for message in (
        {"serverContent": {"inputTranscription": {"text": "I would "}}},
        {"serverContent": {"inputTranscription": {"text": "like a table."}}},
        {"serverContent": {"outputTranscription": {"text": "Sure, "}}},
        {"serverContent": {"outputTranscription": {"text": "for how many?"}}},
        {"serverContent": {"turnComplete": True}},
        {"toolCall": {"functionCalls": [{"id": "f1", "name": "lookup", "args": {"q": 1}}]}},
    ):
        events += agent.receive(json.dumps(message), 0)
    assert events == [Transcript("user", "I would like a table."), Transcript("agent", "Sure, for how many?"), ToolCall("f1", "lookup", {"q": 1})]
    (answer,) = agent.tool_output(events[-1], '{"tables": 2}')
    assert json.loads(answer) == {"toolResponse": {"functionResponses": [{"id": "f1", "name": "lookup", "response": {"tables": 2}}]}}
    provider_types.check_message(GeminiLive.spec, answer)
    with pytest.raises(ProviderError):
        agent.receive(b"\\x00garbage", 0)
