"""Voice activity on real speech (espeak-ng, see audio/samples/caller_8k.json)."""

import json
from pathlib import Path

import numpy as np
import pytest

from audio import SPEECH_END, SPEECH_START, VoiceActivityDetector, read_wav

from .signals import to_pcm

SAMPLES = Path(__file__).resolve().parents[2] / "audio" / "samples"
TRUTH = json.loads((SAMPLES / "caller_8k.json").read_text())["speech_ms"]


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    pcm, rate, channels = read_wav(SAMPLES / "caller_8k.wav")
    assert (rate, channels) == (8000, 1)
    # a second of silence after the fixture, so the last turn's end is seen
    return np.concatenate([np.frombuffer(pcm, "<i2").astype(float), np.zeros(8000)])


def detect(x: np.ndarray, chunk_bytes: int = 320, **options) -> list[tuple[str, float]]:
    vad = VoiceActivityDetector(8000, **options)
    pcm = to_pcm(x)
    events = []
    for i in range(0, len(pcm), chunk_bytes):
        events += vad.process(pcm[i : i + chunk_bytes])
    events += vad.finish()
    return [(e.kind, e.at_ms) for e in events]


def assert_turns(events, start_tolerance_ms, end_tolerance_ms):
    assert [k for k, _ in events] == [SPEECH_START, SPEECH_END] * len(TRUTH)
    for (start, end), (_, got_start), (_, got_end) in zip(TRUTH, events[::2], events[1::2]):
        assert abs(got_start - start) <= start_tolerance_ms, (got_start, start)
        assert abs(got_end - end) <= end_tolerance_ms, (got_end, end)


def test_clean_speech_turns_are_found_within_one_frame(speech):
    assert_turns(detect(speech), 20, 20)


@pytest.mark.parametrize("chunk_bytes", [2, 162, 320, 4000])
def test_chunking_does_not_matter(speech, chunk_bytes):
    assert detect(speech, chunk_bytes) == detect(speech)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speech_on_a_noisy_line_with_mains_hum(speech, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(len(speech)) / 8000
    rms = np.sqrt(np.mean(speech[speech != 0] ** 2))
    hiss = rng.standard_normal(len(speech)) * rms / 10  # 20 dB below the speech
    hum = 2000 * np.sin(2 * np.pi * 50 * t)  # -24 dBFS of 50 Hz
    assert_turns(detect(speech + hiss + hum), 160, 160)


@pytest.mark.parametrize("seed", [0, 1])
def test_line_noise_alone_is_not_speech(seed):
    rng = np.random.default_rng(seed)
    t = np.arange(8000 * 6) / 8000
    assert detect(rng.standard_normal(len(t)) * 300) == []  # hiss at -40 dBFS
    assert detect(rng.standard_normal(len(t)) * 30 + 3000 * np.sin(2 * np.pi * 60 * t)) == []  # hum
    clicks = rng.standard_normal(len(t)) * 30
    clicks[rng.integers(0, len(t), 40)] = 20000  # isolated clicks
    assert detect(clicks) == []


def test_end_of_speech_waits_for_the_configured_silence(speech):
    # with 1.2 s required, the 0.9 s pause between the two sentences no longer ends the turn
    events = detect(speech, end_silence_ms=1200)
    assert [k for k, _ in events] == [SPEECH_START, SPEECH_END]
    assert abs(events[1][1] - TRUTH[1][1]) <= 20


def test_detection_comes_after_the_stamped_time(speech):
    vad = VoiceActivityDetector(8000, end_silence_ms=400)
    pcm = to_pcm(speech)
    for i in range(0, len(pcm), 320):
        for event in vad.process(pcm[i : i + 320]):
            if event.kind == SPEECH_END:
                assert vad.time_ms - event.at_ms == pytest.approx(400, abs=20)
            else:
                assert vad.time_ms > event.at_ms


@pytest.mark.parametrize("rate", [16000, 24000])
def test_works_at_other_rates(speech, rate):
    from audio import Resampler

    r = Resampler(8000, rate)
    up = np.frombuffer(r.process(to_pcm(speech)), "<i2").astype(float)
    vad = VoiceActivityDetector(rate)
    events = vad.process(to_pcm(up)) + vad.finish()
    assert [e.kind for e in events] == [SPEECH_START, SPEECH_END] * 2
    assert abs(events[0].at_ms - TRUTH[0][0]) <= 20


@pytest.mark.parametrize(
    "options,match",
    [
        ({"frame_ms": 0}, "frame_ms"),
        ({"end_silence_ms": -5}, "end_silence_ms"),
        ({"start_margin_db": 3, "continue_margin_db": 6}, "hysteresis"),
    ],
)
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        VoiceActivityDetector(8000, **options)


def test_bad_chunks_are_clear_errors():
    vad = VoiceActivityDetector(8000)
    with pytest.raises(ValueError, match="even number"):
        vad.process(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="empty"):
        vad.process(b"")


def bursts(pattern_ms: list[tuple[int, bool]], rate: int = 8000, seed: int = 0) -> np.ndarray:
    """Concatenate silent / loud noise-burst sections (a crude but exact speech stand-in)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.standard_normal(rate * ms // 1000) * (6000 if loud else 0) for ms, loud in pattern_ms])


def test_a_pause_of_exactly_end_silence_stamps_the_next_start_after_the_end():
    x = bursts([(1000, False), (1000, True), (600, False), (1000, True), (1000, False)])
    assert detect(x) == [(SPEECH_START, 1000), (SPEECH_END, 2000), (SPEECH_START, 2600), (SPEECH_END, 3600)]


def test_digital_silence_does_not_make_line_noise_look_like_speech():
    rng = np.random.default_rng(0)
    hiss = rng.standard_normal(8000 * 8) * 300
    dropout = hiss.copy()
    dropout[16000:16320] = 0  # a 40 ms dropout in the middle of a noisy line
    assert detect(dropout) == []
    # noise fading in after digital silence is judged against a quiet line at first: at most one
    # turn, and the 3 s minimum-statistics window ends it
    events = detect(np.concatenate([np.zeros(4000), hiss]))
    assert len(events) == 2 and events[1][1] - events[0][1] <= 3000


def test_speech_right_after_digital_silence_is_caught_at_once(speech):
    assert detect(speech)[0] == (SPEECH_START, 500)  # the fixture starts with 0.5 s of zeros


def test_a_step_in_line_noise_is_absorbed_within_three_seconds():
    rng = np.random.default_rng(1)
    hiss = rng.standard_normal(8000 * 12) * 300
    hiss[8000 * 4 :] *= 4  # +12 dB after 4 s
    events = detect(hiss)
    assert len(events) <= 2 and (not events or events[1][1] - events[0][1] <= 3000)


def test_timestamps_stay_exact_when_a_frame_is_not_a_whole_number_of_ms():
    rate = 11025  # 220 samples a frame: 19.95 ms, not 20
    x = bursts([(60500, False), (1000, True), (1000, False)], rate)
    vad = VoiceActivityDetector(rate)
    events = vad.process(to_pcm(x)) + vad.finish()
    assert events[0].at_ms == pytest.approx(60500, abs=20)
    assert events[1].at_ms == pytest.approx(61500, abs=20)
