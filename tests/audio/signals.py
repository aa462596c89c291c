"""Test signals and measurements shared by the audio and bridge tests."""

import numpy as np


def tone(freq: float, rate: int, seconds: float, amplitude: float = 16000.0, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t + phase)


def to_pcm(x: np.ndarray) -> bytes:
    return np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()


def from_pcm(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, "<i2").astype(np.float64)


def tone_snr_db(y: np.ndarray, rate: int, freq: float) -> float:
    """Signal to noise+distortion of a tone: least-squares fit of the tone (any phase, any delay)
    and the power of what is left."""
    t = np.arange(len(y)) / rate
    basis = np.column_stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)])
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    fitted = basis @ coef
    return 10 * np.log10(np.sum(fitted**2) / np.sum((y - fitted) ** 2))


def band_energy_db(y: np.ndarray, rate: int, lo: float, hi: float, reference: float) -> float:
    """Energy of ``y`` between ``lo`` and ``hi`` Hz (Blackman-Harris window) relative to
    ``reference`` (a total energy measured the same way), in dB."""
    w = np.blackman(len(y))
    spectrum = np.abs(np.fft.rfft(y * w)) ** 2
    f = np.fft.rfftfreq(len(y), 1 / rate)
    band = spectrum[(f >= lo) & (f <= hi)].sum()
    return 10 * np.log10(max(band, 1e-30) / reference)


def total_energy(y: np.ndarray) -> float:
    w = np.blackman(len(y))
    return float((np.abs(np.fft.rfft(y * w)) ** 2).sum())


def stream(processor, pcm: bytes, chunk_bytes: int) -> bytes:
    return b"".join(processor.process(pcm[i : i + chunk_bytes]) for i in range(0, len(pcm), chunk_bytes))


def tone_pcm(rate: int, ms: float, freq: float = 440.0, amplitude: float = 8000.0) -> bytes:
    """``ms`` of a sine tone as s16le bytes at ``rate``."""
    return to_pcm(tone(freq, rate, ms / 1000, amplitude))
