"""DTMF: the keypad's tone pairs, made and found (sans-I/O).

``tones(digits, rate)``: standard tone pairs (rows 697, 770, 852, 941 Hz; columns 1209, 1336,
1477, 1633 Hz), ``TONE_MS`` each with a ``GAP_MS`` gap, ``w`` a half-second pause, as s16le.
``detect(pcm, rate)``: the digits a stretch of s16le audio holds, with their frequencies, start
and duration, by Goertzel-style single-frequency filters on 20 ms blocks every 10 ms (the simulated caller's ear in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROWS = (697.0, 770.0, 852.0, 941.0)
COLUMNS = (1209.0, 1336.0, 1477.0, 1633.0)
KEYS = ("123A", "456B", "789C", "*0#D")
DIGITS = {key: (ROWS[r], COLUMNS[c]) for r, row in enumerate(KEYS) for c, key in enumerate(row)}
TONE_MS = 100
GAP_MS = 80
PAUSE_MS = 500  # a "w"
AMPLITUDE = 0.35  # of full scale, each of the pair (-9 dBFS each: loud, never clipping)
VALID = set(DIGITS) | {"w"}


def tones(digits: str, rate: int = 8000, tone_ms: int = TONE_MS, gap_ms: int = GAP_MS) -> bytes:
    """The tone pairs of ``digits`` (0-9, *, #, A-D; ``w`` pauses), as s16le at ``rate``."""
    if bad := set(digits) - VALID:
        raise ValueError(f"not keypad digits: {''.join(sorted(bad))!r}")
    parts = []
    n_tone, n_gap, n_pause = rate * tone_ms // 1000, rate * gap_ms // 1000, rate * PAUSE_MS // 1000
    t = np.arange(n_tone) / rate
    ramp = np.minimum(1.0, np.minimum(np.arange(n_tone), np.arange(n_tone)[::-1]) / max(1, rate // 1000 * 5))  # 5 ms edges
    for digit in digits:
        if digit == "w":
            parts.append(np.zeros(n_pause))
            continue
        low, high = DIGITS[digit]
        parts.append((np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t)) * AMPLITUDE * ramp)
        parts.append(np.zeros(n_gap))
    signal = np.concatenate(parts) if parts else np.zeros(0)
    return (signal * 32767).astype("<i2").tobytes()


@dataclass(frozen=True)
class Press:
    digit: str
    start_ms: float
    duration_ms: float
    low_hz: float
    high_hz: float


def _powers(blocks: np.ndarray, freqs: tuple[float, ...], rate: int) -> np.ndarray:
    """The power of each of ``freqs`` in each block (rows): what a Goertzel filter gives, as one
    matrix product with the frequencies' complex exponentials."""
    n = blocks.shape[1]
    basis = np.exp(-2j * np.pi * np.outer(np.arange(n), freqs) / rate)
    return np.abs(blocks @ basis) ** 2


def detect(pcm: bytes, rate: int = 8000, block_ms: int = 20, hop_ms: int = 10, min_ms: int = 40) -> list[Press]:
    """The keypad presses in ``pcm`` (s16le): for each 20 ms block (Hann-windowed, every 10 ms),
    the strongest row and column frequencies, taken when both stand out (6 dB over the other
    rows / columns, the pair within 8 dB of each other, and most of the block's energy); a
    digit held ``min_ms`` is a press, timed to the 10 ms."""
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2").astype(np.float64) / 32768
    n, hop = rate * block_ms // 1000, rate * hop_ms // 1000
    if len(x) < n:
        return []
    starts = np.arange(0, len(x) - n + 1, hop)
    blocks = x[starts[:, None] + np.arange(n)] * np.hanning(n)
    energy = np.einsum("ij,ij->i", blocks, blocks) * n / 2
    rows, cols = _powers(blocks, ROWS, rate), _powers(blocks, COLUMNS, rate)
    r, c = rows.argmax(axis=1), cols.argmax(axis=1)
    best_r, best_c = rows.max(axis=1), cols.max(axis=1)
    others_r = np.sort(rows, axis=1)[:, -2]
    others_c = np.sort(cols, axis=1)[:, -2]
    ratio = best_r / np.maximum(best_c, 1e-12)
    is_digit = (
        (energy > 1e-4 * n) & (best_r > 4 * others_r) & (best_c > 4 * others_c)
        & (ratio > 1 / 6.3) & (ratio < 6.3) & (best_r + best_c > 0.5 * energy)
    )  # fmt: skip
    found: list[Press] = []
    current, since = None, 0

    def press(digit: str, until: int) -> None:
        if (until - since) * 1000 / rate >= min_ms:
            low, high = DIGITS[digit]
            found.append(Press(digit, since * 1000 / rate, (until - since) * 1000 / rate, low, high))

    for i, start in enumerate(starts):
        digit = KEYS[r[i]][c[i]] if is_digit[i] else None
        centre = int(start) + n // 2 - hop // 2  # (the block stands for the 10 ms at its middle)
        if digit != current:
            if current is not None:
                press(current, centre)
            current, since = digit, centre
    if current is not None:
        press(current, len(x) - n // 2 + hop // 2)
    return found
