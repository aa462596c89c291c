"""Live listening (docs/protocol.md, "Listening to a live call"): ``POST
/v2/listen-live-call/{call_id}`` through the official ``retell-sdk`` (strict models), and the
listen-only socket it opens, on real sockets with simulated Twilio calls to the echo agent.

- a listener hears both sides: its caller channel, placed by position, matches what the caller
  said; its agent channel, what the caller heard; it is told how the call ended;
- a token opens one socket, for its own call, before it expires; a private call and a call that
  is not ongoing refuse one;
- a listener that stops reading is dropped (the public log says so) and the call's frames reach
  the caller as they do with no listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import numpy as np
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.listen import shifts_ms, stalled_listener
from bridge.protocol import listen as lf
from bridge.settings import AgentConfig

from .conftest import hung_up_cleanly, api_client, best_correlation, envelope_ms, caller_audio, retell_client, tampered, until, wait_for_end

RATE = 8000
LEAD = bytes(RATE * 2 * 3)  # three seconds of silence before the caller speaks: the listener is in by then


async def _ongoing_call(bridge, pcm: bytes, known: tuple[str, ...] = (), **options) -> tuple[asyncio.Task, str]:
    """A simulated call placed in the background, once it is ongoing: (its task, its call id);
    ``known``: calls already ongoing."""
    options.setdefault("speed", 1.0)
    call = asyncio.create_task(bridge.call(pcm, **options))

    async def ongoing():
        live = [r.call_id for r in (await bridge.store.list(statuses=["ongoing"]))[0] if r.call_id not in known]
        return live[0] if live else None

    return call, await until(ongoing, timeout=10)


async def _listen(url: str, token: str) -> dict:
    """Read a listen socket to its end: {start, frames: [(channel, position, pcm)], texts, code}."""
    heard = {"start": None, "frames": [], "texts": [], "code": None}
    async with websockets.connect(f"{url}?access_token={token}") as ws:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                if isinstance(message, str):
                    event = json.loads(message)
                    if event["event"] == "start":
                        heard["start"] = event
                    else:
                        heard["texts"].append(event)
                else:
                    heard["frames"].append(lf.parse_audio(message))
        heard["code"] = ws.close_code
    return heard


def first_voiced(pcm: bytes, ms: int = 1000) -> bytes:
    """The first ``ms`` of voice in 8 kHz audio (what the caller heard: to find in a listener's)."""
    start, end = envelope_ms(pcm)[0]
    return pcm[start * 16 : min(end, start + ms) * 16]


def _channel(frames, channel: int) -> bytes:
    """One channel of what a listener got, laid out by position (silence where nothing came)."""
    parts = [(p, pcm) for c, p, pcm in frames if c == channel]
    if not parts:
        return b""
    end = max(p + len(pcm) // 2 for p, pcm in parts)
    out = np.zeros(end, "<i2")
    for p, pcm in parts:
        out[p : p + len(pcm) // 2] = np.frombuffer(pcm, "<i2")
    return out.tobytes()


async def _public_log(bridge, call_id: str) -> list[dict]:
    async with api_client(bridge.base_url) as http:
        r = await http.get(f"/v2/public-logs/{call_id}.jsonl")
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


async def _metrics(bridge) -> str:
    async with api_client(bridge.base_url) as http:
        return (await http.get("/metrics")).text


async def test_a_listener_hears_both_sides_of_an_ongoing_call(bridge):
    said = caller_audio()
    async with retell_client(bridge) as sdk:
        # (the SDK's first use imports its resources and models: most of a second with the loop
        # held, which this process's bridge and simulated call share; done before the call)
        assert sdk.call.listen_live
        call, call_id = await _ongoing_call(bridge, LEAD + said)
        grant = await sdk.call.listen_live(call_id)  # the official client's own models parse the answer
    assert grant.room_name == call_id and grant.participant_id.startswith("listener_")
    assert grant.expires_at > time.time() * 1000 and grant.transport == "gateway"
    assert grant.url == f"{bridge.base_url.replace('http', 'ws')}/listen-live/{call_id}"
    heard = await _listen(grant.url, grant.access_token)
    result = await call
    record = await wait_for_end(bridge, call_id)

    start = heard["start"]
    assert {k: v for k, v in start.items() if k != "position"} == {
        "event": "start", "call_id": call_id, "encoding": "s16le", "sample_rate": RATE, "channels": ["caller", "agent"],
    }  # fmt: skip
    first_caller = min(p for c, p, _ in heard["frames"] if c == lf.CALLER)
    assert 0 < start["position"] < len(LEAD) // 2 and abs(first_caller - start["position"]) < RATE // 5, (start, first_caller)
    assert heard["texts"][-1] == {"event": "end", "reason": record.disconnection_reason.value}
    assert heard["code"] == 1000
    caller = _channel(heard["frames"], lf.CALLER)
    peak, _ = best_correlation(caller, said)
    assert peak > 0.95, peak  # the caller's audio, as said (mu-law, decoded)
    agent = _channel(heard["frames"], lf.AGENT)
    peak, _ = best_correlation(agent, first_voiced(result.heard))
    assert peak > 0.9, peak  # what the caller heard from the echo agent
    events = await _public_log(bridge, call_id)
    left = [e for e in events if e["event"] == "listener_left"]
    assert [e["event"] for e in events].count("listener_joined") == 1 and len(left) == 1 and left[0]["at_end"]
    metrics = await _metrics(bridge)
    assert "bridge_listeners 0.0" in metrics and 'bridge_listener_events_total{event="joined"} 1.0' in metrics


async def test_two_listeners_through_the_plain_api_and_the_call_goes_on_when_one_leaves(bridge):
    call, call_id = await _ongoing_call(bridge, caller_audio() * 2)
    async with api_client(bridge.base_url) as http:
        grants = [(await http.post(f"/v2/listen-live-call/{call_id}")).json() for _ in range(2)]
    assert grants[0]["participant_id"] != grants[1]["participant_id"]
    staying = asyncio.create_task(_listen(grants[0]["url"], grants[0]["access_token"]))
    async with websockets.connect(f"{grants[1]['url']}?access_token={grants[1]['access_token']}") as leaving:
        assert json.loads(await leaving.recv())["event"] == "start"
        await leaving.recv()  # some audio, then it leaves
    heard = await staying
    result = await call
    assert result.ended_by == "caller" and heard["code"] == 1000
    record = await wait_for_end(bridge, call_id)
    assert record.disconnection_reason.value == "user_hangup"
    events = await _public_log(bridge, call_id)
    left = [e for e in events if e["event"] == "listener_left"]
    assert [e["event"] for e in events].count("listener_joined") == 2 and [e.get("at_end", False) for e in left] == [False, True]


async def test_a_listener_that_sends_is_closed_and_the_call_goes_on(bridge):
    """A listener sends nothing: a message closes it (1008), and a message it starts in
    fragments is refused as soon as it passes a control frame's size (1009), not held until it
    ends (was: a listener could keep a fragmented message open and the bridge kept every piece)."""
    call, call_id = await _ongoing_call(bridge, caller_audio() * 2)
    async with api_client(bridge.base_url) as http:
        grants = [(await http.post(f"/v2/listen-live-call/{call_id}")).json() for _ in range(2)]

    async def never_ending():
        yield "x" * 200
        await asyncio.sleep(60)  # the message is never finished
        yield "y"

    codes = []
    for grant, message in zip(grants, ["hello", never_ending()]):
        async with websockets.connect(f"{grant['url']}?access_token={grant['access_token']}") as ws:
            sending = asyncio.create_task(ws.send(message))
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            codes.append(ws.close_code)
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    assert codes == [1008, 1009]

    async def both_left() -> bool:  # (a live call's log reaches its file within the writer's wake interval)
        return [e["event"] for e in await _public_log(bridge, call_id)].count("listener_left") == 2

    await until(both_left, timeout=5)
    async with api_client(bridge.base_url) as http:
        assert (await http.post(f"/v2/stop-call/{call_id}")).status_code == 204
    result = await call
    assert hung_up_cleanly(result) and result.protocol_errors == [], result.summary()


async def test_a_token_opens_one_socket_for_its_own_call_before_it_expires(start_bridge):
    bridge = await start_bridge()
    call, call_id = await _ongoing_call(bridge, caller_audio() * 2)
    other, other_id = await _ongoing_call(bridge, caller_audio() * 2, known=(call_id,))
    async with api_client(bridge.base_url) as http:
        grant = (await http.post(f"/v2/listen-live-call/{call_id}")).json()
    url, token = grant["url"], grant["access_token"]

    async def refused(target: str) -> int:
        with pytest.raises(InvalidStatus) as e:
            async with websockets.connect(target):
                pass
        return e.value.response.status_code

    assert await refused(f"{url}?access_token={tampered(token)}") == 403
    assert await refused(url) == 403  # no token
    assert await refused(url.replace(call_id, other_id) + f"?access_token={token}") == 403  # another call's
    async with websockets.connect(f"{url}?access_token={token}") as ws:
        assert json.loads(await ws.recv())["event"] == "start"
        assert await refused(f"{url}?access_token={token}") == 403  # used
    bridge.calls.listen_tokens.ttl_s = 0.2  # (from here on: the grants above had time to be used)
    async with api_client(bridge.base_url) as http:
        late = (await http.post(f"/v2/listen-live-call/{call_id}")).json()
        await asyncio.sleep(0.3)
        assert await refused(f"{url}?access_token={late['access_token']}") == 403  # expired
        for live in (call_id, other_id):
            assert (await http.post(f"/v2/stop-call/{live}")).status_code == 204
    await asyncio.gather(call, other)


async def test_a_private_call_or_one_not_ongoing_refuses_a_listener(start_bridge):
    from retell import ConflictError, NotFoundError, PermissionDeniedError

    agents = {"private": AgentConfig(agent_id="private", opt_out_sensitive_data_storage=True, default=True)}
    bridge = await start_bridge(agents=agents)
    call, call_id = await _ongoing_call(bridge, caller_audio() * 2)
    async with retell_client(bridge) as sdk:
        with pytest.raises(PermissionDeniedError, match="opted out of sensitive data storage"):
            await sdk.call.listen_live(call_id)
        with pytest.raises(NotFoundError):
            await sdk.call.listen_live("no-such-call")
    async with api_client(bridge.base_url) as http:
        await http.post(f"/v2/stop-call/{call_id}")
        await call
        await wait_for_end(bridge, call_id)
    async with retell_client(bridge) as sdk:
        with pytest.raises(ConflictError, match="ended"):
            await sdk.call.listen_live(call_id)
    async with api_client(bridge.base_url) as http:
        registered = await http.post("/v2/register-phone-call", json={"agent_id": "private"})
        assert registered.status_code == 201, registered.text
        r = await http.post(f"/v2/listen-live-call/{registered.json()['call_id']}")
        assert r.status_code == 409 and "registered" in r.json()["message"]
    async with api_client(bridge.base_url, api_key="wrong") as http:
        assert (await http.post(f"/v2/listen-live-call/{call_id}")).status_code == 401


def _shift_ms(a, b) -> float:
    """How far apart two calls' frames reached the caller, each on its own call's clock (ms, at
    worst): the same audio to the same agent gives the same timing, unless something held it."""
    return float(shifts_ms(a, b).max())


async def test_a_listener_that_stops_reading_is_dropped_and_the_call_keeps_its_timing(start_bridge):
    bridge = await start_bridge(listen_max_lag_s=0.5)
    said = caller_audio(first_phrase_only=False)
    baseline = await bridge.call(said, speed=1.0)
    call, call_id = await _ongoing_call(bridge, said)
    async with api_client(bridge.base_url) as http:
        stalled_grant = (await http.post(f"/v2/listen-live-call/{call_id}")).json()
        reading_grant = (await http.post(f"/v2/listen-live-call/{call_id}")).json()
    stalled = await stalled_listener(stalled_grant["url"], stalled_grant["access_token"])
    reading = asyncio.create_task(_listen(reading_grant["url"], reading_grant["access_token"]))
    try:
        result = await call
    finally:
        stalled.close()
    heard = await reading
    record = await wait_for_end(bridge, call_id)
    log = await _public_log(bridge, call_id)
    dropped = [e for e in log if e["event"] == "listener_dropped"]
    assert [e["participant"] for e in dropped] == [stalled_grant["participant_id"]], log
    assert 'bridge_listener_events_total{event="dropped"} 1.0' in await _metrics(bridge)
    assert record.disconnection_reason.value == "user_hangup" and heard["code"] == 1000  # the other listener stayed

    # the call's frames reached the caller as they did with no listener: the same audio, the
    # same number of frames, no stall (timing figures: bench/listen.py)
    shift = _shift_ms(baseline, result)
    print(f"frames: {baseline.media_received} without a listener, {result.media_received} with a stalled one; shift {shift:.1f} ms")
    assert abs(result.media_received - baseline.media_received) <= 0.02 * baseline.media_received
    assert shift < 1000, shift  # (a listener holding the call would hold it for seconds; figures: bench/listen.py)
    peak, _ = best_correlation(result.heard, baseline.heard[: len(baseline.heard) // 4 * 2])
    assert peak > 0.9, peak


class FakeSocket:
    """What ``ListenTap`` writes to, with a settable backlog."""

    def __init__(self, buffered: int = 0):
        self.buffered, self.sent, self.aborted = buffered, [], False

    def frame_binary(self, data: bytes) -> bytes:
        return data

    def frame_text(self, text: str) -> str:
        return text

    def send_many(self, frames) -> None:
        self.sent += frames

    send_text = lambda self, text: self.sent.append(text)  # noqa: E731

    def abort(self) -> None:
        self.aborted = True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


def test_caller_audio_stays_in_order_through_jitter_and_a_stall_and_a_real_gap_is_kept():
    from bridge.media.listen import ListenTap

    events = []
    tap = ListenTap("c", RATE, 2.0, lambda: 0, lambda kind, **d: events.append(kind))
    listener = FakeSocket()
    tap.add(listener, "p")
    frame = bytes(320)  # 20 ms
    arrivals = [i * 160 + (30 if i % 3 else -20) for i in range(20)]  # on time, with jitter
    arrivals += [20 * 160 + 2400] * 16  # a 300 ms stall, then 16 frames at once
    arrivals += [36 * 160 + 2400 + 8000]  # a second of audio that never came: a gap
    for at in arrivals:
        tap.audio(lf.CALLER, frame, at)
    positions = [lf.parse_audio(f)[1] for f in listener.sent if isinstance(f, bytes)]
    assert positions[:20] == [i * 160 for i in range(20)]  # jitter: contiguous
    # after the stall, as the recording has it: the audio resumes where it arrived, in order,
    # never overlapping what came before
    assert positions[20:36] == [20 * 160 + 2400 + i * 160 for i in range(16)]
    assert positions[36] == 36 * 160 + 2400 + 8000  # the missing second stays a gap


def test_a_listener_dropped_mid_frame_costs_the_others_nothing():
    from bridge.media.listen import ListenTap

    tap = ListenTap("c", RATE, 2.0, lambda: 0, lambda kind, **d: None)
    behind, b, c = FakeSocket(buffered=10**6), FakeSocket(), FakeSocket()
    for i, s in enumerate((behind, b, c)):
        tap.add(s, f"p{i}")
    tap.clear(123)
    tap.audio(lf.AGENT, bytes(320), 500)
    assert behind.aborted and [len(s.sent) for s in (b, c)] == [3, 3]  # start, clear, audio
