import json

import numpy as np

from audio import read_wav
from bridge.dev.echo_agent import EchoAgent

from .conftest import SAMPLES, TRUTH


def speech() -> bytes:
    pcm, _, _ = read_wav(SAMPLES / "caller_8k.wav")
    return pcm


def feed(agent: EchoAgent, pcm: bytes, chunk: int = 320):
    out = []
    for i in range(0, len(pcm), chunk):
        out += [(i, kind, payload) for kind, payload in agent.hear(pcm[i : i + chunk])]
    return out


def test_plays_back_each_utterance_after_the_caller_stops():
    agent = EchoAgent(8000, end_silence_ms=600)
    pcm = speech() + bytes(16000)
    out = feed(agent, pcm)
    audio = [(i, p) for i, kind, p in out if kind == "audio"]
    # the first utterance is sent back 600 ms after it ended, whole
    first_at = audio[0][0] / 16
    assert abs(first_at - (TRUTH[0][1] + 600)) <= 40
    kinds = [kind for _, kind, _ in out]
    assert kinds.count("clear") == 1  # sentence two started while sentence one was still playing
    updates = [json.loads(p) for _, kind, p in out if kind == "update"]
    assert [u["role"] for u in updates[-1]["transcript"]] == ["user", "agent", "user", "agent"]
    # what is played back is what was heard
    first = b"".join(p for i, p in audio if i / 16 < TRUTH[1][0])
    said = pcm[int(TRUTH[0][0] * 16) : int(TRUTH[0][1] * 16)]
    a, b = np.frombuffer(first, "<i2").astype(float), np.frombuffer(said, "<i2").astype(float)
    n = min(len(a), len(b))
    assert abs(len(a) - len(b)) <= 16 * 40 and np.corrcoef(a[:n], b[:n])[0, 1] > 0.99


def test_keypad_digits_are_reported_and_hash_hangs_up():
    agent = EchoAgent(16000)
    out = agent.dtmf("5")
    assert out[0][0] == "update" and json.loads(out[0][1])["transcript"][-1] == {"role": "user", "content": "<dtmf 5>"}
    assert [kind for kind, _ in agent.dtmf("#")] == ["update", "hangup"]


def test_memory_stays_bounded_on_a_long_call():
    agent = EchoAgent(8000, max_utterance_s=2)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(8000 * 30) * 3000).astype("<i2").tobytes()  # 30 s of "speech"
    feed(agent, noise, 1600)
    assert len(agent._audio) <= 2 * 8000 * 2 + 1600
