"""Hosted voice models as a call's agent (``protocol = "openai-realtime"`` ... in the agents
file), sans-I/O: one translator per provider turns the provider's events into what the call
session understands (agent audio, a barge-in, transcripts, tool calls, problems) and what the
call does into the provider's messages. No socket, no clock of its own: times and positions are
passed in. ``bridge.media.hosted`` holds the provider's socket around a translator.

Adding a provider is one module here (its ``SPEC`` and its ``HostedAgent`` subclass) and one
line in ``PROVIDERS``.

Positions: agent audio is placed on the call's "heard" timeline, in milliseconds (the position
at which the caller hears a piece of agent audio, as ``CallSession.next_audio_position`` and
``heard_ms`` give it). A translator keeps where each of the provider's responses began on it, so
that a barge-in tells the provider exactly how much of the interrupted response the caller
heard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from audio import AudioFormat

Message = str | bytes  # one websocket message to the provider (text or binary)


# --- what a translator reports --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Audio:
    """Agent audio, in the provider's output format."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The caller spoke over the agent: drop what was not heard (then ``interrupt(heard_ms)``)."""


@dataclass(frozen=True, slots=True)
class Transcript:
    """A finished utterance: ``role`` is ``agent`` or ``user`` (the seeds' transcript roles).
    ``corrects``: the agent's earlier utterance this one replaces (what it had meant to say,
    cut by a barge-in to what was heard)."""

    role: str
    text: str
    corrects: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCancelled:
    call_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the provider said went wrong. ``fatal``: the session cannot go on (a refused
    key, a session over its cap); else it is only logged."""

    text: str
    fatal: bool = False
    #: the session reached the provider's own limit (the call ends as max_duration_reached)
    cap: bool = False


@dataclass(frozen=True, slots=True)
class Ready:
    """The provider accepted the session's set-up."""


@dataclass(frozen=True, slots=True)
class GoAway:
    """The provider will close this connection in ``seconds``: move to a new one now."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Formats:
    """The provider's audio formats, said once the session is open (an ElevenLabs agent's own
    settings): the call's conversion follows them."""

    taken: AudioFormat  # what it takes from the caller
    said: AudioFormat  # what it sends


@dataclass(frozen=True, slots=True)
class Reply:
    """A message to send back to the provider now (a greeting after set-up, a pong)."""

    message: Message


Event = Audio | Interrupted | Transcript | ToolCall | ToolCancelled | Problem | Ready | GoAway | Reply | Formats


class ProviderError(ValueError):
    """A provider message that cannot be understood (not JSON, a wrong shape): it ends the call
    as ``error_llm_websocket_corrupt_payload``."""


# --- what a translator is given ---------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A function the model may call (the agents file's ``tools``): answered by ``tools_url``."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True)
class AgentSetup:
    """What the agents file says of a hosted agent, and of the call."""

    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None
    tools: tuple[Tool, ...] = ()
    session: dict[str, Any] = field(default_factory=dict)  # merged into the provider's set-up
    outbound: bool = False  # the agent opens the call (this greeting, or its own)
    #: the call's dynamic variables, for a provider that takes them (docs/agents.md)
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderSpec:
    protocol: str  # as in the agents file
    name: str  # for people
    default_url: str
    in_format: AudioFormat  # what it takes from the caller
    out_format: AudioFormat  # what it sends
    extra: str  # pip install "twilio-audio-bridge[EXTRA]"
    sdk: str  # the module of its official SDK (its types check the messages)
    key_header: str  # the header that carries the API key
    key_prefix: str = ""  # e.g. "Bearer "
    #: the provider says nothing when the caller speaks over audio it finished generating (it
    #: is sent faster than real time): the bridge's own voice activity then clears what the
    #: caller has not heard
    local_barge_in: bool = False
    #: a dropped connection can be replaced mid-call (the provider resumes, or takes the
    #: conversation so far); False: the call ends with the reason
    reconnects: bool = True
    #: a session lasts at most this long (the call ends then, as max_duration_reached)
    session_cap_s: float | None = None


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, tables within tables (the agents file's session table)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class HostedAgent:
    """The translator of one provider session (one per call; ``resume`` for a new connection
    of the same conversation). Subclasses implement the provider's wire."""

    spec: ProviderSpec

    def __init__(self, setup: AgentSetup):
        self.setup = setup
        #: what was said so far, for a reconnection that must carry the conversation on
        self.conversation: list[Transcript] = []

    def start(self) -> list[Message]:
        """The first messages on a new session (set-up; a greeting follows ``Ready``)."""
        raise NotImplementedError

    def resume(self) -> list[Message]:
        """The first messages on a replacement connection: the same session, no second greeting."""
        raise NotImplementedError

    def caller_audio(self, data: bytes) -> Message:
        """The caller's audio (``spec.in_format``), as one message."""
        raise NotImplementedError

    def caller_text(self, text: str) -> list[Message]:
        """Something the caller did that is not speech (a key pressed), told to the model."""
        raise NotImplementedError

    def receive(self, message: Message, position_ms: float) -> list[Event]:
        """A provider message; ``position_ms``: where agent audio received now is heard. Raises
        ``ProviderError``."""
        raise NotImplementedError

    def interrupt(self, heard_ms: float) -> list[Message]:
        """After ``Interrupted``: the caller has heard the agent's audio up to ``heard_ms``."""
        return []

    def tool_output(self, call: ToolCall, output: str) -> list[Message]:
        """The answer to ``call`` (JSON text), for the model."""
        raise NotImplementedError

    def keepalive(self) -> list[Message]:
        """Messages that keep an idle session open (none for most providers)."""
        return []

    def said(self, transcript: Transcript) -> None:
        if transcript.corrects is not None:
            for i in range(len(self.conversation) - 1, -1, -1):
                if self.conversation[i].role == "agent" and self.conversation[i].text == transcript.corrects:
                    self.conversation[i] = Transcript("agent", transcript.text)
                    return
        self.conversation.append(Transcript(transcript.role, transcript.text))


def dtmf_text(digit: str) -> str:
    """What the model is told when the caller presses a key (docs/agents.md)."""
    return f"[The caller pressed the key {digit} on their phone's keypad.]"
