"""DTMF tones made and found: every key's standard pair, the timing of presses and pauses, and
no false presses in speech-like sound, noise, or a single tone."""

import numpy as np
import pytest

from audio.dtmf import COLUMNS, DIGITS, GAP_MS, PAUSE_MS, ROWS, TONE_MS, detect, tones
from tests.audio.signals import tone_pcm


def test_every_key_is_its_standard_pair_and_is_found_again():
    digits = "123A456B789C*0#D"
    pcm = tones(digits)
    assert len(pcm) == 2 * 8 * (TONE_MS + GAP_MS) * len(digits)
    presses = detect(pcm)
    assert "".join(p.digit for p in presses) == digits
    for i, p in enumerate(presses):
        assert (p.low_hz, p.high_hz) == DIGITS[p.digit] and p.low_hz in ROWS and p.high_hz in COLUMNS
        assert abs(p.start_ms - i * (TONE_MS + GAP_MS)) <= 15, p
        assert abs(p.duration_ms - TONE_MS) <= 25, p


def test_the_spectrum_of_a_tone_is_exactly_its_two_frequencies():
    x = np.frombuffer(tones("5", tone_ms=1000, gap_ms=0), "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(x))
    top_two = sorted(np.argsort(spectrum)[-2:] * 8000 / len(x))
    assert [round(f) for f in top_two] == [770, 1336]
    assert np.abs(x).max() < 32767  # never clipping


def test_a_w_is_a_half_second_pause():
    presses = detect(tones("1w1"))
    assert [p.digit for p in presses] == ["1", "1"]
    assert abs(presses[1].start_ms - presses[0].start_ms - (TONE_MS + GAP_MS + PAUSE_MS)) <= 15


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_tones_at_other_rates_are_found(rate):
    assert [p.digit for p in detect(tones("9#", rate), rate)] == ["9", "#"]


def test_noise_a_lone_tone_and_silence_hold_no_press():
    rng = np.random.default_rng(7)
    noise = (rng.normal(0, 3000, 8000 * 3)).astype("<i2").tobytes()
    assert detect(noise) == []
    assert detect(tone_pcm(8000, 2000, 697)) == []  # a row frequency alone
    assert detect(tone_pcm(8000, 2000, 1000)) == []
    assert detect(bytes(16000)) == [] and detect(b"") == [] and detect(b"\x01") == []


def test_a_press_under_noise_is_still_found():
    rng = np.random.default_rng(3)
    x = np.frombuffer(tones("7"), "<i2").astype(float) + rng.normal(0, 1500, len(tones("7")) // 2)
    assert [p.digit for p in detect(np.clip(x, -32768, 32767).astype("<i2").tobytes())] == ["7"]


def test_what_is_not_a_key_is_refused():
    with pytest.raises(ValueError, match="not keypad digits"):
        tones("12x")
