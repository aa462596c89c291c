"""The agent's ``web`` audio websocket protocol, parsed and built by plain code (sans-I/O).

Agent -> bridge: binary frames of audio in the call's format; text ``clear`` (barge-in), ``pong``
(answer to the bridge's ``ping``), ``ping``; JSON text with ``event_type`` ``update`` (live
transcript) or ``metadata``, and the call-control requests (``transfer_call``, ``press_digit``,
``end_call``: ``bridge.protocol.control``). Bridge -> agent: binary audio, text ``ping``, JSON
``{"event_type": "dtmf", "digit": "5"}`` for keypad presses, ``call_control_result`` and
``voicemail`` (see docs/protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from . import control
from .twilio import FrameError


@dataclass(frozen=True, slots=True)
class Audio:
    data: bytes


@dataclass(frozen=True, slots=True)
class ClearAudio:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Update:
    transcript: list[dict[str, str]]
    turntaking: str | None = None


@dataclass(frozen=True, slots=True)
class Metadata:
    metadata: Any


@dataclass(frozen=True, slots=True)
class OtherEvent:
    event_type: str


AgentMessage = Audio | ClearAudio | Ping | Pong | Update | Metadata | OtherEvent | control.Control | control.BadControl

CLEAR = ClearAudio()
PING = Ping()
PONG = Pong()


def parse(message: str | bytes) -> AgentMessage:
    """Classify one message from a ``web``-protocol agent; ``FrameError`` if it is garbage."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return Audio(bytes(message))
    text = message.strip()
    if text == "clear":
        return CLEAR
    if text == "pong":
        return PONG
    if text == "ping":
        return PING
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError(f"text frame is neither clear/ping/pong nor JSON: {text[:60]!r}") from None
    if not isinstance(event, dict) or not isinstance(event.get("event_type"), str):
        raise FrameError("JSON frame without an 'event_type' string")
    kind = event["event_type"]
    if kind == "update":
        transcript = event.get("transcript", [])
        if not isinstance(transcript, list) or not all(
            isinstance(u, dict) and isinstance(u.get("role"), str) and isinstance(u.get("content"), str)
            for u in transcript
        ):
            raise FrameError("update.transcript must be a list of {role, content} strings")
        turntaking = event.get("turntaking")
        return Update(transcript, turntaking if isinstance(turntaking, str) else None)
    if kind == "metadata":
        return Metadata(event.get("metadata"))
    if kind in control.ACTIONS:
        try:
            return control.parse(event)
        except control.ControlError as e:
            return control.BadControl(kind, str(e))
    return OtherEvent(kind)


def voicemail_event(answered_by: str) -> str:
    """Told to the agent when an outbound call reached a voicemail, at the beep: its message now."""
    return orjson.dumps({"event_type": "voicemail", "answered_by": answered_by}).decode()


def dtmf_event(digit: str) -> str:
    return orjson.dumps({"event_type": "dtmf", "digit": digit}).decode()


def call_details_event(call: dict, caller_audio: dict | None = None, agent_audio: dict | None = None) -> str:
    """The first message to a ``web``-protocol agent that asked for it (``send_call_details``):
    the call object, as the call API answers it (its ``audio_websocket_protocol``,
    ``audio_encoding`` and ``sample_rate`` are the caller's leg, as in the seeds), with both
    legs' formats said apart: ``caller_audio`` (Twilio's mu-law 8 kHz, or a web client's) and
    ``agent_audio``, what this socket carries (``sample_rate_in`` when the agent takes another
    rate than it sends)."""
    event = {"event_type": "call_details", "call": call}
    if caller_audio is not None:
        event["caller_audio"] = caller_audio
    if agent_audio is not None:
        event["agent_audio"] = agent_audio
    return orjson.dumps(event).decode()


def audio_leg(protocol: str, sent, taken=None) -> dict:
    """A leg's format for ``call_details``: ``sent`` is what the leg's peer sends (``taken``,
    what it takes, when that differs in rate)."""
    leg = {"protocol": protocol, "encoding": sent.encoding, "sample_rate": sent.sample_rate}
    if taken is not None and taken != sent:
        leg["sample_rate_in"] = taken.sample_rate
    return leg
