import numpy as np
import pytest

from audio import TWILIO_FORMAT, AudioFormat, agent_to_twilio, pcm_to_ulaw, twilio_to_agent, ulaw_to_pcm

from .signals import from_pcm, to_pcm, tone, tone_snr_db

AGENT_FORMATS = [AudioFormat(e, r) for e in ("s16le", "mulaw") for r in (8000, 16000, 22050, 24000, 44100, 48000)]


def test_twilio_format():
    assert TWILIO_FORMAT == AudioFormat("mulaw", 8000)
    assert TWILIO_FORMAT.bytes_per_sample == 1 and TWILIO_FORMAT.duration_ms(160) == 20


@pytest.mark.parametrize(
    "encoding,rate,match",
    [("pcm", 8000, "encoding must be one of"), ("s16le", 4000, "between 8000"), ("mulaw", 16000.5, "integer")],
)
def test_bad_formats_are_clear_errors(encoding, rate, match):
    with pytest.raises(ValueError, match=match):
        AudioFormat(encoding, rate)


def test_matching_formats_pass_bytes_through():
    c = twilio_to_agent(AudioFormat("mulaw", 8000))
    payload = bytes(range(256))
    assert c.passthrough and c.process(payload) == payload and c.delay_ms == 0
    assert agent_to_twilio(AudioFormat("mulaw", 8000)).process(payload) == payload


def test_s16le_8000_is_only_the_codec():
    payload = pcm_to_ulaw(to_pcm(tone(1000, 8000, 0.02)))
    assert twilio_to_agent(AudioFormat("s16le", 8000)).process(payload) == ulaw_to_pcm(payload)
    pcm = to_pcm(tone(1000, 8000, 0.02))
    assert agent_to_twilio(AudioFormat("s16le", 8000)).process(pcm) == pcm_to_ulaw(pcm)


@pytest.mark.parametrize("agent", AGENT_FORMATS, ids=lambda f: f"{f.encoding}-{f.sample_rate}")
def test_round_trip_through_any_agent_format_keeps_a_tone(agent):
    caller = pcm_to_ulaw(to_pcm(tone(1000, 8000, 1.0, amplitude=12000)))
    inbound, outbound = twilio_to_agent(agent), agent_to_twilio(agent)
    agent_audio = b"".join(inbound.process(caller[i : i + 160]) for i in range(0, len(caller), 160))
    assert len(agent_audio) == agent.bytes_per_sample * agent.sample_rate  # 1 s, steady
    # the agent side sends in other chunk sizes (e.g. 30 ms) and it still comes back whole
    step = int(agent.bytes_per_ms() * 30)
    step += step % 2 if agent.encoding == "s16le" else 0
    back = b"".join(outbound.process(agent_audio[i : i + step]) for i in range(0, len(agent_audio), step))
    assert len(back) == 8000
    y = from_pcm(ulaw_to_pcm(back))[400:]
    # two mu-law quantisations bound this (~38 dB each at this level); resampling adds nothing visible
    assert tone_snr_db(y, 8000, 1000) >= 30
    assert outbound.delay_ms + inbound.delay_ms <= 4.0


def test_reset_drops_history_and_flush_returns_the_tail():
    c = agent_to_twilio(AudioFormat("s16le", 24000))
    c.process(to_pcm(tone(1000, 24000, 0.02)))
    tail = c.flush()
    assert 0 < len(tail) <= 16  # ~1.7 ms at 8 kHz mu-law
    c.process(to_pcm(tone(1000, 24000, 0.02)))
    c.reset()
    assert set(c.process(bytes(960))) == {0xFF}  # digital silence in mu-law


@pytest.mark.parametrize(
    "converter,chunk,match",
    [
        (agent_to_twilio(AudioFormat("s16le", 24000)), b"\x00\x01\x02", "even number of bytes"),
        (agent_to_twilio(AudioFormat("s16le", 8000)), b"\x00", "even number of bytes"),
        (agent_to_twilio(AudioFormat("s16le", 24000)), b"", "empty"),
        (twilio_to_agent(AudioFormat("s16le", 24000)), b"", "empty"),
        (twilio_to_agent(AudioFormat("mulaw", 8000)), b"", "empty"),
    ],
)
def test_bad_chunks_are_clear_errors(converter, chunk, match):
    with pytest.raises(ValueError, match=match):
        converter.process(chunk)


def test_a_bad_chunk_changes_nothing():
    clean, poked = agent_to_twilio(AudioFormat("s16le", 16000)), agent_to_twilio(AudioFormat("s16le", 16000))
    first = to_pcm(tone(500, 16000, 0.011))
    assert clean.process(first) == poked.process(first)
    with pytest.raises(ValueError):
        poked.process(b"\x01\x02\x03")
    rest = to_pcm(tone(500, 16000, 0.04))
    assert clean.process(rest) == poked.process(rest)


def test_mulaw_agent_at_another_rate_is_decoded_resampled_and_encoded():
    agent = AudioFormat("mulaw", 16000)
    c = twilio_to_agent(agent)
    out = c.process(pcm_to_ulaw(to_pcm(tone(800, 8000, 0.5, amplitude=10000))))
    assert len(out) == 8000  # one byte a sample at 16 kHz
    assert tone_snr_db(from_pcm(ulaw_to_pcm(out))[800:], 16000, 800) >= 30
    assert np.isclose(c.delay_ms, 1.65625)
