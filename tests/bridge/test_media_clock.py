"""The caller's audio on Twilio's own clock (``bridge.protocol.media_clock``): placed at each
frame's ``timestamp``, whatever the network did on the way; turn latency as the caller lived it;
the network's health on the record.

Sans-I/O first (the clock, then the observer fed frames with the arrival times a stall makes),
then end to end: the Twilio simulator's ``Network`` stalls, delays, drops, duplicates and
reorders the caller's frames (seeded) on their way to a real bridge over loopback."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from audio import read_wav
from bridge.dev.echo_agent import EchoAgent
from bridge.dev.simulator import Network, simulate_call
from bridge.media.observer import CallObserver, Recording
from bridge.protocol.media_clock import STALL_NOTE_S, MediaClock
from bridge.settings import AgentConfig

from .test_metrics import scrape
from .conftest import AUTH_TOKEN, TRUTH, api_client, best_correlation, caller_audio, envelope_ms, wait_for_end

RATE = 8000
FRAME = 160  # samples: 20 ms


# --- the clock ---------------------------------------------------------------------------------


def test_frames_go_at_their_timestamps_however_late_they_arrive():
    clock = MediaClock()
    # 2 s of frames; those from 1.0 s to 1.6 s arrive together at 1.62 s (a stall and its burst)
    positions = []
    for n in range(100):
        ts = n * 20
        arrival = 1.62 if 1000 <= ts < 1600 else (ts + 20) / 1000
        positions.append(clock.place(FRAME, ts, n + 1, arrival))
    assert positions == [n * FRAME for n in range(100)]
    summary = clock.summary()
    assert summary["clock"] == "twilio" and summary["frames"] == 100 and summary["frames_lost"] == 0
    assert summary["stalls"] == 1 and summary["longest_stall_ms"] == pytest.approx(620, abs=1)
    assert summary["late_bursts"] == 1
    assert summary["inbound_delay_ms"]["max"] == pytest.approx(600, abs=1) and summary["inbound_delay_ms"]["p50"] == 0
    assert clock.stall_ended == (pytest.approx(0.62), 1000 * 8)


def test_lost_duplicated_and_reordered_frames_are_counted_exactly():
    clock = MediaClock()
    order = [1, 2, 4, 3, 3, 5, 8, 9, 9, 10, 6]  # 7 never comes; 3 and 6 late; 3 and 9 twice
    placed: dict[int, int | None] = {}
    for c in order:
        placed.setdefault(c, clock.place(FRAME, (c - 1) * 20, c, c * 0.02))
    assert placed[3] == 2 * FRAME and placed[6] == 5 * FRAME  # (where they belong)
    s = clock.summary()
    assert (s["frames"], s["frames_lost"], s["frames_duplicated"], s["frames_reordered"]) == (9, 1, 2, 2)


def test_a_duplicate_returns_nothing_to_place():
    clock = MediaClock()
    assert clock.place(FRAME, 0, 1, 0.02) == 0
    assert clock.place(FRAME, 0, 1, 0.03) is None


def test_timestamps_from_the_future_are_not_trusted_and_the_arrival_clock_takes_over():
    clock = MediaClock()
    assert clock.place(FRAME, 0, 1, 0.02) == 0
    assert clock.place(FRAME, 999_999, 2, 0.04) == FRAME  # (contiguous, by arrival)
    assert clock.summary()["clock"] == "arrival"


def test_a_bridge_that_took_the_stream_up_late_still_keeps_twilio_s_clock():
    clock = MediaClock()  # the bridge read start 1.5 s after Twilio began: frames come "early"
    positions = [clock.place(FRAME, n * 20, n + 1, (n * 20 + 20) / 1000 - 1.5) for n in range(100, 200)]
    assert positions == [n * FRAME for n in range(100, 200)] and clock.summary()["clock"] == "twilio"
    assert clock.to_bridge(3000) == pytest.approx(1.5)  # (its 3 s said at 1.5 s on the bridge's clock)


def test_audio_said_before_the_call_was_set_up_is_a_backlog_not_a_network_stall():
    clock = MediaClock()
    clock.reading(backlog=True)  # the agent took 1.5 s to connect; 75 frames waited, read at once
    for n in range(75):
        clock.place(FRAME, n * 20, n + 1, 1.5)
    clock.reading(backlog=False)
    for n in range(75, 150):
        clock.place(FRAME, n * 20, n + 1, (n * 20 + 20) / 1000)
    s = clock.summary()
    assert s["setup_backlog_ms"] == 1500 and s["stalls"] == 0 and s["late_bursts"] == 0
    assert s["inbound_delay_ms"]["max"] == 0


def test_figures_stay_bounded_over_a_long_call():
    clock = MediaClock()
    rng = np.random.default_rng(1)
    for n in range(180_000):  # an hour of frames, with jitter up to 3 s
        clock.place(FRAME, n * 20, n + 1, (n * 20 + 20) / 1000 + float(rng.random()) * 3)
    assert len(clock._delays) < 2000 and len(clock._seen) <= 512
    assert 2900 < clock.summary()["inbound_delay_ms"]["max"] <= 3000


# --- the observer on the clock -----------------------------------------------------------------


class Tap:
    """A live listener's share of the call: what it is handed, where."""

    listeners = True

    def __init__(self):
        self.caller: list[tuple[int, int]] = []  # (position, samples)

    def audio(self, channel, pcm, position):
        if channel == 0:
            self.caller.append((position, len(pcm) // 2))

    def clear(self, position):
        pass


def _voice(ms: int, hz: float = 300.0) -> bytes:
    t = np.arange(ms * 8) / RATE
    return (np.sin(2 * np.pi * hz * t) * 8000).astype("<i2").tobytes()


def _frames(pcm: bytes) -> list[bytes]:
    from audio import pcm_to_ulaw

    ulaw = pcm_to_ulaw(pcm)
    return [ulaw[i : i + FRAME] for i in range(0, len(ulaw), FRAME)]


def test_after_a_stall_the_recording_listeners_and_turn_latency_follow_twilio_s_clock(tmp_path):
    # the caller speaks 0.5-2.0 s, then is silent; the network stalls from 1.5 s to 3.5 s, so the
    # end of speech reaches the bridge 1.5 s late; the agent answers 400 ms after it got it
    speech = bytes(8000) + _voice(1500) + bytes(16000 * 2)
    frames = _frames(speech)
    tap = Tap()
    observer = CallObserver(started=100.0, recording=Recording(tmp_path / "r.wav"), clock=MediaClock(), tap=tap)
    answered = False
    for n, frame in enumerate(frames):
        ts = n * 20
        arrival = 100.0 + (3.5 if 1500 <= ts < 3500 else (ts + 20) / 1000)
        observer.caller_audio(frame, arrival, ts, n + 1)
        if not answered and observer._turn_end is not None:  # the bridge has the end of speech
            answered = True
            reply_at = arrival + 0.4
    assert answered
    observer.agent_audio(bytes([0x80]) * 800, reply_at)  # (mu-law: loud)
    observer.close()
    # the caller's side: the voice exactly where it was said, the recording as long as the call
    pcm, rate, channels = read_wav(tmp_path / "r.wav")
    left = np.frombuffer(pcm, "<i2").reshape(-1, 2)[:, 0].astype(float)
    assert len(left) == len(speech) // 2
    loud = np.flatnonzero(np.abs(left) > 2000)
    assert abs(loud[0] - 4000) <= 8 and abs(loud[-1] - 16000) <= 8
    # the listeners were handed each frame at its own place
    assert tap.caller == [(n * FRAME, FRAME) for n in range(len(frames))]
    # the turn: the caller waited from 2.0 s to the reply; the agent's own part was 0.4 s
    (turn,) = [e for e in observer.events if e["event"] == "turn"]
    waited = (reply_at - 100.0 - 2.0) * 1000
    assert abs(observer.turn_latencies_ms[0] - waited) <= 50, (observer.turn_latencies_ms, waited)
    assert abs(observer.agent_latencies_ms[0] - 400) <= 30
    assert turn["agent_latency_ms"] == pytest.approx(observer.agent_latencies_ms[0], abs=0.1)
    (stall,) = [e for e in observer.events if e["event"] == "caller_stall"]
    assert stall["ms"] >= 2000 - 30 and stall["at_ms"] == 1500


def test_a_frame_too_late_for_its_place_is_counted_not_written_elsewhere(tmp_path):
    observer = CallObserver(started=0.0, recording=Recording(tmp_path / "r.wav"), clock=MediaClock())
    frames = _frames(_voice(2000))
    for n, frame in enumerate(frames):
        if n != 3:
            observer.caller_audio(frame, (n + 1) * 0.02, n * 20, n + 1)
    observer.caller_audio(frames[3], 2.0, 60, 4)  # 1.9 s late: its 20 ms are written (silence) by now
    observer.close()
    assert observer.clock.too_late == 1
    pcm, _, _ = read_wav(tmp_path / "r.wav")
    assert len(pcm) // 4 == 2000 * 8


def test_turns_answered_late_or_not_at_all_are_neither_merged_nor_dropped():
    observer = CallObserver(started=0.0, clock=MediaClock())
    # two turns (0.2-1.0 s, 2.0-2.8 s), all of it arriving at once at 3.5 s (a set-up backlog);
    # the agent's replies were heard at 1.5 s (to the first) and 3.6 s (to the second)
    speech = bytes(3200) + _voice(800) + bytes(16000) + _voice(800, 400) + bytes(8000 * 4)
    frames = _frames(speech)
    observer.agent_audio(bytes([0x80]) * 400, 1.5)
    for n, frame in enumerate(frames[:175]):
        observer.caller_audio(frame, 3.5, n * 20, n + 1)
    observer.agent_audio(bytes([0x80]) * 400, 3.6)
    for n, frame in enumerate(frames[175:], 175):
        observer.caller_audio(frame, (n * 20 + 20) / 1000, n * 20, n + 1)
    observer.close()
    assert len(observer.turn_latencies_ms) == 2, observer.turn_latencies_ms
    assert abs(observer.turn_latencies_ms[0] - 500) <= 50 and abs(observer.turn_latencies_ms[1] - 800) <= 50


# --- end to end ----------------------------------------------------------------------------------


def _caller_channel(wav: bytes, tmp_path) -> np.ndarray:
    path = tmp_path / "rec.wav"
    path.write_bytes(wav)
    pcm, rate, channels = read_wav(path)
    assert (rate, channels) == (8000, 2)
    return np.frombuffer(pcm, "<i2").reshape(-1, 2)[:, 0].copy()


async def _recording(bridge, record) -> bytes:
    async with api_client(bridge.base_url) as http:
        r = await http.get(record.recording_url)
    assert r.status_code == 200
    return r.content


def _offsets_ms(left: np.ndarray, said: bytes) -> list[float]:
    """Where 400 ms pieces of what the caller said are found in the caller channel, against
    where they were said (ms): 0 when every piece is at its timestamp."""
    offsets = []
    for start_ms in (600, 1500, 2500, 3200):
        piece = said[start_ms * 16 : (start_ms + 400) * 16]
        corr, lag = best_correlation(left.tobytes(), piece)
        assert corr > 0.9, (start_ms, corr)
        offsets.append(lag / 8 - start_ms)
    return offsets


def _lived_ms(result) -> float:
    """The turn as the simulated caller lived it: from the end of its speech to the first agent
    audio it heard after that."""
    heard = [span for span in envelope_ms(result.heard) if span[0] >= TRUTH[0][1]]
    return heard[0][0] - TRUTH[0][1]


@pytest.mark.parametrize("network", [
    Network(stalls=((3000, 2000),)),  # 2 s without a frame, across the end of speech
    Network(jitter_ms=80, seed=3),
], ids=["stall", "jitter"])  # fmt: skip
async def test_the_recording_and_turn_latency_hold_through_a_stall_or_jitter(bridge, tmp_path, network):
    said = caller_audio()
    result = await simulate_call(bridge.base_url, AUTH_TOKEN, said, speed=1.0, tail_ms=5000, fake_api=bridge.fake, network=network)
    assert result.protocol_errors == [] and result.ended_by == "caller", result.summary()
    record = await wait_for_end(bridge, result.call_id)
    left = _caller_channel(await _recording(bridge, record), tmp_path)
    offsets = _offsets_ms(left, said)
    assert max(abs(o) for o in offsets) <= 20, offsets
    assert abs(len(left) / 8 - result.sent_ms) <= 40, (len(left) / 8, result.sent_ms)  # as long as the call
    lived, recorded = _lived_ms(result), record.e2e_latency.max
    assert record.e2e_latency.num == 1 and abs(recorded - lived) <= 50, (recorded, lived)
    net = record.caller_network
    assert net["frames"] == result.sent_ms // 20 and net["frames_lost"] == 0 and net["frames_too_late"] == 0
    if network.stalls:
        assert net["stalls"] == 1 and 1950 <= net["longest_stall_ms"] <= 2300 and net["late_bursts"] == 1
        assert 1950 <= net["inbound_delay_ms"]["max"] <= 2300
        # the agent answered at once: what the caller waited was the network's (the stall from 3000
        # to 5000 ms held the end of speech, at 3675 ms, back 1.3 s)
        assert record.agent_latency.max < 200 and recorded - record.agent_latency.max >= 5000 - TRUTH[0][1] - 50
        async with api_client(bridge.base_url) as http:
            log = [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]
        (stall,) = [e for e in log if e["event"] == "caller_stall"]
        assert stall["at_ms"] == 3000 and stall["ms"] >= STALL_NOTE_S * 1000
    else:
        assert net["stalls"] == 0 and net["inbound_delay_ms"]["p99"] <= 120
    print(f"\n{'stall' if network.stalls else 'jitter'}: caller offsets {offsets} ms; turn recorded {recorded} ms, lived {lived} ms; {net}")


async def test_lost_duplicated_and_reordered_frames_are_counted_exactly_end_to_end(bridge):
    network = Network(drop=0.03, duplicate=0.03, reorder=0.03, seed=11)
    result = await simulate_call(bridge.base_url, AUTH_TOKEN, caller_audio(), speed=1.0, tail_ms=2000, fake_api=bridge.fake, network=network)
    assert result.chunks_dropped and result.chunks_duplicated and result.chunks_reordered
    record = await wait_for_end(bridge, result.call_id)
    net = record.caller_network
    assert net["frames_lost"] == len(result.chunks_dropped)
    assert net["frames_duplicated"] == len(result.chunks_duplicated)
    assert net["frames_reordered"] == len(result.chunks_reordered) and net["frames_too_late"] == 0
    assert net["frames"] == result.sent_ms // 20 - len(result.chunks_dropped)
    metrics = await scrape(bridge)  # and the operator's view: /metrics counts the same frames
    assert metrics[("bridge_caller_frames_lost_total", ())] == len(result.chunks_dropped)
    assert metrics[("bridge_caller_inbound_delay_p99_seconds_count", ())] == 1
    assert metrics[("bridge_agent_latency_seconds_count", ())] == record.agent_latency.num


@pytest.fixture
async def slow_echo():
    """A web-protocol echo agent that takes 1.5 s to accept its websocket: the caller's first
    words wait in a backlog the bridge reads at once when the call is set up."""

    async def slow(connection, request):
        await asyncio.sleep(1.5)

    async def handle(ws):
        echo = EchoAgent(24000)
        async for message in ws:
            if isinstance(message, bytes):
                for kind, data in echo.hear(message):
                    if kind == "audio":
                        await ws.send(data)

    server = await websockets.serve(handle, "127.0.0.1", 0, process_request=slow)
    yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/{{call_id}}"
    server.close()
    await server.wait_closed()


async def test_a_set_up_backlog_and_calls_started_together_count_in_full(start_bridge, slow_echo):
    agents = {"slow": AgentConfig(agent_id="slow", url=slow_echo, default=True)}
    bridge = await start_bridge(agents=agents)
    said = caller_audio()
    results = await asyncio.gather(*[
        simulate_call(bridge.base_url, AUTH_TOKEN, said, speed=1.0, tail_ms=4000, fake_api=bridge.fake) for _ in range(10)
    ])  # fmt: skip
    for result in results:
        assert result.protocol_errors == [], result.summary()
        record = await wait_for_end(bridge, result.call_id)
        lived, recorded = _lived_ms(result), record.e2e_latency
        assert recorded is not None and recorded.num == 1 and abs(recorded.max - lived) <= 50, (recorded, lived)
        assert record.caller_network["setup_backlog_ms"] >= 1400 and record.caller_network["stalls"] == 0
