"""The listen-only socket of a live call (``/listen-live/{call_id}``, docs/protocol.md): what a
listener receives, built and parsed here (sans-I/O). The listener sends nothing.

- first, text ``{"event": "start", "call_id", "encoding": "s16le", "sample_rate": R,
  "channels": ["caller", "agent"], "position": P}`` (P: the call's position now, in samples);
- binary frames: byte 0 the channel (0 caller, 1 agent), bytes 1-4 the position (uint32,
  little-endian) in samples at R since the call's stream started, that is when the audio is
  heard on the call, then s16le mono PCM at R;
- text ``{"event": "clear", "position": N}``: agent audio from N on is not heard (a barge-in);
- text ``{"event": "end", "reason": ...}`` when the call ends, then a close with 1000.
"""

from __future__ import annotations

import struct

import orjson

LISTEN_PREFIX = "/listen-live/"
CALLER, AGENT = 0, 1
CHANNELS = ("caller", "agent")
_HEADER = struct.Struct("<BI")
HEADER_BYTES = _HEADER.size


class ListenFrameError(ValueError):
    pass


def start_event(call_id: str, sample_rate: int, position: int) -> str:
    """``position``: the call's position now (samples since its stream started): where a
    listener's playback starts (the agent's first frames may be ahead of it, the caller's at it)."""
    body = {
        "event": "start", "call_id": call_id, "encoding": "s16le", "sample_rate": sample_rate, "channels": list(CHANNELS),
        "position": position,
    }  # fmt: skip
    return orjson.dumps(body).decode()


def audio_frame(channel: int, position: int, pcm: bytes) -> bytes:
    return _HEADER.pack(channel, position & 0xFFFFFFFF) + pcm


def clear_event(position: int) -> str:
    return orjson.dumps({"event": "clear", "position": position}).decode()


def end_event(reason: str) -> str:
    return orjson.dumps({"event": "end", "reason": reason}).decode()


def parse_audio(frame: bytes) -> tuple[int, int, bytes]:
    """A binary frame: ``(channel, position, pcm)``."""
    if len(frame) < HEADER_BYTES or frame[0] not in (CALLER, AGENT) or (len(frame) - HEADER_BYTES) % 2:
        raise ListenFrameError(f"not a listen audio frame ({len(frame)} bytes)")
    channel, position = _HEADER.unpack_from(frame)
    return channel, position, bytes(frame[HEADER_BYTES:])
