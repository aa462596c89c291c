"""The embedded echo agent: listens, and when the caller stops speaking plays back what it heard;
when the caller talks over the playback it sends ``clear``. It keeps time by the audio it
receives (stream time), so it behaves the same whether the call runs in real time or faster.

Keypad: every digit is reported in the transcript; ``#`` makes the agent hang up (close 1000).

Served by the bridge itself for both agent protocols:
``/agents/echo/audio-websocket/{call_id}?encoding=s16le&sample_rate=24000`` (``web``) and
``/agents/echo-twilio/audio-websocket/{call_id}`` (``twilio``: mu-law 8 kHz).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from audio import SPEECH_END, SPEECH_START, VoiceActivityDetector, pcm_to_ulaw, ulaw_to_pcm

from ..calls.tokens import internal_key_matches
from ..protocol import twilio as tf
from ..protocol.twilio import FrameError

log = logging.getLogger(__name__)

HANGUP_DIGIT = "#"


class EchoAgent:
    """Sans-I/O echo logic on s16le audio at ``sample_rate``. ``hear``/``dtmf`` return what to send:
    ``("audio", pcm)``, ``("clear", "")``, ``("update", json_text)`` or ``("hangup", "")``."""

    def __init__(self, sample_rate: int, end_silence_ms: int = 600, chunk_ms: int = 100, max_utterance_s: float = 30):
        self.sample_rate = sample_rate
        self.vad = VoiceActivityDetector(sample_rate, end_silence_ms=end_silence_ms)
        self.bytes_per_ms = sample_rate * 2 / 1000
        self.chunk_bytes = int(self.bytes_per_ms * chunk_ms) // 2 * 2
        self.max_bytes = int(self.bytes_per_ms * max_utterance_s * 1000) // 2 * 2
        self.preroll_bytes = int(self.bytes_per_ms * 2000) // 2 * 2
        self._audio = bytearray()  # caller audio from stream time _audio_ms on
        self._audio_ms = 0.0
        self._heard_ms = 0.0  # stream time of everything heard so far
        self._speech_ms: float | None = None  # start of the current utterance
        self._playing_until = 0.0
        self.transcript: list[dict[str, str]] = []
        self.clears = 0

    def hear(self, pcm: bytes) -> list[tuple[str, bytes | str]]:
        out: list[tuple[str, bytes | str]] = []
        if len(pcm) & 1:
            pcm = pcm[:-1]
        if not pcm:
            return out
        events = self.vad.process(pcm)
        self._audio += pcm
        self._heard_ms += len(pcm) / self.bytes_per_ms
        for event in events:
            if event.kind == SPEECH_START:
                self._speech_ms = event.at_ms
                if self._heard_ms < self._playing_until:  # barge-in
                    self._playing_until = 0.0
                    self.clears += 1
                    out.append(("clear", ""))
            elif event.kind == SPEECH_END and self._speech_ms is not None:
                out += self._play(self._speech_ms, event.at_ms)
                self._speech_ms = None
        self._trim()
        return out

    def dtmf(self, digit: str) -> list[tuple[str, bytes | str]]:
        self.transcript.append({"role": "user", "content": f"<dtmf {digit}>"})
        out: list[tuple[str, bytes | str]] = [("update", self._update())]
        if digit == HANGUP_DIGIT:
            out.append(("hangup", ""))
        return out

    def _play(self, start_ms: float, end_ms: float) -> list[tuple[str, bytes | str]]:
        first = max(0, int((start_ms - self._audio_ms) * self.bytes_per_ms) // 2 * 2)
        last = max(first, int((end_ms - self._audio_ms) * self.bytes_per_ms) // 2 * 2)
        utterance = bytes(self._audio[first:last])
        if not utterance:
            return []
        seconds = len(utterance) / self.bytes_per_ms / 1000
        self.transcript.append({"role": "user", "content": f"({seconds:.2f} s of speech)"})
        self.transcript.append({"role": "agent", "content": f"(echo of {seconds:.2f} s)"})
        self._playing_until = max(self._heard_ms, self._playing_until) + seconds * 1000
        out: list[tuple[str, bytes | str]] = [("update", self._update())]
        out += [("audio", utterance[i : i + self.chunk_bytes]) for i in range(0, len(utterance), self.chunk_bytes)]
        return out

    def _trim(self) -> None:
        """Keep the current utterance (bounded), or a 2 s pre-roll between utterances."""
        if self._speech_ms is not None:
            keep_from = int((self._speech_ms - self._audio_ms) * self.bytes_per_ms) // 2 * 2
            excess = max(keep_from, len(self._audio) - self.max_bytes)
        else:
            excess = len(self._audio) - self.preroll_bytes
        if excess > 0:
            excess -= excess % 2
            del self._audio[:excess]
            self._audio_ms += excess / self.bytes_per_ms

    def _update(self) -> str:
        return orjson.dumps({"event_type": "update", "transcript": self.transcript}).decode()


router = APIRouter()


def _from_the_bridge(ws: WebSocket, call_id: str, key: str) -> bool:
    """Only the bridge, relaying one of its calls, may open the echo agent."""
    return internal_key_matches(ws.app.state.settings.twilio_auth_token or "", call_id, key)


@router.websocket("/agents/echo/audio-websocket/{call_id}")
async def echo_web(ws: WebSocket, call_id: str, encoding: str = "s16le", sample_rate: int = 24000, key: str = "") -> None:
    settings = ws.app.state.settings
    if not _from_the_bridge(ws, call_id, key):
        await ws.close(code=1008, reason="only the bridge opens its echo agent")
        return
    if encoding not in ("s16le", "mulaw") or not 8000 <= sample_rate <= 48000:
        await ws.close(code=1008, reason="bad encoding or sample_rate")
        return
    await ws.accept()
    agent = EchoAgent(sample_rate, settings.echo_end_silence_ms)
    mulaw = encoding == "mulaw"
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                data = message["bytes"]
                outputs = agent.hear(ulaw_to_pcm(data) if mulaw else data)
            else:
                text = message.get("text") or ""
                if text == "ping":
                    await ws.send_text("pong")
                    continue
                try:
                    event = orjson.loads(text)
                except orjson.JSONDecodeError:
                    continue
                digit = event.get("digit") if isinstance(event, dict) and event.get("event_type") == "dtmf" else None
                outputs = agent.dtmf(digit) if isinstance(digit, str) and digit else []
            for kind, payload in outputs:
                if kind == "audio":
                    await ws.send_bytes(pcm_to_ulaw(payload) if mulaw else payload)
                elif kind == "hangup":
                    await ws.close(code=1000, reason="agent hung up")
                    return
                else:
                    await ws.send_text(payload if kind == "update" else "clear")
    except WebSocketDisconnect:
        return


@router.websocket("/agents/echo-twilio/audio-websocket/{call_id}")
async def echo_twilio(ws: WebSocket, call_id: str, key: str = "") -> None:
    settings = ws.app.state.settings
    if not _from_the_bridge(ws, call_id, key):
        await ws.close(code=1008, reason="only the bridge opens its echo agent")
        return
    await ws.accept()
    agent = EchoAgent(8000, settings.echo_end_silence_ms, chunk_ms=20)
    frames: tf.FrameBuilder | None = None
    marks = 0
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:  # binary frames are not part of the twilio protocol
                continue
            try:
                event = tf.parse(text)
            except FrameError:
                continue
            if type(event) is tf.Start:
                frames = tf.FrameBuilder(event.stream_sid)
                continue
            if type(event) is tf.Stop:
                await ws.close(code=1000)
                return
            if frames is None:
                continue
            if type(event) is tf.Media:
                outputs = agent.hear(ulaw_to_pcm(event.payload))
            elif type(event) is tf.Dtmf:
                outputs = agent.dtmf(event.digit)
            else:
                continue
            for kind, payload in outputs:
                if kind == "audio":
                    await ws.send_text(frames.media(pcm_to_ulaw(payload)))
                    marks += 1
                    await ws.send_text(frames.mark(f"echo{marks}"))
                elif kind == "clear":
                    await ws.send_text(frames.clear())
                elif kind == "hangup":
                    await ws.close(code=1000, reason="agent hung up")
                    return
    except WebSocketDisconnect:
        return
