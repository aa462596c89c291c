"""Faults around a live call: a clear cuts the recording's agent channel, a recording that cannot
be opened costs only the recording, an agent that stops reading or stops answering pings ends
its call as a lost connection, and a web call's agent hanging up with 1000 is ``agent_hangup``."""

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket

import numpy as np
import websockets
from websockets.exceptions import ConnectionClosed

from audio import read_wav
from bridge.settings import AgentConfig
from tests.audio.signals import tone_pcm

from .conftest import api_client, best_correlation, caller_audio, envelope_ms, retell_client, wait_for_end

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BYTES_PER_MS = 48  # the agents' format: s16le 24 kHz


@contextlib.asynccontextmanager
async def serve_agent(handler):
    """A ``websockets`` agent server running ``handler(ws)``; yields its ws:// base URL."""
    async with websockets.serve(handler, "127.0.0.1", 0, max_size=None) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def raw_agent(reads: bool):
    """A hand-made websocket agent: it answers the upgrade (Sec-WebSocket-Accept =
    base64(sha1(key + GUID))), then never writes again, so it answers no ping. ``reads``: it
    reads and discards everything forever; else it never reads again (its receive window is
    small, so the bridge's sends back up quickly). Yields its ws:// base URL."""
    writers = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head).group(1)
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
        if reads:
            while await reader.read(1 << 16):
                pass
        else:
            writer.transport.pause_reading()
            await asyncio.Event().wait()  # until the server is torn down

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted sockets
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(serve, sock=listener)
    try:
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()


def right_channel(tmp_path, wav: bytes) -> bytes:
    path = tmp_path / "recording.wav"
    path.write_bytes(wav)
    pcm, rate, channels = read_wav(path)
    assert (rate, channels) == (8000, 2)
    return np.frombuffer(pcm, "<i2").reshape(-1, 2)[:, 1].tobytes()


# --- the recording --------------------------------------------------------------------------


async def test_a_clear_cuts_the_agent_channel_of_the_recording_to_what_was_heard(start_bridge, tmp_path):
    """The agent sends 5 s of tone at once (the bridge passes it on to Twilio ahead of
    playback), then ``clear`` after 1 s more of the caller's audio: Twilio threw the rest away,
    and so must the recording. Its agent channel holds the ~1 s the caller heard, where the
    caller heard it."""
    tone_ms, clear_after_ms = 5000, 1000

    async def tone_then_clear(ws):
        heard = None  # caller audio since the tone was sent (bytes): the agent's clock
        async for message in ws:
            if not isinstance(message, bytes):
                continue
            if heard is None:
                await ws.send(tone_pcm(24000, tone_ms))
                heard = 0
                continue
            heard += len(message)
            if heard >= clear_after_ms * BYTES_PER_MS:
                await ws.send("clear")
                break
        async for _ in ws:
            pass

    async with serve_agent(tone_then_clear) as url:
        agents = {"clear": AgentConfig(agent_id="clear", url=f"{url}/{{call_id}}", default=True)}
        bridge = await start_bridge(agents=agents)
        result = await bridge.call(bytes(8000), speed=1.0, tail_ms=3000)  # a silent caller
    assert result.record["disconnection_reason"] == "user_hangup" and result.clears == 1
    async with api_client() as http:
        r = await http.get(result.record["recording_url"])
    assert r.status_code == 200, r.text
    recorded = right_channel(tmp_path, r.content)
    (rec_start, rec_end), = envelope_ms(recorded)
    (heard_start, heard_end), = envelope_ms(result.heard)
    assert 700 <= heard_end - heard_start <= 1500  # the caller heard about what played before the clear
    assert rec_end - rec_start <= 1500 < tone_ms  # far less than what the agent sent
    assert abs((rec_end - rec_start) - (heard_end - heard_start)) <= 200
    assert abs(rec_start - heard_start) <= 200
    corr, _ = best_correlation(recorded, result.heard[heard_start * 16 : heard_end * 16])
    assert corr >= 0.9


async def test_a_recording_that_cannot_be_opened_costs_only_the_recording(start_bridge, tmp_path):
    """``data_dir/recordings`` is a file, not a directory (a full or broken disk): the call goes
    on and ends normally, the caller hears the echo, the public log is still written, and the
    record says there is no recording (no URL, and a note with the reason)."""
    data_dir = tmp_path / "broken-disk"
    data_dir.mkdir()
    (data_dir / "recordings").write_bytes(b"not a directory")
    bridge = await start_bridge(data_dir=data_dir)
    result = await bridge.call()
    record = result.record
    assert record["call_status"] == "ended" and record["disconnection_reason"] == "user_hangup"
    assert result.ended_by == "caller"
    assert len(envelope_ms(result.heard)) == 1  # the echo of the caller's sentence
    assert (data_dir / "recordings").read_bytes() == b"not a directory"
    assert not list(data_dir.rglob("*.wav"))
    assert record["recording_url"] is None and record["public_log_url"]
    async with api_client() as http:
        assert (await http.get(f"{bridge.base_url}/v2/recordings/{result.call_id}.wav")).status_code == 404
        log = await http.get(record["public_log_url"])
    assert log.status_code == 200 and json.loads(log.text.splitlines()[-1])["event"] == "end"
    stored = await bridge.store.get(result.call_id)
    assert any(note.startswith("no recording: ") for note in stored.notes), stored.notes


# --- agent watchdogs --------------------------------------------------------------------------


async def test_an_agent_that_stops_reading_ends_its_call_as_a_lost_connection(start_bridge):
    """The agent accepts, then never reads: the caller's audio the bridge sends it backs up, and
    ``send_timeout_s`` after the bridge's buffer filled the call ends (the caller gets the
    fallback), long before the caller would have hung up. Pings are out of the picture here: the
    ping timeout is longer than the call."""
    async with raw_agent(reads=False) as url:
        agents = {"deaf": AgentConfig(agent_id="deaf", url=f"{url}/{{call_id}}", default=True)}
        bridge = await start_bridge(agents=agents, send_timeout_s=0.5, keepalive_interval_s=60, agent_ping_timeout_s=600)
        # 5 min of the caller's time (19 s at 16x); the kernel's socket buffers (a few MB) fill
        # in about a minute of it, however slow the machine
        call = bridge.call(caller_audio(), speed=16.0, tail_ms=290_000, max_call_s=300)
        result = await asyncio.wait_for(call, 120)
    record = await wait_for_end(bridge, result.call_id)
    assert record.call_status.value == "error"
    assert record.disconnection_reason.value == "error_llm_websocket_lost_connection"
    assert "agent stopped reading for over 0.5 s" in record.error_detail
    assert result.ended_by == "bridge" and result.fallback[0].startswith("Say:")  # not the caller


async def test_an_agent_that_answers_no_ping_ends_its_call_as_a_lost_connection(start_bridge):
    """The agent stays connected and reads everything, but never answers a websocket ping: the
    call ends ``agent_ping_timeout_s`` after the first unanswered ping."""
    async with raw_agent(reads=True) as url:
        agents = {"mute": AgentConfig(agent_id="mute", url=f"{url}/{{call_id}}", default=True)}
        bridge = await start_bridge(agents=agents, keepalive_interval_s=0.2, agent_ping_timeout_s=0.6)
        result = await asyncio.wait_for(bridge.call(caller_audio(), speed=1.0, tail_ms=30_000), 60)
    record = await wait_for_end(bridge, result.call_id)
    assert record.call_status.value == "error"
    assert record.disconnection_reason.value == "error_llm_websocket_lost_connection"
    assert "agent answered no ping for 0.6 s" in record.error_detail
    assert result.ended_by == "bridge" and result.fallback[0].startswith("Say:")
    lasted = (record.end_timestamp - record.start_timestamp) / 1000
    assert 0.6 <= lasted <= 10  # the first ping at 0.2 s + 0.6 s, give or take a loaded machine


# --- web calls ----------------------------------------------------------------------------------


async def test_a_web_call_agent_closing_with_1000_is_an_agent_hangup(start_bridge, bad_agent):
    """The agent closes with 1000 at once: the call is ``agent_hangup`` (not an error) and the
    browser's socket is closed with 1000."""
    agents = {"hangup": AgentConfig(agent_id="hangup", url=f"{bad_agent}/hangup/{{call_id}}", default=True)}
    bridge = await start_bridge(agents=agents)
    async with retell_client(bridge) as sdk:
        call = await sdk.call.create_web_call(agent_id="hangup")
    url = f"{bridge.base_url.replace('http', 'ws')}/web-call/{call.call_id}?access_token={call.access_token}"
    async with websockets.connect(url) as browser:
        try:
            async with asyncio.timeout(10):
                while True:
                    await browser.recv()
        except ConnectionClosed as e:
            closed = e.rcvd
    assert closed is not None and closed.code == 1000
    record = await wait_for_end(bridge, call.call_id, 10)  # written after the sockets close
    assert record.call_status.value == "ended"
    assert record.disconnection_reason.value == "agent_hangup"
