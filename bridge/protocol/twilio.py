"""Twilio Media Streams frames, parsed and built by plain code (sans-I/O).

Twilio -> server: ``connected``, ``start``, ``media``, ``dtmf``, ``mark``, ``stop`` (JSON text;
numbers arrive as strings). Server -> Twilio: only ``media``, ``mark`` and ``clear``.
Parsing never raises anything but ``FrameError`` for bad input.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass, field
from typing import Any

import orjson


#: Where Twilio opens the media stream (the ``url`` of ``<Connect><Stream>``), and the custom
#: parameters the bridge's TwiML gives it: the call, its single-use stream token, and "1" when
#: the TwiML has ``<Connect action>`` (Twilio asks the bridge what to do once the stream ends,
#: ``STREAM_ENDED_PATH``). The voice webhook writes them and the relay reads them back from
#: ``start``; a ``twilio``-protocol agent gets none of them (``BRIDGE_PARAMETERS``) but the call id.
MEDIA_PATH = "/twilio/media"
STREAM_ENDED_PATH = "/twilio/stream-ended/"
CALL_PARAMETER = "call_id"
TOKEN_PARAMETER = "token"
ACTION_PARAMETER = "bridge_action"
BRIDGE_PARAMETERS = (TOKEN_PARAMETER, ACTION_PARAMETER)


class FrameError(ValueError):
    """A frame that cannot be understood (bad JSON, bad base64, wrong shape)."""


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str | None
    account_sid: str | None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    media_format: dict[str, Any] = field(default_factory=dict)
    tracks: tuple[str, ...] = ()


@dataclass(slots=True)  # not frozen: built for every frame, and frozen __init__ is slower
class Media:
    payload: bytes
    track: str | None = None
    timestamp_ms: int | None = None  # ms since the stream began (Twilio's clock)
    chunk: int | None = None  # the frame's count, from 1 (a gap is audio lost on the way)


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    call_sid: str | None = None


@dataclass(frozen=True, slots=True)
class Clear:
    pass


@dataclass(frozen=True, slots=True)
class Unknown:
    event: str


TwilioEvent = Connected | Start | Media | Dtmf | Mark | Stop | Clear | Unknown


def loads(data: str | bytes) -> dict[str, Any]:
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise FrameError(f"invalid JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise FrameError("not a JSON object with an 'event' string")
    return message


def _section(message: dict[str, Any], name: str) -> dict[str, Any]:
    section = message.get(name)
    if not isinstance(section, dict):
        raise FrameError(f"'{message['event']}' frame without a '{name}' object")
    return section


def _decode_payload(media: dict[str, Any]) -> bytes:
    payload = media.get("payload")
    if not isinstance(payload, str):
        raise FrameError("media frame without a 'payload' string")
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise FrameError(f"media payload is not base64: {e}") from None


def _int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse(data: str | bytes) -> TwilioEvent:
    """Parse one frame in either direction of the Twilio protocol."""
    message = loads(data)
    event = message["event"]
    if event == "media":
        media = _section(message, "media")
        return Media(_decode_payload(media), media.get("track"), _int(media.get("timestamp")), _int(media.get("chunk")))
    if event == "mark":
        name = _section(message, "mark").get("name")
        if not isinstance(name, str):
            raise FrameError("mark frame without a 'name' string")
        return Mark(name)
    if event == "dtmf":
        digit = _section(message, "dtmf").get("digit")
        if not isinstance(digit, str) or not digit:
            raise FrameError("dtmf frame without a 'digit'")
        return Dtmf(digit)
    if event == "start":
        start = _section(message, "start")
        stream_sid = start.get("streamSid") or message.get("streamSid")
        if not isinstance(stream_sid, str) or not stream_sid:
            raise FrameError("start frame without a streamSid")
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise FrameError("start.customParameters is not an object")
        media_format = start.get("mediaFormat") or {}
        tracks = start.get("tracks") or ()
        return Start(
            stream_sid,
            start.get("callSid"),
            start.get("accountSid"),
            {str(k): str(v) for k, v in params.items()},
            media_format if isinstance(media_format, dict) else {},
            tuple(tracks) if isinstance(tracks, list) else (),
        )
    if event == "connected":
        return Connected(message.get("protocol"), message.get("version"))
    if event == "stop":
        stop = message.get("stop")
        return Stop(stop.get("callSid") if isinstance(stop, dict) else None)
    if event == "clear":
        return Clear()
    return Unknown(event)


class FrameBuilder:
    """Builds server -> Twilio frames for one stream (the streamSid is escaped once)."""

    __slots__ = ("stream_sid", "_sid")

    def __init__(self, stream_sid: str):
        self.stream_sid = stream_sid
        self._sid = json.dumps(stream_sid)

    def media(self, payload: bytes) -> str:
        b64 = binascii.b2a_base64(payload, newline=False).decode("ascii")
        return '{"event":"media","streamSid":%s,"media":{"payload":"%s"}}' % (self._sid, b64)

    def mark(self, name: str) -> str:
        return '{"event":"mark","streamSid":%s,"mark":{"name":%s}}' % (self._sid, json.dumps(name))

    def clear(self) -> str:
        return '{"event":"clear","streamSid":%s}' % self._sid


class StreamFrames:
    """Builds Twilio -> server frames of one stream, as Twilio sends them: for a
    ``twilio``-protocol agent whose caller is not Twilio (a web client). Media is the caller's
    (``inbound``) track, numbered and timed by its audio (mu-law 8 kHz)."""

    __slots__ = ("stream_sid", "_sid", "_sequence", "_chunk", "_timestamp_ms")

    def __init__(self, stream_sid: str):
        self.stream_sid = stream_sid
        self._sid = json.dumps(stream_sid)
        self._sequence = 2  # connected and start came first
        self._chunk = 0
        self._timestamp_ms = 0

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence

    def media(self, payload: bytes) -> str:
        self._chunk += 1
        timestamp, self._timestamp_ms = self._timestamp_ms, self._timestamp_ms + len(payload) // 8
        b64 = binascii.b2a_base64(payload, newline=False).decode("ascii")
        return (
            '{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"},'
            '"streamSid":%s}' % (self._next(), self._chunk, timestamp, b64, self._sid)
        )

    def mark(self, name: str) -> str:
        return '{"event":"mark","sequenceNumber":"%d","streamSid":%s,"mark":{"name":%s}}' % (self._next(), self._sid, json.dumps(name))

    def stop(self, call_sid: str | None = None) -> str:
        return json.dumps(
            {"event": "stop", "sequenceNumber": str(self._next()), "streamSid": self.stream_sid, "stop": {"callSid": call_sid}}
        )


def start_frame(start: Start, sequence: int = 1, drop_parameters: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> str:
    """A ``start`` frame as Twilio sends it (used to forward to ``twilio``-protocol agents),
    less ``drop_parameters`` and with ``extra`` custom parameters."""
    params = {k: v for k, v in start.custom_parameters.items() if k not in drop_parameters}
    params.update(extra or {})
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": str(sequence),
            "streamSid": start.stream_sid,
            "start": {
                "streamSid": start.stream_sid,
                "accountSid": start.account_sid,
                "callSid": start.call_sid,
                "tracks": list(start.tracks) or ["inbound"],
                "customParameters": params,
                "mediaFormat": start.media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )


def connected_frame() -> str:
    return '{"event":"connected","protocol":"Call","version":"1.0.0"}'
