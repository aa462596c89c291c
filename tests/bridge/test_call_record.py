"""Every call on the record: recording, turn latency, round trip, limits, log, privacy."""

import json

import httpx
import numpy as np
import pytest

from audio import read_wav
from bridge.settings import AgentConfig

from .conftest import hung_up_cleanly, TRUTH, api_client, best_correlation, caller_audio, envelope_ms


async def fetch(bridge, url: str) -> bytes:
    async with api_client() as http:
        r = await http.get(url)
    assert r.status_code == 200, r.text
    return r.content


def stereo(tmp_path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    path = tmp_path / "rec.wav"
    path.write_bytes(data)
    pcm, rate, channels = read_wav(path)
    assert (rate, channels) == (8000, 2)
    frames = np.frombuffer(pcm, "<i2").reshape(-1, 2)
    return frames[:, 0].copy(), frames[:, 1].copy()


async def test_the_recording_holds_both_sides_at_the_right_offsets(start_bridge, tmp_path):
    bridge = await start_bridge()
    said = caller_audio()
    result = await bridge.call(said, speed=1.0, tail_ms=1000)
    record = result.record
    assert record["recording_url"].endswith(f"/v2/recordings/{result.call_id}.wav")
    left, right = stereo(tmp_path, await fetch(bridge, record["recording_url"]))
    # caller left: what the simulator sent, from the start of the stream (within 100 ms: typically 0)
    corr, lag = best_correlation(left.tobytes(), said[: len(said) // 2 * 2])
    assert corr >= 0.95 and abs(lag) <= 800, lag
    # agent right: what the caller heard, where the caller heard it (within 120 ms: typically 20)
    heard = result.heard
    (start, end), = envelope_ms(heard)
    echo = heard[start * 16 : end * 16]
    corr, lag = best_correlation(right.tobytes(), echo)
    assert corr >= 0.95 and abs(lag - start * 8) <= 960, (lag, start * 8)
    # silence where a side did not speak, and the two channels are one length
    assert not right[: int(TRUTH[0][1] * 8)].any()
    assert len(left) == len(right) >= len(said) // 2


async def test_turn_latency_is_what_a_scripted_agent_waited(start_bridge, bad_agent):
    agents = {"slow": AgentConfig(agent_id="slow", url=f"{bad_agent}/scripted/800/{{call_id}}", default=True)}
    bridge = await start_bridge(agents=agents)
    result = await bridge.call(caller_audio(first_phrase_only=False), speed=1.0, tail_ms=1500)
    latency = result.record["e2e_latency"]
    assert latency["num"] == 2
    # the agent waited 800 ms of stream time; our VAD and the agent's may place the turn's end a
    # frame apart, and a loaded machine only adds delay (frames reach the agent later)
    assert 800 - 20 <= latency["p50"] <= 800 + 700, latency
    assert latency["min"] <= latency["p50"] <= latency["max"]
    assert result.record["llm_latency"] is None  # the bridge cannot see inside the agent


async def test_the_agent_link_round_trip_is_measured(start_bridge):
    bridge = await start_bridge(keepalive_interval_s=0.3)
    result = await bridge.call(speed=1.0, tail_ms=500)
    rtt = result.record["llm_websocket_network_rtt_latency"]
    assert rtt["num"] >= 5 and 0 <= rtt["min"] <= rtt["p50"] < 1000  # loopback: ms, even loaded


@pytest.mark.parametrize("limit", ["silence", "duration"])
async def test_limits_end_the_call_at_the_configured_time(start_bridge, limit):
    if limit == "silence":
        agent = AgentConfig(agent_id="a", end_call_after_silence_ms=10000, default=True)
        expected, reason = 10.0, "inactivity"
    else:
        agent = AgentConfig(agent_id="a", max_call_duration_ms=1500, default=True)
        expected, reason = 1.5, "max_duration_reached"
    bridge = await start_bridge(agents={"a": agent})
    result = await bridge.call(bytes(1600), speed=1.0, tail_ms=30000)  # the caller says nothing
    record = result.record
    assert record["disconnection_reason"] == reason and record["call_status"] == "ended"
    # a normal end: Twilio is told to hang up, so the caller never hears the failure message
    assert hung_up_cleanly(result), result.summary()
    # on the stream's own clock (the public log's times), never early and at most a few ticks
    # late; the wall-clock timestamps also include the store's writes
    lines = (await fetch(bridge, record["public_log_url"])).decode().splitlines()
    end = json.loads(lines[-1])
    assert end["event"] == "end" and expected <= end["t_ms"] / 1000 <= expected + 1.0
    lasted = (record["end_timestamp"] - record["start_timestamp"]) / 1000
    assert expected <= lasted <= expected + 3


async def test_the_public_log_tells_the_call_in_json_lines(start_bridge):
    bridge = await start_bridge()
    result = await bridge.call(caller_audio(first_phrase_only=False), dtmf=((300, "7"),), tail_ms=1000)
    lines = (await fetch(bridge, result.record["public_log_url"])).decode().splitlines()
    events = [json.loads(line) for line in lines]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "stream_start" and kinds[1] == "agent_connected" and kinds[-1] == "end"
    assert {"caller_speech_start", "caller_speech_end", "turn", "clear", "dtmf"} <= set(kinds)
    assert events[-1]["reason"] == "user_hangup" and events[-1]["clears"] == 1
    assert events[-1]["frames_from_caller"] > 0 and events[-1]["frames_to_caller"] > 0
    assert all(isinstance(e["t_ms"], float) for e in events)
    times = [e["t_ms"] for e in events]
    assert times == sorted(times), times  # in time order: a turn is logged when it is measured
    (turn, *_) = [e for e in events if e["event"] == "turn"]
    assert 0 < turn["sent_ms"] <= turn["t_ms"]
    woven = result.record["transcript_with_tool_calls"]
    assert woven[0] == {"role": "dtmf", "digit": "7"} and woven[1]["role"] == "user"


async def test_opting_out_leaves_nothing_on_disk(start_bridge, tmp_path):
    agents = {"private": AgentConfig(agent_id="private", opt_out_sensitive_data_storage=True, default=True)}
    data_dir = tmp_path / "private-bridge"
    bridge = await start_bridge(agents=agents, data_dir=data_dir)
    result = await bridge.call(caller_audio(first_phrase_only=False), dtmf=((300, "7"),))
    record = result.record
    for field in ("recording_url", "public_log_url", "transcript", "transcript_object", "transcript_with_tool_calls"):
        assert record[field] is None, field
    assert record["disconnection_reason"] == "user_hangup" and record["e2e_latency"]["num"] >= 1
    files = sorted(p.name for p in data_dir.rglob("*") if p.is_file())
    assert all(name.startswith("bridge.db") for name in files), files  # only the call database
    database = b"".join((data_dir / name).read_bytes() for name in files)
    assert b"of speech" not in database and b"<dtmf" not in database  # no transcript content anywhere
    async with api_client() as http:
        r = await http.get(f"{bridge.base_url}/v2/recordings/{result.call_id}.wav")
    assert r.status_code == 404


async def test_recordings_need_the_api_key(start_bridge):
    bridge = await start_bridge()
    result = await bridge.call()
    async with httpx.AsyncClient() as http:
        assert (await http.get(result.record["recording_url"])).status_code == 401
        assert (await http.get(result.record["public_log_url"])).status_code == 401
