import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import upfirdn

from audio import Resampler
from audio.filters import prototype

from .signals import band_energy_db, from_pcm, stream, to_pcm, tone, tone_snr_db, total_energy

RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000]
PAIRS = [(a, b) for a, b in itertools.permutations(RATES, 2)]
ODD_PAIRS = [(8001, 47999), (47999, 8001), (12345, 23456), (44100, 44099)]


def reference(in_rate: int, out_rate: int, pcm: bytes) -> np.ndarray:
    """One-shot output of the same filter (scipy's polyphase upfirdn, float64), rounded."""
    proto = prototype(in_rate, out_rate)
    y = upfirdn(proto.taps, from_pcm(pcm), proto.up, proto.down)
    return np.clip(np.rint(y), -32768, 32767)


def expected_total(in_rate: int, out_rate: int, samples: int) -> int:
    proto = prototype(in_rate, out_rate)
    return math.ceil((samples * proto.up + proto.group_delay) / proto.down)


def noise(samples: int, seed: int = 0) -> bytes:
    return to_pcm(np.random.default_rng(seed).standard_normal(samples) * 6000)


def chunked(r: Resampler, pcm: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in itertools.cycle(sizes):
        if i >= len(pcm):
            break
        out.append(r.process(pcm[i : i + 2 * n]))
        i += 2 * n
    return out


@pytest.mark.parametrize("in_rate,out_rate", PAIRS + ODD_PAIRS)
def test_streaming_equals_one_shot_filter_within_one_lsb(in_rate, out_rate):
    pcm = noise(in_rate // 5)
    r = Resampler(in_rate, out_rate)
    y = from_pcm(b"".join(chunked(r, pcm, [1, 7, 160, 13, 441, 2, 999])) + r.flush())
    assert len(y) == expected_total(in_rate, out_rate, len(pcm) // 2)
    ref = reference(in_rate, out_rate, pcm)[: len(y)]
    assert np.abs(y - ref).max() <= 1


@settings(max_examples=60, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    samples=st.integers(1, 6000),
    sizes=st.lists(st.integers(1, 12000), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_any_chunking_gives_the_same_output(pair, samples, sizes, seed):
    in_rate, out_rate = pair
    pcm = noise(samples, seed)
    whole = Resampler(in_rate, out_rate)
    one_shot = from_pcm(whole.process(pcm) + whole.flush())
    r = Resampler(in_rate, out_rate)
    pieces = chunked(r, pcm, sizes)
    streamed = from_pcm(b"".join(pieces) + r.flush())
    assert len(streamed) == len(one_shot) == expected_total(in_rate, out_rate, samples)
    assert np.abs(streamed - one_shot).max(initial=0) <= 1


@settings(max_examples=40, deadline=None)
@given(pair=st.sampled_from(PAIRS + ODD_PAIRS), sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=20))
def test_each_chunk_yields_its_share_at_once(pair, sizes):
    """After n input samples exactly ceil(n * out / in) samples have come out: no bursts."""
    in_rate, out_rate = pair
    r = Resampler(in_rate, out_rate)
    fed = produced = 0
    for n in sizes:
        produced += len(r.process(bytes(2 * n))) // 2
        fed += n
        assert produced == -(-fed * out_rate // in_rate)
        assert abs(produced - fed * out_rate / in_rate) < 1


@pytest.mark.parametrize("in_rate,out_rate", PAIRS + ODD_PAIRS)
def test_delay_is_at_most_two_ms(in_rate, out_rate):
    assert 0 < Resampler(in_rate, out_rate).delay_ms <= 2.0


def test_delay_is_what_a_tone_shows():
    """An upsampled tone lags the input by delay_ms (fit the phase of the output)."""
    r = Resampler(8000, 48000)
    x = tone(250, 8000, 0.5)  # a 4 ms period: the phase tells a 0-4 ms lag unambiguously
    y = from_pcm(r.process(to_pcm(x)))[4800:]  # skip the start-up
    t = (np.arange(len(y)) + 4800) / 48000
    basis = np.column_stack([np.sin(2 * np.pi * 250 * t), np.cos(2 * np.pi * 250 * t)])
    (s, c), *_ = np.linalg.lstsq(basis, y, rcond=None)
    lag_ms = -np.arctan2(c, s) / (2 * np.pi * 250) * 1000 % 4.0
    assert abs(lag_ms - r.delay_ms) < 0.01


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_equal_rates_pass_through_untouched(rate):
    r = Resampler(rate, rate)
    pcm = noise(333)
    assert r.process(pcm) == pcm
    assert r.flush() == b"" and r.delay_ms == 0 and r.passthrough


@pytest.mark.parametrize("in_rate,out_rate", PAIRS + ODD_PAIRS)
def test_state_stays_under_16_kib_whatever_the_chunk(in_rate, out_rate):
    r = Resampler(in_rate, out_rate)
    for samples in (1, in_rate // 50, in_rate // 4, in_rate * 3):
        r.process(bytes(2 * samples))
        assert r.state_bytes <= 16 * 1024


def test_reset_forgets_history():
    r = Resampler(8000, 24000)
    r.process(to_pcm(tone(1000, 8000, 0.1)))
    r.reset()
    assert r.process(bytes(320)) == bytes(2 * 480)


def test_flush_returns_the_delayed_tail_and_resets():
    r = Resampler(48000, 8000)
    r.process(to_pcm(tone(440, 48000, 0.02)))
    tail = r.flush()
    assert 0 < len(tail) // 2 <= math.ceil(r.delay_ms * 8) + 1
    assert from_pcm(tail).any()  # the last 1.6 ms of the tone
    assert r.process(bytes(96)) == bytes(2 * 8)  # fresh state afterwards


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("freq", [1000, 3000])
def test_tones_come_through_clean_both_ways(rate, freq):
    for a, b in ((8000, rate), (rate, 8000)):
        y = from_pcm(stream(Resampler(a, b), to_pcm(tone(freq, a, 1.0)), 2 * (a // 50)))
        assert tone_snr_db(y[b // 10 :], b, freq) >= 60


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100, 48000])
def test_images_above_4600_hz_are_60_db_down(rate):
    for freq in (300, 1000, 2500, 3400):
        y = from_pcm(stream(Resampler(8000, rate), to_pcm(tone(freq, 8000, 1.0)), 320))[rate // 10 :]
        assert band_energy_db(y, rate, 4600, rate / 2, total_energy(y)) <= -60


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100, 48000])
def test_content_above_4600_hz_does_not_fold_into_the_telephone_band(rate):
    for freq in np.linspace(4600, rate / 2 - 200, 6):
        x = tone(freq, rate, 1.0)
        y = from_pcm(stream(Resampler(rate, 8000), to_pcm(x), 2 * (rate // 50)))[800:]
        reference = total_energy(x[: len(y) * rate // 8000]) * 8000 / rate
        assert band_energy_db(y, 8000, 0, 3400, reference) <= -60, freq


def test_passband_is_flat_within_0_1_db():
    for rate in (16000, 44100, 48000):
        for a, b in ((8000, rate), (rate, 8000)):
            gains = []
            for freq in (100, 500, 1000, 2000, 3000, 3400):
                y = from_pcm(stream(Resampler(a, b), to_pcm(tone(freq, a, 0.5)), 2 * (a // 50)))[b // 20 :]
                gains.append(20 * np.log10(np.sqrt(2 * np.mean(y**2)) / 16000))
            assert max(gains) - min(gains) <= 0.1 and max(abs(g) for g in gains) <= 0.1


@pytest.mark.parametrize(
    "rates,match",
    [
        ((7999, 8000), "in_rate must be between 8000 and 48000"),
        ((8000, 48001), "out_rate must be between"),
        ((16000.0, 8000), "in_rate must be an integer"),
        ((8000, "16000"), "out_rate must be an integer"),
        ((True, 8000), "in_rate must be an integer"),
    ],
)
def test_bad_rates_are_clear_errors(rates, match):
    with pytest.raises(ValueError, match=match):
        Resampler(*rates)


@pytest.mark.parametrize(
    "chunk,error,match",
    [
        (b"\x01\x02\x03", ValueError, "even number of bytes"),
        (b"", ValueError, "empty"),
        ("text", TypeError, "bytes-like"),
        (None, TypeError, "bytes-like"),
    ],
)
def test_bad_chunks_are_clear_errors_and_change_nothing(chunk, error, match):
    clean, poked = Resampler(8000, 44100), Resampler(8000, 44100)
    first = to_pcm(tone(700, 8000, 0.013))
    assert clean.process(first) == poked.process(first)
    with pytest.raises(error, match=match):
        poked.process(chunk)
    rest = to_pcm(tone(900, 8000, 0.05))
    assert clean.process(rest) == poked.process(rest)
    assert clean.flush() == poked.flush()


def test_accepts_any_bytes_like():
    pcm = noise(200)
    ref = Resampler(16000, 8000).process(pcm)
    assert Resampler(16000, 8000).process(bytearray(pcm)) == ref
    assert Resampler(16000, 8000).process(memoryview(pcm)) == ref
    assert Resampler(16000, 8000).process(np.frombuffer(pcm, "<i2")) == ref


def test_full_scale_input_saturates_instead_of_wrapping():
    square = np.where(tone(500, 8000, 0.2) >= 0, 32767.0, -32768.0)
    y = from_pcm(stream(Resampler(8000, 48000), to_pcm(square), 320))
    # Gibbs overshoot is clipped at full scale; a wrap-around would flip sign next to a peak
    assert y.max() == 32767 and y.min() == -32768
    assert np.abs(np.diff(y)).max() < 20000


def test_filters_are_shared_between_streams():
    a, b = Resampler(8000, 24000), Resampler(8000, 24000)
    assert a._plan is b._plan


def test_flush_with_nothing_fed_returns_nothing():
    r = Resampler(8000, 48000)
    assert r.flush() == b""  # fresh
    r.process(bytes(320))
    assert r.flush() != b""
    assert r.flush() == b""  # twice
    r.process(bytes(320))
    r.reset()
    assert r.flush() == b""  # after a reset
