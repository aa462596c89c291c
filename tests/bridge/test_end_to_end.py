"""Calls through the real bridge over loopback sockets: the Twilio simulator as the caller,
the embedded echo agent (both protocols, every rate) as the agent."""

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from bridge.dev.simulator import simulate_call
from bridge.server import BackgroundServer
from bridge.settings import AgentConfig

from .conftest import hung_up_cleanly, AUTH_TOKEN, TRUTH, best_correlation, caller_audio, envelope_ms

SPEECH_MS = TRUTH[0][1] - TRUTH[0][0]
BRIDGE_SETTINGS = dict(agents={
    "web-8000": AgentConfig(agent_id="web-8000", sample_rate=8000),
    "web-16000": AgentConfig(agent_id="web-16000", sample_rate=16000),
    "web-24000": AgentConfig(agent_id="web-24000", sample_rate=24000, default=True),
    "web-44100": AgentConfig(agent_id="web-44100", sample_rate=44100),
    "web-48000": AgentConfig(agent_id="web-48000", sample_rate=48000),
    "web-mulaw-16000": AgentConfig(agent_id="web-mulaw-16000", encoding="mulaw", sample_rate=16000),
    "twilio": AgentConfig(agent_id="twilio", protocol="twilio", encoding="mulaw", sample_rate=8000),
})
AGENTS = BRIDGE_SETTINGS["agents"]


@pytest.mark.parametrize("agent", list(AGENTS))
async def test_the_caller_hears_the_echo_of_what_they_said(bridge, agent):
    said = caller_audio()
    result = await bridge.call(said, agent_id=agent)
    assert result.status_code == 200 and result.protocol_errors == []
    assert result.ended_by == "caller" and result.close_code == 1000
    # one echo, as long as the sentence, after it
    spans = envelope_ms(result.heard)
    assert len(spans) == 1, spans
    start, end = spans[0]
    assert abs((end - start) - SPEECH_MS) <= 60
    assert start >= TRUTH[0][1]
    sentence = said[int(TRUTH[0][0] * 16) : int(TRUTH[0][1] * 16)]
    corr, lag = best_correlation(result.heard, sentence)
    assert corr >= 0.9
    # every mark the bridge (or the twilio-protocol agent) sent came back, in order, once
    assert result.marks_echoed and len(set(result.marks_echoed)) == len(result.marks_echoed)
    record = result.record
    assert record["call_status"] == "ended" and record["disconnection_reason"] == "user_hangup"
    assert record["agent_id"] == agent and record["start_timestamp"] <= record["end_timestamp"]
    assert record["from_number"] == "+15550199999" and record["direction"] == "inbound"


async def test_web_protocol_marks_track_what_was_played(bridge):
    result = await bridge.call(agent_id="web-24000")
    # a mark every 100 ms of agent audio plus one at the end of the burst: ~32 for 3.18 s
    assert 30 <= len(result.marks_echoed) <= 34
    assert result.marks_echoed == [f"m{i}" for i in range(1, len(result.marks_echoed) + 1)]
    assert result.media_received == pytest.approx(SPEECH_MS / 20, abs=3)  # 20 ms media frames


@pytest.mark.parametrize("agent", ["web-24000", "twilio"])
async def test_talking_over_the_agent_clears_its_audio(bridge, agent):
    """Sentence two starts 0.3 s into the echo of sentence one: the agent sends clear, the bridge
    (or the agent itself on the twilio protocol) clears Twilio's queue, then sentence two echoes."""
    result = await bridge.call(caller_audio(first_phrase_only=False), agent_id=agent, tail_ms=1000)
    assert result.clears == 1
    spans = envelope_ms(result.heard)
    # the echo of sentence one is cut short where sentence two began, sentence two is echoed whole
    first, last = spans[0], spans[-1]
    assert first[1] - first[0] < SPEECH_MS - 1000
    assert abs((last[1] - last[0]) - (TRUTH[1][1] - TRUTH[1][0])) <= 80
    if agent == "web-24000":  # the web agent reports both turns in update events
        assert result.record["transcript"].count("Agent:") == 2


async def test_dtmf_reaches_a_web_agent(bridge):
    result = await bridge.call(agent_id="web-16000", dtmf=((1000, "5"), (1500, "9")))
    assert "User: <dtmf 5>\n" in result.record["transcript"]
    assert "User: <dtmf 9>\n" in result.record["transcript"]


@pytest.mark.parametrize("agent", ["web-24000", "twilio"])
async def test_agent_hangup_hangs_up_the_call_without_the_fallback(bridge, agent):
    """The echo agent hangs up on '#': the bridge closes the stream and answers Twilio's
    <Connect action> with a hang-up (the caller does not hear the fallback), with no REST
    request (which a dev machine could not even make), and records agent_hangup."""
    result = await bridge.call(agent_id=agent, dtmf=((600, "#"),))
    assert hung_up_cleanly(result), result.summary()
    assert bridge.fake.requests == []
    assert result.record["disconnection_reason"] == "agent_hangup"
    assert result.record["call_status"] == "ended"


async def test_every_number_goes_to_the_echo_agent_with_no_configuration(start_bridge):
    bridge = await start_bridge()
    assert list(bridge.settings.agents) == ["echo"] and bridge.settings.agents["echo"].sample_rate == 24000
    result = await bridge.call(to_number="+442071838750")
    assert result.record["agent_id"] == "echo" and result.record["disconnection_reason"] == "user_hangup"
    assert best_correlation(result.heard, caller_audio()[8000:50000])[0] >= 0.9


async def test_calls_run_side_by_side(bridge):
    import asyncio

    results = await asyncio.gather(*(bridge.call(agent_id=a) for a in ("web-8000", "web-48000", "twilio")))
    for result in results:
        assert result.record["disconnection_reason"] == "user_hangup"
        assert len(envelope_ms(result.heard)) == 1
    assert len({r.call_id for r in results}) == 3


async def test_the_caller_hears_the_same_at_any_speed(bridge):
    """Playback runs on the caller's clock; only the bridge's and agent's wall-clock time,
    multiplied by the speed, can shift the echo a few frames later."""
    slow = await bridge.call(agent_id="web-16000", speed=2.0)
    fast = await bridge.call(agent_id="web-16000", speed=16.0)
    (s0, s1), (f0, f1) = envelope_ms(slow.heard)[0], envelope_ms(fast.heard)[0]
    # the echo's length is stream time: equal at any speed; its start can only be later when
    # faster (by the processing time x 16, which a loaded machine makes large)
    assert abs((s1 - s0) - (f1 - f0)) <= 40 and 0 <= f0 - s0 <= 1000
    a = np.frombuffer(slow.heard, "<i2")[s0 * 8 : s1 * 8].astype(float)
    b = np.frombuffer(fast.heard, "<i2")[f0 * 8 : f0 * 8 + len(a)].astype(float)
    assert np.corrcoef(a[: len(b)], b[: len(a)])[0, 1] > 0.9


@pytest.mark.parametrize("path", ["/agents/echo/audio-websocket/c1", "/agents/echo-twilio/audio-websocket/c1"])
@pytest.mark.parametrize("key", [None, "forged", "another call's"])
async def test_only_the_bridge_opens_its_echo_agent(bridge, path, key):
    """The echo agent is served on the public port: a socket without the bridge's key for that
    very call is refused, so nobody else can use it as a free audio loop."""
    import websockets
    from websockets.exceptions import InvalidStatus

    from bridge.calls.tokens import internal_key

    if key == "another call's":
        key = internal_key(bridge.settings.twilio_auth_token, "c2")
    url = bridge.base_url.replace("http", "ws") + path + (f"?key={key}" if key else "")
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url)
    assert refused.value.response.status_code == 403
    own = internal_key(bridge.settings.twilio_auth_token, "c1")
    async with websockets.connect(f"{bridge.base_url.replace('http', 'ws')}{path}?key={own}") as ws:
        await ws.send("ping" if "twilio" not in path else '{"event": "connected"}')


async def test_the_simulator_follows_redirects_as_twilio_does(bridge):
    """A user's own webhook answers ``<Redirect>``s (a relative GET, then a POST to the bridge):
    the simulator requests each with Twilio's parameters and signature, and the call runs."""
    validator = RequestValidator(AUTH_TOKEN)
    seen: list[tuple[str, bool]] = []

    async def first(request: Request) -> Response:
        form = dict(await request.form())
        seen.append(("first", validator.validate(str(request.url), form, request.headers["x-twilio-signature"])))
        return Response('<Response><Say>one moment</Say><Redirect method="GET">second?step=2</Redirect></Response>', media_type="application/xml")

    async def second(request: Request) -> Response:
        params = {k: v for k, v in request.query_params.items() if k != "step"}
        signed = validator.validate(str(request.url), {}, request.headers["x-twilio-signature"])
        seen.append(("second", signed and request.query_params["step"] == "2" and params["To"] == "+15550100000"))
        return Response(f"<Response><Redirect>{bridge.base_url}/twilio/voice</Redirect></Response>", media_type="application/xml")

    async def loop(request: Request) -> Response:
        return Response("<Response><Redirect>loop</Redirect></Response>", media_type="application/xml")

    routes = [Route("/hooks/first", first, methods=["POST"]), Route("/hooks/second", second), Route("/hooks/loop", loop, methods=["POST"])]
    async with BackgroundServer(Starlette(routes=routes), lifespan="off") as webhook:
        result = await bridge.call(voice_url=f"{webhook.base_url}/hooks/first")
        assert seen == [("first", True), ("second", True)]
        assert result.redirects == [f"{webhook.base_url}/hooks/second?step=2", f"{bridge.base_url}/twilio/voice"]
        assert result.ended_by == "caller" and result.record["call_status"] == "ended"
        assert best_correlation(result.heard, caller_audio()[int(TRUTH[0][0] * 16) : int(TRUTH[0][1] * 16)])[0] >= 0.9

        endless = await simulate_call(bridge.base_url, AUTH_TOKEN, b"", voice_url=f"{webhook.base_url}/hooks/loop")
        assert endless.call_id is None and endless.protocol_errors == ["more than 10 <Redirect>s in a row"]
        assert len(endless.redirects) == 11
