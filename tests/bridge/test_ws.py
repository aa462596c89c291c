"""The lean websocket codec and connections (ws_frames, ws_io): RFC 6455 cases byte by byte, and
interop with the ``websockets`` library as the peer on both sides, through uvicorn."""

from __future__ import annotations

import asyncio
import os
import struct
import tracemalloc

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from bridge.protocol import websocket as wsf
from bridge.media import connection as ws_io
from bridge.protocol.websocket import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT, WsProtocolError

from .conftest import until


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """A frame built by hand (the codec under test builds only whole frames)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("masked", [True, False])
def test_whole_frames_of_every_length_form_round_trip(size, masked):
    data = os.urandom(size)
    reader = wsf.FrameReader(masked=masked)
    assert reader.feed(wsf.encode(OP_BINARY, data, mask=masked)) == [(OP_BINARY, data)]
    text = ("é" * size)[:size]
    assert reader.feed(wsf.encode(OP_TEXT, text.encode(), mask=masked)) == [(OP_TEXT, text)]


def test_fragments_join_around_a_control_frame_whatever_the_chunking():
    stream = (
        frame(OP_TEXT, "héllo ".encode()[:3], fin=False)
        + frame(OP_PING, b"p1")
        + frame(OP_CONTINUATION, "héllo ".encode()[3:], fin=False)
        + frame(OP_CONTINUATION, b"world")
        + frame(OP_BINARY, b"\x00\x01")
        + frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    expected = [(OP_PING, b"p1"), (OP_TEXT, "héllo world"), (OP_BINARY, b"\x00\x01"), (OP_CLOSE, (1000, "bye"))]
    assert wsf.FrameReader(masked=True).feed(stream) == expected
    reader, events = wsf.FrameReader(masked=True), []
    for i in range(len(stream)):  # one byte at a time
        events += reader.feed(stream[i : i + 1])
    assert events == expected


def test_a_message_in_many_fragments_holds_its_payload_and_nothing_per_fragment():
    """Was: each fragment kept as its own object, an empty one counted as nothing: a peer sending
    a million 1-byte fragments made the reader hold 42 MB for 1 MB of message (about 180 MB at
    the 4 MiB cap), and empty ones grew it for ever."""
    reader = wsf.FrameReader(masked=True)
    assert reader.feed(frame(OP_BINARY, b"", fin=False)) == []
    pieces = (frame(OP_CONTINUATION, b"x", fin=False) + frame(OP_CONTINUATION, b"", fin=False)) * 5000
    tracemalloc.start()
    try:
        for _ in range(20):
            assert reader.feed(pieces) == []
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, held  # 100 kB of payload (was about 5 MB)
    assert reader.feed(frame(OP_CONTINUATION, b"y")) == [(OP_BINARY, b"x" * 100_000 + b"y")]


@pytest.mark.parametrize(
    "data, code",
    [
        (frame(OP_TEXT, b"x", mask=False), 1002),  # a client frame must be masked
        (frame(OP_TEXT, b"x", rsv=0x40), 1002),  # no extension negotiated
        (frame(0x3, b"x"), 1002),  # reserved opcode
        (frame(OP_PING, b"x" * 126), 1002),  # control frame too long
        (frame(OP_PING, b"x", fin=False), 1002),  # fragmented control frame
        (frame(OP_CONTINUATION, b"x"), 1002),  # nothing to continue
        (frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002),  # new message inside one
        (frame(OP_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (frame(OP_CLOSE, b"\x03"), 1002),  # 1-byte close payload
        (frame(OP_CLOSE, struct.pack("!H", 1006)), 1002),  # a code that must not be sent
        (frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),  # reason not UTF-8
        (frame(OP_BINARY, b"x" * 2000), 1009),  # over max_message
        (frame(OP_BINARY, b"x" * 600, fin=False) + frame(OP_CONTINUATION, b"x" * 600), 1009),
    ],
    ids=[  # (the frames' masks are random: named ids, the same in every process that collects them)
        "unmasked", "rsv", "reserved-opcode", "long-control", "fragmented-control", "lone-continuation",
        "message-in-message", "text-not-utf8", "close-1-byte", "close-1006", "close-reason-not-utf8",
        "too-big", "too-big-in-fragments",
    ],
)
def test_protocol_violations_raise_with_the_close_code_to_send(data, code):
    with pytest.raises(WsProtocolError) as e:
        wsf.FrameReader(masked=True, max_message=1024).feed(data)
    assert e.value.code == code


def test_a_server_frame_must_not_be_masked_and_close_codes_parse():
    with pytest.raises(WsProtocolError):
        wsf.FrameReader(masked=False).feed(frame(OP_TEXT, b"x", mask=True))
    reader = wsf.FrameReader(masked=False)
    assert reader.feed(frame(OP_CLOSE, b"", mask=False)) == [(OP_CLOSE, (wsf.NO_STATUS, ""))]
    assert reader.feed(frame(OP_CLOSE, struct.pack("!H", 4000), mask=False)) == [(OP_CLOSE, (4000, ""))]
    assert wsf.parse_close(wsf.close_payload(1011, "agent crashed")) == (1011, "agent crashed")


def test_masking_keys_differ_from_frame_to_frame():
    keys = {wsf.encode(OP_BINARY, b"\x00" * 8, mask=True)[2:6] for _ in range(2000)}
    assert len(keys) > 1990  # random 32-bit keys: a repeat in 2000 is rare, many would be a bug


# --- interop with the websockets library ---------------------------------------------------


@pytest.fixture
async def websockets_echo():
    """A websockets server: echoes messages; ``/close4001`` closes with 4001 after one message;
    ``/ping`` pings the client and reports the round trip."""

    async def handler(ws):
        if ws.request.path == "/close4001":
            await ws.recv()
            await ws.close(4001, "policy says bye")
            return
        if ws.request.path == "/ping":
            latency = await (await ws.ping())
            await ws.send(f"pong after {latency}")
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(handler, "127.0.0.1", 0, max_size=2**22) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _next(conn: ws_io.WsConnection):
    return await asyncio.wait_for(conn.recv(), 5)


async def test_the_client_talks_to_a_websockets_server(websockets_echo):
    conn = await ws_io.connect(f"{websockets_echo}/echo?x=1")
    conn.send_text("hello ✓")
    assert await _next(conn) == "hello ✓"
    big = os.urandom(1 << 20)
    conn.send_binary(big)
    assert await _next(conn) == big
    conn.send_many([conn.frame_text("a"), conn.frame_binary(b"b")])
    assert [await _next(conn), await _next(conn)] == ["a", b"b"]
    await conn.close(1000, "done")
    assert conn.closed or conn.close_code == 1000


async def test_the_client_sees_the_server_s_close_code_and_answers_pings(websockets_echo):
    conn = await ws_io.connect(f"{websockets_echo}/close4001")
    closed = asyncio.Event()
    conn.listen(lambda m: None, closed.set)
    conn.send_binary(b"x")
    await asyncio.wait_for(closed.wait(), 5)
    assert (conn.close_code, conn.close_reason, conn.protocol_error) == (4001, "policy says bye", None)
    await conn.close()
    pinged = await ws_io.connect(f"{websockets_echo}/ping")
    assert (await _next(pinged)).startswith("pong after")  # our pong answered its ping
    pinged.ping()
    await until(lambda: pinged.latency, timeout=10)
    assert pinged.latency > 0 and pinged.ping_outstanding_s == 0
    await pinged.close()


async def test_connect_fails_cleanly_on_a_refusal_or_a_bad_url(websockets_echo):
    with pytest.raises(ValueError):
        await ws_io.connect("http://127.0.0.1:1/x")
    with pytest.raises(OSError):
        await ws_io.connect("ws://127.0.0.1:1/x")
    http_only = await asyncio.start_server(
        lambda r, w: (w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"), w.close()), "127.0.0.1", 0
    )
    port = http_only.sockets[0].getsockname()[1]
    with pytest.raises(ws_io.HandshakeError, match="404"):
        await ws_io.connect(f"ws://127.0.0.1:{port}/x")
    http_only.close()


@pytest.fixture
async def lean_server():
    """uvicorn with the bridge's UpgradeProtocol: ``/lean`` is served by ws_io (echo; a message
    "refuse" is never reached: ``/refuse`` answers 403), ``/asgi`` by the ASGI app."""
    seen: list[ws_io.ServerConnection] = []

    async def lean(conn: ws_io.ServerConnection) -> None:
        seen.append(conn)
        conn.accept()
        done = asyncio.Event()

        def on_message(message):
            (conn.send_text if type(message) is str else conn.send_binary)(message)

        conn.listen(on_message, done.set)
        await done.wait()
        await conn.close()

    async def refuse(conn: ws_io.ServerConnection) -> None:
        conn.refuse(403)

    async def asgi(websocket):
        await websocket.accept()
        await websocket.send_text("from the ASGI app " + await websocket.receive_text())
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/asgi", asgi)])
    protocol = ws_io.UpgradeProtocol.with_routes({"/lean": lean, "/refuse": refuse})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, ws=protocol, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"ws://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", seen
    server.should_exit = True
    await task


async def test_a_websockets_client_talks_to_the_lean_server(lean_server):
    base, seen = lean_server
    async with websockets.connect(f"{base}/lean?q=1", additional_headers={"X-Test": "yes"}, max_size=2**22) as ws:
        await ws.send(["frag", "mented"])  # a fragmented message
        assert await ws.recv() == "fragmented"
        big = os.urandom(300_000)
        await ws.send(big)
        assert await ws.recv() == big
        await ws.ping()  # answered by the codec
    assert seen[0].path == "/lean" and seen[0].query == "q=1" and seen[0].headers["x-test"] == "yes"
    async with websockets.connect(f"{base}/asgi") as ws:  # another path: uvicorn's own websockets
        await ws.send("hi")
        assert await ws.recv() == "from the ASGI app hi"
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(f"{base}/refuse")
    assert e.value.response.status_code == 403


async def test_a_peer_breaking_the_protocol_gets_a_1002_close(lean_server):
    base, seen = lean_server
    reader, writer = await asyncio.open_connection(*base.removeprefix("ws://").split(":"))
    writer.write(
        b"GET /lean HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 101 " in head and wsf.accept_key("dGhlIHNhbXBsZSBub25jZQ==").encode() in head
    writer.write(frame(OP_TEXT, b"unmasked", mask=False))
    rest = await asyncio.wait_for(reader.read(), 5)  # then the server drops the connection
    assert wsf.FrameReader(masked=False).feed(rest)[0] == (OP_CLOSE, (1002, "client frames must be masked"))
    assert "masked" in seen[-1].protocol_error
    writer.close()


def test_a_refusal_names_its_status():
    assert wsf.ServerHandshake.refuse(409, "over 16 listeners").startswith(b"HTTP/1.1 409 Conflict\r\n")
    assert wsf.ServerHandshake.refuse(503).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")


async def test_a_bad_upgrade_request_is_answered_with_an_http_error(lean_server):
    base, _ = lean_server
    reader, writer = await asyncio.open_connection(*base.removeprefix("ws://").split(":"))
    writer.write(b"GET /lean HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\r\n")
    head = await asyncio.wait_for(reader.read(), 5)
    assert head.startswith(b"HTTP/1.1 426") and b"Sec-WebSocket-Version: 13" in head
    writer.close()



def test_a_long_close_reason_is_cut_on_a_character_boundary():
    from bridge.protocol.websocket import close_payload

    payload = close_payload(1001, "é" * 100)  # 200 bytes of UTF-8: cut to at most 123, whole characters
    assert len(payload) <= 125 and payload[2:].decode("utf-8") == "é" * 61
