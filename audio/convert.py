"""Audio formats and per-direction converters between Twilio (mu-law 8 kHz) and an agent.

A ``Converter(src, dst)`` is composed of the G.711 codec and the streaming ``Resampler``: decode
mu-law if the source is mu-law, resample if the rates differ, encode mu-law if the destination
is mu-law. Matching formats pass bytes through untouched. One converter per call per direction:
it holds the resampler's history, so it must not be shared between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from .g711 import pcm_to_ulaw, ulaw_to_pcm
from .resample import Resampler, check_pcm, check_rate

S16LE = "s16le"
MULAW = "mulaw"
ENCODINGS = (S16LE, MULAW)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """An audio stream format: ``encoding`` (``s16le`` or ``mulaw``), mono, ``sample_rate`` Hz."""

    encoding: str
    sample_rate: int

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        object.__setattr__(self, "sample_rate", check_rate("sample_rate", self.sample_rate))

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == S16LE else 1

    def bytes_per_ms(self) -> float:
        return self.sample_rate * self.bytes_per_sample / 1000

    def duration_ms(self, nbytes: int) -> float:
        return nbytes * 1000 / (self.sample_rate * self.bytes_per_sample)


#: What Twilio Media Streams carry in both directions.
TWILIO_FORMAT = AudioFormat(MULAW, 8000)


class Converter:
    """Streaming conversion of one direction of one call from ``src`` to ``dst`` format."""

    __slots__ = ("src", "dst", "_resampler", "_decode", "_encode")

    def __init__(self, src: AudioFormat, dst: AudioFormat):
        self.src, self.dst = src, dst
        same_rate = src.sample_rate == dst.sample_rate
        self._resampler = None if same_rate else Resampler(src.sample_rate, dst.sample_rate)
        # mu-law -> mu-law at the same rate needs no decoding at all
        recode = not (same_rate and src.encoding == dst.encoding)
        self._decode = recode and src.encoding == MULAW
        self._encode = recode and dst.encoding == MULAW

    @property
    def passthrough(self) -> bool:
        return self.src == self.dst

    @property
    def delay_ms(self) -> float:
        return self._resampler.delay_ms if self._resampler else 0.0

    @property
    def state_bytes(self) -> int:
        return self._resampler.state_bytes if self._resampler else 0

    def process(self, data: bytes) -> bytes:
        """Convert one chunk. Raises ValueError (state unchanged) on an empty chunk or an odd
        byte count for s16le."""
        if self._decode:
            if not data:
                raise ValueError("empty audio chunk")
            data = ulaw_to_pcm(data)
        elif self.src.encoding == S16LE:
            data = check_pcm(data) if type(data) is not bytes or not data or len(data) & 1 else data
        elif not data:
            raise ValueError("empty audio chunk")
        if self._resampler is not None:
            data = self._resampler.process(data)
        if self._encode and data:
            data = pcm_to_ulaw(data)
        return bytes(data)

    def flush(self) -> bytes:
        """End of stream: the resampler's delayed tail, in the destination format."""
        if self._resampler is None:
            return b""
        tail = self._resampler.flush()
        return pcm_to_ulaw(tail) if self._encode and tail else tail

    def reset(self) -> None:
        """Barge-in: drop the resampler's history so stale audio never leaks into new audio."""
        if self._resampler is not None:
            self._resampler.reset()


def twilio_to_agent(agent: AudioFormat) -> Converter:
    """Converter for caller audio: Twilio payload bytes -> the agent's format."""
    return Converter(TWILIO_FORMAT, agent)


def agent_to_twilio(agent: AudioFormat) -> Converter:
    """Converter for agent audio: the agent's format -> Twilio payload bytes."""
    return Converter(agent, TWILIO_FORMAT)
