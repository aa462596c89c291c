"""ElevenLabs Agents (Conversational AI: ``wss://api.elevenlabs.io/v1/convai/conversation``).

The agent is ElevenLabs' own (its id in the URL's ``agent_id``, or ``provider_agent_id``); the
call's part is ``conversation_initiation_client_data``: the call's dynamic variables, and the
agents file's instructions, greeting and voice as overrides (the agent must allow them in its
security settings). Caller audio goes as ``{"user_audio_chunk": ...}``; ``audio`` events come
faster than real time and are placed and marked like any agent audio. Every ``ping`` is
answered with its ``event_id``. ``interruption`` drops the audio up to its ``event_id`` and
clears what the caller has not heard; transcripts come from ``user_transcript`` and
``agent_response`` (``agent_response_correction`` after a barge-in replaces what the agent is
recorded as having said); ``client_tool_call`` is answered with ``client_tool_result``.

The audio formats are the ElevenLabs agent's own settings, said in
``conversation_initiation_metadata``: ``ulaw_8000`` passes untouched; ``pcm_<rate>`` is
converted by the bridge's resampler (``Formats``); anything else ends the call naming the
setting, never plays as static. A dropped connection cannot resume the conversation: the call
ends with the reason (``reconnects`` is off).

Names as the ``elevenlabs`` package's ``conversational_ai/conversation.py`` sends and reads
them; ``conversation_initiation_client_data`` is checked with its
``ConversationInitiationClientDataRequestInput`` type.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import orjson

from audio import AudioFormat

from . import (
    AgentSetup, Audio, Event, Formats, HostedAgent, Interrupted, Message, Problem, ProviderError, ProviderSpec, Ready, Reply,
    ToolCall, Transcript, merge,
)  # fmt: skip

SPEC = ProviderSpec(
    protocol="elevenlabs-agent",
    name="ElevenLabs Agents",
    default_url="wss://api.elevenlabs.io/v1/convai/conversation",
    in_format=AudioFormat("mulaw", 8000),
    out_format=AudioFormat("mulaw", 8000),
    extra="elevenlabs",
    sdk="elevenlabs",
    key_header="xi-api-key",
    reconnects=False,
)
AUDIO_HEAD = '{"user_audio_chunk":"'
PCM = re.compile(r"pcm_(8000|16000|22050|24000|44100|48000)")


def audio_format(name: str) -> AudioFormat | None:
    """The bridge's format for an ElevenLabs format name, or None if it cannot be converted."""
    if name == "ulaw_8000":
        return AudioFormat("mulaw", 8000)
    if match := PCM.fullmatch(name or ""):
        return AudioFormat("s16le", int(match.group(1)))
    return None


class ElevenLabsAgent(HostedAgent):
    spec = SPEC

    def __init__(self, setup: AgentSetup):
        super().__init__(setup)
        self._last_interrupt = -1
        self._in_format = self._out_format = AudioFormat("mulaw", 8000)

    def initiation(self) -> dict[str, Any]:
        setup = self.setup
        agent: dict[str, Any] = {}
        if setup.instructions:
            agent["prompt"] = {"prompt": setup.instructions}
        if setup.greeting:
            agent["first_message"] = setup.greeting
        override: dict[str, Any] = {}
        if agent:
            override["agent"] = agent
        if setup.voice:
            override["tts"] = {"voice_id": setup.voice}
        data: dict[str, Any] = {"type": "conversation_initiation_client_data", "dynamic_variables": dict(setup.variables)}
        if override:
            data["conversation_config_override"] = override
        return merge(data, setup.session)

    def start(self) -> list[Message]:
        return [_json(self.initiation())]

    def caller_audio(self, data: bytes) -> Message:
        return AUDIO_HEAD + base64.b64encode(data).decode("ascii") + '"}'

    def caller_text(self, text: str) -> list[Message]:
        return [_json({"type": "user_message", "text": text})]

    def keepalive(self) -> list[Message]:
        return ['{"type":"user_activity"}']

    def tool_output(self, call: ToolCall, output: str) -> list[Message]:
        failed = False
        try:
            failed = isinstance(parsed := json.loads(output), dict) and set(parsed) == {"error"}
        except ValueError:
            pass
        return [_json({"type": "client_tool_result", "tool_call_id": call.call_id, "result": output, "is_error": failed})]

    def receive(self, message: Message, position_ms: float) -> list[Event]:
        try:
            event = orjson.loads(message)
            kind = event["type"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            raise ProviderError(f"not an ElevenLabs Agents event: {str(message)[:80]!r}") from None
        try:
            if kind == "audio":
                audio = event["audio_event"]
                if int(audio["event_id"]) <= self._last_interrupt:
                    return []  # (audio from before a barge-in: dropped, as the SDK drops it)
                return [Audio(base64.b64decode(audio["audio_base_64"], validate=True))]
            if kind == "ping":
                ping = event["ping_event"]
                return [Reply(_json({"type": "pong", "event_id": ping["event_id"]}))]
            if kind == "interruption":
                self._last_interrupt = int(event["interruption_event"]["event_id"])
                return [Interrupted()]
            if kind == "user_transcript":
                text = event["user_transcription_event"]["user_transcript"].strip()
                return [Transcript("user", text)] if text else []
            if kind == "agent_response":
                text = event["agent_response_event"]["agent_response"].strip()
                return [Transcript("agent", text)] if text else []
            if kind == "agent_response_correction":
                correction = event["agent_response_correction_event"]
                return [Transcript("agent", correction["corrected_agent_response"].strip(), corrects=correction["original_agent_response"].strip())]
            if kind == "client_tool_call":
                call = event["client_tool_call"]
                parameters = call.get("parameters") or {}
                return [ToolCall(call["tool_call_id"], call["tool_name"], parameters if isinstance(parameters, dict) else {"value": parameters})]
            if kind == "conversation_initiation_metadata":
                return self._formats(event["conversation_initiation_metadata_event"])
            if kind == "error":
                return [Problem(f"ElevenLabs error: {event.get('message') or event.get('error_event') or event}")]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ProviderError(f"a malformed {kind} event: {type(e).__name__}: {e}") from None
        return []  # vad_score, internal_tentative_agent_response, agent_chat_response_part...

    def _formats(self, metadata: dict[str, Any]) -> list[Event]:
        user, agent = metadata.get("user_input_audio_format", "ulaw_8000"), metadata.get("agent_output_audio_format", "ulaw_8000")
        taken, said = audio_format(user), audio_format(agent)
        if taken is None or said is None:
            bad = user if taken is None else agent
            setting = "user input audio format" if taken is None else "agent output audio format"
            text = f"the ElevenLabs agent's {setting} is {bad}, which a phone call cannot carry: set it to μ-law 8000 Hz (ulaw_8000) in the agent's settings"
            return [Problem(text, fatal=True)]
        events: list[Event] = []
        if (taken, said) != (self._in_format, self._out_format):
            self._in_format, self._out_format = taken, said
            events.append(Formats(taken, said))
        return [*events, Ready()]


def _json(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))
