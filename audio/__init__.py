"""Sans-I/O audio core of the bridge: G.711, streaming resampling, format conversion,
voice activity detection and WAV recording. No sockets, no asyncio."""

from .convert import (
    ENCODINGS,
    MULAW,
    S16LE,
    TWILIO_FORMAT,
    AudioFormat,
    Converter,
    agent_to_twilio,
    twilio_to_agent,
)
from .g711 import pcm_to_ulaw, ulaw_to_pcm
from .resample import Resampler
from .vad import SPEECH_END, SPEECH_START, VadEvent, VoiceActivityDetector
from .wav import LEFT, RIGHT, StereoWavWriter, read_wav, repair_wav, write_wav

__all__ = [
    "ENCODINGS", "MULAW", "S16LE", "TWILIO_FORMAT", "AudioFormat", "Converter", "agent_to_twilio",
    "twilio_to_agent", "pcm_to_ulaw", "ulaw_to_pcm", "Resampler", "SPEECH_END", "SPEECH_START",
    "VadEvent", "VoiceActivityDetector", "LEFT", "RIGHT", "StereoWavWriter", "read_wav",
    "repair_wav", "write_wav",
]  # fmt: skip
