"""Google Gemini Live (the Gemini API's ``BidiGenerateContent``).

Gemini takes PCM16 at 16 kHz and speaks PCM16 at 24 kHz: the bridge's resampler converts the
caller's 8 kHz both ways. Client messages have exactly one field each: ``setup`` (first),
``realtimeInput`` (the caller's audio, and a key pressed as text), ``clientContent`` (the
greeting's turn), ``toolResponse``. The server's ``serverContent`` carries the model's audio
(``modelTurn.parts[].inlineData``), ``interrupted`` (a barge-in: Twilio's queue is cleared),
``turnComplete`` and both sides' transcriptions; ``toolCall`` / ``toolCallCancellation`` the
function calls; ``sessionResumptionUpdate`` the handle a new connection resumes the session
with; ``goAway`` says the connection ends soon (a connection lives about ten minutes): the
bridge then opens a new one with the latest handle and moves the call over (``resume``).

Names checked against the ``google-genai`` package's ``google.genai.types`` models
(``LiveClientMessage``, ``LiveServerMessage``: camelCase on the wire, unknown fields forbidden);
tests/bridge/test_hosted_gemini.py validates every message the bridge sends with them.
"""

from __future__ import annotations

import base64
import json

import orjson
import re
from typing import Any

from audio import AudioFormat

from . import (
    AgentSetup, Audio, Event, GoAway, HostedAgent, Interrupted, Message, ProviderError, ProviderSpec, Ready, Reply, ToolCall,
    ToolCancelled, Transcript, merge,
)  # fmt: skip

SPEC = ProviderSpec(
    protocol="gemini-live",
    name="Gemini Live",
    default_url="wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
    in_format=AudioFormat("s16le", 16000),
    out_format=AudioFormat("s16le", 24000),
    extra="gemini",
    sdk="google.genai",
    key_header="x-goog-api-key",
    local_barge_in=True,
)
DEFAULT_MODEL = "models/gemini-3.1-flash-live-preview"
AUDIO_HEAD = '{"realtimeInput":{"audio":{"mimeType":"audio/pcm;rate=16000","data":"'
DURATION = re.compile(r"(\d+(?:\.\d+)?)s")


class GeminiLive(HostedAgent):
    spec = SPEC

    def __init__(self, setup: AgentSetup):
        super().__init__(setup)
        self.handle: str | None = None  # the latest resumption handle (None: not resumable yet)
        self._resuming = False
        self._greeted = False
        self._user_text: list[str] = []
        self._agent_text: list[str] = []

    # --- to the provider --------------------------------------------------------------------

    def setup_message(self, handle: str | None = None) -> dict[str, Any]:
        setup = self.setup
        body: dict[str, Any] = {
            "model": DEFAULT_MODEL,
            "generationConfig": {"responseModalities": ["AUDIO"]},
            "inputAudioTranscription": {},
            "outputAudioTranscription": {},
            "sessionResumption": {"handle": handle} if handle else {},
            "contextWindowCompression": {"slidingWindow": {}},  # (an audio session passes 15 minutes)
        }
        if setup.voice:
            body["generationConfig"]["speechConfig"] = {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": setup.voice}}}
        if setup.instructions:
            body["systemInstruction"] = {"parts": [{"text": setup.instructions}]}
        if setup.tools:
            declarations = [{"name": t.name, "description": t.description, "parametersJsonSchema": t.parameters} for t in setup.tools]
            body["tools"] = [{"functionDeclarations": declarations}]
        return {"setup": merge(body, setup.session)}

    def start(self) -> list[Message]:
        return [_json(self.setup_message())]

    def resume(self) -> list[Message]:
        """A new connection for the same session: with the latest handle (then the server has the
        conversation), else a new session told what was said."""
        self._resuming, self._greeted = True, True
        self._user_text.clear()
        self._agent_text.clear()
        return [_json(self.setup_message(self.handle))]

    def _greeting(self) -> list[Message]:
        greeting, outbound = self.setup.greeting, self.setup.outbound
        if greeting:
            text = f"Greet the caller by saying exactly this, and nothing else: {greeting}"
        elif outbound:
            text = "The call has just been answered: open it, as you were instructed."
        else:
            return []
        return [_json({"clientContent": {"turns": [{"role": "user", "parts": [{"text": text}]}], "turnComplete": True}})]

    def _conversation_so_far(self) -> list[Message]:
        if not self.conversation:
            return []
        lines = "\n".join(f"{'Caller' if t.role == 'user' else 'You'}: {t.text}" for t in self.conversation)
        text = f"The call is already in progress; do not greet again. What was said so far:\n{lines}"
        return [_json({"clientContent": {"turns": [{"role": "user", "parts": [{"text": text}]}], "turnComplete": False}})]

    def caller_audio(self, data: bytes) -> Message:
        return AUDIO_HEAD + base64.b64encode(data).decode("ascii") + '"}}}'

    def caller_text(self, text: str) -> list[Message]:
        return [_json({"realtimeInput": {"text": text}})]

    def tool_output(self, call: ToolCall, output: str) -> list[Message]:
        try:
            response = json.loads(output)
        except ValueError:
            response = output
        if not isinstance(response, dict):
            response = {"output": response}
        answer = {"id": call.call_id, "name": call.name, "response": response}
        return [_json({"toolResponse": {"functionResponses": [answer]}})]

    # --- from the provider ------------------------------------------------------------------

    def receive(self, message: Message, position_ms: float) -> list[Event]:
        try:
            event = orjson.loads(message)
            if not isinstance(event, dict):
                raise TypeError
        except (ValueError, TypeError):
            raise ProviderError(f"not a Gemini Live message: {str(message)[:80]!r}") from None
        try:
            events: list[Event] = []
            if "serverContent" in event:
                self._content(event["serverContent"], events)
            if "toolCall" in event:
                for call in event["toolCall"].get("functionCalls") or []:
                    args = call.get("args") or {}
                    events.append(ToolCall(call["id"], call["name"], args if isinstance(args, dict) else {"value": args}))
            if "toolCallCancellation" in event:
                events.append(ToolCancelled(tuple(event["toolCallCancellation"].get("ids") or ())))
            if (event.get("voiceActivity") or {}).get("voiceActivityType") == "ACTIVITY_START":
                events.append(Interrupted())  # (the server heard the caller start: as a barge-in)
            if "sessionResumptionUpdate" in event:
                update = event["sessionResumptionUpdate"]
                if update.get("resumable") and update.get("newHandle"):
                    self.handle = update["newHandle"]
            if "goAway" in event:
                left = DURATION.fullmatch(str(event["goAway"].get("timeLeft") or "0s"))
                events.append(GoAway(float(left.group(1)) if left else 0.0))
            if "setupComplete" in event:
                events.append(Ready())
                if self._resuming:
                    self._resuming = False
                    if self.handle is None:  # (a new session after all: it is told what was said)
                        events += [Reply(m) for m in self._conversation_so_far()]
                elif not self._greeted:
                    self._greeted = True
                    events += [Reply(m) for m in self._greeting()]
            return events
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ProviderError(f"a malformed Gemini Live message: {type(e).__name__}: {e}") from None

    def _content(self, content: dict[str, Any], events: list[Event]) -> None:
        if text := (content.get("inputTranscription") or {}).get("text"):
            self._user_text.append(text)
        if text := (content.get("outputTranscription") or {}).get("text"):
            self._flush_user(events)
            self._agent_text.append(text)
        for part in (content.get("modelTurn") or {}).get("parts") or []:
            blob = part.get("inlineData")
            if blob and str(blob.get("mimeType", "")).startswith("audio/pcm"):
                self._flush_user(events)
                events.append(Audio(base64.b64decode(blob["data"], validate=True)))
        if content.get("interrupted"):
            events.append(Interrupted())
            self._flush_agent(events)
        if content.get("turnComplete"):
            self._flush_user(events)
            self._flush_agent(events)

    def _flush_user(self, events: list[Event]) -> None:
        if self._user_text:
            text = "".join(self._user_text).strip()
            self._user_text.clear()
            if text:
                events.append(Transcript("user", text))

    def _flush_agent(self, events: list[Event]) -> None:
        if self._agent_text:
            text = "".join(self._agent_text).strip()
            self._agent_text.clear()
            if text:
                events.append(Transcript("agent", text))


def _json(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))
