"""Deepgram Voice Agent (V1: ``wss://agent.deepgram.com/v1/agent/converse``).

mu-law 8 kHz both ways with ``container: "none"``: Twilio's audio passes untouched, as binary
frames each way, sent as it arrives (no batching). The first message is ``Settings`` (audio,
then ``agent``: ``listen``, ``think`` with the instructions as its prompt and the declared
functions, ``speak``, ``greeting``); ``SettingsApplied`` says it took. ``UserStartedSpeaking`` is
a barge-in; ``ConversationText`` (role ``user`` / ``assistant``) both sides' transcripts;
``FunctionCallRequest`` (``client_side`` functions) is answered with ``FunctionCallResponse``;
``KeepAlive`` keeps a session with no audio coming (a caller on hold) open; ``Error`` and
``Warning`` go on the public log. A replacement connection gets the same ``Settings`` with the
conversation so far in ``agent.context.messages`` and no greeting. Sessions last at most two
hours (``session_cap_s``).

Names checked against the ``deepgram-sdk`` package's ``deepgram.agent.v1`` types.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from audio import AudioFormat

from . import (
    AgentSetup, Audio, Event, HostedAgent, Interrupted, Message, Problem, ProviderError, ProviderSpec, Ready, ToolCall, Transcript,
    merge,
)  # fmt: skip

SPEC = ProviderSpec(
    protocol="deepgram-agent",
    name="Deepgram Voice Agent",
    default_url="wss://agent.deepgram.com/v1/agent/converse",
    in_format=AudioFormat("mulaw", 8000),
    out_format=AudioFormat("mulaw", 8000),
    extra="deepgram",
    sdk="deepgram",
    key_header="Authorization",
    key_prefix="Token ",
    session_cap_s=7200.0,
)
LISTEN_MODEL = "nova-3"
THINK = {"type": "open_ai", "model": "gpt-4o-mini"}
SPEAK_MODEL = "aura-2-thalia-en"
KEEPALIVE = '{"type":"KeepAlive"}'
ROLES = {"user": "user", "assistant": "agent"}


class DeepgramAgent(HostedAgent):
    spec = SPEC

    def __init__(self, setup: AgentSetup):
        super().__init__(setup)
        self._resuming = False

    def settings(self, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        setup = self.setup
        think: dict[str, Any] = {"provider": dict(THINK)}
        if setup.instructions:
            think["prompt"] = setup.instructions
        if setup.tools:
            think["functions"] = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in setup.tools]
        agent: dict[str, Any] = {
            "listen": {"provider": {"type": "deepgram", "model": LISTEN_MODEL}},
            "think": think,
            "speak": {"provider": {"type": "deepgram", "model": setup.voice or SPEAK_MODEL}},
        }
        if setup.greeting and history is None:
            agent["greeting"] = setup.greeting
        if history:
            agent["context"] = {"messages": history}
        settings = {
            "type": "Settings",
            "audio": {
                "input": {"encoding": "mulaw", "sample_rate": 8000},
                "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
            },
            "agent": agent,
        }
        merged = merge(settings, setup.session)
        if history is not None:
            merged["agent"].pop("greeting", None)  # (the caller heard it on the first connection)
        return merged

    def start(self) -> list[Message]:
        return [_json(self.settings())]

    def resume(self) -> list[Message]:
        self._resuming = True
        history = [{"type": "History", "role": "user" if t.role == "user" else "assistant", "content": t.text} for t in self.conversation]
        return [_json(self.settings(history))]

    def caller_audio(self, data: bytes) -> Message:
        return data  # (a binary frame, as it arrives)

    def caller_text(self, text: str) -> list[Message]:
        return [_json({"type": "InjectUserMessage", "content": text})]

    def keepalive(self) -> list[Message]:
        return [KEEPALIVE]

    def tool_output(self, call: ToolCall, output: str) -> list[Message]:
        return [_json({"type": "FunctionCallResponse", "id": call.call_id, "name": call.name, "content": output})]

    def receive(self, message: Message, position_ms: float) -> list[Event]:
        if isinstance(message, bytes):
            return [Audio(message)] if message else []
        try:
            event = orjson.loads(message)
            kind = event["type"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            raise ProviderError(f"not a Deepgram Voice Agent message: {message[:80]!r}") from None
        try:
            if kind == "UserStartedSpeaking":
                return [Interrupted()]
            if kind == "ConversationText":
                role = ROLES.get(event["role"])
                return [Transcript(role, event["content"])] if role and event["content"].strip() else []
            if kind == "FunctionCallRequest":
                calls = []
                for function in event["functions"]:
                    if not function.get("client_side", True):
                        continue  # (a server-side function: Deepgram calls its endpoint)
                    try:
                        arguments = json.loads(function.get("arguments") or "{}")
                    except ValueError:
                        arguments = {"_unparsed": function.get("arguments")}
                    calls.append(ToolCall(function["id"], function["name"], arguments if isinstance(arguments, dict) else {"value": arguments}))
                return calls
            if kind == "SettingsApplied":
                self._resuming = False
                return [Ready()]
            if kind in ("Error", "Warning"):
                text = f"Deepgram {kind.lower()} {event.get('code', '')}: {event.get('description', '')}".replace("  ", " ")
                return [Problem(text)]  # (an error that ends the session ends its socket too)
        except (KeyError, TypeError, AttributeError) as e:
            raise ProviderError(f"a malformed {kind} message: {type(e).__name__}: {e}") from None
        return []  # Welcome, AgentThinking, AgentStartedSpeaking, AgentAudioDone, History...


def _json(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))
