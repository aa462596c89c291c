"""Web calls: the retell-sdk creates them, a browser-side websocket speaks the web protocol."""

import asyncio

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from audio import Resampler
from bridge.settings import AgentConfig

from .conftest import TRUTH, api_client, best_correlation, caller_audio, call_status, retell_client, tampered, until, wait_for_end


def ws_url(bridge, call_id: str, token: str, **query) -> str:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"{bridge.base_url.replace('http', 'ws')}/web-call/{call_id}?access_token={token}{extra}"


async def talk(url: str, pcm: bytes, rate: int, tail_s: float = 5.0, speed: float = 8.0) -> tuple[bytes, list[str]]:
    """Send s16le ``pcm`` in 20 ms frames (``speed`` x real time), then silence; collect audio."""
    heard, texts = bytearray(), []
    step = rate // 50 * 2
    async with websockets.connect(url) as ws:

        async def receive():
            try:
                async for message in ws:
                    if isinstance(message, bytes):
                        heard.extend(message)
                    else:
                        texts.append(message)
            except ConnectionClosed:
                pass

        receiver = asyncio.create_task(receive())
        silence = bytes(step)
        frames = [pcm[i : i + step] for i in range(0, len(pcm), step)] + [silence] * int(tail_s * 50)
        for frame in frames:
            await ws.send(frame)
            await asyncio.sleep(0.02 / speed)
        await ws.close()
        await receiver
    return bytes(heard), texts


async def test_a_browser_talks_to_the_agent_through_a_web_call(bridge, sdk):
    call = await sdk.call.create_web_call(agent_id="echo", metadata={"page": "pricing"})
    assert call.transport == "gateway" and call.ice_servers == [] and call.expires_at > 0
    record = await bridge.store.get(call.call_id)
    assert record.call_type.value == "web_call" and record.metadata == {"page": "pricing"}
    said = Resampler(8000, 24000).process(caller_audio())  # the browser sends the agent's format
    heard, texts = await talk(ws_url(bridge, call.call_id, call.access_token), said, 24000)
    sentence = said[int(TRUTH[0][0] * 48) : int(TRUTH[0][1] * 48)]
    corr, _ = best_correlation(heard, sentence)
    assert corr >= 0.9
    assert any('"event_type":"update"' in t for t in texts)  # the agent's updates reach the browser
    await wait_for_end(bridge, call.call_id)
    r = await sdk.call.retrieve(call.call_id)
    assert r.call_status == "ended" and r.disconnection_reason == "user_hangup"
    assert r.transcript.startswith("User: (")


async def test_the_browser_can_use_another_format(bridge, sdk):
    call = await sdk.call.create_web_call(agent_id="echo")
    said = Resampler(8000, 16000).process(caller_audio())
    heard, _ = await talk(ws_url(bridge, call.call_id, call.access_token, encoding="s16le", sample_rate=16000), said, 16000)
    corr, _ = best_correlation(heard, said[int(TRUTH[0][0] * 32) : int(TRUTH[0][1] * 32)])
    assert corr >= 0.9


async def test_v2_create_web_call_answers_the_web_call_object(bridge):

    async with api_client(bridge.base_url) as http:
        r = await http.post("/v2/create-web-call", json={"agent_id": "echo"})
    body = r.json()
    assert r.status_code == 201 and body["call_type"] == "web_call" and body["access_token"]
    assert body["call_status"] == "registered" and body["direction"] is None


@pytest.mark.parametrize("problem", ["used", "forged", "expired", "other call", "bad format", "odd rate"])
async def test_access_tokens_are_single_use_and_expire(start_bridge, problem):
    bridge = await start_bridge(web_call_token_ttl_s=0.3 if problem == "expired" else 30)  # (the others must not expire)
    async with retell_client(bridge) as sdk:
        call = await sdk.call.create_web_call(agent_id="echo")
        other = await sdk.call.create_web_call(agent_id="echo")
    url = ws_url(bridge, call.call_id, call.access_token)
    if problem == "used":
        first = await websockets.connect(url)
        await until(lambda: call_status(bridge, call.call_id, "ongoing"))
    elif problem == "forged":
        url = ws_url(bridge, call.call_id, tampered(call.access_token))
    elif problem == "expired":
        await asyncio.sleep(0.5)  # the token's lifetime (0.3 s) passes
    elif problem == "other call":
        url = ws_url(bridge, call.call_id, other.access_token)
    elif problem == "odd rate":  # a rate whose filters would take the loop a second to design
        url += "&sample_rate=47999"
    else:
        url += "&sample_rate=96000"
    why = {"used": "already connected", "forged": "does not match", "expired": "expired", "other call": "does not match",
           "bad format": "sample_rate", "odd rate": "sample_rate"}[problem]  # fmt: skip
    async with websockets.connect(url) as refused:  # the client is told why, in the close frame
        with pytest.raises(ConnectionClosed):
            await refused.recv()
    assert refused.close_code == 1008 and why in refused.close_reason, (refused.close_code, refused.close_reason)
    record = await bridge.store.get(call.call_id)
    assert any(why in note for note in record.notes), record.notes
    if problem == "used":
        assert record.call_status.value == "ongoing"  # the first socket's call goes on
        await first.close()
    else:
        assert record.call_status.value == "registered"  # a refused token spends nothing


async def test_a_web_call_nobody_joins_ends_as_user_not_joined(start_bridge):
    bridge = await start_bridge(registered_call_timeout_s=0.4)
    async with retell_client(bridge) as sdk:
        call = await sdk.call.create_web_call(agent_id="echo")
        await wait_for_end(bridge, call.call_id)
        r = await sdk.call.retrieve(call.call_id)
    assert r.call_status == "error" and r.disconnection_reason == "error_user_not_joined"


async def test_garbage_from_the_browser_ends_that_call(bridge, sdk):
    call = await sdk.call.create_web_call(agent_id="echo")
    async with websockets.connect(ws_url(bridge, call.call_id, call.access_token)) as ws:
        await ws.send(bytes(960))
        await ws.send("this is not the web protocol")
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    r = await wait_for_end(bridge, call.call_id)  # the record is written after the sockets close
    assert r.disconnection_reason.value == "error_frontend_corrupted_payload"


def _break(kind: str) -> bytes:
    """What a hostile or broken browser sends after the upgrade."""
    import struct

    from .test_ws import frame

    return {
        "unmasked": frame(0x2, bytes(960), mask=False),
        "rsv bits": frame(0x2, bytes(960), rsv=0x40),
        "bad utf-8": frame(0x1, b"\xff\xfe ping"),
        "bad close code": frame(0x8, struct.pack("!H", 999)),
        "oversized length": bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40) + bytes(4),
        "5 MiB message": frame(0x2, bytes(5 << 20)),
    }[kind]


@pytest.mark.parametrize(
    "kind,detail",
    [
        ("unmasked", "broke the websocket protocol"),
        ("rsv bits", "broke the websocket protocol"),
        ("bad utf-8", "not valid UTF-8"),
        ("bad close code", "broke the websocket protocol"),
        ("oversized length", "over 4194304"),
        ("5 MiB message", "over 4194304"),
    ],
)
async def test_a_browser_breaking_the_websocket_protocol_is_a_corrupted_payload(bridge, sdk, kind, detail):
    """Recorded as error_frontend_corrupted_payload naming what was wrong (not user_hangup), with
    the media stream's 4 MiB message cap."""
    import base64
    import os

    call = await sdk.call.create_web_call(agent_id="echo")
    reader, writer = await asyncio.open_connection(bridge.server.host, bridge.server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /web-call/{call.call_id}?access_token={call.access_token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    await until(lambda: call_status(bridge, call.call_id, "ongoing"))
    writer.write(_break(kind))
    record = await wait_for_end(bridge, call.call_id, timeout=15)
    writer.close()
    assert record.disconnection_reason.value == "error_frontend_corrupted_payload", record.error_detail
    assert detail in record.error_detail


@pytest.mark.parametrize(
    "limit,reason,expected_s",
    [
        (dict(max_call_duration_ms=1500), "max_duration_reached", 1.5),
        (dict(end_call_after_silence_ms=10000), "inactivity", 10.0),
        ("no audio", "error_no_audio_received", 0.6),
    ],
)
async def test_a_web_call_keeps_the_phone_call_limits(start_bridge, limit, reason, expected_s):
    """A silent browser on an agent with a duration or silence limit, and a browser that sends
    nothing at all, end as a phone call would, at the configured time."""
    agent = AgentConfig(agent_id="a", default=True, **(limit if isinstance(limit, dict) else {}))
    bridge = await start_bridge(agents={"a": agent}, no_audio_timeout_s=0.6 if limit == "no audio" else 10)
    async with retell_client(bridge) as sdk:
        call = await sdk.call.create_web_call(agent_id="a")
    async with websockets.connect(ws_url(bridge, call.call_id, call.access_token)) as browser:

        async def talk_silence():
            while limit != "no audio":
                await browser.send(bytes(960))  # 20 ms of silence at 24 kHz
                await asyncio.sleep(0.02)

        sender = asyncio.create_task(talk_silence())
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(expected_s + 15):
                while True:
                    await browser.recv()
        sender.cancel()
    record = await wait_for_end(bridge, call.call_id)
    assert record.disconnection_reason.value == reason, record.error_detail
    lasted = (record.end_timestamp - record.start_timestamp) / 1000
    assert expected_s <= lasted <= expected_s + 3  # never early; a loaded machine may be late


async def test_access_tokens_never_reach_the_logs(bridge, sdk):
    """uvicorn logs every request and websocket with its query string, the bridge logs refused
    sockets: neither a web call's access token (in the query or in the path) nor the echo
    agent's key reaches any log line (INFO and up: the database driver's DEBUG lines show the
    stored record), of a call or of a refused socket."""
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(handler.format(record))
    loggers = [logging.getLogger(name) for name in ("", "uvicorn.access", "uvicorn.error")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        by_query = await sdk.call.create_web_call(agent_id="echo")
        by_path = await sdk.call.create_web_call(agent_id="echo")
        await talk(ws_url(bridge, by_query.call_id, by_query.access_token), bytes(9600), 24000, tail_s=0.5)
        path_url = f"ws://{bridge.server.host}:{bridge.server.port}/web-call/{by_path.access_token}/{by_path.call_id}"
        await talk(path_url, bytes(9600), 24000, tail_s=0.5)
        for url in (path_url, ws_url(bridge, by_query.call_id, by_query.access_token)):  # used: refused, and logged
            async with websockets.connect(url) as refused:
                with pytest.raises(ConnectionClosed):
                    await refused.recv()
        await wait_for_end(bridge, by_query.call_id)
        await wait_for_end(bridge, by_path.call_id)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert any("/agents/echo/" in line and "key=[redacted]" in line for line in lines), lines
    assert sum("web call socket refused" in line for line in lines) >= 2, lines
    for token in (by_query.access_token, by_path.access_token):
        leaks = [line for line in lines if token in line or token.rpartition(".")[2] in line]
        assert not leaks, leaks


async def test_a_browser_that_leaves_while_its_token_is_checked_ends_its_call(bridge, sdk, monkeypatch):
    """The token is spent (the call ongoing) before the socket is accepted: a browser gone by
    then must not leave the call ongoing for ever."""
    import base64
    import os

    call = await sdk.call.create_web_call(agent_id="echo")
    original = bridge.calls.start_call
    browser_gone = asyncio.Event()

    async def slow_start(call_id, public_base, **fields):
        record = await original(call_id, public_base, **fields)
        await browser_gone.wait()  # the database is slow today; the browser tab closes meanwhile
        return record

    monkeypatch.setattr(bridge.calls, "start_call", slow_start)
    reader, writer = await asyncio.open_connection(bridge.server.host, bridge.server.port)
    writer.write(
        f"GET /web-call/{call.call_id}?access_token={call.access_token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await until(lambda: call_status(bridge, call.call_id, "ongoing"))
    writer.transport.abort()
    await asyncio.sleep(0.05)  # (the server reads the abort)
    browser_gone.set()
    record = await wait_for_end(bridge, call.call_id, timeout=10)
    assert record.disconnection_reason.value == "user_hangup" and "left before its socket opened" in record.error_detail
