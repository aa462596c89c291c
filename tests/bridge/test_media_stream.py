"""WS /twilio/media: only a registered call with a valid, unused token gets a stream; bad input
from either side ends that call with the right reason and nothing else."""

import asyncio
import base64
import json
import socket
import time

import pytest
import websockets
from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bridge.settings import AgentConfig
from bridge.dev.simulator import parse_twiml

from .conftest import hung_up_cleanly, AUTH_TOKEN, call_status, envelope_ms, tampered, until, wait_for_end
from .test_webhook import PARAMS, post, signed


async def register(bridge) -> tuple[str, dict]:
    r = await post(bridge.base_url)
    url, params, _ = parse_twiml(r.text)
    return url, params


def upgrade_headers(url: str) -> dict:
    return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, {})}


def start_frame(params: dict, stream_sid: str = "MZ" + "0" * 32) -> str:
    return json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
        "start": {"streamSid": stream_sid, "accountSid": PARAMS["AccountSid"], "callSid": PARAMS["CallSid"],
                  "tracks": ["inbound"], "customParameters": params,
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
    })  # fmt: skip


def media_frame(payload: bytes = b"\xff" * 160, stream_sid: str = "MZ" + "0" * 32) -> str:
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"track": "inbound", "payload": base64.b64encode(payload).decode()}})


async def open_stream(url: str, params: dict | None, first: list[str] | None = None):
    ws = await websockets.connect(url, additional_headers=upgrade_headers(url))
    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    for frame in first if first is not None else [start_frame(params)]:
        await ws.send(frame)
    return ws


async def test_behind_a_local_tls_proxy_the_signed_wss_url_is_accepted(start_bridge):
    """ngrok's agent on this machine forwards https as http with X-Forwarded-Proto: https. With no
    public_url set, Twilio signs the wss:// URL the TwiML named, and the upgrade must pass."""
    bridge = await start_bridge()
    https = bridge.base_url.replace("http://", "https://", 1) + "/twilio/voice"
    r = await post(bridge.base_url, headers={**signed(https, PARAMS), "X-Forwarded-Proto": "https"})
    url, params, _ = parse_twiml(r.text)
    assert url.startswith("wss://")
    plain = url.replace("wss://", "ws://", 1)  # where the proxy really connects
    ws = await websockets.connect(plain, additional_headers={**upgrade_headers(url), "X-Forwarded-Proto": "https"})
    await ws.send(start_frame(params))
    await ws.send(json.dumps({"event": "stop", "stop": {}}))
    record = await wait_for_end(bridge, params["call_id"])
    assert record.disconnection_reason.value == "user_hangup"
    with pytest.raises(InvalidStatus):  # without the proxy's header the signed URL does not match
        await websockets.connect(plain, additional_headers=upgrade_headers(url))


async def closed_with(ws) -> int:
    try:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else 1006


async def test_a_used_token_cannot_open_a_second_stream(start_bridge):
    bridge = await start_bridge()
    url, params = await register(bridge)
    first = await open_stream(url, params)
    await until(lambda: call_status(bridge, params["call_id"], "ongoing"))
    second = await open_stream(url, params)
    assert await closed_with(second) == 1008
    record = await bridge.store.get(params["call_id"])
    assert record.call_status.value == "ongoing"  # the real call goes on
    assert any("already connected" in note for note in record.notes)
    await first.send(json.dumps({"event": "stop", "stop": {}}))
    assert (await wait_for_end(bridge, params["call_id"])).disconnection_reason.value == "user_hangup"


@pytest.mark.parametrize(
    "tamper,why",
    [
        (lambda p: {**p, "call_id": "no-such-call"}, None),
        (lambda p: {**p, "token": tampered(p["token"])}, "does not match"),
        (lambda p: {"call_id": p["call_id"]}, "no stream token"),
        (lambda p: {**p, "token": "garbage"}, "malformed"),
    ],
)
async def test_unknown_calls_and_bad_tokens_are_refused_with_1008(start_bridge, tamper, why):
    bridge = await start_bridge()
    url, params = await register(bridge)
    ws = await open_stream(url, tamper(params))
    assert await closed_with(ws) == 1008
    record = await bridge.store.get(params["call_id"])
    assert record.call_status.value == "registered"
    if why:
        assert any(why in note for note in record.notes)


async def test_an_expired_token_is_refused_and_the_call_times_out(start_bridge):
    bridge = await start_bridge(stream_token_ttl_s=0.1, registered_call_timeout_s=0.6)
    url, params = await register(bridge)
    await asyncio.sleep(0.2)  # the token's lifetime (0.1 s) passes
    ws = await open_stream(url, params)
    assert await closed_with(ws) == 1008
    record = await wait_for_end(bridge, params["call_id"], timeout=3)
    assert record.call_status.value == "error"
    assert record.disconnection_reason.value == "registered_call_timeout"
    assert any("expired" in note for note in record.notes)


@pytest.mark.parametrize("first", [["media"], ["binary"], ["not json"], []])
async def test_a_stream_without_start_is_refused_with_1008(start_bridge, first):
    bridge = await start_bridge()
    url, params = await register(bridge)
    frames = {"media": media_frame(), "not json": "{oops"}
    ws = await websockets.connect(url, additional_headers=upgrade_headers(url))
    for kind in first:
        await ws.send(b"\x00\x01" if kind == "binary" else frames[kind])
    if not first:
        await ws.close()
        assert ws.close_code == 1000  # the bridge answered the close handshake
    else:
        assert await closed_with(ws) == 1008
    assert (await bridge.store.get(params["call_id"])).call_status.value == "registered"
    # the refused socket spent nothing: the token still opens the call's real stream
    real = await open_stream(url, params)
    await until(lambda: call_status(bridge, params["call_id"], "ongoing"))
    await real.send(json.dumps({"event": "stop", "stop": {}}))
    assert (await wait_for_end(bridge, params["call_id"])).disconnection_reason.value == "user_hangup"


async def test_a_stream_that_never_sends_start_is_closed_with_1008(start_bridge):
    bridge = await start_bridge(stream_start_timeout_s=0.3)
    url, params = await register(bridge)
    ws = await websockets.connect(url, additional_headers=upgrade_headers(url))
    assert await closed_with(ws) == 1008


async def test_an_agent_s_last_words_are_heard_before_it_hangs_up(start_bridge, bad_agent):
    """The agent sends 3 s of goodbye at once and closes with 1000 straight away: the bridge lets
    Twilio play it all (a last mark) before it closes the stream, and Twilio hangs up."""
    agents = {"bye": AgentConfig(agent_id="bye", url=f"{bad_agent}/goodbye/{{call_id}}", default=True)}
    bridge = await start_bridge(agents=agents)
    result = await bridge.call(agent_id="bye")
    assert result.record["disconnection_reason"] == "agent_hangup" and hung_up_cleanly(result)
    (start, end), = envelope_ms(result.heard)
    assert end - start >= 2900


@pytest.mark.parametrize("signature", [None, "forged"])
async def test_the_upgrade_needs_twilio_s_signature(start_bridge, signature):
    bridge = await start_bridge()
    url, params = await register(bridge)
    headers = {} if signature is None else {"X-Twilio-Signature": "Zm9yZ2Vk"}
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers)
    assert refused.value.response.status_code == 403
    assert (await bridge.store.get(params["call_id"])).call_status.value == "registered"


# --- bad input during a call: the call ends with the right reason, the others go on ----------


async def healthy_call(bridge):
    result = await bridge.call(agent_id="echo")
    assert result.record["disconnection_reason"] == "user_hangup"
    assert len(envelope_ms(result.heard)) == 1
    return result


@pytest.mark.parametrize(
    "garbage,close_code",
    [
        ("{not json", 1007),  # invalid payload
        (json.dumps({"event": "media", "media": {"payload": "***not base64***"}}), 1007),
        (json.dumps({"event": "media"}), 1007),
        (json.dumps(["an", "array"]), 1007),
        (json.dumps({"event": "clear", "streamSid": "MZ" + "0" * 32}), 1008),  # only servers send clear
        (b"\x00\x01binary", 1003),  # unsupported data
    ],
)
async def test_twilio_garbage_ends_only_that_call(start_bridge, garbage, close_code):
    """The close code says what was wrong (never 1011, which says the bridge failed)."""
    bridge = await start_bridge(agents={"echo": AgentConfig(agent_id="echo", default=True)})

    async def bad_call():
        url, params = await register(bridge)
        ws = await open_stream(url, params)
        for _ in range(10):
            await ws.send(media_frame())
        await ws.send(garbage)
        code = await closed_with(ws)
        return code, await wait_for_end(bridge, params["call_id"])

    (code, record), _ = await asyncio.gather(bad_call(), healthy_call(bridge))
    assert code == close_code
    assert record.call_status.value == "error" and record.disconnection_reason.value == "error_frontend_corrupted_payload"
    assert record.end_timestamp >= record.start_timestamp


@pytest.mark.parametrize(
    "how,reason",
    [
        ("abort", "error_twilio"),  # the socket is lost without a stop frame
        ("go quiet", "error_no_audio_received"),  # half-dead: no close, no frames; the watchdog ends it
    ],
)
async def test_a_twilio_socket_that_goes_away(start_bridge, how, reason):
    bridge = await start_bridge(no_audio_timeout_s=0.6)
    url, params = await register(bridge)
    ws = await open_stream(url, params)
    await ws.send(media_frame())
    if how == "abort":
        ws.transport.abort()
    else:
        ws.transport.pause_reading()
    record = await wait_for_end(bridge, params["call_id"])
    assert record.disconnection_reason.value == reason
    ws.transport.abort()


@pytest.mark.parametrize(
    "path,reason",
    [
        ("/garbage", "error_llm_websocket_corrupt_payload"),
        ("/abort", "error_llm_websocket_lost_connection"),
        ("/close1011", "error_llm_websocket_runtime"),
        ("/hangup", "agent_hangup"),
    ],
)
async def test_a_misbehaving_agent_ends_its_call_with_the_matching_reason(start_bridge, bad_agent, path, reason):
    agents = {
        "echo": AgentConfig(agent_id="echo", default=True),
        "bad": AgentConfig(agent_id="bad", url=f"{bad_agent}{path}/{{call_id}}"),
    }
    bridge = await start_bridge(agents=agents)
    bad, _ = await asyncio.gather(bridge.call(agent_id="bad"), healthy_call(bridge))
    assert bad.record["disconnection_reason"] == reason
    if reason == "agent_hangup":
        assert bad.record["call_status"] == "ended" and hung_up_cleanly(bad)
    else:
        assert bad.record["call_status"] == "error"
        assert bad.ended_by == "bridge"  # the bridge's answer to Twilio's <Connect action>: the fallback
        assert bad.after == [f"Say: {bridge.settings.fallback_message}", "Hangup"]


@pytest.mark.parametrize("kind", ["hangs", "refuses"])
async def test_an_agent_that_cannot_be_reached_gives_the_fallback(start_bridge, black_hole, kind):
    url = f"{black_hole}/{{call_id}}" if kind == "hangs" else "ws://127.0.0.1:9/{call_id}"
    agents = {"echo": AgentConfig(agent_id="echo", default=True), "gone": AgentConfig(agent_id="gone", url=url)}
    bridge = await start_bridge(agents=agents, agent_connect_timeout_s=2.0)  # (the healthy call's agent too)
    # (in real time: the caller is still on the line when the bridge gives up on its agent)
    bad, _ = await asyncio.gather(bridge.call(agent_id="gone", speed=1.0), healthy_call(bridge))
    assert bad.record["call_status"] == "error"
    assert bad.record["disconnection_reason"] == "error_llm_websocket_open"
    assert bad.fallback[0].startswith("Say:")


async def test_a_stalled_twilio_socket_ends_its_call_and_stalls_no_other(start_bridge, bad_agent):
    """One call's Twilio side stops reading (a half-dead socket) while its agent floods audio:
    the bridge sees it stop reading (its send buffer stays full) and ends it as error_twilio; another call carries on."""
    agents = {
        "echo": AgentConfig(agent_id="echo", default=True),
        "flood": AgentConfig(agent_id="flood", url=f"{bad_agent}/flood/{{call_id}}"),
    }
    bridge = await start_bridge(agents=agents, send_timeout_s=0.5, no_audio_timeout_s=60)

    async def stalled_call():
        r = await post(bridge.base_url, "/twilio/voice/flood")
        url, params, _ = parse_twiml(r.text)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
        sock.connect((bridge.server.host, bridge.server.port))
        ws = await websockets.connect(url, sock=sock, additional_headers=upgrade_headers(url))
        await ws.send(start_frame(params))
        ws.transport.pause_reading()  # never read again
        # how long the kernel's socket buffers take to fill varies (16 s here unloaded): this is
        # about ending at all, and about the other call not waiting
        record = await wait_for_end(bridge, params["call_id"], timeout=60)
        ws.transport.abort()
        return record

    stalled, _ = await asyncio.gather(stalled_call(), healthy_call(bridge))
    assert stalled.call_status.value == "error"
    assert stalled.disconnection_reason.value == "error_twilio"
    assert "Twilio stopped reading" in stalled.error_detail


async def test_a_bug_in_one_call_s_relay_ends_that_call_as_error_unknown(start_bridge, monkeypatch):
    """An exception inside the per-frame path (here: the session, on the agent's first audio)
    ends that call with error_unknown and the exception named, closes both sockets, and leaves the
    process and the next call alone."""
    from bridge.protocol.session import CallSession

    original = CallSession.from_agent

    def broken(self, message, now=0.0):
        if not getattr(broken, "fired", False):
            broken.fired = True
            raise RuntimeError("boom")
        return original(self, message, now)

    monkeypatch.setattr(CallSession, "from_agent", broken)
    bridge = await start_bridge()
    failed = await bridge.call()
    assert failed.record["call_status"] == "error"
    assert failed.record["disconnection_reason"] == "error_unknown"
    assert "RuntimeError: boom" in (await bridge.store.get(failed.call_id)).error_detail
    assert failed.ended_by == "bridge"
    await healthy_call(bridge)


async def test_a_bug_while_a_call_is_set_up_ends_it_on_the_record(start_bridge, monkeypatch):
    """An exception between the stream's start and the relay (building the session here) ends
    the call as error_unknown, naming the exception: the record never stays ongoing."""
    from bridge.media import relay

    fired = []

    def broken(*args, **kwargs):
        if not fired:
            fired.append(1)
            raise RuntimeError("no session")
        return original(*args, **kwargs)

    original = relay.CallSession
    monkeypatch.setattr(relay, "CallSession", broken)
    bridge = await start_bridge()
    failed = await bridge.call()
    assert failed.ended_by == "bridge"
    record = await wait_for_end(bridge, failed.call_id)
    assert record.disconnection_reason.value == "error_unknown"
    assert record.error_detail == "set-up failed: RuntimeError: no session"
    assert (await bridge.call()).record["disconnection_reason"] == "user_hangup"  # the next call is fine


async def ping_flood(host: str, port: int, url: str, seconds: float, start: str | None = None) -> int:
    """A signed media-stream upgrade (the signature is a fixed HMAC of a fixed URL: one captured
    request is enough), then 125-byte pings as fast as the kernel takes them, never reading the
    pongs. Returns how many bytes the bridge's side took in ``seconds``."""
    from .test_ws import frame

    path = "/" + url.split("/", 3)[3]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing: a small window
    sock.connect((host, port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"X-Twilio-Signature: {upgrade_headers(url)['X-Twilio-Signature']}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:  # the 101 (a client sends no frame before it)
        head += await asyncio.to_thread(sock.recv, 1024)
    assert head.startswith(b"HTTP/1.1 101"), head
    if start is not None:
        sock.sendall(frame(0x1, start.encode()))
    burst = frame(0x9, b"p" * 125) * 512  # 66 kB of pings

    def flood() -> int:  # on a thread: the bridge's loop reads as fast as it can meanwhile
        sock.settimeout(0.05)
        sent, deadline = 0, time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                try:
                    sent += sock.send(burst)
                except TimeoutError:
                    pass
        except ConnectionError:
            pass  # the bridge dropped the socket
        finally:
            sock.close()
        return sent

    return await asyncio.to_thread(flood)


@pytest.mark.parametrize("when", ["before start", "during the call"])
async def test_a_ping_flood_that_never_reads_is_held_to_a_bounded_amount(start_bridge, when):
    """Before, one such socket took the server from 279 to 745 MiB in 10 s: every ping was
    answered into a buffer the peer never drained, and reading went on. Now reading stops while
    the peer does not read, only the latest ping is answered, and the socket is dropped in the
    end; a healthy call beside it is untouched."""
    bridge = await start_bridge(stream_start_timeout_s=3)
    url, params = await register(bridge)
    start = start_frame(params) if when == "during the call" else None
    flood = asyncio.create_task(ping_flood(bridge.server.host, bridge.server.port, url, 4.0, start))
    await healthy_call(bridge)
    taken = await flood
    # the kernel's buffers on both sides plus one high-water mark: a few MB, never hundreds
    assert taken < 24 * 1024 * 1024, f"{taken / 2**20:.0f} MiB taken in 4 s"
    if when == "during the call":
        record = await wait_for_end(bridge, params["call_id"], timeout=20)
        assert record.call_status.value == "error"
