"""CallSession, the relay's logic, with no sockets: frames in, frames out."""

import base64
import json

import pytest

from audio import AudioFormat, pcm_to_ulaw
from bridge.protocol import twilio as tf
from bridge.models import DisconnectionReason as R
from bridge.models import Protocol
from bridge.protocol.session import TO_AGENT, TO_TWILIO, CallSession
from tests.audio.signals import tone_pcm

SID = "MZ" + "b" * 32


def media(payload: bytes) -> str:
    return json.dumps({"event": "media", "streamSid": SID, "media": {"payload": base64.b64encode(payload).decode()}})


def tone(rate: int, ms: int, freq: float = 440.0) -> bytes:
    return tone_pcm(rate, ms, freq)


def web(rate: int = 24000, **kw) -> CallSession:
    return CallSession(Protocol.web, AudioFormat("s16le", rate), SID, **kw)


def twilio_frames(actions):
    return [tf.parse(m) for target, m in actions if target == TO_TWILIO]


def test_twilio_audio_reaches_a_web_agent_converted():
    s = web(24000)
    actions = s.from_twilio(media(pcm_to_ulaw(tone(8000, 20))))
    assert [(t, len(m)) for t, m in actions] == [(TO_AGENT, 960)]  # 20 ms of s16le at 24 kHz
    assert s.stats.inbound_frames == 1


def test_agent_audio_of_any_size_goes_out_as_20_ms_frames_with_marks():
    s = web(24000, frame_ms=20, mark_interval_ms=100)
    out = []
    audio = tone(24000, 1000)
    for i in range(0, len(audio), 2 * 7 * 24 + 2):  # odd-sized chunks (~7 ms)
        out += twilio_frames(s.from_agent(audio[i : i + 2 * 7 * 24 + 2]))
    out += twilio_frames(s.flush_agent_audio())
    frames = [f for f in out if type(f) is tf.Media]
    marks = [f for f in out if type(f) is tf.Mark]
    assert all(len(f.payload) == 160 for f in frames[:-1]) and 0 < len(frames[-1].payload) <= 160
    assert sum(len(f.payload) for f in frames) == pytest.approx(8000, abs=16)
    assert [m.name for m in marks] == [f"m{i}" for i in range(1, len(marks) + 1)]
    assert 10 <= len(marks) <= 11  # every 100 ms, and the end of the burst
    assert s.stats.sent_ms == pytest.approx(1000, abs=2)


def test_marks_echoed_by_twilio_say_what_was_played():
    s = web(8000)
    sent = twilio_frames(s.from_agent(tone(8000, 300)))
    names = [f.name for f in sent if type(f) is tf.Mark]
    assert names == ["m1", "m2", "m3"]
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": "m2"}}))
    assert s.stats.played_ms == 200 and s.pending_marks == 1


def test_clear_drops_audio_resets_and_cleared_marks_do_not_count():
    s = web(16000)
    s.from_agent(tone(16000, 230))  # two marks out, 10 ms pending
    assert s.pending_marks == 2
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": "m1"}}))
    assert s.stats.played_ms == 100
    actions = s.from_agent("clear")
    assert twilio_frames(actions) == [tf.Clear()]
    assert s.stats.clears == 1 and s.idle_timeout(0.0) is None and s.pending_marks == 0
    # Twilio echoes m2 because the clear flushed it: it was not heard
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": "m2"}}))
    assert s.stats.played_ms == 100
    # the resampler restarted: new audio after the clear starts from silence, not old history
    fresh = web(16000)
    assert s.from_agent(tone(16000, 40, 300))[0] == fresh.from_agent(tone(16000, 40, 300))[0]


def test_dtmf_reaches_the_agent_in_its_protocol():
    s = web()
    frame = json.dumps({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "4"}})
    assert s.from_twilio(frame) == [(TO_AGENT, '{"event_type":"dtmf","digit":"4"}')]
    t = CallSession(Protocol.twilio, AudioFormat("mulaw", 8000), SID)
    assert t.from_twilio(frame) == [(TO_AGENT, frame)]
    assert s.stats.dtmf == ["4"] == t.stats.dtmf


def test_twilio_protocol_passes_frames_through_both_ways():
    s = CallSession(Protocol.twilio, AudioFormat("mulaw", 8000), SID)
    m = media(b"\x01" * 160)
    assert s.from_twilio(m) == [(TO_AGENT, m)]
    mark = json.dumps({"event": "mark", "mark": {"name": "agent-mark"}})
    assert s.from_twilio(mark) == [(TO_AGENT, mark)]
    for frame in (media(b"\x02" * 320), tf.FrameBuilder(SID).mark("x"), tf.FrameBuilder(SID).clear()):
        assert s.from_agent(frame) == [(TO_TWILIO, frame)]
    assert s.stats.outbound_frames == 1 and s.stats.sent_ms == 40 and s.stats.clears == 1


@pytest.mark.parametrize("frame", [b"\x00binary", "{oops", json.dumps({"event": "stop"}), json.dumps({"event": "start", "start": {"streamSid": "x"}})])
def test_a_twilio_agent_sending_what_twilio_rejects_is_corrupt(frame):
    s = CallSession(Protocol.twilio, AudioFormat("mulaw", 8000), SID)
    assert s.from_agent(frame) == []
    assert s.ending.reason is R.error_llm_websocket_corrupt_payload


def test_endings():
    s = web()
    assert s.from_twilio(json.dumps({"event": "stop", "stop": {}})) == []
    assert s.ending.reason is R.user_hangup
    s.end(R.error_twilio)  # the first reason wins
    assert s.ending.reason is R.user_hangup
    t = CallSession(Protocol.twilio, AudioFormat("mulaw", 8000), SID)
    stop = json.dumps({"event": "stop", "stop": {}})
    assert t.from_twilio(stop) == [(TO_AGENT, stop)]  # the twilio agent is told too
    for bad in ("{oops", json.dumps({"event": "media", "media": {"payload": "@@"}})):
        u = web()
        u.from_twilio(bad)
        assert u.ending.reason is R.error_frontend_corrupted_payload
    v = web()
    v.from_agent("not a protocol message")
    assert v.ending.reason is R.error_llm_websocket_corrupt_payload


def test_a_split_sample_is_carried_to_the_next_chunk():
    s, whole = web(8000), web(8000)
    audio = tone(8000, 60)
    a = twilio_frames(s.from_agent(audio[:161]) + s.from_agent(audio[161:]))
    b = twilio_frames(whole.from_agent(audio))
    assert a == b


def test_ping_pong_measures_the_round_trip_and_updates_keep_the_transcript():
    s = web()
    assert s.ping(10.0) == [(TO_AGENT, "ping")]
    s.from_agent("pong", 10.025)
    assert s.stats.rtt_ms == [pytest.approx(25.0)]
    assert s.from_agent("ping") == [(TO_AGENT, "pong")]
    s.from_agent(json.dumps({"event_type": "update", "transcript": [{"role": "user", "content": "hello"}]}))
    assert s.transcript == [{"role": "user", "content": "hello"}]
    assert CallSession(Protocol.twilio, AudioFormat("mulaw", 8000), SID).ping(1.0) == []


@pytest.mark.parametrize("private", [False, True])
def test_the_log_carries_each_utterance_once_another_follows_it(private):
    """(a live call's page shows the transcript from the log; a private call's never holds it)"""
    from bridge.media.observer import CallObserver

    observer = CallObserver(started=0.0, private=private)
    s = web(observer=observer)

    def update(*turns):
        utterances = [{"role": role, "content": text} for role, text in turns]
        s.from_agent(json.dumps({"event_type": "update", "transcript": utterances}), 1.0)

    update(("agent", "Hel"))
    update(("agent", "Hello, how"))
    update(("agent", "Hello, how can I help?"), ("user", "I'd"))
    update(("agent", "Hello, how can I help?"), ("user", "I'd like a table"), ("agent", "Sure."), ("user", "For"))
    logged = [e for e in observer.events if e["event"] == "transcript"]
    assert [e["utterances"] for e in logged] == [1, 2, 4]
    settled = [u for e in logged for u in e.get("settled", [])]
    if private:
        assert settled == []
    else:
        assert settled == [{"role": "agent", "content": "Hello, how can I help?"}, {"role": "user", "content": "I'd like a table"},
                           {"role": "agent", "content": "Sure."}]  # fmt: skip


def test_after_a_clear_only_audio_the_caller_heard_counts():
    s = web(8000, mark_interval_ms=100)
    s.from_agent(tone(8000, 1000))  # 1 s queued at Twilio, marks m1..m10
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": "m2"}}))  # 200 ms heard
    s.from_agent("clear")  # the other 800 ms are dropped
    names = [f.name for f in twilio_frames(s.from_agent(tone(8000, 100))) if type(f) is tf.Mark]
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": names[-1]}}))
    assert s.stats.played_ms == 300  # 200 before the clear + 100 after, not 1100


def test_the_echo_of_a_mark_a_clear_flushed_leaves_the_marks_sent_after_it():
    """Twilio echoes the marks a clear flushed (they were not heard), possibly after marks sent
    since: such an echo must neither count as heard nor consume the newer marks, whose echoes
    then say what was heard after the clear."""
    s = web(8000, mark_interval_ms=100)
    s.from_agent(tone(8000, 500))  # m1..m5 queued
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": "m1"}}))  # 100 ms heard
    s.from_agent("clear")  # m2..m5 flushed
    names = [f.name for f in twilio_frames(s.from_agent(tone(8000, 300))) if type(f) is tf.Mark]
    assert names == ["m6", "m7", "m8"] and s.pending_marks == 3
    for flushed in ("m2", "m3", "m4", "m5"):  # their echoes, late
        s.from_twilio(json.dumps({"event": "mark", "mark": {"name": flushed}}))
    assert s.stats.played_ms == 100 and s.pending_marks == 3  # nothing heard, nothing consumed
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": "m7"}}))
    assert s.stats.played_ms == 300 and s.pending_marks == 1  # 100 before the clear + 200 after
    s.from_twilio(json.dumps({"event": "mark", "mark": {"name": "m2"}}))  # an echo seen twice: still nothing
    assert s.stats.played_ms == 300 and s.pending_marks == 1


def test_a_fast_agent_gets_whole_frames_and_marks_by_interval():
    """An agent sending faster than real time in odd chunks: the partial frame waits while
    Twilio has audio queued, so every frame is 20 ms; marks come every 100 ms, not per chunk."""
    s = web(24000, mark_interval_ms=100)
    now, frames = 0.0, []
    audio = tone(24000, 2000)
    step = 2 * 24 * 30  # 30 ms chunks, sent every 3 ms (10x real time)
    for i in range(0, len(audio), step):
        frames += twilio_frames(s.from_agent(audio[i : i + step], now))
        now += 0.003
        wait = s.idle_timeout(now)
        assert wait is None or wait > 0.003  # never a flush between chunks
    media = [f for f in frames if type(f) is tf.Media]
    assert {len(f.payload) for f in media} == {160}
    assert len([f for f in frames if type(f) is tf.Mark]) == 20
    # 2 s in 30 ms chunks ends on a frame boundary with its last mark sent: nothing waits
    assert s.idle_timeout(now) is None


def test_a_paused_agent_gets_its_partial_frame_before_twilio_runs_dry():
    s = web(8000)
    s.from_agent(tone(8000, 50), now=0.0)  # 40 ms framed, 10 ms pending
    wait = s.idle_timeout(0.0)
    assert wait == pytest.approx(0.02)  # Twilio has 40 ms queued: flush a frame before it empties
    frames = twilio_frames(s.agent_idle(wait))
    assert [len(f.payload) for f in frames if type(f) is tf.Media] == [80]
    assert s.idle_timeout(wait) == 0.1  # then, after a pause, the mark closing the burst
    assert [type(f) for f in twilio_frames(s.agent_idle(wait + 0.1))] == [tf.Mark]
    assert s.idle_timeout(1.0) is None
