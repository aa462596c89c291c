"""OpenAI Realtime (GA, ``gpt-realtime``), and any server that speaks its events (Azure OpenAI).

Audio is ``audio/pcmu`` both ways: Twilio's mu-law passes through untouched. Caller audio goes
as ``input_audio_buffer.append``; the model's as ``response.output_audio.delta``. Server VAD
finds the caller's turns; ``input_audio_buffer.speech_started`` is a barge-in: the bridge clears
Twilio's queue and sends ``conversation.item.truncate`` for the response being heard, with
``audio_end_ms`` what the caller heard of it (from Twilio's mark echoes, never more than the
model sent, and nothing for a response nobody heard). Transcripts: the agent's from
``response.output_audio_transcript.done``, the caller's from
``conversation.item.input_audio_transcription.completed`` (input transcription is on). Function
calls come as ``function_call`` items in ``response.done`` and are answered with a
``function_call_output`` item and ``response.create``.

Names checked against the ``openai`` package's ``openai.types.realtime`` models
(tests/bridge/test_hosted_openai.py validates every message the bridge sends with them).
"""

from __future__ import annotations

import base64
import json

import orjson
from typing import Any

from audio import AudioFormat

from . import (
    AgentSetup, Audio, Event, HostedAgent, Interrupted, Message, Problem, ProviderError, ProviderSpec, Ready, Reply, ToolCall,
    Transcript, merge,
)  # fmt: skip

SPEC = ProviderSpec(
    protocol="openai-realtime",
    name="OpenAI Realtime",
    default_url="wss://api.openai.com/v1/realtime?model=gpt-realtime",
    in_format=AudioFormat("mulaw", 8000),
    out_format=AudioFormat("mulaw", 8000),
    extra="openai",
    sdk="openai",
    key_header="Authorization",
    key_prefix="Bearer ",
    session_cap_s=3600.0,
)
TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
MS_PER_BYTE = 1 / 8  # mu-law 8 kHz
#: error codes that end the session (the rest are logged and the call goes on)
FATAL_CODES = {"session_expired", "invalid_api_key", "insufficient_quota", "session_closed"}
APPEND_HEAD = '{"type":"input_audio_buffer.append","audio":"'


class OpenAIRealtime(HostedAgent):
    spec = SPEC

    def __init__(self, setup: AgentSetup):
        super().__init__(setup)
        self._greeted = False
        self._replay = False  # a replacement connection: the conversation goes in after set-up
        #: the responses whose audio came, in order: item id -> [start position, audio ms]
        self._items: dict[str, list[float]] = {}
        self._current: str | None = None  # the item whose audio is coming or being heard
        self._truncated: set[str] = set()

    # --- to the provider --------------------------------------------------------------------

    def session(self) -> dict[str, Any]:
        setup = self.setup
        session: dict[str, Any] = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": {"type": "server_vad"},
                    "transcription": {"model": TRANSCRIPTION_MODEL},
                },
                "output": {"format": {"type": "audio/pcmu"}},
            },
        }
        if setup.instructions:
            session["instructions"] = setup.instructions
        if setup.voice:
            session["audio"]["output"]["voice"] = setup.voice
        if setup.tools:
            session["tools"] = [
                {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters} for t in setup.tools
            ]
        return merge(session, setup.session)

    def start(self) -> list[Message]:
        return [_json({"type": "session.update", "session": self.session()})]

    def resume(self) -> list[Message]:
        self._replay, self._greeted = True, True
        self._items.clear()
        self._current = None
        return self.start()

    def _greeting(self) -> list[Message]:
        greeting, outbound = self.setup.greeting, self.setup.outbound
        if greeting:
            instructions = f"Greet the caller by saying exactly this, and nothing else: {greeting}"
            return [_json({"type": "response.create", "response": {"instructions": instructions}})]
        if outbound:  # the agent opens an outbound call, with its own words
            return [_json({"type": "response.create"})]
        return []

    def _conversation_so_far(self) -> list[Message]:
        items = []
        for said in self.conversation:
            if said.role == "user":
                item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": said.text}]}
            else:
                item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": said.text}]}
            items.append(_json({"type": "conversation.item.create", "item": item}))
        return items

    def caller_audio(self, data: bytes) -> Message:
        return APPEND_HEAD + base64.b64encode(data).decode("ascii") + '"}'

    def caller_text(self, text: str) -> list[Message]:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        return [_json({"type": "conversation.item.create", "item": item}), _json({"type": "response.create"})]

    def interrupt(self, heard_ms: float) -> list[Message]:
        """Truncate the response the caller was hearing at what they heard of it."""
        item_id = self._current
        if item_id is None or item_id in self._truncated:
            return []
        start, received = self._items[item_id]
        heard = heard_ms - start
        if heard <= 0 or heard >= received:  # nobody heard it (the server refuses such a truncate), or all of it
            return []
        self._truncated.add(item_id)
        event = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": int(heard)}
        return [_json(event)]

    def tool_output(self, call: ToolCall, output: str) -> list[Message]:
        item = {"type": "function_call_output", "call_id": call.call_id, "output": output}
        return [_json({"type": "conversation.item.create", "item": item}), _json({"type": "response.create"})]

    # --- from the provider ------------------------------------------------------------------

    def receive(self, message: Message, position_ms: float) -> list[Event]:
        try:
            event = orjson.loads(message)
            kind = event["type"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            raise ProviderError(f"not an OpenAI Realtime event: {str(message)[:80]!r}") from None
        try:
            if kind == "response.output_audio.delta" or kind == "response.audio.delta":
                data = base64.b64decode(event["delta"], validate=True)
                item_id = event["item_id"]
                item = self._items.get(item_id)
                if item is None:
                    item = self._items[item_id] = [position_ms, 0.0]
                    self._current = item_id
                item[1] += len(data) * MS_PER_BYTE
                return [Audio(data)]
            if kind == "input_audio_buffer.speech_started":
                return [Interrupted()] if self._current is not None else []
            if kind == "response.output_audio_transcript.done" or kind == "response.audio_transcript.done":
                return [Transcript("agent", event["transcript"])] if event["transcript"] else []
            if kind == "conversation.item.input_audio_transcription.completed":
                return [Transcript("user", event["transcript"])] if event["transcript"].strip() else []
            if kind == "response.done":
                return self._response_done(event["response"])
            if kind == "session.updated":
                return self._session_ready()
            if kind == "error":
                error = event["error"]
                code = error.get("code") or error.get("type") or "error"
                text = f"OpenAI error {code}: {error.get('message', '')}".rstrip(": ")
                return [Problem(text, fatal=code in FATAL_CODES, cap=code == "session_expired")]
        except (KeyError, TypeError, ValueError) as e:
            raise ProviderError(f"a malformed {kind} event: {type(e).__name__}: {e}") from None
        return []  # session.created, rate_limits.updated, deltas the bridge does not need...

    def _session_ready(self) -> list[Event]:
        events: list[Event] = [Ready()]
        if self._replay:
            self._replay = False
            events += [Reply(m) for m in self._conversation_so_far()]
        elif not self._greeted:
            self._greeted = True
            events += [Reply(m) for m in self._greeting()]
        return events

    def _response_done(self, response: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        for item in response.get("output") or []:
            if item.get("type") == "function_call":
                try:
                    arguments = json.loads(item.get("arguments") or "{}")
                except ValueError:
                    arguments = {"_unparsed": item.get("arguments")}
                if not isinstance(arguments, dict):
                    arguments = {"value": arguments}
                events.append(ToolCall(item["call_id"], item["name"], arguments))
        status = response.get("status")
        if status == "failed":
            details = response.get("status_details") or {}
            error = details.get("error") or {}
            events.append(Problem(f"OpenAI response failed: {error.get('code') or details.get('reason') or 'unknown'}: {error.get('message', '')}".rstrip(": ")))
        return events


def _json(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))
